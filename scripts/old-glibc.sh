#!/usr/bin/env bash
# The packed tarball on an older glibc than this machine's: a Debian 11
# (bullseye: glibc 2.31, libstdc++ of GCC 10) root made with debootstrap from
# Debian's mirror, with no compiler in it, and this machine's node and npm
# copied in (plus any other node binaries given, e.g. Node 20.19.0's official
# one). There it installs the tarball with --ignore-scripts and runs the quick
# start: import, tryLock, a wait that times out, spawnSupervised, require, the
# sanlock helper, npx lockmgr run and status. For comparison it also loads
# build/Release/lockmgr.node (the system compiler's build), which fails there.
#
# Not part of CI (debootstrap fetches ~40 MB and takes minutes); run it by hand
# after changing how the prebuilds are made (docs/performance.md, "Install").
#
# Usage (root): scripts/old-glibc.sh TARBALL [NODE_BINARY...]
#   ROOT=/var/tmp/lockmgr-bullseye (default) is kept and reused; SUITE=bullseye.
set -euo pipefail
cd "$(dirname "$0")/.."
tarball=$(realpath "$1"); shift
root=${ROOT:-/var/tmp/lockmgr-bullseye}
suite=${SUITE:-bullseye}
command -v debootstrap >/dev/null || { echo "old-glibc: needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }

if [ ! -x "$root/bin/sh" ]; then
  debootstrap --variant=minbase "$suite" "$root" http://deb.debian.org/debian >"$root.debootstrap.log" 2>&1 ||
    { tail -20 "$root.debootstrap.log" >&2; exit 1; }
fi
mkdir -p "$root/usr/local/lib/node_modules" "$root/usr/local/bin" "$root/etc/ssl/certs" "$root/work"
cp /usr/bin/node "$root/usr/local/bin/node"
rm -rf "$root/usr/local/lib/node_modules/npm"
cp -a "$(dirname "$(realpath "$(command -v npm)")")/.." "$root/usr/local/lib/node_modules/npm"
ln -sf ../lib/node_modules/npm/bin/npm-cli.js "$root/usr/local/bin/npm"
ln -sf ../lib/node_modules/npm/bin/npx-cli.js "$root/usr/local/bin/npx"
cp /etc/resolv.conf "$root/etc/resolv.conf"
# The registry may be reached through a proxy with its own CA.
cp "${NODE_EXTRA_CA_CERTS:-/etc/ssl/certs/ca-certificates.crt}" "$root/etc/ssl/certs/ca-certificates.crt"
nodes=(node)
for n in "$@"; do
  name="node-$("$n" --version)"
  cp "$n" "$root/usr/local/bin/$name"
  nodes+=("$name")
done
cp "$tarball" "$root/work/lockmgr.tgz"
cp build/Release/lockmgr.node "$root/work/system-compiler-build.node" 2>/dev/null || true

mount -t proc proc "$root/proc"
mount --bind /dev "$root/dev"
trap 'umount "$root/dev"; umount "$root/proc"' EXIT

chroot "$root" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt \
  NODES="${nodes[*]}" /bin/bash -euo pipefail -c '
  echo "old-glibc: $(ldd --version | head -1), Debian $(cat /etc/debian_version)"
  for t in cc gcc g++ make python3; do if command -v $t >/dev/null; then echo "old-glibc: $t is here" >&2; exit 1; fi; done
  rm -rf /work/app && mkdir /work/app && cd /work/app
  echo "{\"name\":\"app\",\"version\":\"1.0.0\",\"private\":true,\"type\":\"module\"}" >package.json
  npm install /work/lockmgr.tgz --ignore-scripts --no-audit --no-fund --loglevel=error
  truncate -s 1M /work/disk.img
  cat >quick-start.mjs <<EOF
import { openLockable, spawnSupervised } from "lockmgr";
const { addonPath } = await import("./node_modules/lockmgr/dist/os/native.js");
const { execHelperPath } = await import("./node_modules/lockmgr/dist/lockspaces/sanlock-client.js");
const a = openLockable("/work/disk.img"), b = openLockable("/work/disk.img");
const r = { node: process.version, first: a.tryLock("exclusive"), second: b.tryLock("exclusive") };
try { await b.lock("exclusive", undefined, { timeout: 50 }); r.wait = "locked"; } catch (e) { r.wait = e.name; }
a.close(); await b.lock("exclusive", undefined, { timeout: 60000 }); r.afterClose = true; b.close();
r.exited = await spawnSupervised(process.execPath, ["-e", "process.exit(3)"]).exited;
r.addon = addonPath; r.helper = execHelperPath();
const ok = r.first && !r.second && r.wait === "LockTimeoutError" && r.exited.code === 3 && r.addon.includes("/prebuilds/");
console.log(JSON.stringify(r));
if (!ok) process.exit(1);
EOF
  for n in $NODES; do
    $n quick-start.mjs
    $n -e "const m = require(\"lockmgr\"); const f = m.openLockable(\"/work/disk.img\"); if (!f.tryLock(\"shared\")) process.exit(1); console.log(\"require: ok on \" + process.version)"
  done
  set +e; node_modules/lockmgr/prebuilds/linux-x64/lockmgr-sanlock-exec 2>/dev/null; rc=$?; set -e
  [ $rc = 2 ] && echo "helper: runs (usage, exit 2)" || { echo "helper: exit $rc" >&2; exit 1; }
  npx lockmgr run --exclusive /work/disk.img -- true
  npx lockmgr run --exclusive /work/disk.img -- npx lockmgr status --json /work/disk.img | grep -q "\"state\": \"exclusive\""
  npx lockmgr status --json /work/disk.img | grep -q "\"state\": \"free\""
  echo "npx lockmgr run/status: ok"
  if [ -f /work/system-compiler-build.node ]; then
    node -e "require(\"/work/system-compiler-build.node\")" 2>&1 | grep -m1 -o "version .GLIBC[^ ]* not found" | sed "s/^/build\/Release (system compiler): /" || true
  fi
  echo "old-glibc: passed"
'

#!/usr/bin/env bash
# npm run test:valgrind: valgrind memcheck over scripts/valgrind-drive.mjs, which
# drives every native entry point of the addon (the build npm test uses,
# build/Release) through dist/ (docs/reliability.md, "Native hygiene").
#
# Fails on any memcheck error (invalid read/write, use of uninitialised
# values, bad free, fd misuse...) and on any definitely lost block, with
# test/valgrind.supp applied (Node/V8 noise, each entry says why), and on a
# driver that did not finish. Prints the figures; the full report is in
# build-valgrind/memcheck.log.
#
# node --jitless: V8's interpreter only. Valgrind copes with JIT code only when
# told to re-check every store for code changes (--smc-check=all), which costs
# several times more; no native code of ours is affected either way.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v valgrind >/dev/null; then
  echo "valgrind: not installed (Debian: apt-get install valgrind)" >&2
  exit 1
fi
if [ -f /usr/include/node/node_api.h ]; then export npm_config_nodedir=${npm_config_nodedir:-/usr}; fi
# The addon and dist/ as npm test builds them.
if [ ! -f build/Makefile ]; then npx --no-install node-gyp configure >/dev/null 2>&1; fi
npx --no-install node-gyp build >/dev/null 2>&1 || npx --no-install node-gyp build
npm run --silent build:ts

out=build-valgrind
mkdir -p "$out"
log="$out/memcheck.log"
rm -f "$log"
start=$(date +%s)
status=0
# A hang fails rather than blocks: killed after VALGRIND_TIMEOUT seconds.
timeout -s KILL "${VALGRIND_TIMEOUT:-900}" valgrind --tool=memcheck --leak-check=full --show-leak-kinds=definite --errors-for-leak-kinds=definite \
  --track-fds=no --num-callers=40 --error-exitcode=99 --suppressions=test/valgrind.supp \
  --trace-children=no --log-file="$log" \
  node --jitless scripts/valgrind-drive.mjs >"$out/drive.out" || status=$?
secs=$(( $(date +%s) - start ))

errors=$(sed -n 's/.*ERROR SUMMARY: \([0-9,]*\) errors.*/\1/p' "$log" | tail -1 | tr -d ,)
suppressed=$(sed -n 's/.*ERROR SUMMARY: .*(suppressed: \([0-9,]*\) from.*/\1/p' "$log" | tail -1 | tr -d ,)
definite=$(sed -n 's/.*definitely lost: \([0-9,]*\) bytes in \([0-9,]*\) blocks.*/\1 bytes in \2 blocks/p' "$log" | tail -1)
indirect=$(sed -n 's/.*indirectly lost: \([0-9,]*\) bytes in \([0-9,]*\) blocks.*/\1 bytes in \2 blocks/p' "$log" | tail -1)
possible=$(sed -n 's/.*possibly lost: \([0-9,]*\) bytes in \([0-9,]*\) blocks.*/\1 bytes in \2 blocks/p' "$log" | tail -1)
ours=$(grep -c 'lockmgr\.node' "$log" || true)
echo "valgrind memcheck ($(valgrind --version), ${secs}s): errors ${errors:-?} (suppressed ${suppressed:-?});" \
  "definitely lost ${definite:-?}; indirectly lost ${indirect:-?}; possibly lost ${possible:-?};" \
  "frames of lockmgr.node in reports: $ours"
if ! grep -q '"ok":true' "$out/drive.out"; then
  echo "valgrind: the driver did not finish:" >&2
  cat "$out/drive.out" >&2
  status=1
fi
if [ "$status" != 0 ] || [ "${errors:-1}" != 0 ]; then
  echo "valgrind: memcheck reported errors or definite leaks; see $log" >&2
  grep -A40 -E '^==[0-9]+== (Invalid|Conditional|Use of|Syscall param|Mismatched|[0-9,]+ bytes in [0-9,]+ blocks are definitely)' "$log" | head -150 >&2 || true
  exit 1
fi
echo "valgrind: clean"

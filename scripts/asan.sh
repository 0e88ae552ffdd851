#!/usr/bin/env bash
# npm run test:asan: the native-facing test suites against an addon built with
# AddressSanitizer + UndefinedBehaviorSanitizer (docs/reliability.md, "Native hygiene").
#
# - The sanitized addon is built from a copy of binding.gyp and native/ in
#   build-asan/, so build/Release (what `npm test` and the package load) is
#   never touched. The copy keeps timestamps: a rebuild is incremental.
# - It is loaded through node-gyp-build's own override, LOCKMGR_PREBUILD=DIR
#   (DIR/build/Release/*.node wins over the package's build/Release): no change
#   to lib/native.ts, and the variable reaches every process that loads the
#   addon (vitest's forked workers, fixtures, CLI children) through the
#   environment, as do LD_PRELOAD and the sanitizer options.
# - Node is not built with ASan, so the runtime has to come first in the
#   process: LD_PRELOAD of the compiler's own libasan and libubsan.
# - Every sanitizer report is fatal (halt_on_error, -fno-sanitize-recover) and
#   is also written to build-asan/logs/*.PID; this script fails if any such
#   log exists after the run, so a report in a child process whose exit status
#   nobody checks still fails the job.
#
# Usage: scripts/asan.sh [vitest args...]   (default: the native-facing suites)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
if [ -f /usr/include/node/node_api.h ]; then export npm_config_nodedir=${npm_config_nodedir:-/usr}; fi

CXX=${CXX:-g++}
asan_rt=$("$CXX" -print-file-name=libasan.so)
ubsan_rt=$("$CXX" -print-file-name=libubsan.so)
for rt in "$asan_rt" "$ubsan_rt"; do
  if [ ! -e "$rt" ]; then
    echo "asan: $CXX has no $(basename "$rt") (Debian: apt-get install g++)" >&2
    exit 1
  fi
done

# --- build --------------------------------------------------------------------
out=build-asan
mkdir -p "$out/native" "$out/logs"
cp -p binding.gyp "$out/"
cp -p native/* "$out/native/"
san=(-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -O1)
(
  cd "$out"
  export CFLAGS="${san[*]}" CXXFLAGS="${san[*]}" LDFLAGS="-fsanitize=address,undefined"
  # Flags are baked into the Makefile at configure time: reconfigure when they change.
  stamp="${CXXFLAGS}"
  if [ ! -f build/Makefile ] || [ "$(cat build/.asan-flags 2>/dev/null)" != "$stamp" ]; then
    npx --no-install node-gyp configure >build.log 2>&1 || { cat build.log >&2; exit 1; }
    echo "$stamp" >build/.asan-flags
  fi
  npx --no-install node-gyp build >build.log 2>&1 || { cat build.log >&2; exit 1; }
)
addon="$out/build/Release/lockmgr.node"
if ! readelf -d "$addon" | grep -q 'libasan'; then
  echo "asan: $addon is not linked against libasan" >&2
  exit 1
fi
# lib/ is loaded from source by vitest, dist/ by the fixtures: both must be current.
npm run --silent build:ts

# --- run ----------------------------------------------------------------------
rm -f "$out"/logs/*
# Not exported to this script's own commands (awk, grep): only the commands
# run through `sanitized` get the runtimes and options.
san_env=(LOCKMGR_PREBUILD="$root/$out" LD_PRELOAD="$asan_rt:$ubsan_rt${LD_PRELOAD:+:$LD_PRELOAD}")
# detect_leaks=0: Node and V8 are not instrumented and free little at exit (and
# SIGKILLed fixtures never exit at all), so LeakSanitizer would report thousands
# of allocations of theirs; its suppressions match any frame of a stack, so a
# rule broad enough to hide them (every stack passes through node) would hide
# ours too. Leaks in our code are valgrind's job: scripts/valgrind.sh.
# handle_segv=0 etc.: V8 installs its own SIGSEGV handler (trap-based bounds
# checks for WebAssembly); ASan's must not take over.
# detect_stack_use_after_return=0: our spawn path runs the child on a stack of
# its own (clone3 + CLONE_VM); ASan's fake stacks do not survive that switch.
asan_options="detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86:handle_segv=0:handle_sigbus=0:handle_sigfpe=0:handle_abort=0:allow_user_segv_handler=1:detect_stack_use_after_return=0:check_initialization_order=1:strict_init_order=1:detect_odr_violation=0:log_path=$root/$out/logs/asan"
ubsan_options="print_stacktrace=1:halt_on_error=1:exitcode=87:log_path=$root/$out/logs/ubsan"

suites=(test/integration/locks.test.ts test/integration/wait.test.ts test/integration/worker.test.ts test/integration/signal.test.ts test/integration/supervise.test.ts
  test/integration/leaks.test.ts test/unit/errors.test.ts test/integration/manager.test.ts test/integration/migration.test.ts test/integration/indirect.test.ts
  test/integration/lockspace.test.ts test/integration/blockdev.test.ts test/system/cli.test.ts test/system/sanlock.test.ts test/integration/exhaustion.test.ts
  test/integration/lock-sync.test.ts)
if [ $# -gt 0 ]; then suites=("$@"); fi

sanitized() { env "${san_env[@]}" ASAN_OPTIONS="$asan_options" UBSAN_OPTIONS="$ubsan_options" "$@"; }

status=0
sanitized npx --no-install vitest run "${suites[@]}" || status=$?

# The preload must have reached the workers: each node process that loaded the
# sanitized addon could not have started without it, and a check in-process
# proves the sanitized build is the one loaded.
sanitized node --input-type=module -e '
  const { createRequire } = await import("node:module");
  const require = createRequire(process.cwd() + "/");
  const path = require("node-gyp-build").resolve(process.cwd());
  if (!path.includes("build-asan")) { console.error("asan: loaded " + path + ", not the sanitized build"); process.exit(1); }
  await import(process.cwd() + "/dist/index.js");
  console.log("asan: sanitized addon " + path);
' || status=1

# LeakSanitizer over scripts/valgrind-drive.mjs (every native entry point,
# spawn and worker teardown included, which valgrind 3.19 cannot run: it lacks
# pidfd_open). Here detect_leaks=1: at exit LSan lists every unfreed block no
# pointer reaches. V8 and Node leave such blocks (worker isolates' remembered
# sets and the like) and are not ours to fix, so the report is not suppressed
# but filtered: a leak fails the job when its allocation was made by our code
# or by N-API on our behalf: the first frame past the allocator (and past
# libstdc++/node-addon-api templates inlined into our code) is in native/*.cc|h
# (lockmgr.node when unsymbolized) or is a napi_* function. Not "any frame":
# V8 allocates its own bookkeeping (remembered sets) during a napi call of
# ours, and that block is V8's. Checked to catch a planted `new int[7]` in
# openFile.
rm -rf "$out/lsan" && mkdir -p "$out/lsan"
lsan_options=${asan_options/detect_leaks=0/detect_leaks=1}
lsan_options=${lsan_options/\/logs\/asan/\/lsan\/lsan}
drive_rc=0
asan_options=$lsan_options sanitized node scripts/valgrind-drive.mjs >"$out/lsan/drive.out" || drive_rc=$?
if ! grep -q '"ok":true' "$out/lsan/drive.out"; then
  # The exit status says how it ended (128+N: killed by signal N), for a run that printed nothing.
  echo "asan: the LeakSanitizer driver did not finish (exit status $drive_rc)" >&2
  cat "$out/lsan/drive.out" >&2
  status=1
fi
lsan_all=$(cat "$out"/lsan/lsan.* 2>/dev/null | grep -cE '^(Direct|Indirect) leak' || true)
lsan_ours=$(cat "$out"/lsan/lsan.* 2>/dev/null | awk '
  function flush() { if (rec != "" && ours) print rec; rec = ""; ours = 0; decided = 0 }
  /^(Direct|Indirect) leak/ { flush(); rec = $0; next }
  /^$/ { flush(); next }
  rec != "" {
    rec = rec "\n" $0
    # The first frame past the allocator and inlined library templates decides.
    if (!decided && $0 ~ /^ *#[0-9]+ / && $0 !~ /libsanitizer|asan_|\/usr\/include\/c\+\+\/|napi-inl\.h/) {
      decided = 1
      if ($0 ~ /lockmgr\.node|[ \/]native\/[a-z_]+\.(cc|h):| in napi_[a-z_]+ /) ours = 1
    }
  }
  END { flush() }' | tee "$out/lsan/ours.txt" | grep -cE '^(Direct|Indirect) leak' || true)
echo "asan: LeakSanitizer over the driver: $lsan_all leak records in all, $lsan_ours allocated by our code (or N-API on its behalf)"
if [ "$lsan_ours" != 0 ]; then
  head -80 "$out/lsan/ours.txt" >&2
  status=1
fi
if grep -l 'ERROR: AddressSanitizer' "$out"/lsan/lsan.* 2>/dev/null; then
  echo "asan: AddressSanitizer error in the driver (above)" >&2
  status=1
fi

shopt -s nullglob
logs=("$out"/logs/*)
if [ ${#logs[@]} -gt 0 ]; then
  echo "asan: ${#logs[@]} sanitizer report(s):" >&2
  for f in "${logs[@]}"; do
    echo "==== $f" >&2
    head -60 "$f" >&2
  done
  status=1
fi
if [ "$status" = 0 ]; then echo "asan: clean (no AddressSanitizer or UndefinedBehaviorSanitizer report)"; fi
exit "$status"

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
  # LOCKMGR_SANITIZER_SELFTEST: the planted faults of the LeakSanitizer self-test
  # (native/ofd.cc), compiled into this build only and dormant unless the
  # variable of that name is set.
  export CFLAGS="${san[*]}" CXXFLAGS="${san[*]} -DLOCKMGR_SANITIZER_SELFTEST" LDFLAGS="-fsanitize=address,undefined"
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
# ours, and that block is V8's.
#
# How the leg ends, told apart (lsan_run, lsan_judge):
# - The driver must reach its end (its JSON line with "ok":true). If it does
#   not, its exit status says how it ended (describe_status) and its stderr is
#   shown: 13 is Node's "unsettled top-level await" (the event loop ran empty
#   while the driver waited for an event; the driver names the wait); 128+N is
#   signal N; 86/87 a sanitizer report; 124 still running after
#   LSAN_DRIVE_TIMEOUT seconds (default 1800; the driver takes about 20 s on an
#   idle 2-core VM, and at most 277 s in 64 runs at load 2-17), stopped as a
#   hang: a limit for a hung driver, never for a slow one.
# - An AddressSanitizer or UBSan report in any of its processes fails it, and
#   so does "LeakSanitizer has encountered a fatal error" (its tracer could not
#   stop the threads: under ptrace, or a seccomp profile): no leak check ran,
#   which is not a pass. None of these is retried.
# - Then the leak filter above.
# Each run gets TMPDIR=$out/lsan/NAME/tmp, removed on every path.
# A self-test then proves the leg still bites: the sanitized build has
# test-only code (LOCKMGR_SANITIZER_SELFTEST, native/ofd.cc) that leaks a
# block, aborts, overflows a heap buffer or overflows an int in openPath; a
# small driver run with each must fail the leg in exactly that way, and run
# with none must pass.
shopt -s nullglob
rm -rf "$out/lsan" && mkdir -p "$out/lsan"
lsan_options=${asan_options/detect_leaks=0/detect_leaks=1}
lsan_timeout=${LSAN_DRIVE_TIMEOUT:-1800}

describe_status() {
  local rc=$1
  case "$rc" in
    0) echo "exit status 0" ;;
    13) echo "exit status 13: Node's unsettled top-level await (the event loop ran empty while the driver waited)" ;;
    86) echo "exit status 86: a sanitizer report (ASAN_OPTIONS exitcode)" ;;
    87) echo "exit status 87: an UndefinedBehaviorSanitizer report" ;;
    124) echo "exit status 124: still running after ${lsan_timeout} s, stopped with SIGTERM (a hang)" ;;
    *) if [ "$rc" -gt 128 ]; then echo "exit status $rc: killed by signal $((rc - 128)) (SIG$(kill -l $((rc - 128)) 2>/dev/null || echo '?'))"
       else echo "exit status $rc"; fi ;;
  esac
}

# lsan_run NAME [VAR=value...] -- CMD...: runs CMD (which loads the sanitized
# addon) with LeakSanitizer on, everything it leaves in $out/lsan/NAME; sets lsan_rc.
lsan_run() {
  local name=$1 d="$out/lsan/$1"
  shift
  local vars=()
  while [ "$1" != "--" ]; do vars+=("$1"); shift; done
  shift
  mkdir -p "$d/tmp"
  lsan_rc=0
  # timeout outside env: the preload and options reach only CMD. The group's
  # 2>/dev/null only silences bash's own "Aborted" notice for a CMD killed by
  # a signal: describe_status says it, and CMD's stderr is in $d/err.
  { timeout -s TERM -k 60 "$lsan_timeout" env "${san_env[@]}" "${vars[@]}" TMPDIR="$root/$d/tmp" \
      ASAN_OPTIONS="${lsan_options/\/logs\/asan/\/lsan\/$name\/lsan}" UBSAN_OPTIONS="${ubsan_options/\/logs\/ubsan/\/lsan\/$name\/ubsan}" \
      "$@" >"$d/out" 2>"$d/err" || lsan_rc=$?; } 2>/dev/null
  rm -rf "$d/tmp"
}

# lsan_judge NAME: prints what the run did; sets lsan_finished (0/1),
# lsan_problems (what failed it, one per line), lsan_all and lsan_ours.
lsan_judge() {
  local name=$1 d="$out/lsan/$1" f
  local logs=("$d"/lsan.*) ulogs=("$d"/ubsan.*)
  lsan_problems=""
  lsan_finished=0
  if grep -q '"ok":true' "$d/out"; then lsan_finished=1; fi
  if [ "$lsan_finished" = 0 ]; then
    lsan_problems+="the driver did not finish: $(describe_status "$lsan_rc")"$'\n'
  elif [ "$lsan_rc" != 0 ] && [ "$lsan_rc" != 86 ]; then
    lsan_problems+="the driver finished, then ended with $(describe_status "$lsan_rc")"$'\n'
  fi
  if [ ${#logs[@]} -gt 0 ]; then
    for f in $(grep -l 'ERROR: AddressSanitizer' "${logs[@]}"); do
      lsan_problems+="AddressSanitizer error ($f): $(grep -m1 '^SUMMARY: AddressSanitizer' "$f" || grep -m1 'ERROR: AddressSanitizer' "$f")"$'\n'
    done
    for f in $(grep -l 'LeakSanitizer has encountered a fatal error' "${logs[@]}"); do
      # Its tracer's own lines (Could not attach to thread..., Tracer caught signal...) and hints.
      lsan_problems+="LeakSanitizer could not run its check ($f): $(cat "$d/err" "$f" | grep -E 'Could not|Tracer|Failed|fatal error|HINT' | sed 's/^==[0-9]*==//' | tr '\n' ' ' || true)"$'\n'
    done
    # Any other sanitizer error (CHECK failed, a DEADLYSIGNAL...): all but the leak reports.
    for f in $(grep -lE '^==[0-9]+==(ERROR|AddressSanitizer: CHECK failed)' "${logs[@]}"); do
      local other
      other=$(grep -E '^==[0-9]+==(ERROR|AddressSanitizer: CHECK failed)' "$f" | grep -vE 'ERROR: (LeakSanitizer: detected memory leaks|AddressSanitizer)' | head -1 || true)
      if [ -n "$other" ]; then lsan_problems+="sanitizer error ($f): $other"$'\n'; fi
    done
  fi
  for f in "${ulogs[@]}"; do
    lsan_problems+="UndefinedBehaviorSanitizer report ($f): $(grep -m1 'runtime error' "$f" || head -1 "$f")"$'\n'
  done
  # In a process that also has ASan, gcc 12's UBSan ignores log_path and
  # reports on stderr only: the driver's, which its children share.
  if grep -q ': runtime error: ' "$d/err"; then
    lsan_problems+="UndefinedBehaviorSanitizer report (stderr): $(grep -m1 ': runtime error: ' "$d/err")"$'\n'
  fi
  lsan_all=0
  lsan_ours=0
  if [ ${#logs[@]} -gt 0 ]; then
    lsan_all=$(cat "${logs[@]}" | grep -cE '^(Direct|Indirect) leak' || true)
    lsan_ours=$(cat "${logs[@]}" | awk '
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
      END { flush() }' | tee "$d/ours.txt" | grep -cE '^(Direct|Indirect) leak' || true)
  fi
  if [ "$lsan_ours" != 0 ]; then lsan_problems+="$lsan_ours leak records allocated by our code (or N-API on its behalf): $d/ours.txt"$'\n'; fi
}

lsan_run drive -- node scripts/valgrind-drive.mjs
lsan_judge drive
echo "asan: LeakSanitizer over the driver: $(describe_status "$lsan_rc"); $lsan_all leak records in all, $lsan_ours allocated by our code (or N-API on its behalf)"
if [ -n "$lsan_problems" ]; then
  printf 'asan: the LeakSanitizer leg failed:\n%s' "$lsan_problems" | sed '2,$s/^/  - /' >&2
  if [ -s "$out/lsan/drive/err" ]; then echo "  the driver's stderr ($out/lsan/drive/err):" >&2; tail -30 "$out/lsan/drive/err" | sed 's/^/    /' >&2; fi
  if [ -s "$out/lsan/drive/out" ]; then echo "  its stdout: $(head -c 400 "$out/lsan/drive/out")" >&2; fi
  if [ "$lsan_ours" != 0 ]; then head -80 "$out/lsan/drive/ours.txt" >&2; fi
  status=1
fi

# Self-test: each planted fault must fail the leg, in its own way.
selftest_js='
  const { mkdtempSync, rmSync, writeFileSync } = await import("node:fs");
  const { join } = await import("node:path");
  const { tmpdir } = await import("node:os");
  const { openLockable } = await import(process.cwd() + "/dist/index.js");
  const dir = mkdtempSync(join(tmpdir(), "lockmgr-lsan-selftest-"));
  writeFileSync(join(dir, "f"), "");
  openLockable(join(dir, "f")).close();
  rmSync(dir, { recursive: true });
  console.log(JSON.stringify({ ok: true }));'
for fault in none leak abort overflow ub; do
  lsan_run "selftest-$fault" LOCKMGR_SANITIZER_SELFTEST="$fault" -- node --input-type=module -e "$selftest_js"
  lsan_judge "selftest-$fault"
  case "$fault" in
    none) want='^$' ;;                                      # the control: the same driver, nothing planted, passes
    leak) want='leak records allocated by our code' ;;
    abort) want='did not finish: exit status 134: killed by signal 6 \(SIGABRT\)' ;;
    overflow) want='AddressSanitizer error .*heap-buffer-overflow .*native/ofd\.cc' ;;
    ub) want='UndefinedBehaviorSanitizer report .*native/ofd\.cc:[0-9:]+ runtime error: signed integer overflow' ;;
  esac
  seen=$(printf '%s' "$lsan_problems" | grep -E "$want" | head -1 || true)
  if { [ "$fault" = none ] && [ -z "$lsan_problems" ]; } || { [ "$fault" != none ] && printf '%s' "$lsan_problems" | grep -qE "$want"; }; then
    echo "asan: LeakSanitizer self-test '$fault': ${seen:-passes, as it must}"
  else
    echo "asan: LeakSanitizer self-test '$fault' did not end as it must (/$want/); it gave: ${lsan_problems:-a pass} ($(describe_status "$lsan_rc"))" >&2
    tail -20 "$out/lsan/selftest-$fault/err" >&2
    status=1
  fi
  if [ -e "$out/lsan/selftest-$fault/tmp" ]; then echo "asan: self-test '$fault' left its temp dir" >&2; status=1; fi
done

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

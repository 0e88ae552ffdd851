// Drives every native entry point of the addon through the built package
// (dist/), for scripts/valgrind.sh: valgrind memcheck runs this one process
// instead of the whole vitest suite (Node under valgrind is 20-50x slower).
//
// Covered, per native function (native/*.cc):
//   openPath statFd reopenFd createFile (plain, create, existing lock file, failing)
//   setlk getlk closeFd retireFd strerror
//   lockSync (free, blocked without a deadline, with one: the per-thread timer)
//   initWaiters waitLock (grant, timeout, abort, close while waiting, batches)
//   cancelWait waiterThreads (and the idle exit of waiter threads)
//   initSpawn spawn (exec, exit codes, failing exec, ENOEXEC -> /bin/sh, pipes,
//   /dev/null, keepFds, cwd, newSession, parentDeathSignal, the fallback)
//   attach sendSignal setRef makePipe openDevNull fdIsOpen spawnInfo
//   worker teardown: a worker with open files, pending waits and running
//   children, terminated (cleanup hooks, pool shutdown, orphan reaper), and a
//   worker that ends by itself.
// Prints one JSON line of what ran; exits non-zero if anything behaved wrongly.
import { spawn as cpSpawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, realpathSync, rmSync, writeFileSync, chmodSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Worker } from 'node:worker_threads';

const dist = new URL('../dist/', import.meta.url);
const { openLockable, spawnSupervised, attachProcess } = await import(new URL('index.js', dist).href);
const { native } = await import(new URL('os/native.js', dist).href);
const { locksOn } = await import(new URL('os/proc-locks.js', dist).href);

// Its real path: a child's cwd is compared with what its `pwd` prints, which is
// the physical path (TMPDIR may go through a symlink).
const dir = realpathSync(mkdtempSync(join(tmpdir(), 'lockmgr-valgrind-')));
const file = join(dir, 'disk.img');
writeFileSync(file, Buffer.alloc(4096));
const ran = {};
// Valgrind 3.19 (Debian 12) does not know F_OFD_SETLKW may block: it runs the
// syscall holding its global lock, with every signal masked. A waiter blocked
// on a lock held in this process would freeze the process for good, and no
// timer signal can interrupt it. So contended waits here block on locks held
// by another process (`holder`, not traced). Natively (and under ASan) the
// holder keeps its locks until the driver releases it, so no outcome here
// depends on how fast the machine is. Under valgrind the frozen driver could
// not release it: there the holder lets go after a while by itself, a
// timeout or abort then ends in a grant instead, and either outcome is
// accepted: semantics are the tests' job, memory is ours.
const underValgrind = (process.env.LD_PRELOAD ?? '').includes('vgpreload');
// The holder runs natively (valgrind's own preloads stripped), or with the
// sanitizer runtimes the sanitized addon it loads needs.
const holderEnv = { ...process.env, LD_PRELOAD: (process.env.LD_PRELOAD ?? '').split(':').filter((p) => p && !p.includes('vgpreload')).join(':') };
// holder(ranges, ms): another process holds exclusive locks on `ranges` of the
// file until release() (which resolves once it has exited); under valgrind, or
// when `selfRelease` (for a driver about to block in lockSync), it also lets go
// by itself after `ms`.
async function holder(ranges, ms, selfRelease = false) {
  const src = `const { openLockable } = await import(${JSON.stringify(new URL('index.js', dist).href)});
    const f = openLockable(${JSON.stringify(file)});
    for (const r of ${JSON.stringify(ranges)}) if (!f.tryLock('exclusive', r)) process.exit(3);
    process.stdin.on('end', () => process.exit(0)).resume();
    console.log('held');
    ${underValgrind || selfRelease ? `setTimeout(() => process.exit(0), ${ms});` : ''}`;
  const child = cpSpawn(process.execPath, ['--input-type=module', '-e', src], { stdio: ['pipe', 'pipe', 'inherit'], env: holderEnv });
  child.stdin.on('error', () => {});  // EPIPE: released after it let go by itself (valgrind)
  // Listening for its exit from the start: an event has no memory for late listeners.
  const exited = until('holder exit', once(child, 'exit'));
  const line = await until('holder: its first line or its exit', Promise.race([once(child.stdout, 'data').then(([d]) => String(d)), exited.then(([code]) => `exit ${code}`)]));
  if (line.trim() !== 'held') throw new Error(`valgrind-drive: holder failed: ${line}`);
  return {
    exited,
    release() {
      child.stdin.end();
      return exited;
    },
  };
}
// Resolves once the kernel lists a waiter blocked on `path` (/proc/locks "->").
async function blockedOn(path) {
  while (!locksOn(path).some((l) => l.blocked)) await sleep(10);
}
// Polls `cond` until it holds: for what has no event to wait for. No time
// limit: how long it takes is no failure (asan.sh and valgrind.sh stop a hang).
async function eventually(what, cond) {
  await until(what, (async () => {
    while (!cond()) await sleep(100);
  })());
}
const WHOLE = { start: 0, length: 0 };
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
let lastCheck = 'none';
function check(cond, what) {
  if (!cond) throw new Error(`valgrind-drive: ${what}`);
  ran[what] = (ran[what] ?? 0) + 1;
  lastCheck = what;
  if (process.env.VALGRIND_DRIVE_TRACE) process.stderr.write(`ok: ${what}\n`);
}
// What the driver is waiting for right now. A promise that nobody settles, with
// nothing left to keep the event loop alive, ends Node with exit code 13
// ("unsettled top-level await") and not a word on stderr: the exit handler
// below says which wait it was and what passed last, and removes the temp dir.
const waiting = new Set();
async function until(what, promise) {
  waiting.add(what);
  try {
    return await promise;
  } finally {
    waiting.delete(what);
  }
}
let finished = false;
process.on('exit', (exitCode) => {
  if (finished) return;
  rmSync(dir, { recursive: true, force: true });
  // For an unsettled top-level await the event says 0 and exitCode says 13.
  const code = exitCode || process.exitCode || 0;
  const why = code === 13 ? ' (Node: the event loop ran empty while the top-level await was unsettled)' : '';
  process.stderr.write(`valgrind-drive: exit ${code}${why} before the end; waiting for: ${[...waiting].join(', ') || 'nothing'}; last check passed: ${lastCheck}\n`);
});
// A hang stopped by asan.sh's time limit (SIGTERM): the exit handler says where.
process.on('SIGTERM', () => process.exit(143));
async function rejects(p, name, what) {
  try {
    await until(what, p);
    if (underValgrind) return check(true, `${what} (granted under valgrind)`);
  } catch (e) {
    check(e.name === name, `${what} (${e.name})`);
    return;
  }
  check(false, `${what}: resolved`);
}

// --- ofd.cc -----------------------------------------------------------------
const a = openLockable(file);
const b = openLockable(file);
const ro = openLockable(file, { access: 'read' });
check(a.tryLock('exclusive'), 'setlk exclusive');
check(!b.tryLock('shared'), 'setlk conflict');
check(b.getConflict('exclusive') !== null, 'getlk conflict');
check(a.getConflict('exclusive') === null, 'getlk none');
a.unlock();
check(b.tryLock('shared', { start: 100, length: 2 }) && ro.tryLock('shared', { start: 100, length: 2 }), 'setlk shared range');
b.unlock();
ro.close();
const created = openLockable(join(dir, 'lockfile'), { create: true });
check(created.created && created.tryLock('exclusive'), 'createFile');
const existing = openLockable(join(dir, 'lockfile'), { create: true });
check(!existing.created && !existing.tryLock('shared'), 'createFile EEXIST, openPath, reopenFd');
existing.close();
created.close();
try {
  openLockable(join(dir, 'missing'));
  check(false, 'openPath ENOENT');
} catch (e) {
  check(e.code !== undefined, 'openPath ENOENT');
}
check(native.strerror(37).length > 0 && native.strerror(116).length > 0, 'strerror');

// --- waiters.cc -------------------------------------------------------------
let held = await holder([WHOLE], 400);
await rejects(b.lock('exclusive', undefined, { timeout: 30 }), 'LockTimeoutError', 'waitLock timeout');
await held.release();
b.unlock();  // granted under valgrind
held = await holder([WHOLE], 400);
const ac = new AbortController();
const aborted = b.lock('shared', undefined, { signal: ac.signal });
setTimeout(() => ac.abort(), 20);
await rejects(aborted, 'AbortError', 'cancelWait abort');
await held.release();
b.unlock();
// A batch: many waiters on distinct bytes, all granted when the holder goes.
// Their timeout is there to run the armed-deadline path to a grant, not to
// bound anything: an hour.
held = await holder(Array.from({ length: 16 }, (_, i) => ({ start: i, length: 1 })), 300);
const many = [];
const files = [];
for (let i = 0; i < 16; i++) {
  const f = openLockable(file);
  files.push(f);
  many.push(f.lock('exclusive', { start: i, length: 1 }, { timeout: 3_600_000 }));
}
check(native.waiterThreads() > 0, 'waiterThreads busy');
const released = held.release();
await until('the batch of 16 waits', Promise.all(many));
check(true, 'waitLock granted batch');
await released;
for (const f of files) f.close();
// close() while a wait is pending: retireFd, then closeFd once the waiter
// reported. Natively close() comes once the waiter is blocked inside fcntl.
held = await holder([WHOLE], 300);
const c = openLockable(file);
const pending = c.lock('exclusive');
if (underValgrind) await sleep(30);
else await until('the waiter blocked in /proc/locks', blockedOn(file));
c.close();
await rejects(pending, 'InvalidStateError', 'retireFd close while waiting');
await held.release();
// lockSync: free (no timer), blocked until the holder lets go (no deadline),
// and with a deadline (the per-thread timer; under valgrind the grant may come first).
b.lockSync('exclusive', { start: 500, length: 1 });
check(true, 'lockSync free');
b.unlock({ start: 500, length: 1 });
held = await holder([WHOLE], 200, true);
b.lockSync('shared');
check(true, 'lockSync waited, no deadline');
b.unlock();
await held.exited;
held = await holder([WHOLE], 200);
try {
  b.lockSync('shared', undefined, { timeout: 30 });
  check(underValgrind, 'lockSync timeout (granted under valgrind)');
} catch (e) {
  check(e.name === 'LockTimeoutError', 'lockSync timeout (LockTimeoutError)');
}
await held.release();
b.unlock();
// The idle waiter threads exit after a second (detached self-exit path).
await eventually('the idle waiter threads to exit', () => native.waiterThreads() === 0);
check(true, 'waiter threads idle exit');

// --- spawn.cc ---------------------------------------------------------------
// Valgrind 3.19 (Debian 12) answers pidfd_open with ENOSYS (and clone3 too):
// every spawn then takes the fallback, which kills and reaps the child it cannot
// watch and throws UnsupportedError. That path is exercised here; the rest of
// spawn.cc runs only where pidfds work (natively, and under ASan + LSan: see
// scripts/asan.sh, which runs this driver too).
let pidfds = true;
try {
  await spawnSupervised('true', [], { stdio: 'ignore' }).exited;
} catch (e) {
  if (!underValgrind || e.cause?.code !== 'ENOSYS') throw e;
  pidfds = false;
  check(e.name === 'UnsupportedError', 'spawn without pidfd_open (UnsupportedError)');
  try { attachProcess(process.pid); } catch (e2) { check(e2.cause?.code === 'ENOSYS', 'attach without pidfd_open'); }
  check(native.fdIsOpen(1) && !native.fdIsOpen(1_000_000), 'fdIsOpen');
}
if (pidfds) {
async function exits(child) {
  return until(`exit of pid ${child.pid}`, child.exited);
}
check((await exits(spawnSupervised('true', [], { stdio: 'ignore' }))).code === 0, 'spawn true');
check((await exits(spawnSupervised('sh', ['-c', 'exit 3'], { stdio: 'ignore' }))).code === 3, 'spawn exit code');
{
  const p = spawnSupervised('sh', ['-c', 'cat; echo out; echo err >&2'], { stdio: 'pipe' });
  p.stdin.end('in\n');
  const chunks = [];
  p.stdout.on('data', (d) => chunks.push(d));
  p.stderr.resume();
  // Listening for 'close' before the exit is seen: the child's end of the pipe
  // closes before its exit is reported (in about a quarter of runs here, the
  // pipe's 'close' is emitted first), and a listener added after the event
  // waits for ever. That ended this driver with exit 13 in CI.
  const closed = until('makePipe: stdout close', once(p.stdout, 'close'));
  await exits(p);
  await closed;
  check(Buffer.concat(chunks).toString() === 'in\nout\n', 'makePipe stdio pipe');
}
{
  // keepFds: the child inherits a locked fd; cwd; newSession; parentDeathSignal.
  const kept = openLockable(file);
  kept.tryLock('shared', { start: 7, length: 1 });
  const st = await exits(spawnSupervised('sh', ['-c', `test -e /proc/self/fd/${kept.fd} && test "$(pwd)" = ${JSON.stringify(dir)}`], {
    stdio: 'ignore', keepFds: [kept.fd], cwd: dir, newSession: true, parentDeathSignal: 'SIGKILL',
  }));
  check(st.code === 0, 'spawn keepFds cwd newSession pdeathsig');
  check(native.fdIsOpen(kept.fd) && !native.fdIsOpen(1_000_000), 'fdIsOpen');
  kept.close();
}
{
  // A failing exec: SpawnError, or (where the child cannot report back, as
  // under valgrind, which turns CLONE_VM|CLONE_VFORK into a fork) exit 127.
  try {
    const st = await exits(spawnSupervised(join(dir, 'no-such-command'), [], { stdio: 'ignore' }));
    check(st.code === 127, 'spawn failing exec');
  } catch (e) {
    check(e.name === 'SpawnError', 'spawn failing exec');
  }
  // ENOEXEC: a text file without #! runs with /bin/sh, as execvp does.
  const script = join(dir, 'script');
  writeFileSync(script, 'exit 5\n');
  chmodSync(script, 0o755);
  check((await exits(spawnSupervised(script, [], { stdio: 'ignore' }))).code === 5, 'spawn ENOEXEC via /bin/sh');
}
{
  // sendSignal, setRef (unref/ref), stop with SIGTERM.
  const p = spawnSupervised('sleep', ['30'], { stdio: 'ignore' });
  p.unref();
  p.ref();
  check(p.signal(0), 'sendSignal 0');
  check((await p.stop({ graceMs: 5000 })).signal === 'SIGTERM', 'sendSignal stop');
  check(p.signal('SIGTERM') === false, 'sendSignal after exit');
}
{
  // The fallback: clone + pidfd_open.
  process.env.LOCKMGR_SPAWN_FALLBACK = '1';
  check((await exits(spawnSupervised('true', [], { stdio: 'ignore' }))).code === 0, 'spawn fallback');
  delete process.env.LOCKMGR_SPAWN_FALLBACK;
}
{
  // attach: pidfd_open on a process that is not our child; its exit is seen, never reaped by us.
  const other = cpSpawn('sleep', ['30'], { stdio: 'ignore' });
  await until('attach: the other child spawned', once(other, 'spawn'));
  const p = attachProcess(other.pid);
  check(p.signal('SIGTERM'), 'attach sendSignal');
  const [st] = await until('attach: exits seen', Promise.all([p.exited, once(other, 'exit')]));
  check(st.code === null, 'attach exit seen');
}
}
const info = native.spawnInfo();
check(info[0] === 0, 'spawnInfo nothing watched');
ran.spawnInfo = info;

// --- workers: environment teardown --------------------------------------------
const workerSource = (mode) => `
  const { parentPort, workerData } = require('node:worker_threads');
  import(${JSON.stringify(new URL('index.js', dist).href)}).then(async (m) => {
    const f = m.openLockable(workerData.file);
    f.tryLock('shared', { start: 50, length: 1 });
    const g = m.openLockable(workerData.file);
    g.lock('exclusive', { start: 60, length: 1 }).catch(() => {});   // blocks: the holder has byte 60
    let orphan = 0;
    if (workerData.pidfds) {
      orphan = m.spawnSupervised('sleep', ['600'], { stdio: 'ignore' }).pid;  // running at teardown: the orphan reaper's
      await m.spawnSupervised('true', [], { stdio: 'ignore' }).exited;
    }
    parentPort.postMessage({ orphan });
    ${mode === 'exit' ? "setTimeout(() => process.exit(0), 50);" : 'setInterval(() => {}, 1000);'}
  });`;
for (const mode of ['terminate', 'exit', 'terminate']) {
  held = await holder([{ start: 60, length: 1 }], 1500);
  const w = new Worker(workerSource(mode), { eval: true, workerData: { file, pidfds } });
  const ended = until('worker exit', once(w, 'exit'));
  const [{ orphan }] = await until(`worker ${mode}: ready`, once(w, 'message'));
  if (mode === 'terminate') await until('worker terminate', w.terminate());
  await ended;
  check(true, `worker ${mode}`);
  if (orphan !== 0) {
    // Its child outlived it: adopted by the orphan reaper, which must reap it
    // once it ends. Killing it by pid is safe: unreaped, the pid is still its.
    check(native.spawnInfo()[1] > 0, 'orphan adopted');
    process.kill(orphan, 'SIGKILL');
    await eventually('the orphan reaper to reap', () => native.spawnInfo()[1] === 0);
    check(true, 'orphans reaped');
  }
  await held.release();
}
// The worker's files were closed by its cleanup hook: nothing of theirs is left.
check(a.getConflict('exclusive', { start: 50, length: 1 }) === null, 'worker cleanup closed its files');
check(native.spawnInfo()[1] === 0, 'no orphans left');
a.close();
b.close();
rmSync(dir, { recursive: true, force: true });
finished = true;
console.log(JSON.stringify({ ok: true, pidfds, ran }));

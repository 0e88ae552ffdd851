// Exhaustion: out of file descriptors (RLIMIT_NOFILE), out of threads and
// processes (RLIMIT_NPROC of a non-root uid), out of POSIX timers
// (RLIMIT_SIGPENDING), and the kernel's lock table. Each limit is lowered in a
// child process (test/fixtures/exhaust.mjs) by prlimit; every operation that
// hits it must fail with ResourceExhaustedError naming the system call,
// nothing may crash, and once the limit is lifted (or the fds freed) the same
// operations must work, with nothing held and nothing left over.
//
// prlimit moves only soft limits, as the child's own uid: the test machines
// run as root without CAP_SYS_RESOURCE, which raising a hard limit, or
// changing another uid's limits, would need.
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { chmodSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openLockable } from '../../lib/index.js';
import { locksOn } from '../../lib/os/proc-locks.js';
import { distUrl, fdCount, isRoot, makeFile, tempDir } from '../helpers.js';

const FIXTURE = fileURLToPath(new URL('../fixtures/exhaust.mjs', import.meta.url));

interface Step {
  label: string;
  ok?: boolean;
  value?: unknown;
  name?: string;
  code?: string;
  cause?: string;
  syscall?: string;
  message?: string;
  fds?: number | null;
  children?: number | null;
}

const have = (tool: string): boolean => spawnSync('sh', ['-c', `command -v ${tool}`]).status === 0;

/**
 * Runs a scenario of the fixture under `wrapper` (prlimit, setpriv, ...), doing
 * the limit changes it asks for; resolves its steps by label. Rejects if the
 * child exits without reporting (a crash).
 */
function runScenario(scenario: string, wrapper: string[], uid?: number): Promise<Map<string, Step>> {
  const tmp = tempDir();
  chmodSync(tmp.dir, 0o777);
  const argv = [...wrapper, process.execPath, FIXTURE, scenario, tmp.dir];
  const child = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'inherit', 'pipe', 'ipc'] });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d));
  return new Promise<Map<string, Step>>((resolve, reject) => {
    let steps: Step[] | undefined;
    child.on('message', (m: { id?: number; limit?: string; done?: Step[] }) => {
      if (m.done) {
        steps = m.done;
        return;
      }
      // As the child's own uid: the only way to touch another uid's limits without CAP_SYS_RESOURCE.
      const as = uid === undefined ? [] : ['setpriv', `--reuid=${uid}`, `--regid=${uid}`, '--clear-groups'];
      const cmd = [...as, 'prlimit', '--pid', String(child.pid), m.limit!];
      try {
        execFileSync(cmd[0]!, cmd.slice(1), { stdio: ['ignore', 'ignore', 'pipe'] });
        child.send({ id: m.id, ok: true });
      } catch (err) {
        child.send({ id: m.id, ok: false, error: (err as Error).message });
      }
    });
    child.on('exit', (code, signal) => {
      tmp.cleanup();
      if (steps !== undefined && code === 0) resolve(new Map(steps.map((s) => [s.label, s])));
      else reject(new Error(`the ${scenario} scenario exited with ${code ?? signal} without reporting: ${stderr}`));
    });
  });
}

function exhausted(step: Step | undefined, cause: string, syscall: string): void {
  expect(step, 'the step ran').toBeDefined();
  expect(step).toMatchObject({ name: 'ResourceExhaustedError', code: 'ERR_RESOURCE_EXHAUSTED', cause, syscall });
  expect(step!.message).toContain(`${cause}: `);
}

function ok(step: Step | undefined, value?: unknown): void {
  expect(step, 'the step ran').toBeDefined();
  expect(step!.message, 'it must not fail').toBeUndefined();
  expect(step!.ok).toBe(true);
  if (value !== undefined) expect(step!.value).toEqual(value);
}

const prlimitMissing = have('prlimit') ? undefined : 'prlimit (util-linux) is missing';
if (prlimitMissing) console.warn(`exhaustion: skipping the RLIMIT cases: ${prlimitMissing}`);

describe.skipIf(prlimitMissing !== undefined)('EMFILE: RLIMIT_NOFILE of 256, every fd taken', () => {
  let steps: Map<string, Step>;
  beforeAll(async () => {
    steps = await runScenario('emfile', ['prlimit', '--nofile=256:256']);
  });
  it('the table really filled up', () => {
    expect(steps.get('filled')).toMatchObject({ code: 'EMFILE' });
  });
  it('openLockable: ResourceExhaustedError (EMFILE, open)', () => exhausted(steps.get('openLockable'), 'EMFILE', 'open'));
  it('LockManager.registerResource: ResourceExhaustedError (EMFILE, open)', () => exhausted(steps.get('registerResource'), 'EMFILE', 'open'));
  it('the manager is still new, with nothing registered', () => ok(steps.get('manager after registerResource'), { state: 'new', resources: 0 }));
  it("spawnSupervised with stdio 'pipe': ResourceExhaustedError (EMFILE, pipe2)", () => exhausted(steps.get('spawnSupervised with stdio pipes'), 'EMFILE', 'pipe2'));
  it('spawnSupervised: ResourceExhaustedError (EMFILE, clone3: no fd for the pidfd)', () => exhausted(steps.get('spawnSupervised (the pidfd of clone3)'), 'EMFILE', 'clone3'));
  it('attachProcess: ResourceExhaustedError (EMFILE, pidfd_open)', () => exhausted(steps.get('attachProcess (pidfd_open)'), 'EMFILE', 'pidfd_open'));
  it('acquireResource while running: ResourceExhaustedError (EMFILE, open), non-fatal', () => exhausted(steps.get('acquireResource while running (non-fatal)'), 'EMFILE', 'open'));
  it('verify() while running: ResourceExhaustedError (EMFILE), not a false lock failure', () => exhausted(steps.get('verify() while running'), 'EMFILE', 'open'));
  it('the running manager runs on, its lease held', () => ok(steps.get('the running manager after all that'), { state: 'running', held: [true] }));
  it('once the fds are freed: fd and child counts are back at the baseline (nothing leaked, no stray child)', () =>
    ok(steps.get('after freeing: fds and children back to the baseline'), { fds: 0, children: 0 }));
  it('once the fds are freed: nothing is held on the disk', () => ok(steps.get('after freeing: nothing held on the disk'), null));
  it('once the fds are freed: openLockable works', () => ok(steps.get('after freeing: openLockable works')));
  it('once the fds are freed: registerResource, start and the exit work', () => ok(steps.get('after freeing: registerResource, start and shutdown work'), 'freed'));
  it('once the fds are freed: verify() sees the lease still held', () => ok(steps.get('after freeing: verify() sees the lease held'), { lost: [] }));
  it('once the fds are freed: hotplug works', () => ok(steps.get('after freeing: hotplug works'), { wasHeld: false }));
  it('at the end: nothing held, no children', () => ok(steps.get('at the end: nothing held, no children'), { disk: null, disk2: null, children: 0 }));
});

// A uid of its own: RLIMIT_NPROC counts every task of the uid on the machine.
const NPROC_UID = 40_000 + (process.pid % 20_000);
const nprocMissing = prlimitMissing ?? (!isRoot ? 'not root (cannot switch to another uid)' : have('setpriv') ? undefined : 'setpriv (util-linux) is missing');
if (nprocMissing) console.warn(`exhaustion: skipping the RLIMIT_NPROC cases: ${nprocMissing}`);

describe.skipIf(nprocMissing !== undefined)(`threads and processes: RLIMIT_NPROC of uid ${NPROC_UID} at its current task count`, () => {
  let steps: Map<string, Step>;
  beforeAll(async () => {
    steps = await runScenario('nproc', ['setpriv', `--reuid=${NPROC_UID}`, `--regid=${NPROC_UID}`, '--clear-groups'], NPROC_UID);
  });
  it('lock() that has to wait: ResourceExhaustedError (EAGAIN, pthread_create: no waiter thread)', () => exhausted(steps.get('lock() that has to wait'), 'EAGAIN', 'pthread_create'));
  it('start() waiting for a busy lease: ResourceExhaustedError (pthread_create)', () => exhausted(steps.get('start() that has to wait for a busy lease'), 'EAGAIN', 'pthread_create'));
  it('that manager is back in state new, holding nothing', () => ok(steps.get('the waiting manager after it'), { state: 'new', held: [false] }));
  it('spawnSupervised: ResourceExhaustedError (EAGAIN, clone3)', () => exhausted(steps.get('spawnSupervised'), 'EAGAIN', 'clone3'));
  it('LockManager.start: ResourceExhaustedError (clone3) after the leases were taken', () => exhausted(steps.get('LockManager.start (spawn fails after the leases were taken)'), 'EAGAIN', 'clone3'));
  it('that manager is back in state new, its lease released', () => ok(steps.get('the manager after it'), { state: 'new', held: [false], disk2: null }));
  it('lifted: a lock() wait works and gets the lock', () => ok(steps.get('lifted: lock() waits and gets the lock once the holder lets go'), 'exclusive'));
  it('lifted: spawnSupervised works', () => ok(steps.get('lifted: spawnSupervised works'), 0));
  it('lifted: LockManager.start works (the same manager)', () => ok(steps.get('lifted: LockManager.start works'), 'stopped'));
  it('at the end: nothing held, no children, no fd left', () => ok(steps.get('at the end: nothing held, no children, no fd'), { disk: null, disk2: null, children: 0, fds: 0 }));
});

describe.skipIf(prlimitMissing !== undefined)('timers: RLIMIT_SIGPENDING 0 (a waiter thread cannot get its POSIX timer)', () => {
  let steps: Map<string, Step>;
  beforeAll(async () => {
    steps = await runScenario('sigpending', []);
  });
  it('lock() with a timeout: ResourceExhaustedError (EAGAIN, timer_create)', () => exhausted(steps.get('lock() with a timeout'), 'EAGAIN', 'timer_create'));
  it('lock() without a timeout: ResourceExhaustedError (timer_create): every waiter needs its timer', () => exhausted(steps.get('lock() without a timeout'), 'EAGAIN', 'timer_create'));
  it('tryLock needs no thread and still works', () => ok(steps.get('tryLock still works'), true));
  it('lifted: waits time out as asked and get the lock once it is free', () =>
    ok(steps.get('lifted: lock() waits, times out as asked, and gets the lock once free'), { timedOut: 'LockTimeoutError', held: 'exclusive' }));
  it('at the end: fds back at the baseline, nothing held', () => ok(steps.get('at the end: fds back, nothing held'), { fds: 0, disk: null }));
});

describe('the lock table', () => {
  // Linux has no fixed table of locks: each is a small kernel allocation,
  // limited only by memory (and a memory cgroup). ENOLCK, "lock table full",
  // is not reachable on a local filesystem; it comes from NFS's lock manager.
  // Its mapping (NoLocksAvailableError) is proven with an fcntl shim in
  // errors.test.ts. What can be proven here: a great many locks are taken
  // without any error, and all go with close().
  let tmp: ReturnType<typeof tempDir>;
  beforeAll(() => {
    tmp = tempDir();
  });
  afterAll(() => tmp.cleanup());

  it('20,000 separate locks on one file are all granted, all listed in the kernel\'s table, and all released by close()', () => {
    const path = makeFile(tmp.dir, 'many.img');
    const fds = fdCount();
    const f = openLockable(path);
    const N = 20_000;
    let granted = 0;
    // Every other byte, alternating modes: no two locks can merge.
    for (let i = 0; i < N; i++) if (f.tryLock(i % 2 === 0 ? 'exclusive' : 'shared', { start: 2 * i, length: 1 })) granted++;
    expect(granted).toBe(N);
    // This open file description's own locks, as the kernel lists them in one
    // go. (/proc/locks is read in chunks of a list every process changes
    // meanwhile, so a count taken there can be off by a few.)
    const ours = readFileSync(`/proc/self/fdinfo/${f.fd}`, 'utf8').split('\n').filter((l) => /^lock:\s+\d+: OFDLCK /.test(l));
    expect(ours).toHaveLength(N);
    expect(ours.filter((l) => / WRITE /.test(l))).toHaveLength(N / 2);
    f.close();
    expect(locksOn(path)).toHaveLength(0);
    expect(fdCount()).toBe(fds);
    const observer = openLockable(path, { access: 'read' });
    expect(observer.getConflict('exclusive')).toBeNull();
    observer.close();
  });

  it.skipIf(prlimitMissing !== undefined)('RLIMIT_LOCKS is not enforced by Linux (since 2.4.25): a child limited to 1 lock still takes 1,000', () => {
    const path = makeFile(tmp.dir, 'rlimit-locks.img');
    const script = `import { openLockable } from ${JSON.stringify(distUrl)};
      const f = openLockable(${JSON.stringify(path)});
      let granted = 0;
      for (let i = 0; i < 1000; i++) if (f.tryLock('exclusive', { start: 2 * i, length: 1 })) granted++;
      f.close();
      console.log(JSON.stringify({ granted }));`;
    const r = spawnSync('prlimit', ['--locks=1:1', process.execPath, '--input-type=module', '-e', script], { encoding: 'utf8' });
    expect(r.stderr).toBe('');
    expect(JSON.parse(r.stdout)).toEqual({ granted: 1000 });
  });
});

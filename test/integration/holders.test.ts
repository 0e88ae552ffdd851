// lockHolders(): the exact holders of a lock, from the kernel's own records
// (/proc/PID/fdinfo for OFD and flock locks, /proc/locks for POSIX owners),
// against real holders of every kind: lockmgr, a child that inherited the
// lease fd, QEMU (qemu-io), Python's fcntl (OFD and classic POSIX), flock(1),
// and waiters that must never be named as holders.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { chmodSync, existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it } from 'vitest';
import { LockManager, LockTimeoutError, ResourceBusyError, lockHolders, type LockHolders } from '../../lib/index.js';
import { holdersWords } from '../../lib/os/proc-locks.js';
import { isRoot, lockFixture, waitUntil } from '../helpers.js';
import { endGroups } from '../harness/process-helpers.js';

const fx = lockFixture({ peer: true });
const BIN = fileURLToPath(new URL('../../bin/lockmgr.js', import.meta.url));
const PROC_LOCKS = fileURLToPath(new URL('../../dist/os/proc-locks.js', import.meta.url));
const INDEX = fileURLToPath(new URL('../../dist/index.js', import.meta.url));
const PYTHON = existsSync('/usr/bin/python3') ? '/usr/bin/python3' : 'python3';
const havePython = spawnSync(PYTHON, ['-c', 'import fcntl']).status === 0;
const haveQemuIo = spawnSync('sh', ['-c', 'command -v qemu-io']).status === 0;
const haveFlock = spawnSync('sh', ['-c', 'command -v flock']).status === 0;
const BYTE0 = { start: 0, length: 1 };

const children: ChildProcess[] = [];
afterEach(() => endGroups(children));

function start(command: string, args: string[], options: { stdin?: 'pipe' | 'ignore' } = {}): ChildProcess {
  // In a process group of its own, killed whole after the test: a command a holder started must not outlive it.
  const child = spawn(command, args, { stdio: [options.stdin ?? 'ignore', 'pipe', 'inherit'], detached: true });
  children.push(child);
  return child;
}

/** Resolves with the first line a child prints (its "ready"), or rejects if it exits first. */
function firstLine(child: ChildProcess): Promise<string> {
  return new Promise((resolve, reject) => {
    let out = '';
    child.stdout!.on('data', (d: Buffer) => {
      out += d;
      if (out.includes('\n')) resolve(out.split('\n')[0]!);
    });
    child.once('exit', (code) => reject(new Error(`exited with ${code} before it was ready: ${out}`)));
  });
}

// Python's fcntl: an OFD lock (F_OFD_SETLK, 37; F_OFD_SETLKW, 38) or a
// classic POSIX one (lockf: F_SETLK / F_SETLKW), on byte 0. "wait" blocks
// until granted; the script prints "locked" once it holds the lock.
const PY = `
import fcntl, os, struct, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
kind, how = sys.argv[2], sys.argv[3]
if kind == 'ofd':
    cmd = 38 if how == 'wait' else 37
    fcntl.fcntl(fd, cmd, struct.pack('@hhqqi', fcntl.F_WRLCK, 0, 0, 1, 0) + bytes(4))
else:
    fcntl.lockf(fd, fcntl.LOCK_EX if how == 'wait' else fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
print('locked', flush=True)
time.sleep(1000)
`;

async function python(kind: 'ofd' | 'posix', how: 'hold' | 'wait', path = fx.path): Promise<ChildProcess> {
  const child = start(PYTHON, ['-c', PY, path, kind, how]);
  if (how === 'hold') expect(await firstLine(child)).toBe('locked');
  return child;
}

const pids = (h: LockHolders) => h.holders.map((x) => x.pid);

/** Polls until `check` holds of the file's holders (a waiter becomes visible once it blocks). */
async function holdersUntil(check: (h: LockHolders) => boolean, what: string, mode: 'exclusive' | 'shared' = 'exclusive'): Promise<LockHolders> {
  let h = lockHolders(fx.path, mode, BYTE0);
  await waitUntil(() => check((h = lockHolders(fx.path, mode, BYTE0))), 20_000, what);
  return h;
}

describe('lockHolders names the processes that hold a lock, never mere openers or waiters', () => {
  it('lockmgr: a peer process holding an OFD lock, with its fd; the asking process is never an opener', async () => {
    const h = await fx.peer.call<number>('open', fx.path);
    expect(await fx.peer.call('tryLock', h, 'exclusive', BYTE0)).toBe(true);
    const peerPid = fx.peer.child.pid!;
    const f = fx.open();
    expect(f.tryLock('shared', BYTE0)).toBe(false);
    const found = lockHolders(f.fd, 'shared', BYTE0);
    expect(found.fdinfoAvailable).toBe(true);
    expect(found.holders).toEqual([
      { pid: peerPid, command: expect.stringContaining('peer.mjs'), kind: 'OFD', mode: 'exclusive', start: 0, end: 0, fds: [expect.any(Number)] },
    ]);
    expect(found.openers.map((o) => o.pid)).not.toContain(process.pid);
    expect(found.unreadable).toEqual([]);
    // The fd it names is really the peer's descriptor of this file.
    expect(readFileSync(`/proc/${peerPid}/fdinfo/${found.holders[0]!.fds![0]}`, 'utf8')).toMatch(/^lock:\s+\d+: OFDLCK ADVISORY\s+WRITE -1 /m);
    // A lock that does not conflict is not asked about: a shared asker and a shared holder.
    await fx.peer.call('unlock', h, BYTE0);
    await fx.peer.call('tryLock', h, 'shared', BYTE0);
    expect(lockHolders(f.fd, 'shared', BYTE0).holders).toEqual([]);
    expect(lockHolders(f.fd, 'shared', BYTE0).openers.map((o) => o.pid)).toEqual([peerPid]);
    expect(pids(lockHolders(f.fd, 'exclusive', BYTE0))).toEqual([peerPid]);
    await fx.peer.call('close', h);
  });

  it('another descriptor of this very process is named as "this process"', () => {
    const holder = fx.open();
    holder.tryLock('exclusive', BYTE0);
    const asker = fx.open();
    const found = lockHolders(asker.fd, 'exclusive', BYTE0);
    expect(found.holders).toEqual([expect.objectContaining({ pid: process.pid, kind: 'OFD', fds: [holder.fd] })]);
    expect(holdersWords(found, fx.path).by).toBe(`this process (pid ${process.pid}) with an exclusive OFD lock on byte 0`);
  });

  it('a child that inherited the lease fd: lockmgr run and its command both hold the lease', async () => {
    const ready = join(fx.tmp.dir, 'ready');
    const run = start(process.execPath, [BIN, 'run', '--exclusive', fx.path, '--', 'sh', '-c', `touch ${ready}; exec sleep 1000`]);
    await waitUntil(() => existsSync(ready), 20_000, 'the command to start');
    const found = await holdersUntil((h) => h.holders.length === 2, 'both holders');
    const child = found.holders.find((x) => x.pid !== run.pid)!;
    expect(found.holders.find((x) => x.pid === run.pid)).toMatchObject({ kind: 'OFD', mode: 'exclusive', start: 0, end: 0, command: expect.stringContaining('lockmgr.js run') });
    expect(child).toMatchObject({ kind: 'OFD', mode: 'exclusive', command: 'sleep 1000' });
    // The child is the command: its parent is lockmgr.
    expect(readFileSync(`/proc/${child.pid}/stat`, 'utf8').split(') ')[1]!.split(' ')[1]).toBe(String(run.pid));
  });

  it.skipIf(!haveQemuIo)('QEMU: qemu-io holding its permission bytes (shared OFD locks on 100-101)', async () => {
    const qemu = start('qemu-io', ['-f', 'raw', fx.path], { stdin: 'pipe' });
    await waitUntil(() => lockHolders(fx.path).holders.some((x) => x.pid === qemu.pid), 20_000, 'qemu-io to lock');
    const found = lockHolders(fx.path, 'exclusive', { start: 101, length: 1 });
    expect(found.holders).toEqual([expect.objectContaining({ pid: qemu.pid, kind: 'OFD', mode: 'shared', start: 100, end: 101, command: expect.stringContaining('qemu-io') })]);
    // Byte 0 is not QEMU's: asked about it, QEMU is an opener, not a holder.
    const byte0 = lockHolders(fx.path, 'exclusive', BYTE0);
    expect(byte0.holders).toEqual([]);
    expect(byte0.openers).toEqual([expect.objectContaining({ pid: qemu.pid, waiting: false })]);
    qemu.stdin!.end();
  });

  it.skipIf(!havePython)("Python's fcntl: an OFD lock, and a classic POSIX lock whose owner /proc/locks records", async () => {
    const ofd = await python('ofd', 'hold');
    expect(lockHolders(fx.path, 'exclusive', BYTE0).holders).toEqual([
      { pid: ofd.pid, command: expect.stringContaining('import fcntl'), kind: 'OFD', mode: 'exclusive', start: 0, end: 0, fds: [3] },
    ]);
    ofd.kill('SIGKILL');
    await new Promise((r) => ofd.once('exit', r));
    const posix = await python('posix', 'hold');
    expect(lockHolders(fx.path, 'exclusive', BYTE0).holders).toEqual([expect.objectContaining({ pid: posix.pid, kind: 'POSIX', mode: 'exclusive', start: 0, end: 0, fds: [3] })]);
  });

  it.skipIf(!haveFlock)('flock(1): the flock lock and the command that inherited it; they do not conflict with a byte-range lock', async () => {
    const ready = join(fx.tmp.dir, 'ready');
    const flock = start('flock', [fx.path, 'sh', '-c', `touch ${ready}; exec sleep 1000`]);
    await waitUntil(() => existsSync(ready), 20_000, 'flock to run its command');
    const all = lockHolders(fx.path);
    expect(all.holders.map((x) => [x.pid === flock.pid ? 'flock' : x.command, x.kind, x.mode, x.start, x.end])).toEqual([
      ['flock', 'FLOCK', 'exclusive', 0, null],
      ['sleep 1000', 'FLOCK', 'exclusive', 0, null],
    ]);
    // On a local filesystem flock and OFD locks ignore each other (docs/cli.md).
    const f = fx.open();
    expect(f.tryLock('exclusive')).toBe(true);
    const byteRange = lockHolders(f.fd, 'exclusive', BYTE0);
    expect(byteRange.holders).toEqual([]);
    expect(byteRange.openers.map((o) => o.pid).sort()).toEqual(all.holders.map((x) => x.pid).sort());
  });

  it.skipIf(!havePython)('waiters are openers marked waiting, never holders: Python OFD and POSIX waiters, a lockmgr waiter', async () => {
    const holder = await python('ofd', 'hold');
    const ofdWaiter = await python('ofd', 'wait');
    const posixWaiter = await python('posix', 'wait');
    const h = await fx.peer.call<number>('open', fx.path);
    const peerWait = fx.peer.call('lock', h, 'exclusive', BYTE0, {}).catch(() => undefined);
    const waiting = [ofdWaiter.pid, posixWaiter.pid, fx.peer.child.pid];
    const found = await holdersUntil((x) => waiting.every((pid) => x.openers.some((o) => o.pid === pid && o.waiting === true)), 'every waiter to block');
    expect(pids(found)).toEqual([holder.pid]);
    // The status view (no mode): still only the holder.
    expect(pids(lockHolders(fx.path))).toEqual([holder.pid]);
    expect(holdersWords(found, fx.path).also).toContain('waiting for a lock');
    holder.kill('SIGKILL');
    await fx.peer.call('close', h);
    await peerWait;
  });

  it('without fdinfo (a kernel before 4.1) it falls back to candidates and says so', async () => {
    const h = await fx.peer.call<number>('open', fx.path);
    await fx.peer.call('tryLock', h, 'exclusive', BYTE0);
    const found = lockHolders(fx.path, 'exclusive', BYTE0, { fdinfo: false });
    expect(found).toMatchObject({ holders: [], fdinfoAvailable: false, unreadable: [expect.objectContaining({ kind: 'OFD', reason: 'no-fdinfo', pid: null })] });
    expect(found.openers.map((o) => o.pid)).toContain(fx.peer.child.pid);
    expect(holdersWords(found, fx.path).by).toMatch(new RegExp(`one of pid ${fx.peer.child.pid} .*this kernel does not say which: these have it open`));
    await fx.peer.call('close', h);
  });
});

describe('busy and timeout errors carry holders and openers', () => {
  it('ResourceBusyError from a LockManager: holders, openers, and candidates (deprecated) for compatibility', async () => {
    const h = await fx.peer.call<number>('open', fx.path);
    await fx.peer.call('tryLock', h, 'exclusive', BYTE0);
    const m = new LockManager();
    try {
      m.registerResource({ type: 'disk', path: fx.path, mode: 'shared' });
      const err = (await m.start('true').catch((e: unknown) => e)) as ResourceBusyError;
      expect(err).toBeInstanceOf(ResourceBusyError);
      expect(err.holders).toEqual([expect.objectContaining({ pid: fx.peer.child.pid, kind: 'OFD', mode: 'exclusive', start: 0, end: 0 })]);
      expect(err.resource).toBe(fx.path);
      expect(err.fdinfoAvailable).toBe(true);
      expect(err.candidates.map((c) => c.pid)).toEqual([fx.peer.child.pid]);
      expect(err.message).toMatch(new RegExp(`^${fx.path} is held exclusively by pid ${fx.peer.child.pid} \\(.*peer\\.mjs\\) with an exclusive OFD lock on byte 0$`));
    } finally {
      await m.free();
      await fx.peer.call('close', h);
    }
  });

  it("LockManager 'wait': emitted once when a start begins to wait, with the busy error naming the holder; the start then gets the lease", async () => {
    const h = await fx.peer.call<number>('open', fx.path);
    await fx.peer.call('tryLock', h, 'exclusive', BYTE0);
    const m = new LockManager();
    try {
      m.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
      const waits: ResourceBusyError[] = [];
      let release: Promise<unknown> | undefined;
      m.on('wait', (busy) => {
        waits.push(busy);
        // The holder lets go only once the wait has been announced.
        release = fx.peer.call('close', h);
      });
      await m.start('true', [], {}, { timeout: 60_000 });
      await release;
      expect(waits).toHaveLength(1);
      expect(waits[0]).toBeInstanceOf(ResourceBusyError);
      expect(waits[0]!.holders.map((x) => [x.pid, x.kind, x.mode])).toEqual([[fx.peer.child.pid, 'OFD', 'exclusive']]);
      expect(waits[0]!.resource).toBe(fx.path);
    } finally {
      await m.free();
    }
    // Without a timeout or signal a start never waits, so never says so.
    const h2 = await fx.peer.call<number>('open', fx.path);
    await fx.peer.call('tryLock', h2, 'exclusive', BYTE0);
    const n = new LockManager();
    try {
      n.registerResource({ type: 'disk', path: fx.path, mode: 'shared' });
      let waited = 0;
      n.on('wait', () => waited++);
      await expect(n.start('true')).rejects.toBeInstanceOf(ResourceBusyError);
      expect(waited).toBe(0);
    } finally {
      await n.free();
      await fx.peer.call('close', h2);
    }
  });

  it("LockableFile.lock()'s LockTimeoutError names the holder, the waiters apart", async () => {
    const h = await fx.peer.call<number>('open', fx.path);
    await fx.peer.call('tryLock', h, 'exclusive', BYTE0);
    const err = (await fx.open().lock('exclusive', BYTE0, { timeout: 0 }).catch((e: unknown) => e)) as LockTimeoutError;
    expect(err).toBeInstanceOf(LockTimeoutError);
    expect(err.holders.map((x) => [x.pid, x.kind])).toEqual([[fx.peer.child.pid, 'OFD']]);
    expect(err.resource).toBe(fx.path);
    expect(err.message).toContain(`; still held by pid ${fx.peer.child.pid} (`);
    await fx.peer.call('close', h);
  });
});

// A holder this observer may not name: observed from another pid namespace,
// and as another user. Both need root to set up (unshare, setpriv). The
// observer is a separate node process running the built package.
describe.skipIf(!isRoot)('a holder whose /proc the observer may not read is reported as such, never dropped', () => {
  const observe = (wrapper: string[], path: string) => {
    const src = `
      const { lockHolders } = await import(${JSON.stringify(PROC_LOCKS)});
      const { openLockable } = await import(${JSON.stringify(INDEX)});
      const f = openLockable(${JSON.stringify(path)}, { access: 'read' });
      const conflict = f.getConflict('exclusive', { start: 0, length: 1 });
      console.log(JSON.stringify({ conflict, ...lockHolders(f.fd, 'exclusive', { start: 0, length: 1 }, { conflict }) }));`;
    const r = spawnSync(wrapper[0]!, [...wrapper.slice(1), process.execPath, '--input-type=module', '-e', src], { encoding: 'utf8', timeout: 60_000 });
    expect(r.stderr).toBe('');
    return JSON.parse(r.stdout) as LockHolders & { conflict: unknown };
  };

  it('from another pid namespace (unshare --pid --mount-proc): the OFD lock is reported with reason "namespace"', async () => {
    const h = await fx.peer.call<number>('open', fx.path);
    await fx.peer.call('tryLock', h, 'exclusive', BYTE0);
    const seen = observe(['unshare', '--pid', '--fork', '--mount-proc'], fx.path);
    expect(seen.conflict).toMatchObject({ mode: 'exclusive', pid: -1 });
    expect(seen.holders).toEqual([]);
    expect(seen.unreadable).toEqual([expect.objectContaining({ kind: 'OFD', mode: 'exclusive', start: 0, end: 0, pid: null, reason: 'namespace' })]);
    await fx.peer.call('close', h);
  });

  it.skipIf(!havePython)('from another pid namespace, a POSIX owner /proc/locks hides is still reported (from F_OFD_GETLK)', async () => {
    await python('posix', 'hold');
    const seen = observe(['unshare', '--pid', '--fork', '--mount-proc'], fx.path);
    // The kernel hides the foreign owner's pid (0) and drops the lock from this namespace's /proc/locks.
    expect(seen.conflict).toMatchObject({ mode: 'exclusive', pid: 0 });
    expect(seen.unreadable).toEqual([expect.objectContaining({ kind: 'POSIX', pid: null, reason: 'namespace' })]);
  });

  it("as another user (setpriv to nobody), a root holder's OFD lock is reported with reason \"permission\"", async () => {
    // The observer needs to reach the file: a world-searchable directory, a world-readable file.
    chmodSync(fx.tmp.dir, 0o755);
    chmodSync(fx.path, 0o644);
    const h = await fx.peer.call<number>('open', fx.path);
    await fx.peer.call('tryLock', h, 'exclusive', BYTE0);
    const seen = observe(['setpriv', '--reuid', '65534', '--regid', '65534', '--clear-groups'], fx.path);
    expect(seen.holders).toEqual([]);
    expect(seen.unreadable).toEqual([expect.objectContaining({ kind: 'OFD', pid: null, reason: 'permission', detail: expect.stringMatching(/could not be read/) })]);
    await fx.peer.call('close', h);
  });
});

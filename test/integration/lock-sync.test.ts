// lockSync(): F_OFD_SETLKW on the calling thread, with timeouts through the
// same per-thread timer and wake-up signal as the waiter threads. It blocks
// the thread it runs on, so every wait that needs someone else to act runs in
// another process or a worker thread, and the test process acts from outside.
import { spawn } from 'node:child_process';
import { readFileSync, statSync } from 'node:fs';
import { Worker } from 'node:worker_threads';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { AccessModeError, InvalidArgumentError, InvalidStateError, LockTimeoutError, openLockable, type LockableFile } from '../../lib/index.js';
import { Peer, distUrl, fdCount, makeFile, tempDir, waitUntil } from '../helpers.js';

let tmp: ReturnType<typeof tempDir>;
let path: string;
const opened: LockableFile[] = [];
const open = (access: 'read' | 'readwrite' = 'readwrite'): LockableFile => {
  const f = openLockable(path, { access });
  opened.push(f);
  return f;
};

beforeEach(() => {
  tmp = tempDir();
  path = makeFile(tmp.dir);
});
afterEach(() => {
  for (const f of opened.splice(0)) f.close();
  tmp.cleanup();
});

const BYTE0 = { start: 0, length: 1 };

/** POSIX timers of this process (/proc/self/timers lists one "ID:" line each). */
function timerCount(): number {
  return readFileSync('/proc/self/timers', 'utf8')
    .split('\n')
    .filter((l) => l.startsWith('ID:')).length;
}

/** Lock requests blocked on the test file now ("->" lines in /proc/locks). */
function blockedOnFile(): number {
  const needle = `:${statSync(path).ino} `;
  return readFileSync('/proc/locks', 'utf8')
    .split('\n')
    .filter((l) => l.includes('->') && l.includes(needle)).length;
}

/** Runs an ES module in another node process; resolves with the last line of its stdout parsed as JSON. */
function runChild(source: string): { pid: number; result: Promise<unknown>; output: () => string } {
  const child = spawn(process.execPath, ['--input-type=module', '-e', source], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
  child.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
  const result = new Promise<unknown>((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (code) => {
      if (code !== 0 || err !== '') return reject(new Error(`child exited ${code}: ${err}`));
      try {
        resolve(JSON.parse(out.trim().split('\n').at(-1)!));
      } catch (e) {
        reject(e as Error);
      }
    });
  });
  return { pid: child.pid!, result, output: () => out };
}

describe('lockSync()', () => {
  it('takes a free lock at once, and it is held like any other', () => {
    const f = open();
    const other = open();
    f.lockSync('exclusive', BYTE0);
    expect(other.tryLock('shared', BYTE0)).toBe(false);
    f.lockSync('exclusive', BYTE0); // held already: a no-op, as for tryLock
    f.unlock(BYTE0);
    expect(other.tryLock('shared', BYTE0)).toBe(true);
    other.unlock(BYTE0);
    f.lockSync('shared', BYTE0, { timeout: 1000 });
    expect(other.tryLock('shared', BYTE0)).toBe(true);
    expect(other.tryLock('exclusive', BYTE0)).toBe(false);
  });

  it('blocks until another process releases, then holds the lock', async () => {
    const holder = open();
    holder.tryLock('exclusive', BYTE0);
    const child = runChild(`import { openLockable } from ${JSON.stringify(distUrl)};
      const f = openLockable(${JSON.stringify(path)});
      f.lockSync('exclusive', { start: 0, length: 1 });
      const held = f.getConflict('exclusive', { start: 0, length: 1 }) === null;
      console.log(JSON.stringify({ held }));`);
    await waitUntil(() => blockedOnFile() === 1, 20_000, 'the child to block in F_OFD_SETLKW');
    holder.unlock(BYTE0);
    expect(await child.result).toEqual({ held: true });
  });

  it('times out with LockTimeoutError naming the holder, and does not hold the lock', async () => {
    const peer = await Peer.start();
    try {
      const h = await peer.call<number>('open', path);
      expect(await peer.call('tryLock', h, 'exclusive', BYTE0)).toBe(true);
      const f = open();
      let err: unknown;
      try {
        f.lockSync('shared', BYTE0, { timeout: 50 });
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(LockTimeoutError);
      expect((err as LockTimeoutError).holder).toMatchObject({ mode: 'exclusive', start: 0, length: 1 });
      expect(() => f.lockSync('shared', BYTE0, { timeout: 0 })).toThrow(LockTimeoutError);
      await peer.call('unlock', h, BYTE0);
      // Neither timed-out wait left a lock behind: an exclusive lock of another open file description is free.
      const other = open();
      expect(other.tryLock('exclusive', BYTE0)).toBe(true);
    } finally {
      await peer.kill();
    }
  });

  it('conflicts across processes both ways: a child waiting in lockSync times out while we hold the lock', async () => {
    const holder = open();
    holder.tryLock('shared', BYTE0);
    const child = runChild(`import { openLockable } from ${JSON.stringify(distUrl)};
      const f = openLockable(${JSON.stringify(path)});
      f.lockSync('shared', { start: 0, length: 1 }, { timeout: 30 }); // shared with our shared: granted
      f.unlock({ start: 0, length: 1 });
      let name = 'granted';
      try { f.lockSync('exclusive', { start: 0, length: 1 }, { timeout: 100 }); } catch (e) { name = e.name; }
      console.log(JSON.stringify({ name, held: f.getConflict('exclusive', { start: 0, length: 1 }) === null }));`);
    expect(await child.result).toEqual({ name: 'LockTimeoutError', held: false });
  });

  it('is not ended by unrelated signals: EINTR is retried unless the deadline passed', async () => {
    const holder = open();
    holder.tryLock('exclusive', BYTE0);
    // The child waits twice: without and with a deadline. SIGRTMIN+6 (the
    // wake-up signal, whose handler has no SA_RESTART) sent from outside
    // interrupts its fcntl; the wait must go on until we release.
    const child = runChild(`import { openLockable } from ${JSON.stringify(distUrl)};
      const f = openLockable(${JSON.stringify(path)});
      const g = openLockable(${JSON.stringify(path)});
      // A wait that times out: it installs the wake-up signal's handler (the
      // default action of a real-time signal would end the process).
      await g.lock('shared', { start: 0, length: 1 }, { timeout: 1 }).catch(() => {});
      console.log('{"ready":true}');
      f.lockSync('exclusive', { start: 0, length: 1 });
      f.unlock({ start: 0, length: 1 });
      console.log('{"first":true}');
      f.lockSync('shared', { start: 1, length: 1 }, { timeout: 600000 });
      console.log('{"second":true}');`);
    const rtmin6 = 34 + 6; // glibc's SIGRTMIN is 34 on Linux
    await waitUntil(() => child.output().includes('ready') && blockedOnFile() === 1, 20_000, 'the child to block without a deadline');
    for (let i = 0; i < 5; i++) {
      process.kill(child.pid, rtmin6);
      await new Promise((r) => setTimeout(r, 10));
    }
    expect(blockedOnFile()).toBe(1);
    holder.tryLock('exclusive', { start: 1, length: 1 });
    holder.unlock(BYTE0);
    await waitUntil(() => child.output().includes('first') && blockedOnFile() === 1, 20_000, 'the child to block with a deadline');
    for (let i = 0; i < 5; i++) {
      process.kill(child.pid, rtmin6);
      await new Promise((r) => setTimeout(r, 10));
    }
    expect(blockedOnFile()).toBe(1);
    holder.unlock({ start: 1, length: 1 });
    await expect(child.result.catch((e: Error) => e.message)).resolves.toEqual({ second: true });
  });

  it('works in a worker thread: blocks that thread only, is granted, and times out', async () => {
    const holder = open();
    holder.tryLock('exclusive', BYTE0);
    const source = `import { parentPort, workerData } from 'node:worker_threads';
      import { openLockable } from ${JSON.stringify(distUrl)};
      const f = openLockable(workerData.path);
      let name = 'granted';
      try { f.lockSync('exclusive', { start: 0, length: 1 }, { timeout: 30 }); } catch (e) { name = e.name; }
      parentPort.postMessage(name);
      f.lockSync('exclusive', { start: 0, length: 1 }, { timeout: 600000 });
      parentPort.postMessage('granted');
      f.close();`;
    const w = new Worker(new URL(`data:text/javascript,${encodeURIComponent(source)}`), { workerData: { path } });
    const messages: unknown[] = [];
    w.on('message', (m) => messages.push(m));
    const exited = new Promise((r) => w.once('exit', r));
    await waitUntil(() => messages.length === 1, 20_000, 'the worker to time out');
    expect(messages[0]).toBe('LockTimeoutError');
    // The main thread's event loop runs while the worker blocks.
    await waitUntil(() => blockedOnFile() === 1, 20_000, 'the worker to block');
    holder.unlock(BYTE0);
    await exited;
    expect(messages).toEqual(['LockTimeoutError', 'granted']);
  });

  it('rejects bad input with typed errors', () => {
    const f = open();
    const ro = open('read');
    // @ts-expect-error: not a mode
    expect(() => f.lockSync('bogus')).toThrow(InvalidArgumentError);
    expect(() => f.lockSync('exclusive', { start: -1 })).toThrow(InvalidArgumentError);
    // @ts-expect-error: not a key of ByteRange
    expect(() => f.lockSync('exclusive', { begin: 0 })).toThrow(InvalidArgumentError);
    expect(() => f.lockSync('exclusive', BYTE0, { timeout: -1 })).toThrow(InvalidArgumentError);
    expect(() => f.lockSync('exclusive', BYTE0, { timeout: Number.NaN })).toThrow(InvalidArgumentError);
    // @ts-expect-error: lockSync has no AbortSignal: nothing could run to abort it
    expect(() => f.lockSync('exclusive', BYTE0, { signal: new AbortController().signal })).toThrow(InvalidArgumentError);
    expect(() => ro.lockSync('exclusive', BYTE0)).toThrow(AccessModeError);
    expect(() => ro.lockSync('exclusive', BYTE0, { timeout: 10 })).toThrow(AccessModeError);
    f.close();
    expect(() => f.lockSync('exclusive', BYTE0)).toThrow(InvalidStateError);
  });

  it('leaks no fd and no timer: one timer per thread that waited with a deadline, gone with its worker', async () => {
    const holder = open();
    const f = open();
    holder.tryLock('exclusive', BYTE0);
    f.lockSync('shared', { start: 9, length: 1 }, { timeout: 5 }); // free: no timer needed yet
    const fds = fdCount();
    // Waiter threads of an earlier test may still be winding down: count after.
    f.lockSync('shared', { start: 8, length: 1 }, { timeout: 5 });
    for (let i = 0; i < 3; i++) expect(() => f.lockSync('shared', BYTE0, { timeout: 1 })).toThrow(LockTimeoutError);
    const timers = timerCount();
    for (let i = 0; i < 100; i++) {
      expect(() => f.lockSync('shared', BYTE0, { timeout: i % 3 })).toThrow(LockTimeoutError);
      f.lockSync('shared', { start: 10 + i, length: 1 }, { timeout: 1000 });
    }
    expect(timerCount()).toBe(timers);
    expect(fdCount()).toBe(fds);

    const source = `import { parentPort, workerData } from 'node:worker_threads';
      import { openLockable } from ${JSON.stringify(distUrl)};
      const f = openLockable(workerData.path);
      for (let i = 0; i < 20; i++) { try { f.lockSync('shared', { start: 0, length: 1 }, { timeout: 1 }); } catch {} }
      parentPort.postMessage('done');`;
    const before = timerCount();
    const w = new Worker(new URL(`data:text/javascript,${encodeURIComponent(source)}`), { workerData: { path } });
    await new Promise((r) => w.once('message', r));
    await w.terminate();
    await waitUntil(() => timerCount() === before, 10_000, "the worker's timer to be deleted");
    await waitUntil(() => fdCount() === fds, 10_000, "the worker's fds to close");
  });
});

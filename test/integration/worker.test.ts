import { Worker } from 'node:worker_threads';
import { afterEach, beforeEach, expect, it } from 'vitest';
import { openLockable } from '../../lib/index.js';
import { fdCount, makeFile, runScript, tempDir, threadCount, waitUntil } from '../helpers.js';

let tmp: ReturnType<typeof tempDir>;
let path: string;
const dist = new URL('../../dist/index.js', import.meta.url).href;

beforeEach(() => {
  tmp = tempDir();
  path = makeFile(tmp.dir);
});
afterEach(() => tmp.cleanup());

function worker(body: string): Worker {
  const source = `import { parentPort, workerData } from 'node:worker_threads';
    import { openLockable } from ${JSON.stringify(dist)};
    ${body}`;
  return new Worker(new URL(`data:text/javascript,${encodeURIComponent(source)}`), { workerData: { path } });
}

function message(w: Worker): Promise<unknown> {
  return new Promise((resolve, reject) => {
    w.once('message', resolve);
    w.once('error', reject);
  });
}

it('a worker thread locks, waits and is woken like the main thread', async () => {
  const holder = openLockable(path);
  holder.tryLock('exclusive', { start: 0, length: 1 });
  const w = worker(`
    const f = openLockable(workerData.path);
    parentPort.postMessage(f.tryLock('shared', { start: 0, length: 1 }));
    await f.lock('shared', { start: 0, length: 1 });
    parentPort.postMessage('granted');
    f.close();`);
  expect(await message(w)).toBe(false);
  const granted = message(w);
  holder.unlock({ start: 0, length: 1 });
  expect(await granted).toBe('granted');
  await new Promise((r) => w.once('exit', r));
  holder.close();
});

it('terminating a worker with waits pending joins its waiter threads and closes its files, releasing their locks', async () => {
  const threads = threadCount();
  const fds = fdCount();
  const holder = openLockable(path);
  holder.tryLock('exclusive', { start: 0, length: 1 });
  const w = worker(`
    const f = openLockable(workerData.path);
    f.tryLock('exclusive', { start: 10, length: 1 });
    for (let i = 0; i < 50; i++) f.lock('exclusive', { start: 0, length: 1 }).catch(() => {});
    setTimeout(() => parentPort.postMessage('waiting'), 50);`);
  expect(await message(w)).toBe('waiting');
  expect(threadCount()).toBeGreaterThan(threads + 1);
  expect(holder.getConflict('shared', { start: 10, length: 1 })).toMatchObject({ mode: 'exclusive' });
  await w.terminate();
  // The worker never closed its file: its environment's cleanup did, so the
  // lock it held on byte 10 is gone, and so are its fd and 50 waiter threads.
  expect(holder.getConflict('shared', { start: 10, length: 1 })).toBeNull();
  await waitUntil(() => threadCount() <= threads, 10_000, 'worker and waiter threads to exit');
  holder.close();
  await waitUntil(() => fdCount() === fds, 5_000, 'fds to return');
});

it('terminating workers while results are being delivered never crashes the process (stress)', () => {
  // In a child process: were the teardown race still there, the whole process
  // would abort, and here that is an exit status, not a crashed test runner.
  const script = `import { Worker } from 'node:worker_threads';
    import { openLockable } from ${JSON.stringify(dist)};
    const H = openLockable(${JSON.stringify(path)}); H.tryLock('exclusive', { start: 0, length: 100 });
    const src = \`import { parentPort, workerData } from 'node:worker_threads';
      import { openLockable } from ${JSON.stringify(dist)};
      const f = openLockable(workerData.path); const ac = new AbortController();
      for (let i = 0; i < 40; i++) f.lock('exclusive', { start: i, length: 1 }, i % 3 === 0 ? { timeout: i % 5 } : { signal: ac.signal }).catch(() => {});
      setTimeout(() => ac.abort(), workerData.n % 4);
      if (workerData.n % 2) setTimeout(() => f.close(), workerData.n % 3);
      parentPort.postMessage('go');\`;
    for (let n = 0; n < 120; n++) {
      const w = new Worker(new URL('data:text/javascript,' + encodeURIComponent(src)), { workerData: { path: ${JSON.stringify(path)}, n } });
      await new Promise((r) => w.once('message', r));
      if (n % 2) { H.unlock({ start: 0, length: 100 }); H.tryLock('exclusive', { start: 0, length: 100 }); }
      await new Promise((r) => setTimeout(r, n % 5));
      await w.terminate();
    }
    console.log(JSON.stringify('survived'));`;
  expect(runScript(script)).toBe('survived');
  // 120 workers one after another: a minute or more on a loaded 2-core machine. A hang guard only.
}, 300_000);

it('blocking waits keep working in workers loaded after the first one that loaded the addon has ended', () => {
  // Only workers load lockmgr here, so Node may unload the addon between them.
  const script = `import { Worker } from 'node:worker_threads';
    const src = \`import { parentPort, workerData } from 'node:worker_threads';
      import { openLockable } from ${JSON.stringify(dist)};
      const a = openLockable(workerData.path), b = openLockable(workerData.path);
      a.tryLock('exclusive');
      b.lock('shared', undefined, { timeout: 20 }).catch((e) => parentPort.postMessage(e.name));\`;
    const out = [];
    for (let i = 0; i < 3; i++) {
      const w = new Worker(new URL('data:text/javascript,' + encodeURIComponent(src)), { workerData: { path: ${JSON.stringify(path)} } });
      out.push(await new Promise((r) => w.once('message', r)));
      await new Promise((r) => w.once('exit', r));
    }
    console.log(JSON.stringify(out));`;
  expect(runScript(script)).toEqual(['LockTimeoutError', 'LockTimeoutError', 'LockTimeoutError']);
});

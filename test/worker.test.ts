import { Worker } from 'node:worker_threads';
import { afterEach, beforeEach, expect, it } from 'vitest';
import { openLockable } from '../lib/index.js';
import { makeFile, tempDir, threadCount, waitUntil } from './helpers.js';

let tmp: ReturnType<typeof tempDir>;
let path: string;
const dist = new URL('../dist/index.js', import.meta.url).href;

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

it('terminating a worker with waits pending frees its waiter threads and its locks', async () => {
  const threads = threadCount();
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
  // The worker's environment cleanup woke and joined its 50 waiter threads, and
  // its fds went with it (Node closes a worker's handles, not its raw fds; our
  // lock fds are released because the cleanup hook ran).
  await waitUntil(() => threadCount() <= threads, 10_000, 'worker and waiter threads to exit');
  expect(holder.tryLock('exclusive', { start: 0, length: 1 })).toBe(true);
  holder.close();
});

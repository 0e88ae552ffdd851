import { afterEach, beforeEach, expect, it } from 'vitest';
import { openLockable } from '../../lib/index.js';
import { native } from '../../lib/os/native.js';
import { fdCount, makeFile, tempDir, threadCount, waitUntil } from '../helpers.js';

let tmp: ReturnType<typeof tempDir>;
let path: string;

beforeEach(() => {
  tmp = tempDir();
  path = makeFile(tmp.dir);
});
afterEach(() => tmp.cleanup());

it('10,000 open/lock/unlock/close cycles leave no fd and no thread behind', () => {
  const fds = fdCount();
  const threads = threadCount();
  for (let i = 0; i < 10_000; i++) {
    const f = openLockable(path);
    expect(f.tryLock(i % 2 ? 'exclusive' : 'shared', { start: i, length: 1 })).toBe(true);
    if (i % 3 === 0) f.unlock({ start: i, length: 1 });
    f.close();
  }
  expect(fdCount()).toBe(fds);
  expect(threadCount()).toBe(threads);
});

it('1,000 cancelled waits (abort, timeout, close) leave no fd, thread or pending wait behind', async () => {
  const fds = fdCount();
  const threads = threadCount();
  const holder = openLockable(path);
  holder.tryLock('exclusive');
  for (let round = 0; round < 10; round++) {
    const f = openLockable(path);
    const ac = new AbortController();
    const waits = [
      ...Array.from({ length: 40 }, (_, i) => f.lock('exclusive', { start: i, length: 1 }, { signal: ac.signal })),
      ...Array.from({ length: 30 }, (_, i) => f.lock('shared', { start: i, length: 1 }, { timeout: 5 })),
      ...Array.from({ length: 30 }, () => f.lock('exclusive')),
    ];
    const settled = Promise.allSettled(waits);
    ac.abort();
    await new Promise((r) => setTimeout(r, 10));
    f.close();
    const results = await settled;
    const codes = new Set(results.map((r) => (r.status === 'rejected' ? (r.reason as { code: string }).code : 'granted')));
    expect([...codes].sort()).toEqual(['ABORT_ERR', 'ERR_INVALID_STATE', 'ERR_LOCK_TIMEOUT']);
  }
  holder.close();
  // close() rejects pending waits at once; the fd itself closes when their
  // threads have let go of it, a moment later.
  await waitUntil(() => fdCount() === fds, 5_000, `fd count to return to ${fds}`);
  // Waiter threads outlive their wait by an idle second, then exit.
  await waitUntil(() => native.waiterThreads() === 0, 15_000, 'waiter threads to exit');
  await waitUntil(() => threadCount() === threads, 5_000, `thread count to return to ${threads}`);
});

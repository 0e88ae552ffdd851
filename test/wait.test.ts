import { readFile } from 'node:fs/promises';
import { setImmediate as tick } from 'node:timers/promises';
import { describe, expect, it } from 'vitest';
import { AbortError, LockTimeoutError, openLockable, type LockableFile } from '../lib/index.js';
import { lockFixture } from './helpers.js';

const fx = lockFixture({ peer: true });
const lockable = (): LockableFile => fx.open();

/** Settles to 'pending' if the promise has not settled after a few turns of the loop. */
async function state(p: Promise<unknown>): Promise<'resolved' | 'rejected' | 'pending'> {
  const marker = Symbol('pending');
  const r = await Promise.race([p.then(() => 'resolved' as const, () => 'rejected' as const), tick().then(() => marker)]);
  return r === marker ? 'pending' : (r as 'resolved' | 'rejected');
}


const BYTE0 = { start: 0, length: 1 };

describe('lock()', () => {
  it('takes a free lock at once', async () => {
    const f = lockable();
    await f.lock('exclusive', BYTE0);
    expect(lockable().tryLock('shared', BYTE0)).toBe(false);
  });

  it('waits while another process holds the lock, and gets it when that process releases', async () => {
    const h = await fx.peer.call<number>('open', fx.path, { access: 'readwrite' });
    expect(await fx.peer.call('tryLock', h, 'exclusive', BYTE0)).toBe(true);
    const f = lockable();
    const p = f.lock('shared', BYTE0);
    for (let i = 0; i < 20; i++) expect(await state(p)).toBe('pending');
    await fx.peer.call('unlock', h, BYTE0);
    await p;
    expect(await fx.peer.call('tryLock', h, 'exclusive', BYTE0)).toBe(false);
    await fx.peer.call('close', h);
  });

  it('a waiter in another process gets the lock when we release', async () => {
    const f = lockable();
    f.tryLock('exclusive', BYTE0);
    const h = await fx.peer.call<number>('open', fx.path, { access: 'readwrite' });
    const p = fx.peer.call('lock', h, 'exclusive', BYTE0, {});
    await new Promise((r) => setTimeout(r, 50));
    f.unlock(BYTE0);
    expect(await p).toBe(true);
    expect(f.tryLock('shared', BYTE0)).toBe(false);
    await fx.peer.call('close', h);
  });

  it('times out with LockTimeoutError, naming what is still in the way, and does not hold the lock', async () => {
    const holder = lockable();
    holder.tryLock('exclusive', BYTE0);
    const f = lockable();
    const err = await f.lock('exclusive', BYTE0, { timeout: 100 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(LockTimeoutError);
    expect(err).toMatchObject({ code: 'ERR_LOCK_TIMEOUT', timeout: 100, holder: { mode: 'exclusive', start: 0, length: 1, pid: -1 } });
    expect((err as Error).message).toContain(fx.path);
    holder.unlock(BYTE0);
    // Had the timed-out wait left a lock behind, this would fail.
    expect(lockable().tryLock('exclusive', BYTE0)).toBe(true);
  });

  it('timeout 0 tries once', async () => {
    lockable().tryLock('exclusive', BYTE0);
    await expect(lockable().lock('shared', BYTE0, { timeout: 0 })).rejects.toBeInstanceOf(LockTimeoutError);
  });

  it('rejects with AbortError at once when the signal is already aborted, even on a free lock', async () => {
    const f = lockable();
    const reason = new Error('changed my mind');
    const err = await f.lock('exclusive', BYTE0, { signal: AbortSignal.abort(reason) }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(AbortError);
    expect(err).toMatchObject({ name: 'AbortError', code: 'ABORT_ERR', cause: reason });
    expect(lockable().tryLock('exclusive', BYTE0)).toBe(true);
  });

  it('rejects with AbortError when aborted during the wait, and does not hold the lock', async () => {
    const holder = lockable();
    holder.tryLock('exclusive', BYTE0);
    const f = lockable();
    const ac = new AbortController();
    const p = f.lock('exclusive', BYTE0, { signal: ac.signal });
    for (let i = 0; i < 10; i++) expect(await state(p)).toBe('pending');
    const reason = new Error('stop');
    ac.abort(reason);
    await expect(p).rejects.toMatchObject({ name: 'AbortError', code: 'ABORT_ERR', cause: reason });
    holder.unlock(BYTE0);
    expect(lockable().tryLock('exclusive', BYTE0)).toBe(true);
  });

  it('close() rejects pending waits with InvalidStateError and releases the file locks', async () => {
    const holder = lockable();
    holder.tryLock('exclusive', { start: 0, length: 1 });
    const f = openLockable(fx.path);
    f.tryLock('exclusive', { start: 100, length: 1 });
    const waits = [f.lock('exclusive', BYTE0), f.lock('shared', BYTE0, { timeout: 60_000 })];
    expect(await state(waits[0]!)).toBe('pending');
    f.close();
    for (const w of waits) await expect(w).rejects.toMatchObject({ code: 'ERR_INVALID_STATE' });
    expect(lockable().tryLock('exclusive', { start: 100, length: 1 })).toBe(true);
  });

  it('1,000 concurrent waiters all resolve when the holder releases', async () => {
    const holder = lockable();
    holder.tryLock('exclusive');
    const f = lockable();
    const waits = Array.from({ length: 1000 }, (_, i) => f.lock('exclusive', { start: i, length: 1 }));
    expect(await state(waits[999]!)).toBe('pending');
    holder.unlock();
    await Promise.all(waits);
    expect(holder.getConflict('shared', { start: 0, length: 1000 })).toMatchObject({ mode: 'exclusive' });
    expect(holder.getConflict('shared', { start: 1000, length: 1 })).toBeNull();
  });

  it('the event loop and libuv threadpool keep working while 1,000 waiters block', async () => {
    const holder = lockable();
    holder.tryLock('exclusive');
    const f = lockable();
    const waits = Array.from({ length: 1000 }, () => f.lock('shared', BYTE0).catch((e: unknown) => e));
    // Were the waits parked on libuv's 4 pool threads, these reads could never run.
    const reads = await Promise.all(Array.from({ length: 16 }, () => readFile(fx.path, 'utf8')));
    expect(reads.every((r) => r.length === 4096)).toBe(true);
    let turns = 0;
    for (let i = 0; i < 100; i++) {
      await new Promise((r) => setTimeout(r, 0));
      turns++;
    }
    expect(turns).toBe(100);
    for (const w of waits) expect(await state(w)).toBe('pending');
    f.close();
    for (const w of waits) expect(await w).toMatchObject({ code: 'ERR_INVALID_STATE' });
  });

  it('a pending wait keeps the process alive until it resolves', async () => {
    const { spawnSync } = await import('node:child_process');
    const holder = lockable();
    holder.tryLock('exclusive', BYTE0);
    const script = `
      import { openLockable } from ${JSON.stringify(new URL('../dist/index.js', import.meta.url).href)};
      const f = openLockable(${JSON.stringify(fx.path)});
      f.lock('exclusive', { start: 0, length: 1 }, { timeout: 300 }).then(
        () => console.log('granted'), (e) => console.log(e.code));`;
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8' });
    expect(r.stdout.trim()).toBe('ERR_LOCK_TIMEOUT');
    expect(r.status).toBe(0);
  });
});

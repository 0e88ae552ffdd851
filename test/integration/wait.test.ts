import { readFile } from 'node:fs/promises';
import { setImmediate as tick } from 'node:timers/promises';
import { describe, expect, it } from 'vitest';
import { AbortError, LockTimeoutError, openLockable, type LockableFile } from '../../lib/index.js';
import { spawnSync } from 'node:child_process';
import { chmodSync } from 'node:fs';
import { distUrl, isRoot, lockFixture, runScript, waitUntil } from '../helpers.js';

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

  it('close() with a wait pending releases the file locks even when the holder lets go at the same moment', async () => {
    // A waiter inside F_OFD_SETLKW can be granted the lock just as close()
    // runs; the kernel must drop that late grant by itself, without JS help.
    const holder = lockable();
    let lateGrants = 0;
    for (let i = 0; i < 200; i++) {
      const range = { start: i, length: 1 };
      holder.tryLock('exclusive', range);
      const w = openLockable(fx.path);
      const p = w.lock('exclusive', range).catch((e: { code: string }) => e.code);
      await new Promise((r) => setImmediate(r));
      holder.unlock(range);
      w.close();
      expect(await p).toBe('ERR_INVALID_STATE');
      // Never for longer than the waiter thread takes to leave the kernel:
      // the event loop does nothing to release it.
      if (!holder.tryLock('exclusive', range)) {
        lateGrants++;
        await waitUntil(() => holder.tryLock('exclusive', range), 2000, 'a late grant to be dropped by the kernel');
      }
      holder.unlock(range);
    }
    expect(lateGrants).toBeLessThan(200);
  });

  it('a very large timeout means wait (no overflow into "no wait" or "time out now")', async () => {
    const holder = lockable();
    holder.tryLock('exclusive', BYTE0);
    const f = lockable();
    for (const timeout of [1e13, Number.MAX_SAFE_INTEGER, 1e300]) {
      const ac = new AbortController();
      const p = f.lock('exclusive', BYTE0, { timeout, signal: ac.signal });
      for (let i = 0; i < 5; i++) expect(await state(p)).toBe('pending');
      ac.abort();
      await expect(p).rejects.toMatchObject({ code: 'ABORT_ERR' });
    }
  });

  it('one AbortSignal shared by many waits cancels them all, with one listener', async () => {
    const holder = lockable();
    holder.tryLock('exclusive');
    const f = lockable();
    const warnings: string[] = [];
    const onWarning = (w: Error) => warnings.push(w.name);
    process.on('warning', onWarning);
    const ac = new AbortController();
    const waits = Array.from({ length: 50 }, (_, i) => f.lock('shared', { start: i, length: 1 }, { signal: ac.signal }));
    ac.abort();
    const results = await Promise.allSettled(waits);
    expect(results.map((r) => (r.status === 'rejected' ? (r.reason as { code: string }).code : 'granted'))).toEqual(Array(50).fill('ABORT_ERR'));
    await new Promise((r) => setImmediate(r));
    process.off('warning', onWarning);
    expect(warnings).not.toContain('MaxListenersExceededWarning');
  });

  it('two copies of the JavaScript in one process share the waiter pool', () => {
    const script = `const a = await import(${JSON.stringify(`${distUrl}?copy=1`)});
      const b = await import(${JSON.stringify(`${distUrl}?copy=2`)});
      const h = a.openLockable(${JSON.stringify(fx.path)}); h.tryLock('exclusive');
      const out = [];
      for (const m of [a, b]) {
        const f = m.openLockable(${JSON.stringify(fx.path)});
        out.push(await f.lock('shared', undefined, { timeout: 20 }).then(() => 'granted', (e) => e.name));
      }
      console.log(JSON.stringify(out));`;
    expect(runScript(script)).toEqual(['LockTimeoutError', 'LockTimeoutError']);
  });

  // RLIMIT_SIGPENDING counts every process of the user, so the check runs as a
  // user with no other processes (nobody, through setpriv: root only).
  it.skipIf(!isRoot)('out of timers (RLIMIT_SIGPENDING) is ResourceExhaustedError from timer_create, and the other waits still work', () => {
    chmodSync(fx.tmp.dir, 0o755);
    chmodSync(fx.path, 0o666);
    const script = `import { openLockable } from ${JSON.stringify(distUrl)};
      const h = openLockable(${JSON.stringify(fx.path)}); h.tryLock('exclusive');
      const f = openLockable(${JSON.stringify(fx.path)});
      const ps = Array.from({ length: 20 }, (_, i) => f.lock('shared', { start: i, length: 1 }).then(() => 'granted', (e) => e.name + ' ' + e.cause?.syscall + ' ' + e.cause?.code));
      setTimeout(() => h.close(), 100);
      const out = {}; for (const r of await Promise.all(ps)) out[r] = (out[r] ?? 0) + 1;
      console.log(JSON.stringify(out));`;
    const r = spawnSync('prlimit', ['--sigpending=8', 'setpriv', '--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, '--input-type=module', '-e', script], {
      encoding: 'utf8',
    });
    const out = JSON.parse(r.stdout) as Record<string, number>;
    expect(Object.keys(out).sort()).toEqual(['ResourceExhaustedError timer_create EAGAIN', 'granted']);
    expect(out.granted! + out['ResourceExhaustedError timer_create EAGAIN']!).toBe(20);
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
      import { openLockable } from ${JSON.stringify(new URL('../../dist/index.js', import.meta.url).href)};
      const f = openLockable(${JSON.stringify(fx.path)});
      f.lock('exclusive', { start: 0, length: 1 }, { timeout: 300 }).then(
        () => console.log('granted'), (e) => console.log(e.code));`;
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8' });
    expect(r.stdout.trim()).toBe('ERR_LOCK_TIMEOUT');
    expect(r.status).toBe(0);
  });
});

// Locks tied to a scope: hold()/tryHold() handles released by `using` and
// `await using` (Symbol.dispose / Symbol.asyncDispose), and withLock(), which
// opens, locks, runs and always releases. A peer process checks from outside
// whether the lock is held.
import { describe, expect, it } from 'vitest';
import { AbortError, HeldLock, InvalidArgumentError, LockTimeoutError, ResourceAccessError, withLock } from '../../lib/index.js';
import { fdCount, lockFixture } from '../helpers.js';

const fx = lockFixture({ peer: true });

/** Whether another process could take `mode` on the whole file now (it lets go at once). */
async function freeForPeer(mode: 'exclusive' | 'shared' = 'exclusive', range?: { start: number; length: number }): Promise<boolean> {
  const h = await fx.peer.call<number>('open', fx.path);
  try {
    // (Over IPC an undefined range would arrive as null.)
    return await fx.peer.call<boolean>('tryLock', h, mode, ...(range === undefined ? [] : [range]));
  } finally {
    await fx.peer.call('close', h);
  }
}

describe('hold() and tryHold(): a handle that releases its lock', () => {
  it('`using` releases at the end of the block, the file stays open', async () => {
    const f = fx.open();
    {
      using held = await f.hold('exclusive', { start: 0, length: 1 });
      expect(held).toBeInstanceOf(HeldLock);
      expect([held.mode, held.start, held.length, held.released]).toEqual(['exclusive', 0, 1, false]);
      expect(await freeForPeer('shared', { start: 0, length: 1 })).toBe(false);
    }
    expect(await freeForPeer('exclusive', { start: 0, length: 1 })).toBe(true);
    expect(f.closed).toBe(false);
  });

  it('`await using` releases too (Symbol.asyncDispose), also when the block throws', async () => {
    const f = fx.open();
    const boom = new Error('boom');
    let seen: HeldLock | undefined;
    await expect(
      (async () => {
        await using held = await f.hold('shared');
        seen = held;
        expect(await freeForPeer('exclusive')).toBe(false);
        throw boom;
      })(),
    ).rejects.toBe(boom);
    expect(seen!.released).toBe(true);
    expect(await freeForPeer('exclusive')).toBe(true);
  });

  it('tryHold(): null when busy, never waiting; a handle when free', async () => {
    const h = await fx.peer.call<number>('open', fx.path);
    await fx.peer.call('tryLock', h, 'exclusive', { start: 0, length: 1 });
    const f = fx.open();
    expect(f.tryHold('shared', { start: 0, length: 1 })).toBeNull();
    await fx.peer.call('close', h);
    const held = f.tryHold('exclusive', { start: 0, length: 1 });
    expect(held).toBeInstanceOf(HeldLock);
    expect(await freeForPeer('shared', { start: 0, length: 1 })).toBe(false);
    held!.release();
    expect(await freeForPeer('exclusive', { start: 0, length: 1 })).toBe(true);
  });

  it('release() is idempotent, and a no-op once the file was closed (which released the lock)', async () => {
    const f = fx.open();
    const held = await f.hold('exclusive');
    held.release();
    // A lock taken again after the first release is not released by a second call.
    f.tryLock('exclusive');
    held.release();
    expect(await freeForPeer('shared')).toBe(false);
    const again = f.tryHold('exclusive')!;
    f.close();
    expect(again.released).toBe(true);
    expect(() => again.release()).not.toThrow();
    expect(await freeForPeer('exclusive')).toBe(true);
  });

  it('hold() waits, times out and aborts as lock() does', async () => {
    const h = await fx.peer.call<number>('open', fx.path);
    await fx.peer.call('tryLock', h, 'exclusive');
    const f = fx.open();
    await expect(f.hold('shared', undefined, { timeout: 0 })).rejects.toBeInstanceOf(LockTimeoutError);
    await expect(f.hold('shared', undefined, { signal: AbortSignal.abort() })).rejects.toBeInstanceOf(AbortError);
    const waiting = f.hold('shared', undefined, { timeout: 60_000 });
    await fx.peer.call('close', h);
    const held = await waiting;
    expect(held.released).toBe(false);
    expect(await freeForPeer('exclusive')).toBe(false);
  });
});

describe('withLock(path, mode, fn, { timeout, signal }): open, lock, run, always release', () => {
  it("runs fn holding the lock, resolves to fn's value, and closes the file after", async () => {
    const fds = fdCount();
    const value = await withLock(fx.path, 'exclusive', async (file) => {
      expect(file.path).toBe(fx.path);
      expect(await freeForPeer('shared')).toBe(false);
      return 42;
    });
    expect(value).toBe(42);
    expect(await freeForPeer('exclusive')).toBe(true);
    expect(fdCount()).toBe(fds);
  });

  it("rejects with fn's error, and still releases and closes", async () => {
    const fds = fdCount();
    const boom = new Error('boom');
    await expect(
      withLock(fx.path, 'shared', () => {
        throw boom;
      }),
    ).rejects.toBe(boom);
    expect(await freeForPeer('exclusive')).toBe(true);
    expect(fdCount()).toBe(fds);
  });

  it('a busy file: waits for it; times out (LockTimeoutError) or aborts (AbortError) without running fn; nothing left open', async () => {
    const h = await fx.peer.call<number>('open', fx.path);
    await fx.peer.call('tryLock', h, 'exclusive');
    const fds = fdCount();
    let ran = 0;
    const fn = () => ran++;
    await expect(withLock(fx.path, 'shared', fn, { timeout: 0 })).rejects.toBeInstanceOf(LockTimeoutError);
    const controller = new AbortController();
    const aborted = withLock(fx.path, 'exclusive', fn, { signal: controller.signal });
    controller.abort(new Error('stop'));
    await expect(aborted).rejects.toBeInstanceOf(AbortError);
    expect(ran).toBe(0);
    expect(fdCount()).toBe(fds);
    const waiting = withLock(fx.path, 'exclusive', fn, { timeout: 60_000 });
    await fx.peer.call('close', h);
    expect(await waiting).toBe(0);
    expect(ran).toBe(1);
    expect(fdCount()).toBe(fds);
  });

  it("a shared lock opens for reading by default (a read-only file will do); a range and access can be given", async () => {
    const { chmodSync } = await import('node:fs');
    chmodSync(fx.path, 0o444);
    // As root, a mode of 0444 does not stop a readwrite open: check the access the file was opened with instead.
    expect(await withLock(fx.path, 'shared', (file) => file.access)).toBe('read');
    expect(await withLock(fx.path, 'exclusive', (file) => file.access)).toBe('readwrite');
    await withLock(
      fx.path,
      'shared',
      async () => {
        expect(await freeForPeer('exclusive', { start: 5, length: 1 })).toBe(false);
        expect(await freeForPeer('exclusive', { start: 0, length: 1 })).toBe(true);
      },
      { range: { start: 5, length: 1 }, access: 'readwrite' },
    );
  });

  it('bad input: InvalidArgumentError before anything is opened; a missing file ResourceAccessError', async () => {
    const fds = fdCount();
    await expect(withLock(fx.path, 'sideways' as never, () => 0)).rejects.toBeInstanceOf(InvalidArgumentError);
    await expect(withLock(fx.path, 'shared', 'not a function' as never)).rejects.toThrow(/withLock needs a function/);
    await expect(withLock(fx.path, 'shared', () => 0, { wait: true } as never)).rejects.toThrow(/withLock options has an unknown option 'wait'/);
    await expect(withLock('relative.img', 'shared', () => 0)).rejects.toBeInstanceOf(InvalidArgumentError);
    await expect(withLock(`${fx.path}.missing`, 'shared', () => 0)).rejects.toBeInstanceOf(ResourceAccessError);
    expect(fdCount()).toBe(fds);
  });
});

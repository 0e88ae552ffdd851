import { closeSync, linkSync, openSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { InvalidStateError, openLockable, type LockableFile, type LockMode } from '../../lib/index.js';
import { Peer, lockFixture, makeFile } from '../helpers.js';

const fx = lockFixture({ peer: true });
const lockable = (p = fx.path, access: 'read' | 'readwrite' = 'readwrite'): LockableFile => fx.open(p, access);

describe('openLockable', () => {
  it('opens a regular file with its kind, path, fd and identity', () => {
    const f = lockable();
    expect(f.kind).toBe('file');
    expect(f.path).toBe(fx.path);
    expect(f.access).toBe('readwrite');
    expect(Number.isInteger(f.fd) && f.fd > 2).toBe(true);
    expect(typeof f.identity.dev).toBe('bigint');
    expect(typeof f.identity.ino).toBe('bigint');
    expect(f.identity.key).toBe(`f:${f.identity.dev}:${f.identity.ino}`);
  });

  it('gives one identity to the same file under two paths, another to another file', () => {
    const hard = join(fx.tmp.dir, 'hard.img');
    const soft = join(fx.tmp.dir, 'soft.img');
    linkSync(fx.path, hard);
    symlinkSync(fx.path, soft);
    const other = makeFile(fx.tmp.dir, 'other.img');
    const key = lockable().identity.key;
    expect(lockable(hard).identity.key).toBe(key);
    expect(lockable(soft).identity.key).toBe(key);
    expect(lockable(other).identity.key).not.toBe(key);
  });

  it('opens its fd close-on-exec', async () => {
    const { readFileSync } = await import('node:fs');
    const f = lockable();
    const flags = /^flags:\s+(\d+)$/m.exec(readFileSync(`/proc/self/fdinfo/${f.fd}`, 'utf8'))![1]!;
    expect(Number.parseInt(flags, 8) & 0o2000000).toBe(0o2000000); // O_CLOEXEC
    expect(Number.parseInt(flags, 8) & 0o4000).toBe(0); // O_NONBLOCK was for the open only
  });
});

// Every pair of modes, on the same, overlapping and disjoint ranges, across two processes.
describe('conflict matrix across processes', () => {
  const modes: LockMode[] = ['exclusive', 'shared'];
  const cases = [
    { name: 'same byte', mine: { start: 0, length: 1 }, theirs: { start: 0, length: 1 }, overlap: true },
    { name: 'overlapping ranges', mine: { start: 10, length: 10 }, theirs: { start: 15, length: 10 }, overlap: true },
    { name: 'whole file against one byte', mine: { start: 0, length: 0 }, theirs: { start: 4000, length: 1 }, overlap: true },
    { name: 'disjoint ranges', mine: { start: 0, length: 10 }, theirs: { start: 10, length: 10 }, overlap: false },
  ];
  for (const c of cases) {
    for (const held of modes) {
      for (const wanted of modes) {
        const conflicts = c.overlap && (held === 'exclusive' || wanted === 'exclusive');
        it(`${c.name}: ${held} held, ${wanted} wanted -> ${conflicts ? 'conflict' : 'granted'}`, async () => {
          const f = lockable();
          expect(f.tryLock(held, c.mine)).toBe(true);
          const h = await fx.peer.call<number>('open', fx.path, { access: 'readwrite' });
          try {
            expect(await fx.peer.call('tryLock', h, wanted, c.theirs)).toBe(!conflicts);
            const conflict = await fx.peer.call<{ mode: string; pid: number } | null>('getConflict', h, wanted, c.theirs);
            if (conflicts) expect(conflict).toMatchObject({ mode: held, pid: -1 });
            else expect(conflict).toBeNull();
          } finally {
            await fx.peer.call('close', h);
          }
        });
      }
    }
  }
});

describe('OFD semantics', () => {
  it('two openLockable() of one file in one process conflict', () => {
    const a = lockable();
    const b = lockable();
    expect(a.tryLock('exclusive', { start: 0, length: 1 })).toBe(true);
    expect(b.tryLock('shared', { start: 0, length: 1 })).toBe(false);
    expect(b.getConflict('shared', { start: 0, length: 1 })).toEqual({ mode: 'exclusive', start: 0, length: 1, pid: -1 });
    a.unlock({ start: 0, length: 1 });
    expect(b.tryLock('shared', { start: 0, length: 1 })).toBe(true);
  });

  it('a second lock through the same open file converts the first instead of conflicting', () => {
    const a = lockable();
    expect(a.tryLock('shared', { start: 0, length: 1 })).toBe(true);
    expect(a.tryLock('exclusive', { start: 0, length: 1 })).toBe(true);
    expect(a.getConflict('exclusive', { start: 0, length: 1 })).toBeNull();
    const b = lockable();
    expect(b.getConflict('shared', { start: 0, length: 1 })).toMatchObject({ mode: 'exclusive' });
  });

  it('closing an unrelated fd of the same file does not drop the lock', async () => {
    const f = lockable();
    expect(f.tryLock('exclusive', { start: 0, length: 1 })).toBe(true);
    closeSync(openSync(fx.path, 'r+'));
    const other = lockable();
    other.close();
    const h = await fx.peer.call<number>('open', fx.path, { access: 'read' });
    expect(await fx.peer.call('tryLock', h, 'shared', { start: 0, length: 1 })).toBe(false);
    await fx.peer.call('close', h);
  });

  it('defaults to the whole file', async () => {
    const f = lockable();
    expect(f.tryLock('exclusive')).toBe(true);
    const h = await fx.peer.call<number>('open', fx.path, { access: 'read' });
    expect(await fx.peer.call('tryLock', h, 'shared', { start: 1_000_000_000, length: 1 })).toBe(false);
    expect(await fx.peer.call('getConflict', h, 'shared', { start: 5, length: 1 })).toEqual({ mode: 'exclusive', start: 0, length: 0, pid: -1 });
    f.unlock();
    expect(await fx.peer.call('tryLock', h, 'shared', { start: 5, length: 1 })).toBe(true);
    await fx.peer.call('close', h);
  });

  it('unlocking what is not locked is a no-op', () => {
    const f = lockable();
    expect(() => f.unlock({ start: 7, length: 3 })).not.toThrow();
    expect(f.tryLock('exclusive', { start: 7, length: 3 })).toBe(true);
  });

  it('a lock held by a killed process is released by the kernel', async () => {
    const p = await Peer.start();
    const h = await p.call<number>('open', fx.path, { access: 'readwrite' });
    expect(await p.call('tryLock', h, 'exclusive', { start: 0, length: 1 })).toBe(true);
    const f = lockable();
    expect(f.tryLock('exclusive', { start: 0, length: 1 })).toBe(false);
    await p.kill('SIGKILL');
    expect(f.tryLock('exclusive', { start: 0, length: 1 })).toBe(true);
  });

  it('a shared lock needs only read access', async () => {
    const f = lockable(fx.path, 'read');
    expect(f.tryLock('shared', { start: 0, length: 1 })).toBe(true);
    const h = await fx.peer.call<number>('open', fx.path, { access: 'readwrite' });
    expect(await fx.peer.call('tryLock', h, 'exclusive', { start: 0, length: 1 })).toBe(false);
    await fx.peer.call('close', h);
  });
});

describe('close', () => {
  it('releases the file locks', async () => {
    const f = openLockable(fx.path);
    expect(f.tryLock('exclusive', { start: 0, length: 1 })).toBe(true);
    const h = await fx.peer.call<number>('open', fx.path, { access: 'readwrite' });
    expect(await fx.peer.call('tryLock', h, 'exclusive', { start: 0, length: 1 })).toBe(false);
    f.close();
    expect(await fx.peer.call('tryLock', h, 'exclusive', { start: 0, length: 1 })).toBe(true);
    await fx.peer.call('close', h);
  });

  it('is idempotent, and every use after it throws InvalidStateError', () => {
    const f = openLockable(fx.path);
    f.close();
    f.close();
    expect(f.closed).toBe(true);
    expect(() => f.fd).toThrow(InvalidStateError);
    expect(() => f.tryLock('shared')).toThrow(InvalidStateError);
    expect(() => f.unlock()).toThrow(InvalidStateError);
    expect(() => f.getConflict('shared')).toThrow(InvalidStateError);
    return expect(f.lock('shared')).rejects.toMatchObject({ code: 'ERR_INVALID_STATE', message: expect.stringContaining(fx.path) });
  });

  it('Symbol.dispose closes', () => {
    const f = openLockable(fx.path);
    f.tryLock('exclusive');
    f[Symbol.dispose]();
    expect(f.closed).toBe(true);
    expect(lockable().tryLock('exclusive')).toBe(true);
  });
});

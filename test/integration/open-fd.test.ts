// openLockable(fd | FileHandle): locking what the caller already has open.
// The locks live on the caller's open file description (the kernel's fdinfo
// of the caller's fd shows them), close() releases them and leaves the
// caller's fd open, and bad descriptors are typed errors.
import { closeSync, fstatSync, mkdirSync, openSync, readFileSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { AccessModeError, InvalidArgumentError, LockableFile, ResourceAccessError, openLockable } from '../../lib/index.js';
import { fdCount, lockFixture } from '../helpers.js';

const fx = lockFixture({ peer: true });

async function peerCanTake(mode: 'exclusive' | 'shared', range: { start: number; length: number }): Promise<boolean> {
  const h = await fx.peer.call<number>('open', fx.path);
  try {
    return await fx.peer.call<boolean>('tryLock', h, mode, range);
  } finally {
    await fx.peer.call('close', h);
  }
}

/** The lock lines the kernel lists for one of this process's fds. */
const lockLines = (fd: number): string[] => readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8').split('\n').filter((l) => l.startsWith('lock:'));

describe('openLockable(fd)', () => {
  it("locks the caller's open file description: the caller's fd shows the lock; close() releases it and leaves the caller's fd open", async () => {
    const before = fdCount();
    const fd = openSync(fx.path, 'r+');
    const f = openLockable(fd);
    expect(f).toBeInstanceOf(LockableFile);
    expect([f.path, f.access, f.kind, f.adopted]).toEqual([fx.path, 'readwrite', 'file', true]);
    expect(f.fd).not.toBe(fd);
    // The duplicate is close-on-exec (flags in fdinfo are octal; O_CLOEXEC is 02000000).
    const flags = Number.parseInt(/^flags:\s+(\d+)/m.exec(readFileSync(`/proc/self/fdinfo/${f.fd}`, 'utf8'))![1]!, 8);
    expect(flags & 0o2000000).toBe(0o2000000);
    expect(f.tryLock('exclusive', { start: 0, length: 1 })).toBe(true);
    expect(lockLines(fd)).toEqual([expect.stringMatching(/OFDLCK\s+ADVISORY\s+WRITE -1 \S+ 0 0$/)]);
    expect(await peerCanTake('shared', { start: 0, length: 1 })).toBe(false);
    f.close();
    expect(await peerCanTake('exclusive', { start: 0, length: 1 })).toBe(true);
    expect(lockLines(fd)).toEqual([]);
    expect(fstatSync(fd).isFile()).toBe(true);
    closeSync(fd);
    expect(fdCount()).toBe(before);
  });

  it("an fd opened for reading: shared locks only (AccessModeError for exclusive); `path` names it in messages", async () => {
    const fd = openSync(fx.path, 'r');
    try {
      const f = openLockable(fd, { path: '/images/named.img' });
      expect([f.access, f.path]).toEqual(['read', '/images/named.img']);
      expect(() => f.tryLock('exclusive')).toThrow(AccessModeError);
      expect(() => f.tryLock('exclusive')).toThrow(/\/images\/named\.img/);
      expect(f.tryLock('shared')).toBe(true);
      expect(await peerCanTake('exclusive', { start: 0, length: 1 })).toBe(false);
      f.close();
      expect(await peerCanTake('exclusive', { start: 0, length: 1 })).toBe(true);
    } finally {
      closeSync(fd);
    }
  });

  it('bad descriptors are InvalidArgumentError (a directory ResourceAccessError), and nothing is left open', async () => {
    const before = fdCount();
    const fd = openSync(fx.path, 'r');
    closeSync(fd);
    expect(() => openLockable(fd)).toThrow(/is not an open file descriptor/);
    for (const bad of [-1, 1.5, Number.NaN, 2 ** 31]) expect(() => openLockable(bad)).toThrow(InvalidArgumentError);
    expect(() => openLockable({} as never)).toThrow(/path must be a string, a file descriptor or a FileHandle, got an object/);
    const w = openSync(fx.path, 'w');
    expect(() => openLockable(w)).toThrow(/write-only/);
    closeSync(w);
    const nul = openSync('/dev/null', 'r');
    expect(() => openLockable(nul)).toThrow(InvalidArgumentError);
    closeSync(nul);
    const fifo = join(fx.tmp.dir, 'fifo');
    execFileSync('mkfifo', [fifo]);
    const p = openSync(fifo, 'r+');
    expect(() => openLockable(p)).toThrow(InvalidArgumentError);
    closeSync(p);
    const dir = join(fx.tmp.dir, 'dir');
    mkdirSync(dir);
    const d = openSync(dir, 'r');
    expect(() => openLockable(d)).toThrow(ResourceAccessError);
    closeSync(d);
    const ok = openSync(fx.path, 'r');
    expect(() => openLockable(ok, { access: 'read' } as never)).toThrow(/openLockable options has an unknown option 'access'/);
    closeSync(ok);
    expect(fdCount()).toBe(before);
  });
});

describe('openLockable(FileHandle)', () => {
  it("locks through the handle's descriptor; the handle stays the caller's to close", async () => {
    const before = fdCount();
    const handle = await open(fx.path, 'r+');
    const f = openLockable(handle);
    expect([f.path, f.access, f.adopted]).toEqual([fx.path, 'readwrite', true]);
    await f.lock('exclusive', { start: 0, length: 1 });
    expect(lockLines(handle.fd)).toHaveLength(1);
    expect(await peerCanTake('shared', { start: 0, length: 1 })).toBe(false);
    f.close();
    expect(await peerCanTake('exclusive', { start: 0, length: 1 })).toBe(true);
    expect((await handle.stat()).isFile()).toBe(true);
    await handle.close();
    expect(() => openLockable(handle)).toThrow(/the FileHandle is closed/);
    expect(fdCount()).toBe(before);
  });
});

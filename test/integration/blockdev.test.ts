import { execFileSync } from 'node:child_process';
import { existsSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LockManager, ResourceBusyError, openLockable } from '../../lib/index.js';
import { Peer, isRoot, tempDir } from '../helpers.js';

const canLoop = isRoot && existsSync('/dev/loop-control');
if (!canLoop) {
  console.warn(`skipping block-device tests: ${isRoot ? '/dev/loop-control is missing' : 'losetup needs root'}`);
}

describe.skipIf(!canLoop)('block devices (a loop device over a sparse file)', () => {
  let tmp: ReturnType<typeof tempDir>;
  let device: string;
  let peer: Peer;

  beforeAll(async () => {
    tmp = tempDir();
    const backing = join(tmp.dir, 'backing.img');
    writeFileSync(backing, '');
    truncateSync(backing, 64 * 1024 * 1024);
    device = execFileSync('losetup', ['-f', '--show', backing], { encoding: 'utf8' }).trim();
    peer = await Peer.start();
  });

  afterAll(async () => {
    await peer?.kill();
    if (device) execFileSync('losetup', ['-d', device]);
    tmp?.cleanup();
    // The device is gone: no loop device left over this test's backing file.
    expect(execFileSync('losetup', ['-j', join(tmp.dir, 'backing.img')], { encoding: 'utf8' })).toBe('');
  });

  it('opens as a block device whose identity is the device number', () => {
    const f = openLockable(device);
    try {
      expect(f.kind).toBe('block-device');
      expect(f.identity.ino).toBe(0n);
      expect(f.identity.key).toMatch(/^b:\d+$/);
    } finally {
      f.close();
    }
  });

  it('two managers on two device nodes of one disk exclude each other (the lease is on the canonical node)', async () => {
    const alias = join(tmp.dir, 'alias-node');
    const st = statSync(device);
    execFileSync('mknod', [alias, 'b', String(Math.floor(st.rdev / 256) & 0xfff), String(st.rdev & 0xff)]);
    // The kernel itself does not exclude them: two inodes, two lock lists.
    const rawA = openLockable(device);
    const rawB = openLockable(alias);
    expect(rawA.identity.key).toBe(rawB.identity.key);
    expect(rawA.tryLock('exclusive', { start: 0, length: 1 })).toBe(true);
    expect(rawB.tryLock('exclusive', { start: 0, length: 1 })).toBe(true);
    rawA.close();
    rawB.close();
    const a = new LockManager();
    const b = new LockManager();
    try {
      a.registerResource({ type: 'disk', path: device, mode: 'exclusive' });
      await a.start('sleep', ['1000']);
      b.registerResource({ type: 'disk', path: alias, mode: 'shared' });
      const err = await b.start('sleep', ['1000']).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(ResourceBusyError);
      expect((err as ResourceBusyError).resource).toBe(alias);
    } finally {
      await a.free();
      await b.free();
    }
  });

  it('locks and is contended from another process', async () => {
    const f = openLockable(device);
    try {
      expect(f.tryLock('exclusive', { start: 0, length: 1 })).toBe(true);
      const h = await peer.call<number>('open', device, { access: 'readwrite' });
      expect(await peer.call('tryLock', h, 'shared', { start: 0, length: 1 })).toBe(false);
      expect(await peer.call('getConflict', h, 'shared', { start: 0, length: 1 })).toEqual({ mode: 'exclusive', start: 0, length: 1, pid: -1 });
      const waiting = peer.call('lock', h, 'exclusive', { start: 0, length: 1 }, { timeout: 30_000 });
      f.unlock({ start: 0, length: 1 });
      expect(await waiting).toBe(true);
      expect(f.tryLock('shared', { start: 0, length: 1 })).toBe(false);
      await peer.call('close', h);
      expect(f.tryLock('shared', { start: 0, length: 1 })).toBe(true);
    } finally {
      f.close();
    }
  });
});

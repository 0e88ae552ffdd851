import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, rmSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { InvalidArgumentError, LockManager, ResourceAccessError, ResourceBusyError, openLockable } from '../../lib/index.js';
import type { StatusEntry } from '../../lib/cli/main.js';
import { locksOn } from '../../lib/os/proc-locks.js';
import { Peer, isRoot, tempDir } from '../helpers.js';

const BIN = fileURLToPath(new URL('../../bin/lockmgr.js', import.meta.url));
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

// Writing a loop device writes its backing file: each used to get its own
// lease, so a VM on /dev/loopN and another on the file (or on a second loop
// device of the same file) both ran "exclusively" (issue 18, part 2). A loop
// device's lease now covers its backing file too, all or nothing.
describe.skipIf(!canLoop)('a loop device and its backing file (real losetup)', () => {
  let tmp: ReturnType<typeof tempDir>;
  let backing: string;
  const devices: string[] = [];
  // Only this test's: other test files attach and detach loop devices of their own meanwhile.
  const loopsOnTmp = () => execFileSync('losetup', ['-a'], { encoding: 'utf8' }).split('\n').filter((l) => l.includes(tmp.dir));
  const attach = (file: string) => {
    const d = execFileSync('losetup', ['-f', '--show', file], { encoding: 'utf8' }).trim();
    devices.push(d);
    return d;
  };

  beforeAll(() => {
    tmp = tempDir();
    backing = join(tmp.dir, 'backing.img');
    writeFileSync(backing, '');
    truncateSync(backing, 16 * 1024 * 1024);
  });

  afterAll(() => {
    for (const d of devices.splice(0)) execFileSync('losetup', ['-d', d]);
    // Every loop device this test attached is detached again.
    const left = loopsOnTmp();
    tmp?.cleanup();
    expect(left).toEqual([]);
  });

  for (const lockspace of ['direct', 'indirect'] as const) {
    describe(lockspace, () => {
      const managers: LockManager[] = [];
      const manager = () => {
        let options = {};
        if (lockspace === 'indirect') {
          const dir = join(tmp.dir, 'locks');
          if (!existsSync(dir)) mkdirSync(dir, { mode: 0o700 });
          options = { lockspace: { kind: 'indirect', dir } };
        }
        const m = new LockManager(options);
        managers.push(m);
        return m;
      };
      const holding = async (path: string, mode: 'exclusive' | 'shared') => {
        const m = manager();
        m.registerResource({ type: 'disk', path, mode });
        await m.start('sleep', ['1000']);
        return m;
      };
      const refused = async (path: string, mode: 'exclusive' | 'shared') => {
        const m = manager();
        m.registerResource({ type: 'disk', path, mode });
        const err = await m.start('sleep', ['1000']).catch((e: unknown) => e);
        expect(err, `${mode} ${path}`).toBeInstanceOf(ResourceBusyError);
        expect(m.resources[0]!.held).toBe(false);
        await m.free();
        return err as ResourceBusyError;
      };
      afterAll(async () => {
        for (const m of managers.splice(0)) await m.free();
      });

      it('the loop device held exclusively: its backing file is busy, exclusive or shared', async () => {
        const loop = attach(backing);
        const a = await holding(loop, 'exclusive');
        await refused(backing, 'exclusive');
        await refused(backing, 'shared');
        await a.free();
        // Released together: the file is free again.
        await (await holding(backing, 'exclusive')).free();
      });

      it('the backing file held: the loop device is busy, and it took nothing (all or nothing)', async () => {
        const loop = devices[0]!;
        const a = await holding(backing, 'exclusive');
        const err = await refused(loop, 'exclusive');
        if (lockspace === 'direct') {
          // The backing file is what it is, not a lock file.
          expect(err.message).toContain(`${loop} (its backing file ${backing}) is held exclusively by`);
          expect([err.lockFile, err.lockFileRole]).toEqual([backing, 'backing file']);
          // status names the loop device's lease held, through its backing file, and by whom.
          const r = spawnSync(process.execPath, [BIN, 'status', loop], { encoding: 'utf8', timeout: 30_000, killSignal: 'SIGKILL' });
          expect(r.stdout, r.stderr).toMatch(new RegExp(`lease \\(byte 0\\) +held exclusive by pid ${process.pid}, \\d+, through its backing file ${backing}\n`));
          const json = JSON.parse(spawnSync(process.execPath, [BIN, 'status', '--json', loop], { encoding: 'utf8', timeout: 30_000, killSignal: 'SIGKILL' }).stdout) as { entries: StatusEntry[] };
          const behind = json.entries[0]!.backingFile!;
          expect([behind.path, behind.lease.state]).toEqual([backing, 'exclusive']);
          expect(behind.holders.map((h) => [h.pid, h.orphan])).toContainEqual([process.pid, false]);
        }
        // Nothing of the refused lease is left locked on the loop device's node.
        expect(locksOn(loop)).toEqual([]);
        await a.free();
      });

      it('two loop devices on one file exclude each other; shared ones share', async () => {
        const [one, two] = [devices[0]!, devices[1] ?? attach(backing)];
        const a = await holding(one, 'exclusive');
        await refused(two, 'exclusive');
        await refused(two, 'shared');
        await a.free();
        const s1 = await holding(one, 'shared');
        const s2 = await holding(two, 'shared');
        expect([s1.state, s2.state]).toEqual(['running', 'running']);
        await refused(backing, 'exclusive');
        await s1.free();
        await s2.free();
      });

      // Both names in one manager once waited forever on their own backing-file lease (issue 14, review defect 7).
      it('one disk by two names in one manager (the loop device and its file, two loop devices of it) is refused at registration, in every mode, naming both', async () => {
        const [one, two] = [devices[0]!, devices[1] ?? attach(backing)];
        for (const mode of ['exclusive', 'shared', 'readonly'] as const) {
          for (const [first, second, why] of [
            [one, backing, `${one} is a loop device over ${backing}`],
            [backing, one, `${one} is a loop device over ${backing}`],
            [one, two, `both are loop devices over ${backing}`],
          ] as const) {
            const m = manager();
            m.registerResource({ type: 'disk', path: first, mode });
            let err: unknown;
            try {
              m.registerResource({ type: 'disk', path: second, mode });
            } catch (e) {
              err = e;
            }
            expect(err, `${mode} ${first} ${second}`).toBeInstanceOf(InvalidArgumentError);
            expect((err as Error).message).toBe(`${first} and ${second} are the same disk: ${why}`);
            // The refused name left nothing registered; the first still starts, holding the disk.
            expect(m.resources.map((r) => r.path)).toEqual([first]);
            await m.start('true', []);
            expect(m.state).not.toBe('new');
            await m.free();
          }
        }
        // Nothing of either is left locked.
        expect([...locksOn(one), ...locksOn(two), ...locksOn(backing)]).toEqual([]);
      });
    });
  }

  it('a loop device whose backing file was deleted is refused: its lease could not cover the file', () => {
    const gone = join(tmp.dir, 'gone.img');
    writeFileSync(gone, '');
    truncateSync(gone, 1024 * 1024);
    const loop = attach(gone);
    rmSync(gone);
    const m = new LockManager();
    expect(() => m.registerResource({ type: 'disk', path: loop, mode: 'exclusive' })).toThrow(ResourceAccessError);
    expect(() => m.registerResource({ type: 'disk', path: loop, mode: 'exclusive' })).toThrow(/no longer names that file \(deleted, renamed or replaced\)/);
    void m.free();
    // status still shows the device itself (who holds it), without a backing file to show.
    const r = spawnSync(process.execPath, [BIN, 'status', '--json', loop], { encoding: 'utf8', timeout: 30_000, killSignal: 'SIGKILL' });
    expect(r.status, r.stdout + r.stderr).toBe(0);
    const entry = (JSON.parse(r.stdout) as { entries: StatusEntry[] }).entries[0]!;
    expect([entry.path, entry.kind, entry.error, entry.backingFile]).toEqual([loop, 'block-device', undefined, undefined]);
  });
});

// The indirect lockspace (lib/lockspaces/indirect.ts): lock file names, hard
// links and symlinks, the create/lock/recheck/delete protocol under races, the
// directory checks, named leases and block devices. Real processes throughout.
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import {
  chmodSync,
  chownSync,
  existsSync,
  linkSync,
  lstatSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  realpathSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { AbortError, InvalidArgumentError, LockTimeoutError, ResourceAccessError } from '../../lib/os/errors.js';
import { openLockable } from '../../lib/os/locks.js';
import type { TakeOptions } from '../../lib/lockspaces/driver.js';
import { checkLockDir } from '../../lib/lockspaces/lock-files.js';
import { GUARD_RANGE, LEASE_RANGE, type OfdLease as Lease } from '../../lib/lockspaces/ofd.js';
import {
  blockDeviceIdentity,
  hostId,
  indirectLockspace,
  inodeIdentity,
  lockFileName,
  type IndirectLockspace,
} from '../../lib/lockspaces/indirect.js';
import { major, minor } from '../../lib/os/proc-locks.js';
import { Peer, fdCount, isRoot, makeFile, tempDir } from '../helpers.js';

const peerScript = fileURLToPath(new URL('../fixtures/indirect-peer.mjs', import.meta.url));
const raceScript = fileURLToPath(new URL('../fixtures/indirect-race.mjs', import.meta.url));

const FAST: TakeOptions = { wait: false };

/** Takes every slot in order, as a lock manager does; on a busy one releases what it took. */
async function takeAll(lease: Lease, mode: 'exclusive' | 'shared', options: TakeOptions = FAST): Promise<boolean> {
  const taken = [];
  for (const slot of lease.slots) {
    if (!(await slot.take(mode, LEASE_RANGE, options))) {
      for (const s of taken.reverse()) s.release(LEASE_RANGE);
      return false;
    }
    taken.push(slot);
  }
  return true;
}

function releaseAll(lease: Lease): void {
  for (const s of [...lease.slots].reverse()) s.release(LEASE_RANGE);
}

function sha256sum(text: string): string {
  return execFileSync('sh', ['-c', 'printf "%s" "$1" | sha256sum', 'sh', text], { encoding: 'utf8' }).split(' ')[0]!;
}

let tmp: ReturnType<typeof tempDir>;
let dir: string;
let space: IndirectLockspace;
let image: string;
const leases: Lease[] = [];

function open(path = image, mode: 'exclusive' | 'shared' | 'readonly' = 'exclusive'): Lease {
  const lease = space.open({ type: 'disk', path: path }, mode);
  leases.push(lease);
  return lease;
}

beforeEach(() => {
  tmp = tempDir();
  dir = join(tmp.dir, 'locks');
  mkdirSync(dir, { mode: 0o700 });
  space = indirectLockspace({ kind: 'indirect', dir });
  image = makeFile(tmp.dir);
});

afterEach(() => {
  for (const l of leases.splice(0)) l.close();
  tmp.cleanup();
});

describe('lock file names', () => {
  it('a regular file: virtlockd\'s sha256(realpath) first, then the inode name; Lease.key is the path name', () => {
    const link = join(tmp.dir, 'link.img');
    symlinkSync(image, link);
    const names = space.describeDisk(link);
    const st = statSync(image, { bigint: true });
    expect(names.kind).toBe('file');
    expect(names.files.map((f) => f.source)).toEqual(['path', 'inode']);
    expect(names.files[0]!.identity).toBe(image);
    expect(names.files[0]!.name).toBe(sha256sum(image));
    expect(names.files[0]!.path).toBe(join(dir, sha256sum(image)));
    expect(names.files[1]!.identity).toBe(`inode:${hostId()}:${st.dev}:${st.ino}`);
    expect(names.files[1]!.name).toBe(sha256sum(inodeIdentity(st.dev, st.ino)));
    expect(names.key).toBe(sha256sum(image));
    expect(readdirSync(dir)).toEqual([]); // describing creates nothing

    const lease = open(link);
    expect(lease.key).toBe(sha256sum(image));
    expect(lease.kind).toBe('file');
    expect(lease.path).toBe(link);
    expect(lease.slots.map((s) => s.path)).toEqual(names.files.map((f) => f.path));
    expect(lease.image?.access).toBe('read');
    expect(lease.image?.path).toBe(link);
  });

  it('the host id is the kernel boot id (device and inode numbers mean something within one running kernel)', () => {
    const boot = readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
    expect(boot).toMatch(/^[0-9a-f-]{36}$/);
    expect(hostId()).toBe(boot);
  });

  it('lock files are regular files of mode 0600, created at open and deleted when the lease closes', async () => {
    const lease = open();
    for (const s of lease.slots) expect(lstatSync(s.path).mode & 0o7777).toBe(0o600);
    expect(await takeAll(lease, 'exclusive')).toBe(true);
    releaseAll(lease);
    expect(readdirSync(dir)).toEqual([]);
    expect(await takeAll(lease, 'shared')).toBe(true); // recreated by the next take
    expect(readdirSync(dir).sort()).toEqual(lease.slots.map((s) => s.path.slice(dir.length + 1)).sort());
    lease.close();
    expect(readdirSync(dir)).toEqual([]);
    lease.close(); // idempotent
  });
});

describe('one lock per file, whatever the path (separate processes)', () => {
  let peer: Peer;
  beforeAll(async () => {
    peer = await Peer.start(process.env, peerScript);
  });
  afterAll(() => peer.kill());

  it('a symlink and a hard link to a file held exclusively elsewhere are refused; free again once released', async () => {
    const sym = join(tmp.dir, 'sym.img');
    const hard = join(tmp.dir, 'hard.img');
    symlinkSync(image, sym);
    linkSync(image, hard);
    const h = await peer.call<number>('openDisk', dir, image, 'exclusive');
    expect(await peer.call('takeAll', h, 'exclusive', LEASE_RANGE, { wait: false })).toBe(true);

    const viaSym = open(sym);
    const viaHard = open(hard);
    expect(viaSym.key).toBe(sha256sum(image)); // realpath: the same path name
    expect(viaHard.key).toBe(sha256sum(hard)); // a different path name...
    expect(viaHard.slots[1]!.path).toBe(viaSym.slots[1]!.path); // ...but the same inode name
    expect(await takeAll(viaSym, 'exclusive')).toBe(false);
    expect(await takeAll(viaHard, 'exclusive')).toBe(false);
    expect(await takeAll(viaHard, 'shared')).toBe(false);
    // The hard link's own path file was taken and given back: only the peer's two files remain.
    expect(readdirSync(dir).sort()).toEqual([...viaSym.slots.map((s) => s.path.slice(dir.length + 1))].sort());

    await peer.call('release', h, LEASE_RANGE);
    expect(await takeAll(viaHard, 'exclusive')).toBe(true);
    expect(await takeAll(viaSym, 'shared')).toBe(false);
    releaseAll(viaHard);
    expect(await takeAll(viaSym, 'shared')).toBe(true);
    await peer.call('close', h);
  });

  it('shared holders share across paths; an exclusive one is refused until the last has gone', async () => {
    const hard = join(tmp.dir, 'hard.img');
    linkSync(image, hard);
    const h = await peer.call<number>('openDisk', dir, hard, 'shared');
    expect(await peer.call('takeAll', h, 'shared', LEASE_RANGE, { wait: false })).toBe(true);
    const reader = open(image, 'readonly');
    expect(await takeAll(reader, 'shared')).toBe(true);
    const writer = open(image);
    expect(await takeAll(writer, 'exclusive')).toBe(false);
    releaseAll(reader);
    expect(await takeAll(writer, 'exclusive')).toBe(false); // the peer still reads, through its hard link
    await peer.call('close', h);
    expect(await takeAll(writer, 'exclusive')).toBe(true);
  });

  it('a waiting take times out or aborts while the peer holds it, and gets it once the peer lets go', async () => {
    const h = await peer.call<number>('openDisk', dir, image, 'exclusive');
    expect(await peer.call('takeAll', h, 'exclusive', LEASE_RANGE, { wait: false })).toBe(true);
    const lease = open();
    await expect(lease.slots[0]!.take('exclusive', LEASE_RANGE, { wait: true, timeout: 20 })).rejects.toBeInstanceOf(LockTimeoutError);
    const ac = new AbortController();
    const aborted = lease.slots[0]!.take('exclusive', LEASE_RANGE, { wait: true, signal: ac.signal });
    ac.abort();
    await expect(aborted).rejects.toBeInstanceOf(AbortError);
    const waiting = takeAll(lease, 'exclusive', { wait: true });
    // The peer releases: its files are deleted under our waiting take, which
    // must find that out and lock the recreated files instead.
    await peer.call('close', h);
    expect(await waiting).toBe(true);
    for (const s of lease.slots) {
      const st = lstatSync(s.path, { bigint: true });
      expect([st.dev, st.ino]).toEqual([s.file.identity.dev, s.file.identity.ino]);
    }
  });

  it('the migration guard: a lock file whose byte 1 someone holds is not deleted at release', async () => {
    const h = await peer.call<number>('openDisk', dir, image, 'shared');
    expect(await peer.call('take', h, 0, 'exclusive', GUARD_RANGE, { wait: false })).toBe(true);
    const lease = open();
    const slot = lease.slots[0]!;
    expect(await slot.take('exclusive', LEASE_RANGE, FAST)).toBe(true);
    const before = lstatSync(slot.path, { bigint: true }).ino;
    slot.release(LEASE_RANGE);
    expect(existsSync(slot.path)).toBe(true);
    expect(lstatSync(slot.path, { bigint: true }).ino).toBe(before);
    expect(await slot.take('shared', GUARD_RANGE, FAST)).toBe(false); // still the peer's guard
    lease.close();
    expect(existsSync(slot.path)).toBe(true);
    await peer.call('release', h, GUARD_RANGE); // the last holder deletes it
    expect(existsSync(slot.path)).toBe(false);
    await peer.call('close', h);
    expect(readdirSync(dir)).toEqual([]);
  });

  it('a fast-fail take waits out a deleter (a whole-file lock) instead of calling the lease busy, then locks the new file', async () => {
    const lease = open();
    const slot = lease.slots[0]!;
    // Keeps the first inode alive, so the recreated file cannot reuse its number.
    using pin = openLockable(slot.path, { access: 'read' });
    const first = pin.identity.ino;
    const h = await peer.call<number>('rawLock', slot.path, 'exclusive', { start: 0, length: 0 });
    expect(h).toBeGreaterThan(0);
    const taking = slot.take('exclusive', LEASE_RANGE, FAST);
    await peer.call('rawUnlinkAndClose', h);
    expect(await taking).toBe(true);
    expect(slot.file.identity.ino).not.toBe(first);
    expect(lstatSync(slot.path, { bigint: true }).ino).toBe(slot.file.identity.ino);
    // A holder's lock on byte 0 is a plain "busy".
    const other = await peer.call<number>('openDisk', dir, image, 'exclusive');
    expect(await peer.call('take', other, 0, 'shared', LEASE_RANGE, { wait: false })).toBe(false);
    await peer.call('close', other);
  });

  it('a named lease <path>/<lockspace>/<key> excludes across processes and is never deleted (it may be someone\'s configuration)', async () => {
    const spec = { path: tmp.dir, lockspace: 'vmspace', key: 'disk-1' };
    const h = await peer.call<number>('openLease', dir, spec, 'exclusive');
    expect(await peer.call('takeAll', h, 'exclusive', LEASE_RANGE, { wait: false })).toBe(true);
    const lease = space.open({ type: 'lease', ...spec }, 'exclusive');
    leases.push(lease);
    expect(lease.kind).toBe('lease');
    expect(lease.image).toBeNull();
    expect(lease.key).toBe(`lease:${tmp.dir}/vmspace/disk-1`);
    expect(lease.slots.map((s) => s.path)).toEqual([join(tmp.dir, 'vmspace', 'disk-1')]);
    expect(lstatSync(join(tmp.dir, 'vmspace')).mode & 0o7777).toBe(0o700);
    expect(await takeAll(lease, 'shared')).toBe(false);
    await peer.call('close', h);
    expect(await takeAll(lease, 'exclusive')).toBe(true);
    lease.close();
    expect(readdirSync(join(tmp.dir, 'vmspace'))).toEqual(['disk-1']);
  });
});

describe('races: create, lock, release and delete from 4 processes', () => {
  function race(iterations: number, sharedEvery: number): Promise<Array<{ taken: number; busy: number; violations: string[] }>> {
    const markers = join(tmp.dir, 'markers');
    mkdirSync(markers);
    const config = JSON.stringify({ dir, path: image, markers, iterations, sharedEvery });
    return Promise.all(
      [0, 1, 2, 3].map(
        () =>
          new Promise<{ taken: number; busy: number; violations: string[] }>((resolve, reject) => {
            const child = spawn(process.execPath, [raceScript, config], { stdio: ['ignore', 'pipe', 'pipe'] });
            let out = '';
            let err = '';
            child.stdout.on('data', (d: Buffer) => (out += d));
            child.stderr.on('data', (d: Buffer) => (err += d));
            child.on('error', reject);
            child.on('close', (code) => {
              if (code !== 0 || err !== '') reject(new Error(`race process exited with ${code}: ${err}`));
              else resolve(JSON.parse(out));
            });
          }),
      ),
    );
  }

  it('2,000 exclusive iterations each: never two holders, and no file left behind', async () => {
    const results = await race(2000, 0);
    expect(results.flatMap((r) => r.violations)).toEqual([]);
    for (const r of results) expect(r.taken + r.busy).toBe(2000);
    // Every waiting iteration (half of them) must have got it.
    for (const r of results) expect(r.taken).toBeGreaterThanOrEqual(1000);
    expect(readdirSync(dir)).toEqual([]);
    expect(readdirSync(join(tmp.dir, 'markers'))).toEqual([]);
  });

  it('with shared holders mixed in (every third iteration): never exclusive alongside anyone, and no file left behind', async () => {
    const results = await race(2000, 3);
    expect(results.flatMap((r) => r.violations)).toEqual([]);
    for (const r of results) expect(r.taken).toBeGreaterThanOrEqual(1000);
    expect(readdirSync(dir)).toEqual([]);
  });
});

describe('the directory checks', () => {
  const refused = (d: string, pattern: RegExp, Class: Function = InvalidArgumentError): void => {
    let err: unknown;
    try {
      indirectLockspace({ kind: 'indirect', dir: d });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(Class);
    expect((err as Error).message).toMatch(pattern);
  };

  it('refuses a relative, missing or non-directory dir', () => {
    refused('locks', /must be absolute/);
    refused(join(tmp.dir, 'missing'), /cannot be used.*ENOENT/, ResourceAccessError);
    refused(image, /is not a directory/);
    expect(() => indirectLockspace({ kind: 'direct' } as never)).toThrow(InvalidArgumentError);
  });

  it('refuses a dir that is a symlink, naming the fix', () => {
    const link = join(tmp.dir, 'link');
    symlinkSync(dir, link);
    refused(link, /is a symbolic link and was refused.*real directory/);
  });

  it('refuses a dir writable by others or the group unless it is sticky', () => {
    chmodSync(dir, 0o777);
    refused(dir, /writable by.*not sticky.*chmod go-w/);
    chmodSync(dir, 0o770);
    refused(dir, /writable by its group/);
    chmodSync(dir, 0o1777);
    expect(indirectLockspace({ kind: 'indirect', dir }).config).toEqual({ kind: 'indirect', dir });
  });

  it.skipIf(!isRoot)('refuses a dir owned by another user who is not root (needs root to chown)', () => {
    chownSync(dir, 12345, 12345);
    refused(dir, /owned by uid 12345/);
  });

  it('refuses a dir that was swapped for another after set-up', () => {
    const moved = join(tmp.dir, 'moved');
    execFileSync('mv', [dir, moved]);
    mkdirSync(dir, { mode: 0o700 });
    expect(() => space.open({ type: 'disk', path: image }, 'exclusive')).toThrow(/was replaced by another directory/);
  });

  it('a symlink planted at a lock file\'s name is refused and its target left alone', async () => {
    const names = space.describeDisk(image);
    const target = makeFile(tmp.dir, 'victim', 'precious');
    const dangling = join(tmp.dir, 'not-created');
    symlinkSync(target, names.files[0]!.path);
    symlinkSync(dangling, names.files[1]!.path);
    let err: unknown;
    try {
      space.open({ type: 'disk', path: image }, 'exclusive');
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(ResourceAccessError);
    expect((err as Error).message).toMatch(/is a symbolic link.*never followed/);
    expect((err as { cause: { code: string } }).cause.code).toBe('ELOOP');
    expect(readFileSync(target, 'utf8')).toBe('precious');
    expect(statSync(target).mode & 0o777).not.toBe(0o600);
    using probe = openLockable(target, { access: 'readwrite' });
    expect(probe.getConflict('exclusive')).toBeNull();
    // The second slot's dangling link: its target must not have been created either.
    execFileSync('rm', [names.files[0]!.path]);
    expect(() => space.open({ type: 'disk', path: image }, 'exclusive')).toThrow(/is a symbolic link/);
    expect(existsSync(dangling)).toBe(false);
    expect(readdirSync(dir)).toEqual([names.files[1]!.name]); // the first slot's file was closed and deleted again
  });

  it('a hard link planted at a lock file\'s name is refused', () => {
    const names = space.describeDisk(image);
    const other = makeFile(tmp.dir, 'other', '');
    linkSync(other, names.files[0]!.path);
    expect(() => space.open({ type: 'disk', path: image }, 'exclusive')).toThrow(/has 2 hard links/);
  });

  it('a named lease refuses a <path>/<lockspace> that is a symlink, and an unsafe <path>', () => {
    const elsewhere = join(tmp.dir, 'elsewhere');
    mkdirSync(elsewhere, { mode: 0o700 });
    symlinkSync(elsewhere, join(tmp.dir, 'space'));
    expect(() => space.open({ type: 'lease', path: tmp.dir, lockspace: 'space', key: 'k' }, 'exclusive')).toThrow(
      /lease directory .* is a symbolic link and was refused/,
    );
    expect(readdirSync(elsewhere)).toEqual([]);
    symlinkSync(tmp.dir, join(tmp.dir, 'base-link'));
    expect(() => space.open({ type: 'lease', path: join(tmp.dir, 'base-link'), lockspace: 'x', key: 'k' }, 'exclusive')).toThrow(
      /lease path .* is a symbolic link/,
    );
    chmodSync(elsewhere, 0o777);
    expect(() => space.open({ type: 'lease', path: elsewhere, lockspace: 'x', key: 'k' }, 'exclusive')).toThrow(/not sticky/);
  });

  it('refuses bad lease lockspace names and keys, naming which', () => {
    for (const bad of ['', '/', '..', '.', 'a/b', 'a\0b', 'x'.repeat(256), 7]) {
      expect(() => space.open({ type: 'lease', path: tmp.dir, lockspace: bad as string, key: 'k' }, 'exclusive')).toThrow(
        /^lease lockspace /,
      );
      expect(() => space.open({ type: 'lease', path: tmp.dir, lockspace: 'ls', key: bad as string }, 'exclusive')).toThrow(/^lease key /);
    }
    try {
      space.open({ type: 'lease', path: tmp.dir, lockspace: 'ls', key: '..' }, 'exclusive');
    } catch (err) {
      expect(err).toBeInstanceOf(InvalidArgumentError);
    }
    expect(() => space.open({ type: 'lease', path: 'rel', lockspace: 'ls', key: 'k' }, 'exclusive')).toThrow(/lease path must be absolute/);
    expect(() => space.open({ type: 'lease', path: tmp.dir, lockspace: 'ls', key: 'k', extra: 1 } as never, 'exclusive')).toThrow(
      /unknown option 'extra'/,
    );
    expect(() => space.open({ type: 'lease', path: tmp.dir, lockspace: 'ls', key: 'k' }, 'bogus' as never)).toThrow(InvalidArgumentError);
    expect(existsSync(join(tmp.dir, 'ls'))).toBe(false);
  });
});

describe('openLockable({ create })', () => {
  it('creates a missing file with mode 0600 and refuses a symlink at the name', () => {
    const p = join(tmp.dir, 'new.lock');
    using f = openLockable(p, { access: 'readwrite', create: true });
    expect(f.kind).toBe('file');
    expect(statSync(p).mode & 0o7777).toBe(0o600);
    const link = join(tmp.dir, 'link.lock');
    symlinkSync(p, link);
    expect(() => openLockable(link, { access: 'readwrite', create: true })).toThrow(ResourceAccessError);
    expect(() => openLockable(link, { access: 'readwrite', create: true })).toThrow(/is a symbolic link/);
    // Without create, a symlink is followed as before.
    using g = openLockable(link, { access: 'readwrite' });
    expect(g.identity.key).toBe(f.identity.key);
  });

  it('create needs readwrite access and a boolean', () => {
    expect(() => openLockable(join(tmp.dir, 'x'), { access: 'read', create: true })).toThrow(/create needs access 'readwrite'/);
    expect(() => openLockable(join(tmp.dir, 'x'), { create: 'yes' as never })).toThrow(/create must be a boolean/);
    expect(existsSync(join(tmp.dir, 'x'))).toBe(false);
  });
});

describe('images that cannot be written', () => {
  it('an immutable image (open for writing fails even for root) still gets an exclusive lease', async (ctx) => {
    const r = spawnSync('chattr', ['+i', image]);
    if (r.status !== 0) {
      console.log(`skipped: chattr +i failed here (${r.stderr?.toString().trim() || r.error?.message}); needs root and a filesystem with immutable files`);
      ctx.skip();
    }
    try {
      expect(() => openLockable(image, { access: 'readwrite' })).toThrow(ResourceAccessError);
      const lease = open(image, 'exclusive');
      expect(await takeAll(lease, 'exclusive')).toBe(true);
      expect(lease.image?.access).toBe('read');
      lease.close();
      expect(readdirSync(dir)).toEqual([]);
    } finally {
      spawnSync('chattr', ['-i', image]);
    }
  });
});

describe('block devices', () => {
  const losetup = spawnSync('losetup', ['--version']).status === 0;
  const why = !isRoot ? 'not root' : !losetup ? 'no losetup' : '';
  let loop = '';
  let backing: ReturnType<typeof tempDir> | undefined;

  beforeAll(() => {
    if (why !== '') {
      console.log(`block device tests skipped: ${why}`);
      return;
    }
    backing = tempDir();
    const file = join(backing.dir, 'backing.img');
    writeFileSync(file, Buffer.alloc(1 << 20));
    loop = execFileSync('losetup', ['-f', '--show', file], { encoding: 'utf8' }).trim();
  });
  afterAll(() => {
    if (loop !== '') spawnSync('losetup', ['-d', loop]);
    backing?.cleanup();
  });

  let peer: Peer;
  beforeAll(async () => {
    if (why === '') peer = await Peer.start(process.env, peerScript);
  });
  afterAll(() => peer?.kill());

  it.skipIf(why !== '')('a loop device has no persistent identity: it is named by its canonical node, under any path', async () => {
    const st = statSync(loop, { bigint: true });
    expect(blockDeviceIdentity(st.rdev)).toBeNull();
    const names = space.describeDisk(loop);
    expect(names.kind).toBe('block-device');
    expect(names.files).toEqual([{ name: sha256sum(loop), path: join(dir, sha256sum(loop)), identity: loop, source: 'path' }]);
    const sym = join(tmp.dir, 'loop-link');
    symlinkSync(loop, sym);
    const alias = join(tmp.dir, 'loop-alias');
    execFileSync('mknod', [alias, 'b', String(major(st.rdev)), String(minor(st.rdev))]);
    expect(statSync(alias, { bigint: true }).rdev).toBe(st.rdev);
    expect(space.describeDisk(sym).key).toBe(names.key);
    expect(space.describeDisk(alias).key).toBe(names.key);

    const h = await peer.call<number>('openDisk', dir, loop, 'exclusive');
    expect(await peer.call('takeAll', h, 'exclusive', LEASE_RANGE, { wait: false })).toBe(true);
    const viaSym = open(sym);
    const viaAlias = open(alias);
    expect(viaSym.kind).toBe('block-device');
    expect(viaSym.image?.path).toBe(loop); // opened through its canonical node
    expect(await takeAll(viaSym, 'shared')).toBe(false);
    expect(await takeAll(viaAlias, 'exclusive')).toBe(false);
    await peer.call('close', h);
    expect(await takeAll(viaAlias, 'exclusive')).toBe(true);
    expect(await takeAll(viaSym, 'shared')).toBe(false);
    viaAlias.close();
    viaSym.close();
    expect(readdirSync(dir)).toEqual([]);
  });

  it('a disk with a WWN, LVM UUID or serial in sysfs is named by it (checked on whatever disks this host has)', (ctx) => {
    const found: Array<{ node: string; identity: string }> = [];
    for (const name of readdirSync('/sys/class/block')) {
      const sys = realpathSync(join('/sys/class/block', name));
      const node = join('/dev', name);
      if (!existsSync(node)) continue;
      const isPart = existsSync(join(sys, 'partition'));
      const disk = isPart ? join(sys, '..') : sys;
      const read = (p: string): string | null => {
        try {
          const t = readFileSync(join(disk, p), 'utf8').trim();
          return t === '' ? null : t;
        } catch {
          return null;
        }
      };
      const part = isPart ? `:part${readFileSync(join(sys, 'partition'), 'utf8').trim()}` : '';
      const wwid = read('wwid') ?? read('device/wwid');
      const uuid = read('dm/uuid');
      const serial = read('serial') ?? read('device/serial');
      const identity =
        wwid !== null ? `wwid:${wwid}${part}` : uuid?.startsWith('LVM-') ? `lvm:${uuid}${part}` : serial !== null ? `serial:${serial}${part}` : null;
      if (identity !== null) found.push({ node, identity });
    }
    if (found.length === 0) {
      console.log('skipped: no block device on this host has a WWN, LVM UUID or serial in sysfs');
      ctx.skip();
    }
    for (const { node, identity } of found) {
      expect(blockDeviceIdentity(statSync(node, { bigint: true }).rdev)?.identity).toBe(identity);
      // Describing opens the device for reading, which a sandbox or a
      // non-root user may not do; the identity itself was checked above.
      let names;
      try {
        names = space.describeDisk(node);
      } catch (err) {
        if (!(err instanceof ResourceAccessError)) throw err;
        console.log(`${node}: not opened (${err.message}); only its sysfs identity was checked`);
        continue;
      }
      expect(names.files).toHaveLength(1);
      expect(names.files[0]!.identity).toBe(identity);
      expect(names.key).toBe(lockFileName(identity));
    }
  });
});

describe('leaks', () => {
  it('open/take/release/close cycles, busy takes and refused opens leave no fd behind', async () => {
    const peer = await Peer.start(process.env, peerScript);
    try {
      const other = makeFile(tmp.dir, 'held.img');
      const h = await peer.call<number>('openDisk', dir, other, 'exclusive');
      expect(await peer.call('takeAll', h, 'exclusive', LEASE_RANGE, { wait: false })).toBe(true);
      const spec = { path: tmp.dir, lockspace: 'ls', key: 'k' };
      const cycle = async (): Promise<void> => {
        const a = space.open({ type: 'disk', path: image }, 'exclusive');
        expect(await takeAll(a, 'exclusive')).toBe(true);
        expect(await a.slots[0]!.take('exclusive', GUARD_RANGE, FAST)).toBe(true);
        releaseAll(a);
        a.slots[0]!.release(GUARD_RANGE);
        expect(await takeAll(a, 'shared', { wait: true, timeout: 1000 })).toBe(true);
        a.close();
        const b = space.open({ type: 'disk', path: other }, 'shared');
        expect(await takeAll(b, 'shared')).toBe(false);
        await expect(b.slots[0]!.take('shared', LEASE_RANGE, { wait: true, timeout: 0 })).rejects.toBeInstanceOf(LockTimeoutError);
        b.close();
        const l = space.open({ type: 'lease', ...spec }, 'shared');
        expect(await takeAll(l, 'shared')).toBe(true);
        l.close();
        expect(() => space.open({ type: 'disk', path: join(tmp.dir, 'missing.img') }, 'exclusive')).toThrow(ResourceAccessError);
      };
      await cycle(); // warm up: lazy loads, caches
      const before = fdCount();
      for (let i = 0; i < 200; i++) await cycle();
      expect(fdCount()).toBe(before);
      await peer.call('close', h);
      expect(readdirSync(dir)).toEqual([]);
    } finally {
      await peer.kill();
    }
  });
});

describe('checkLockDir', () => {
  it('returns the lstat of a good dir', () => {
    expect(checkLockDir(dir).isDirectory()).toBe(true);
  });
});

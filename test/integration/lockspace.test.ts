// LockManager over an indirect lockspace and named leases, with managers in
// separate processes. The lockspace module itself (names, protocol, races,
// attacks) is tested in indirect.test.ts.
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmodSync, chownSync, existsSync, linkSync, lstatSync, mkdirSync, readdirSync, readFileSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { InvalidArgumentError, LockManager, openLockable, ResourceAccessError, ResourceBusyError, type LockManagerOptions, type ResourceSpec } from '../../lib/index.js';
import { indirectLockspace } from '../../lib/lockspaces/indirect.js';
import { distUrl, fdCount, isRoot, lockFixture, makeFile, managerHarness, opensUnderStrace, type Peer } from '../helpers.js';

const fx = lockFixture();
const harness = managerHarness();
const { managers } = harness;
const vms: number[] = [];
let dir: string;
const TARGET = 'qemu+ssh://target/system';
const SOURCE = 'qemu+ssh://source/system';

beforeEach(() => {
  dir = join(fx.tmp.dir, 'locks');
  mkdirSync(dir, { mode: 0o755 });
});

afterEach(() => {
  // VMs whose supervisor a test killed live on (lockLifetime 'child').
  for (const vm of vms.splice(0)) {
    try {
      process.kill(vm, 'SIGKILL');
    } catch {
      // Already gone.
    }
  }
});

const indirect = (): LockManagerOptions => ({ lockspace: { kind: 'indirect', dir } });

const manager = (options: LockManagerOptions = indirect()): LockManager => harness.manager(options);

/** A manager in another process, running `sleep` with `specs` held. */
async function holder(specs: ResourceSpec[], options: LockManagerOptions = indirect()): Promise<Peer> {
  const p = await harness.managerPeer();
  await p.call('create', options);
  for (const s of specs) await p.call('register', s);
  vms.push(await p.call<number>('start', 'sleep', ['1000']));
  return p;
}

/** The image's own byte 0, seen from outside. */
function imageLease(path = fx.path): string {
  const probe = fx.open(path, 'read');
  const c = probe.getConflict('exclusive', { start: 0, length: 1 });
  probe.close();
  return c === null ? 'free' : c.mode;
}

describe('a LockManager with an indirect lockspace', () => {
  it('holds its lease in lock files in dir, not on the image; another process is refused with the lock file named; nothing is left at the end', async () => {
    const p = await holder([{ type: 'disk', path: fx.path, mode: 'exclusive' }]);
    expect(imageLease()).toBe('free');
    expect(readdirSync(dir)).toHaveLength(2);
    const m = manager();
    m.registerResource({ type: 'disk', path: fx.path, mode: 'shared' });
    const err = await m.start('sleep', ['1000']).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ResourceBusyError);
    expect((err as ResourceBusyError).message).toMatch(new RegExp(`^${fx.path} \\(its lock file ${dir}/[0-9a-f]{64}\\) is held exclusively by .*${p.child.pid}`));
    expect(m.state).toBe('new');
    await p.call('shutdown', { graceMs: 1000 });
    await m.start('sleep', ['1000']);
    expect(m.state).toBe('running');
    await m.free();
    await p.call('free');
    expect(readdirSync(dir)).toEqual([]);
  });

  it('the same image by a symlink and by a hard link is one resource across processes', async () => {
    const sym = join(fx.tmp.dir, 'sym.img');
    const hard = join(fx.tmp.dir, 'hard.img');
    symlinkSync(fx.path, sym);
    linkSync(fx.path, hard);
    await holder([{ type: 'disk', path: fx.path, mode: 'exclusive' }]);
    for (const path of [sym, hard]) {
      const m = manager();
      m.registerResource({ type: 'disk', path, mode: 'exclusive' });
      await expect(m.start('sleep', ['1000'])).rejects.toThrow(ResourceBusyError);
    }
  });

  it('works where the image cannot be opened for writing (an immutable image): the direct lockspace cannot lease it exclusively', async (ctx) => {
    const image = makeFile(fx.tmp.dir, 'immutable.img');
    const r = spawnSync('chattr', ['+i', image]);
    if (r.status !== 0) {
      console.log(`skipped: chattr +i failed (${r.stderr?.toString().trim() || r.error?.message}); needs root and a filesystem with immutable files`);
      ctx.skip();
    }
    try {
      const direct = manager({});
      expect(() => direct.registerResource({ type: 'disk', path: image, mode: 'exclusive' })).toThrow(ResourceAccessError);
      const m = manager();
      m.registerResource({ type: 'disk', path: image, mode: 'exclusive', qemuCompatible: true });
      await m.start('sleep', ['1000']);
      expect(m.resources[0]!.held).toBe(true);
      await m.free();
    } finally {
      spawnSync('chattr', ['-i', image]);
    }
  });

  it('migration in an indirect lockspace: the guard sits on the lock files, third parties are refused, no stray files', async () => {
    const src = await holder([{ type: 'disk', path: fx.path, mode: 'exclusive' }]);
    const token = await src.call<string>('inquire');
    const tgt = await harness.managerPeer();
    await tgt.call('fromInquire', token, { ...indirect(), resources: [{ type: 'disk', path: fx.path, mode: 'exclusive' }] });
    await tgt.call('start', 'sleep', ['1000']);
    await src.call('prepareMigrate', TARGET);
    await src.call('completeMigrateOut', TARGET);
    // The lock files survive the source's release: the target's guard keeps them.
    expect(readdirSync(dir)).toHaveLength(2);
    const m = manager();
    m.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    const err = (await m.start('sleep', ['1000']).catch((e: unknown) => e)) as ResourceBusyError;
    expect(err).toBeInstanceOf(ResourceBusyError);
    expect(err.migrationInProgress).toBe(true);
    await tgt.call('completeMigrateIn', SOURCE, { timeout: 10_000 });
    expect(await tgt.call('state')).toBe('running');
    await expect(m.start('sleep', ['1000'])).rejects.toThrow(/held exclusively/);
    await src.call('free');
    await tgt.call('free');
    expect(readdirSync(dir)).toEqual([]);
  });

  it('a token from another lockspace is refused: InvalidArgumentError, nothing opened', async () => {
    const m = manager();
    m.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    const token = m.inquire();
    const otherDir = join(fx.tmp.dir, 'other-locks');
    mkdirSync(otherDir, { mode: 0o700 });
    const direct = manager({});
    direct.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    const resources: ResourceSpec[] = [{ type: 'disk', path: fx.path, mode: 'exclusive' }];
    const before = fdCount();
    expect(() => LockManager.fromInquire(token, { resources })).toThrow(InvalidArgumentError);
    expect(() => LockManager.fromInquire(token, { resources })).toThrow(/lockspace indirect \(dir .*\), and this manager's is direct/);
    expect(() => LockManager.fromInquire(token, { resources, lockspace: { kind: 'indirect', dir: otherDir } })).toThrow(/must lock the same files/);
    expect(() => LockManager.fromInquire(direct.inquire(), { ...indirect(), resources })).toThrow(InvalidArgumentError);
    expect(fdCount()).toBe(before);
    const t = LockManager.fromInquire(token, { ...indirect(), resources });
    managers.push(t);
    expect(t.resources.map((r) => r.lockFiles.length)).toEqual([2]);
  });

  it('refuses a symlinked or world-writable dir at construction', () => {
    const link = join(fx.tmp.dir, 'link');
    symlinkSync(dir, link);
    expect(() => new LockManager({ lockspace: { kind: 'indirect', dir: link } })).toThrow(/symbolic link/);
    spawnSync('chmod', ['0777', dir]);
    expect(() => new LockManager(indirect())).toThrow(/writable by .* and not sticky/);
    spawnSync('chmod', ['1777', dir]);
    expect(() => new LockManager(indirect())).not.toThrow();
  });

  it('two paths of one file (hard link) are one resource in one manager: the same mode a no-op, another refused', () => {
    const hard = join(fx.tmp.dir, 'hard.img');
    linkSync(fx.path, hard);
    const m = manager();
    m.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    m.registerResource({ type: 'disk', path: hard, mode: 'exclusive' });
    expect(m.resources).toHaveLength(1);
    expect(() => m.registerResource({ type: 'disk', path: hard, mode: 'shared' })).toThrow(InvalidArgumentError);
  });

  it('no deadlock when two managers reach two images by different hard links: the lock files are taken in one global order', async () => {
    // Names chosen so that sorting resources by their path files would lock
    // the two images' shared inode files in opposite orders.
    const h = (p: string) => createHash('sha256').update(p).digest('hex');
    let n = 0;
    let [p1, q1, p2, q2] = ['', '', '', ''];
    for (; ; n++) {
      [p1, q1, p2, q2] = [`i${n}.img`, `j${n}.img`, `i${n}.lnk`, `j${n}.lnk`].map((f) => join(fx.tmp.dir, f)) as [string, string, string, string];
      if (h(p1) < h(q1) && h(q2) < h(p2)) break;
    }
    writeFileSync(p1, 'x');
    linkSync(p1, p2);
    writeFileSync(q1, 'y');
    linkSync(q1, q2);
    // Hold the path files of q1 and p2 for a moment, so that both managers are mid-acquire together.
    const block = [q1, p2].map((p) => {
      const f = openLockable(join(dir, h(p)), { access: 'readwrite', create: true });
      fx.opened.push(f);
      f.tryLock('exclusive', { start: 0, length: 1 });
      return f;
    });
    const mk = (a: string, b: string) => {
      const m = manager();
      m.registerResource({ type: 'disk', path: a, mode: 'exclusive' });
      m.registerResource({ type: 'disk', path: b, mode: 'exclusive' });
      return m;
    };
    const [m1, m2] = [mk(p1, q1), mk(p2, q2)];
    const results = [m1, m2].map((m) => m.start('sleep', ['1000'], {}, { timeout: 3_000 }).then(() => 'started', (e: Error) => e.name));
    await new Promise((r) => setTimeout(r, 200));
    for (const f of block) f.close();
    const outcome = await Promise.all(results);
    // With a deadlock both would time out.
    expect(outcome).toContain('started');
  });

  it('after a release while the VM runs, a waiting manager gets the disk at once: no whole-file lock stays behind in the child', async () => {
    const m1 = manager();
    m1.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    await m1.start('sleep', ['1000']);
    const m2 = manager();
    m2.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    const waiting = m2.start('sleep', ['1000'], {}, { timeout: 30_000 });
    await new Promise((r) => setTimeout(r, 100));
    expect(await m1.releaseResource({ type: 'disk', path: fx.path })).toEqual({ wasHeld: true });
    await waiting;
    expect(m2.state).toBe('running');
    // And a third, registered before, fails fast for the right reason: m2 holds it.
    const m3 = manager();
    m3.registerResource({ type: 'disk', path: fx.path, mode: 'shared' });
    await expect(m3.start('sleep', ['1000'])).rejects.toThrow(/held exclusively by/);
  });

  it('a source that takes its leases back in an indirect lockspace: its VM carries them again, even with the supervisor killed', async () => {
    const src = await holder([{ type: 'disk', path: fx.path, mode: 'exclusive' }]);
    const token = await src.call<string>('prepareMigrate', TARGET);
    const tgt = await harness.managerPeer();
    await tgt.call('fromInquire', token, { ...indirect(), resources: [{ type: 'disk', path: fx.path, mode: 'exclusive' }] });
    await tgt.call('start', 'sleep', ['1000']);
    // The target gives up first, then the source lets go and takes back.
    await tgt.call('completeMigrateIn', SOURCE, { cancel: true });
    await src.call('completeMigrateOut', TARGET);
    await src.call('completeMigrateOut', TARGET, { cancel: true });
    expect(await src.call('state')).toBe('running');
    await src.kill('SIGKILL');
    const m = manager();
    m.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    await expect(m.start('sleep', ['1000'])).rejects.toThrow(ResourceBusyError);
  });

  it('a token names the dir as resolved: a source configured with a trailing slash is the same lockspace', () => {
    const m = manager({ lockspace: { kind: 'indirect', dir: `${dir}/` } });
    m.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    const t = LockManager.fromInquire(m.inquire(), { ...indirect(), resources: [{ type: 'disk', path: fx.path, mode: 'exclusive' }] });
    managers.push(t);
    expect(t.resources).toHaveLength(1);
  });

  it('supervisorArgs() passes --lockspace to lockmgr run', () => {
    const m = manager();
    m.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    expect(m.supervisorArgs().slice(0, 4)).toEqual(['run', '--lockspace', dir, '--exclusive']);
  });
});

describe('named leases: <path>/<lockspace>/<key>', () => {
  const lease = (mode: 'exclusive' | 'shared' = 'exclusive', key = 'vm1-disk0'): ResourceSpec => ({ type: 'lease', lockspace: 'cluster', key, path: dir, mode });

  it('exclude across processes, in either lockspace; the file is <path>/<lockspace>/<key>, and stays after the last release', async () => {
    const p = await holder([lease()], {});
    expect(readdirSync(join(dir, 'cluster'))).toEqual(['vm1-disk0']);
    const m = manager();
    m.registerResource(lease('shared'));
    const err = await m.start('sleep', ['1000']).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ResourceBusyError);
    expect((err as Error).message).toMatch(new RegExp(`^${dir}/cluster/vm1-disk0 is held exclusively by .*${p.child.pid}`));
    await p.call('free');
    await m.start('sleep', ['1000']);
    expect(m.resources).toEqual([{ path: join(dir, 'cluster', 'vm1-disk0'), mode: 'shared', held: true, identity: `lease:${dir}/cluster/vm1-disk0`, lockFiles: [join(dir, 'cluster', 'vm1-disk0')] }]);
    expect(await m.releaseResource({ type: 'lease', lockspace: 'cluster', key: 'vm1-disk0', path: dir })).toEqual({ wasHeld: true });
    // A lease's file is never deleted: it may be someone's (libvirt's are not deleted either).
    expect(readdirSync(join(dir, 'cluster'))).toEqual(['vm1-disk0']);
  });

  it('bad lockspace names and keys are InvalidArgumentError naming which; nothing is created', () => {
    const m = manager({});
    const bad: Array<[Record<string, unknown>, RegExp]> = [
      [{ key: '' }, /lease key must not be empty/],
      [{ key: 'a/b' }, /lease key must not contain '\/'/],
      [{ key: '..' }, /lease key must not be '\.' or '\.\.'/],
      [{ key: '.' }, /lease key must not be/],
      [{ key: 'a\0b' }, /NUL/],
      [{ lockspace: '/' }, /lease lockspace must not contain/],
      [{ lockspace: '..' }, /lease lockspace must not be/],
      [{ lockspace: '' }, /lease lockspace must not be empty/],
      [{ key: 7 }, /key must be a string/],
      [{ path: 'relative' }, /must be absolute/],
      [{ qemuCompatible: true }, /unknown option 'qemuCompatible'/],
    ];
    for (const [patch, why] of bad) {
      const spec = { ...lease(), ...patch };
      expect(() => m.registerResource(spec as ResourceSpec), JSON.stringify(patch)).toThrow(InvalidArgumentError);
      expect(() => m.registerResource(spec as ResourceSpec), JSON.stringify(patch)).toThrow(why);
    }
    expect(readdirSync(dir)).toEqual([]);
    expect(m.resources).toEqual([]);
  });

  it('hotplug of a lease, and a lease travels in the migration token', async () => {
    const m = manager({});
    m.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    await m.start('sleep', ['1000']);
    expect(await m.acquireResource(lease('exclusive', 'hot'))).toEqual({ wasHeld: false });
    expect(await m.acquireResource(lease('exclusive', 'hot'))).toEqual({ wasHeld: true });
    const t = LockManager.fromInquire(m.inquire(), { resources: [{ type: 'disk', path: fx.path, mode: 'exclusive' }, lease('exclusive', 'hot')] });
    managers.push(t);
    expect(t.resources.map((r) => r.path).sort()).toEqual([join(dir, 'cluster', 'hot'), fx.path].sort());
  });
});

// Issue 18, part 1: a lease or lock file lockmgr did not make is never
// deleted, and one that is not plausibly a lock file is refused before it is
// opened for writing; a migration target opens only what its caller named.
describe('nothing lost: files lockmgr did not make', () => {
  /** A file's content, mode, owner, size and inode, to show it was left exactly as it was. */
  const fingerprint = (p: string): string => {
    const st = statSync(p);
    return JSON.stringify([readFileSync(p, 'base64'), st.mode, st.uid, st.size, st.ino, st.mtimeMs]);
  };

  it("a lease named like '/etc/shadow' (here a copy in a temp root) is refused before it is opened for writing, and free() leaves it as it was", async () => {
    const root = join(fx.tmp.dir, 'root');
    mkdirSync(join(root, 'etc'), { recursive: true, mode: 0o755 });
    const shadow = join(root, 'etc', 'shadow');
    writeFileSync(shadow, 'root:*:19000:0:99999:7:::\n', { mode: 0o640 });
    const before = fingerprint(shadow);
    const m = manager({});
    const err = (() => {
      try {
        m.registerResource({ type: 'lease', lockspace: 'etc', key: 'shadow', path: root, mode: 'shared' });
      } catch (e) {
        return e;
      }
    })();
    expect(err).toBeInstanceOf(ResourceAccessError);
    expect((err as Error).message).toMatch(/refused to use '.*\/etc\/shadow' as a lock file: it is not empty \(26 bytes\).*It was not opened for writing/);
    await m.free();
    expect(fingerprint(shadow)).toBe(before);
  });

  it('a pre-existing empty lease file is used, and left in place after the last release', async () => {
    mkdirSync(join(dir, 'cluster'), { mode: 0o700 });
    const file = join(dir, 'cluster', 'mine');
    writeFileSync(file, '', { mode: 0o644 });
    const m = manager({});
    m.registerResource({ type: 'lease', lockspace: 'cluster', key: 'mine', path: dir, mode: 'exclusive' });
    await m.start('sleep', ['1000']);
    expect(m.resources[0]!.held).toBe(true);
    await m.free();
    expect(existsSync(file)).toBe(true);
  });

  it('implausible lease and lock files are refused with ResourceAccessError naming why, and left as they were', async () => {
    const names = indirectLockspace({ kind: 'indirect', dir }).describeDisk(fx.path);
    mkdirSync(join(dir, 'ls'), { mode: 0o700 });
    const cases: Array<[string, (p: string) => void, RegExp]> = [
      ['not empty', (p) => writeFileSync(p, 'data', { mode: 0o600 }), /it is not empty \(4 bytes\)/],
      ['setuid', (p) => { writeFileSync(p, '', { mode: 0o600 }); chmodSync(p, 0o4600); }, /set-user-ID or set-group-ID bit set \(mode 4600\)/],
      ['a directory', (p) => mkdirSync(p), /it is a directory, not a lock file/],
      ['a FIFO', (p) => execFileSync('mkfifo', [p]), /it is a FIFO, not a lock file/],
    ];
    if (isRoot) {
      cases.push(['owned by another user', (p) => { writeFileSync(p, '', { mode: 0o600 }); chownSync(p, 65534, 65534); }, /owned by uid 65534, neither this user \(uid 0\) nor root/]);
      cases.push(['a character device', (p) => execFileSync('mknod', [p, 'c', '1', '3']), /it is a character device, not a lock file/]);
    } else {
      console.log('skipped: the cases of a file owned by another user and of a character device need root (chown, mknod)');
    }
    for (const [label, make, why] of cases) {
      for (const [what, p, register] of [
        ['lease', join(dir, 'ls', 'k'), (m: LockManager) => m.registerResource({ type: 'lease', lockspace: 'ls', key: 'k', path: dir, mode: 'exclusive' })],
        ['disk lock file', names.files[0]!.path, (m: LockManager) => m.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' })],
      ] as const) {
        make(p);
        const before = lstatSync(p);
        const m = manager();
        expect(() => register(m), `${label} ${what}`).toThrow(ResourceAccessError);
        expect(() => register(m), `${label} ${what}`).toThrow(why);
        await m.free();
        const after = lstatSync(p);
        expect([after.ino, after.mode, after.size, after.uid], `${label} ${what}`).toEqual([before.ino, before.mode, before.size, before.uid]);
        execFileSync('rm', ['-rf', p]);
      }
    }
    expect(readdirSync(dir).sort()).toEqual(['ls']);
  });

  it('a disk lock file lockmgr did not make (mode 0644) is used but never deleted; the ones it made are', async () => {
    const names = indirectLockspace({ kind: 'indirect', dir }).describeDisk(fx.path);
    writeFileSync(names.files[0]!.path, '', { mode: 0o644 });
    const m = manager();
    m.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    await m.start('sleep', ['1000']);
    await m.free();
    expect(readdirSync(dir)).toEqual([names.files[0]!.name]);
  });

  it('a migration token edited to name other files (digest recomputed) is refused; the target never opens them, and they are left as they were', async (ctx) => {
    const victim = makeFile(fx.tmp.dir, 'victim', 'precious');
    const victimDir = join(fx.tmp.dir, 'victims');
    mkdirSync(join(victimDir, 'etc'), { recursive: true, mode: 0o755 });
    const lease = makeFile(join(victimDir, 'etc'), 'shadow', 'secret');
    const src = manager({});
    src.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    const body = JSON.parse(Buffer.from(src.inquire().split('.')[2]!, 'base64url').toString('utf8')) as { resources: unknown[] };
    body.resources.push({ type: 'disk', path: victim, mode: 'exclusive', qemuCompatible: false }, { type: 'lease', lockspace: 'etc', key: 'shadow', path: victimDir, mode: 'shared' });
    const head = `lockmgr.1.${Buffer.from(JSON.stringify(body)).toString('base64url')}`;
    const forged = `${head}.${createHash('sha256').update(head).digest('hex').slice(0, 16)}`;
    const before = [fingerprint(victim), fingerprint(lease)];
    const fds = fdCount();
    expect(() => LockManager.fromInquire(forged, { resources: [{ type: 'disk', path: fx.path, mode: 'exclusive' }] })).toThrow(
      /does not match this target's resources: the token names disk .*victim \(exclusive\), which this target did not register/,
    );
    expect(fdCount()).toBe(fds);
    expect([fingerprint(victim), fingerprint(lease)]).toEqual(before);
    // Seen from the kernel: the target process never opens either path, not even to look.
    const opened = opensUnderStrace(
      `import { LockManager } from ${JSON.stringify(distUrl)};
       try { LockManager.fromInquire(${JSON.stringify(forged)}, { resources: [{ type: 'disk', path: ${JSON.stringify(fx.path)}, mode: 'exclusive' }] }); } catch {}`,
      [victim, lease, join(victimDir, 'etc')],
    );
    if (opened === null) {
      console.log('skipped the strace check: strace is not installed');
      ctx.skip();
    }
    expect(opened).toEqual([]);
  });
});

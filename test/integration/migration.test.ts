// Migration handover (docs/contract.md, "Migration"): source and target are
// separate processes, each a real LockManager supervising a real child; this
// process observes the lock bytes from outside as a third party would.
import { spawnSync } from 'node:child_process';
import { readFileSync, readdirSync, readlinkSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { InvalidArgumentError, InvalidStateError, LockManager, ResourceBusyError, type LockManagerOptions, type ResourceSpec } from '../../lib/index.js';
import { fdCount, lockFixture, makeFile, managerHarness, processExists, waitUntil, type Peer } from '../helpers.js';

const fx = lockFixture();
const { managers, peers, manager, managerPeer } = managerHarness();
const LEASE = { start: 0, length: 1 };
const GUARD = { start: 1, length: 1 };
const TARGET = 'qemu+ssh://target.example/system';
const SOURCE = 'qemu+ssh://source.example/system';


/** What a third party sees on a byte of `path`: the conflicting lock's mode, or 'free'. */
function observe(range: { start: number; length: number }, path = fx.path): 'exclusive' | 'shared' | 'free' {
  const probe = fx.open(path, 'read');
  const c = probe.getConflict('exclusive', range);
  probe.close();
  return c === null ? 'free' : c.mode;
}

const alive = processExists;

/** A source process running a VM (sleep) with `path` leased in `mode`. */
async function source(mode: 'exclusive' | 'shared' = 'exclusive', options: LockManagerOptions = {}, path = fx.path): Promise<Source> {
  const peer = await managerPeer();
  await peer.call('create', options);
  const resources: ResourceSpec[] = [{ type: 'disk', path, mode }];
  await peer.call('register', resources[0]);
  const vm = await peer.call<number>('start', 'sleep', ['1000']);
  return { peer, token: await peer.call<string>('inquire'), vm, resources };
}

interface Source {
  peer: Peer;
  token: string;
  vm: number;
  /** What it registered: the target's own configuration names the same. */
  resources: ResourceSpec[];
}

/** A target process for the source's token (or `token`), configured with the same resources, started: its incoming VM runs, it holds the guard. */
async function target(src: Source, token = src.token): Promise<{ peer: Peer; vm: number }> {
  const peer = await managerPeer();
  await peer.call('fromInquire', token, { resources: src.resources });
  const vm = await peer.call<number>('start', 'sleep', ['1000']);
  return { peer, vm };
}

/** A third manager starting on the disk in this process. */
async function thirdStart(mode: 'exclusive' | 'shared' = 'exclusive', path = fx.path): Promise<unknown> {
  const m = manager();
  m.registerResource({ type: 'disk', path, mode });
  try {
    await m.start('sleep', ['1000']);
  } catch (err) {
    expect(m.state).toBe('new');
    return err;
  }
  throw new Error('the third manager started');
}

describe('the handover, source and target in separate processes', () => {
  it('success: guard at target start, leases released by the source and taken by the target, no window for a third party', async () => {
    const src = await source();
    const tgt = await target(src);
    expect(await tgt.peer.call('state')).toBe('incoming');
    expect(observe(LEASE)).toBe('exclusive');
    expect(observe(GUARD)).toBe('exclusive');

    await src.peer.call('prepareMigrate', TARGET);
    expect(await src.peer.call('state')).toBe('migrating');
    const during = (await thirdStart()) as ResourceBusyError;
    expect(during).toBeInstanceOf(ResourceBusyError);
    expect(during.migrationInProgress).toBe(true);
    expect(during.message).toMatch(/migration is in progress/);

    await src.peer.call('completeMigrateOut', TARGET);
    expect(await src.peer.call('state')).toBe('migrated');
    // Nobody holds the lease now, yet a third party cannot take it.
    expect(observe(LEASE)).toBe('free');
    const window = (await thirdStart()) as ResourceBusyError;
    expect(window).toBeInstanceOf(ResourceBusyError);
    expect(window.migrationInProgress).toBe(true);
    expect(window.message).toMatch(/handover guard/);
    expect(observe(LEASE)).toBe('free');

    await tgt.peer.call('completeMigrateIn', SOURCE);
    expect(await tgt.peer.call('state')).toBe('running');
    expect(observe(LEASE)).toBe('exclusive');
    expect(observe(GUARD)).toBe('free');
    const after = (await thirdStart()) as ResourceBusyError;
    expect(after.migrationInProgress).toBe(false);
    // The source's VM still runs (paused, in real life); shutting it down changes nothing for the target.
    expect(alive(src.vm)).toBe(true);
    await src.peer.call('shutdown', { graceMs: 1000 });
    expect(await src.peer.call('state')).toBe('stopped');
    expect(observe(LEASE)).toBe('exclusive');
    // The target's VM carries the lease (lockLifetime 'child'): kill its supervisor and the lease stays.
    await tgt.peer.kill();
    expect(alive(tgt.vm)).toBe(true);
    expect(observe(LEASE)).toBe('exclusive');
    process.kill(tgt.vm, 'SIGKILL');
    await waitUntil(() => observe(LEASE) === 'free', 10_000, 'the lease to go with the target VM');
  });

  it('the target waits in completeMigrateIn until the source lets go', async () => {
    const src = await source();
    const tgt = await target(src);
    await src.peer.call('prepareMigrate', TARGET);
    let done = false;
    const incoming = tgt.peer.call('completeMigrateIn', SOURCE, { timeout: 30_000 }).then(() => {
      done = true;
    });
    await new Promise((r) => setTimeout(r, 200));
    expect(done).toBe(false);
    expect(await tgt.peer.call('state')).toBe('incoming');
    await src.peer.call('completeMigrateOut', TARGET);
    await incoming;
    expect(await tgt.peer.call('state')).toBe('running');
    expect(observe(LEASE)).toBe('exclusive');
    expect(observe(GUARD)).toBe('free');
  });

  it('target timeout: LockTimeoutError naming the source, still incoming with its guard; then cancel ends it stopped', async () => {
    const src = await source();
    const tgt = await target(src);
    await src.peer.call('prepareMigrate', TARGET);
    const err = await tgt.peer.callError('completeMigrateIn', SOURCE, { timeout: 200 });
    expect(err.code).toBe('ERR_LOCK_TIMEOUT');
    expect(err.message).toContain(SOURCE);
    expect(await tgt.peer.call('state')).toBe('incoming');
    expect(observe(GUARD)).toBe('exclusive');
    await tgt.peer.call('completeMigrateIn', SOURCE, { cancel: true, graceMs: 1000 });
    expect(await tgt.peer.call('state')).toBe('stopped');
    expect(observe(GUARD)).toBe('free');
    expect(alive(tgt.vm)).toBe(false);
    // The migration failed: the source keeps its lease and runs on.
    await src.peer.call('completeMigrateOut', TARGET, { cancel: true });
    expect(await src.peer.call('state')).toBe('running');
    expect(observe(LEASE)).toBe('exclusive');
  });

  it('source killed mid-migration: the kernel frees its locks and the target acquires', async () => {
    // lockLifetime 'supervisor': the VM dies with its supervisor.
    const src = await source('exclusive', { lockLifetime: 'supervisor' });
    const tgt = await target(src);
    await src.peer.call('prepareMigrate', TARGET);
    const incoming = tgt.peer.call('completeMigrateIn', SOURCE, { timeout: 30_000 });
    await src.peer.kill('SIGKILL');
    await incoming;
    expect(await tgt.peer.call('state')).toBe('running');
    expect(observe(LEASE)).toBe('exclusive');
    await waitUntil(() => !alive(src.vm), 10_000, 'the source VM to die with its supervisor');
  });

  it('the source VM exiting mid-migration releases its leases; the source ends stopped and the target acquires', async () => {
    const src = await source();
    const tgt = await target(src);
    await src.peer.call('prepareMigrate', TARGET);
    process.kill(src.vm, 'SIGKILL');
    await tgt.peer.call('completeMigrateIn', SOURCE, { timeout: 30_000 });
    // The target got the lease only after the source reaped its VM and released.
    expect(await src.peer.call('state')).toBe('stopped');
    expect((await src.peer.call<Array<[string, unknown]>>('events')).filter(([e]) => e === 'state').map(([, s]) => s)).toEqual(['starting', 'running', 'migrating', 'stopped']);
    expect(await tgt.peer.call('state')).toBe('running');
  });

  it('a third party waiting for the disk gets ResourceBusyError (migration in progress) when the source lets go, never the lease', async () => {
    const src = await source();
    const tgt = await target(src);
    await src.peer.call('prepareMigrate', TARGET);
    const m = manager();
    m.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    const waiting = m.start('sleep', ['1000'], {}, { timeout: 30_000 }).then(
      () => null,
      (err: unknown) => err,
    );
    await new Promise((r) => setTimeout(r, 100));
    await src.peer.call('completeMigrateOut', TARGET);
    const err = (await waiting) as ResourceBusyError;
    expect(err).toBeInstanceOf(ResourceBusyError);
    expect(err.migrationInProgress).toBe(true);
    expect(m.state).toBe('new');
    await tgt.peer.call('completeMigrateIn', SOURCE, { timeout: 10_000 });
    expect(observe(LEASE)).toBe('exclusive');
  });

  it('a second target for the same disk fails fast: another migration is in progress', async () => {
    const src = await source();
    await target(src);
    const second = await managerPeer();
    await second.call('fromInquire', src.token, { resources: src.resources });
    const err = await second.callError('start', 'sleep', ['1000']);
    expect(err.code).toBe('ERR_RESOURCE_BUSY');
    expect(err.message).toMatch(/another migration of it is in progress/);
    expect(await second.call('state')).toBe('new');
  });

  it('shared disks: the target guards with a read lock; shared starters are welcome during the handover, exclusive ones refused', async () => {
    const src = await source('shared');
    const tgt = await target(src);
    expect(observe(GUARD)).toBe('shared');
    // Another VM sharing the disk (a base image) starts, and may even migrate at the same time.
    const other = manager();
    other.registerResource({ type: 'disk', path: fx.path, mode: 'readonly' });
    await other.start('sleep', ['1000']);
    const otherTarget = LockManager.fromInquire(await other.prepareMigrate(TARGET), { resources: [{ type: 'disk', path: fx.path, mode: 'readonly' }] });
    managers.push(otherTarget);
    await otherTarget.start('sleep', ['1000']);
    expect(otherTarget.state).toBe('incoming');
    // An exclusive starter is refused, and told why.
    const err = (await thirdStart('exclusive')) as ResourceBusyError;
    expect(err.migrationInProgress).toBe(true);
    await src.peer.call('prepareMigrate', TARGET);
    await tgt.peer.call('completeMigrateIn', SOURCE);
    expect(await tgt.peer.call('state')).toBe('running');
    expect(observe(LEASE)).toBe('shared');
    await src.peer.call('completeMigrateOut', TARGET);
    await other.completeMigrateOut(TARGET);
    await otherTarget.completeMigrateIn(SOURCE);
    expect(observe(LEASE)).toBe('shared');
    expect(observe(GUARD)).toBe('free');
  });

  it('a readonly disk the target cannot open for writing migrates, and the incoming VM gets it read-only', async (ctx) => {
    const image = makeFile(fx.tmp.dir, 'base.img');
    const r = spawnSync('chattr', ['+i', image]);
    if (r.status !== 0) {
      console.log(`skipped: chattr +i failed (${r.stderr?.toString().trim() || r.error?.message}); needs root and a filesystem with immutable files`);
      ctx.skip();
    }
    try {
      const src = await source('shared', {}, image);
      const token = await src.peer.call<string>('prepareMigrate', TARGET);
      const tgt = await target(src, token);
      const fds = readdirSync(`/proc/${tgt.vm}/fd`).filter((fd) => {
        try {
          return readlinkSync(`/proc/${tgt.vm}/fd/${fd}`) === image;
        } catch {
          return false;
        }
      });
      expect(fds).toHaveLength(1);
      // flags in octal; the access mode is its low two bits: 0 = O_RDONLY.
      const flags = Number.parseInt(/^flags:\s+(\d+)/m.exec(readFileSync(`/proc/${tgt.vm}/fdinfo/${fds[0]}`, 'utf8'))![1]!, 8);
      expect(flags & 3).toBe(0);
      await src.peer.call('completeMigrateOut', TARGET);
      await tgt.peer.call('completeMigrateIn', SOURCE);
      expect(await tgt.peer.call('state')).toBe('running');
    } finally {
      for (const p of peers.splice(0)) {
        await p.call('free').catch(() => undefined);
        await p.kill();
      }
      spawnSync('chattr', ['-i', image]);
    }
  });

  it('prepareMigrate() returns the token: taken then, it names every disk, hot-plugged ones included', async () => {
    const src = await source();
    const hot = makeFile(fx.tmp.dir, 'hot.img');
    await src.peer.call('acquire', { type: 'disk', path: hot, mode: 'exclusive' });
    const token = await src.peer.call<string>('prepareMigrate', TARGET);
    const t = LockManager.fromInquire(token, { resources: [...src.resources, { type: 'disk', path: hot, mode: 'exclusive' }] });
    managers.push(t);
    expect(t.resources.map((r) => r.path).sort()).toEqual([fx.path, hot].sort());
    // Without the hot-plugged disk, the target's configuration does not match what the source holds.
    expect(() => LockManager.fromInquire(token, { resources: src.resources })).toThrow(/the token names disk .*hot\.img \(exclusive\), which this target did not register/);
  });

  it('a cancel that races a completed completeMigrateIn is refused: the VM that now runs here is not stopped', async () => {
    const holder = manager();
    holder.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    await holder.start('sleep', ['1000']);
    const t = LockManager.fromInquire(await holder.prepareMigrate(TARGET), { resources: [{ type: 'disk', path: fx.path, mode: 'exclusive' }] });
    managers.push(t);
    await t.start('sleep', ['1000']);
    await holder.completeMigrateOut(TARGET);
    const incoming = t.completeMigrateIn(SOURCE);
    const cancel = t.completeMigrateIn(SOURCE, { cancel: true }).then(
      () => null,
      (err: unknown) => err,
    );
    await incoming.catch(() => undefined);
    const err = await cancel;
    // Either the cancel won (the wait was aborted, the target stopped) or the handover did (the cancel is refused).
    if (t.state === 'running') {
      expect(err).toBeInstanceOf(InvalidStateError);
      expect(observe(LEASE)).toBe('exclusive');
    } else {
      expect(err).toBeNull();
      expect(t.state).toBe('stopped');
      expect(observe(LEASE)).toBe('free');
    }
  });
});

describe('cancel at each step', () => {
  it('target cancels before the source prepared: guard gone, incoming VM stopped, source untouched', async () => {
    const src = await source();
    const tgt = await target(src);
    await tgt.peer.call('completeMigrateIn', SOURCE, { cancel: true, graceMs: 1000 });
    expect(await tgt.peer.call('state')).toBe('stopped');
    expect(alive(tgt.vm)).toBe(false);
    expect(observe(GUARD)).toBe('free');
    expect(observe(LEASE)).toBe('exclusive');
    expect(await src.peer.call('state')).toBe('running');
    // Cancel is idempotent.
    await tgt.peer.call('completeMigrateIn', SOURCE, { cancel: true });
  });

  it('source cancels after prepareMigrate: back to running with its lease; the target can only time out, then cancel', async () => {
    const src = await source();
    const tgt = await target(src);
    await src.peer.call('prepareMigrate', TARGET);
    await src.peer.call('completeMigrateOut', TARGET, { cancel: true });
    expect(await src.peer.call('state')).toBe('running');
    expect(observe(LEASE)).toBe('exclusive');
    expect((await tgt.peer.callError('completeMigrateIn', SOURCE, { timeout: 100 })).code).toBe('ERR_LOCK_TIMEOUT');
    await tgt.peer.call('completeMigrateIn', SOURCE, { cancel: true });
    expect(observe(GUARD)).toBe('free');
    // Running again: hotplug works again, and the source can migrate anew.
    await src.peer.call('prepareMigrate', TARGET);
    expect(await src.peer.call('state')).toBe('migrating');
  });

  it('source cancels after completeMigrateOut: it takes the leases back past the target\'s guard', async () => {
    const src = await source();
    const tgt = await target(src);
    await src.peer.call('prepareMigrate', TARGET);
    await src.peer.call('completeMigrateOut', TARGET);
    expect(observe(LEASE)).toBe('free');
    await src.peer.call('completeMigrateOut', TARGET, { cancel: true });
    expect(await src.peer.call('state')).toBe('running');
    expect(observe(LEASE)).toBe('exclusive');
    // The source's VM carries the lease again (the same open file description).
    await src.peer.kill();
    expect(observe(LEASE)).toBe('exclusive');
    await tgt.peer.call('completeMigrateIn', SOURCE, { cancel: true });
    process.kill(src.vm, 'SIGKILL');
    await waitUntil(() => observe(LEASE) === 'free', 10_000, 'the lease to go with the source VM');
  });

  it('target cancels after the source let go: the source takes the leases back', async () => {
    const src = await source();
    const tgt = await target(src);
    await src.peer.call('prepareMigrate', TARGET);
    await src.peer.call('completeMigrateOut', TARGET);
    await tgt.peer.call('completeMigrateIn', SOURCE, { cancel: true });
    expect(observe(GUARD)).toBe('free');
    expect(observe(LEASE)).toBe('free');
    await src.peer.call('completeMigrateOut', TARGET, { cancel: true });
    expect(await src.peer.call('state')).toBe('running');
    expect(observe(LEASE)).toBe('exclusive');
  });

  it('source cancels after the target completed: ResourceBusyError, the source stays migrated and holds nothing', async () => {
    const src = await source();
    const tgt = await target(src);
    await src.peer.call('prepareMigrate', TARGET);
    await src.peer.call('completeMigrateOut', TARGET);
    await tgt.peer.call('completeMigrateIn', SOURCE);
    const err = await src.peer.callError('completeMigrateOut', TARGET, { cancel: true });
    expect(err.code).toBe('ERR_RESOURCE_BUSY');
    expect(await src.peer.call('state')).toBe('migrated');
    expect(await tgt.peer.call('state')).toBe('running');
    // The target cannot cancel once it runs.
    expect((await tgt.peer.callError('completeMigrateIn', SOURCE, { cancel: true })).code).toBe('ERR_INVALID_STATE');
  });
});

describe('inquire tokens', () => {
  function tokenFor(options: LockManagerOptions = {}, mode: 'exclusive' | 'shared' = 'exclusive'): string {
    const m = manager({ params: { uuid: '5f1c2a3e-9b0d-4c6e-8a7f-112233445566', name: 'vm1', id: 3 }, ...options });
    m.registerResource({ type: 'disk', path: fx.path, mode, qemuCompatible: true });
    return m.inquire();
  }

  it('carries the lockspace, the params and every resource with its mode', async () => {
    const other = makeFile(fx.tmp.dir, 'data.img');
    const m = manager({ params: { name: 'vm1', uuid: '5f1c2a3e-9b0d-4c6e-8a7f-112233445566' } });
    m.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive', qemuCompatible: true });
    m.registerResource({ type: 'disk', path: other, mode: 'readonly' });
    const t = LockManager.fromInquire(m.inquire(), {
      params: { id: 7 },
      resources: [
        { type: 'disk', path: other, mode: 'readonly' },
        { type: 'disk', path: fx.path, mode: 'exclusive', qemuCompatible: true },
      ],
    });
    managers.push(t);
    expect(t.params).toEqual({ name: 'vm1', uuid: '5f1c2a3e-9b0d-4c6e-8a7f-112233445566', id: 7 });
    expect(t.resources.map((r) => [r.path, r.mode, r.held]).sort()).toEqual(
      [
        [fx.path, 'exclusive', false],
        [other, 'readonly', false],
      ].sort(),
    );
    expect(t.state).toBe('new');
  });

  it('a truncated, altered, wrong-version or foreign token is InvalidArgumentError; so is one for another domain', async () => {
    const token = tokenFor();
    const [name, version, payload, digest] = token.split('.') as [string, string, string, string];
    const altered = `${name}.${version}.${payload.slice(0, 10)}${payload[10] === 'A' ? 'B' : 'A'}${payload.slice(11)}.${digest}`;
    const bad: Array<[unknown, RegExp]> = [
      [token.slice(0, token.length - 3), /digest does not match/],
      [token.slice(0, 40), /form lockmgr/],
      [altered, /truncated or altered/],
      [`${name}.2.${payload}.${digest}`, /version 2/],
      [`virtlockd.${version}.${payload}.${digest}`, /lock manager 'virtlockd'/],
      ['', /form lockmgr/],
      [42, /expected a string/],
    ];
    const resources: ResourceSpec[] = [
      { type: 'disk', path: fx.path, mode: 'exclusive', qemuCompatible: true },
      { type: 'disk', path: join(fx.tmp.dir, 'data.img'), mode: 'readonly' },
    ];
    for (const [t, why] of bad) {
      expect(() => LockManager.fromInquire(t as string, { resources }), String(t)).toThrow(InvalidArgumentError);
      expect(() => LockManager.fromInquire(t as string, { resources }), String(t)).toThrow(why);
    }
    expect(() => LockManager.fromInquire(token, { resources, params: { uuid: '00000000-0000-4000-8000-000000000000' } })).toThrow(/is for domain 5f1c2a3e/);
  });

  it('the target opens the resources at fromInquire: a disk missing on the target fails there, holding nothing', async () => {
    const other = makeFile(fx.tmp.dir, 'gone.img');
    const m = manager();
    m.registerResource({ type: 'disk', path: other, mode: 'exclusive' });
    const token = m.inquire();
    await m.free();
    const { rmSync } = await import('node:fs');
    rmSync(other);
    const before = fdCount();
    expect(() => LockManager.fromInquire(token, { resources: [{ type: 'disk', path: other, mode: 'exclusive' }] })).toThrow(/gone\.img/);
    expect(fdCount()).toBe(before);
  });
});

describe('the migration API in the wrong state or with bad arguments', () => {
  it('InvalidStateError or InvalidArgumentError, and nothing changes', async () => {
    const m = manager();
    m.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    await expect(m.prepareMigrate(TARGET)).rejects.toThrow(InvalidStateError);
    await expect(m.completeMigrateIn(SOURCE)).rejects.toThrow(InvalidStateError);
    await expect(m.completeMigrateIn(SOURCE, { cancel: true })).rejects.toThrow(InvalidStateError);
    await m.start('sleep', ['1000']);
    await expect(m.completeMigrateOut(TARGET)).rejects.toThrow(/not allowed in state 'running'/);
    await expect(m.prepareMigrate('')).rejects.toThrow(InvalidArgumentError);
    await expect(m.prepareMigrate(5 as unknown as string)).rejects.toThrow(InvalidArgumentError);
    await m.prepareMigrate(TARGET);
    await expect(m.prepareMigrate(TARGET)).rejects.toThrow(InvalidStateError);
    await expect(m.acquireResource({ type: 'disk', path: makeFile(fx.tmp.dir, 'b.img'), mode: 'shared' })).rejects.toThrow(/not allowed in state 'migrating'/);
    await expect(m.completeMigrateOut('qemu://elsewhere/system')).rejects.toThrow(/the migration in progress is to/);
    await expect(m.completeMigrateOut(TARGET, { cancel: 'yes' } as never)).rejects.toThrow(InvalidArgumentError);
    expect(m.state).toBe('migrating');
    expect(observe(LEASE)).toBe('exclusive');
    await m.completeMigrateOut(TARGET);
    // Idempotent.
    await m.completeMigrateOut(TARGET);
    expect(m.state).toBe('migrated');
    expect(observe(LEASE)).toBe('free');
    await expect(m.verify()).rejects.toThrow(InvalidStateError);
    await m.shutdown({ graceMs: 1000 });
    expect(m.state).toBe('stopped');
  });

  it('a target cannot hotplug or migrate out while incoming, and free() during completeMigrateIn rejects it and releases everything', async () => {
    const holder = manager();
    holder.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    await holder.start('sleep', ['1000']);
    const t = manager({ flags: { migrate: true } });
    t.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    await t.start('sleep', ['1000']);
    expect(t.state).toBe('incoming');
    await expect(t.prepareMigrate(TARGET)).rejects.toThrow(InvalidStateError);
    await expect(t.acquireResource({ type: 'disk', path: fx.path, mode: 'exclusive' })).rejects.toThrow(InvalidStateError);
    const pending = t.completeMigrateIn(SOURCE).then(
      () => null,
      (err: unknown) => err,
    );
    await expect(t.completeMigrateIn(SOURCE)).rejects.toThrow(/already in progress/);
    await t.free();
    expect(await pending).toBeInstanceOf(InvalidStateError);
    expect(t.state).toBe('freed');
    await holder.free();
    expect(observe(LEASE)).toBe('free');
    expect(observe(GUARD)).toBe('free');
  });

  it('prepareMigrate is refused while a hotplug is in flight', async () => {
    const m = manager();
    m.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    await m.start('sleep', ['1000']);
    const other = makeFile(fx.tmp.dir, 'hot.img');
    const blocker = fx.open(other);
    blocker.tryLock('exclusive', LEASE);
    const hot = m.acquireResource({ type: 'disk', path: other, mode: 'exclusive' }, { timeout: 5_000 });
    await expect(m.prepareMigrate(TARGET)).rejects.toThrow(/acquireResource\(\) is still in progress/);
    blocker.unlock(LEASE);
    await hot;
    await m.prepareMigrate(TARGET);
    expect(m.state).toBe('migrating');
  });
});

describe('nothing leaks', () => {
  it('a whole migration in one process, ten times: fds back to the baseline, nothing held', async () => {
    const once = async () => {
      const s = new LockManager();
      s.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
      await s.start('sleep', ['1000']);
      const t = LockManager.fromInquire(s.inquire(), { resources: [{ type: 'disk', path: fx.path, mode: 'exclusive' }] });
      await t.start('sleep', ['1000']);
      await s.prepareMigrate(TARGET);
      await s.completeMigrateOut(TARGET);
      await t.completeMigrateIn(SOURCE);
      await s.shutdown({ graceMs: 1000 });
      await s.free();
      await t.shutdown({ graceMs: 1000 });
      await t.free();
    };
    await once();
    const before = fdCount();
    for (let i = 0; i < 10; i++) await once();
    expect(fdCount()).toBe(before);
    expect(observe(LEASE)).toBe('free');
    expect(observe(GUARD)).toBe('free');
  });
});


// The lock-manager contract (docs/contract.md): every row there names a test here.
import { spawnSync } from 'node:child_process';
import { chmodSync, existsSync, linkSync, readFileSync, readdirSync, readlinkSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  InvalidArgumentError,
  InvalidStateError,
  LockManager,
  ResourceAccessError,
  ResourceBusyError,
  type LockManagerOptions,
  type ManagerState,
} from '../../lib/index.js';
import { compileShim, distUrl, fdCount, isRoot, lockFixture, makeFile, managerHarness, preload, runScript, waitUntil } from '../helpers.js';

const fx = lockFixture();
const { manager, managerPeer } = managerHarness();
const BYTE0 = { start: 0, length: 1 };

/** What an observer sees on byte 0 of `path`: the conflicting lock's mode, or 'free'. */
function observe(path = fx.path): 'exclusive' | 'shared' | 'free' {
  const probe = fx.open(path, 'read');
  const c = probe.getConflict('exclusive', BYTE0);
  probe.close();
  return c === null ? 'free' : c.mode;
}

function alive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return !/^\d+ \(.*\) [ZX] /.test(stat);
  } catch {
    return false;
  }
}

/** This process's fds open on `path`. */
function fdsOn(path: string): string[] {
  return readdirSync('/proc/self/fd').filter((fd) => {
    try {
      return readlinkSync(`/proc/self/fd/${fd}`) === path;
    } catch {
      return false;
    }
  });
}

/** A disk held exclusively by another running manager, and a running manager `m` without resources. */
async function busyDiskAndRunningManager(): Promise<{ busy: string; other: LockManager; m: LockManager }> {
  const busy = makeFile(fx.tmp.dir, 'busy.img');
  const other = manager();
  other.registerResource({ type: 'disk', path: busy, mode: 'exclusive' });
  await other.start('sleep', ['1000']);
  const m = manager();
  await m.start('sleep', ['1000']);
  return { busy, other, m };
}

function states(m: LockManager): ManagerState[] {
  const seen: ManagerState[] = [];
  m.on('state', (s) => seen.push(s));
  return seen;
}

describe('construction and parameters', () => {
  it('validates params: uuid in RFC 4122 text, id integer >= 0, name non-empty, no unknown keys', () => {
    const ok = manager({ params: { id: 7, uuid: 'A1B2C3D4-0000-4000-8000-000000000001', name: 'vm1', uri: 'qemu:///system' } });
    expect(ok.params).toEqual({ id: 7, uuid: 'a1b2c3d4-0000-4000-8000-000000000001', name: 'vm1', uri: 'qemu:///system' });
    const bad: unknown[] = [
      { params: { uuid: 'not-a-uuid' } },
      { params: { uuid: 'a1b2c3d4000040008000000000000001' } },
      { params: { id: -1 } },
      { params: { id: 1.5 } },
      { params: { name: '' } },
      { params: { name: 'a\0b' } },
      { params: { colour: 'red' } },
      { lockspace: { kind: 'nfs' } },
      { lockLifetime: 'forever' },
      { onLockFailure: 'panic' },
      { attach: -5 },
      { attach: 1, lockLifetime: 'child' },
      { verifyInterval: 0 },
      { flags: { migrate: 'yes' } },
      { flags: { migrate: true }, attach: 1 },
      { lockspace: { kind: 'direct', dir: '/tmp' } },
      { lockspace: { kind: 'indirect' } },
      { lockspace: { kind: 'indirect', dir: 'relative/dir' } },
      { unknown: true },
    ];
    for (const options of bad) expect(() => new LockManager(options as LockManagerOptions), JSON.stringify(options)).toThrow(InvalidArgumentError);
  });

  it('setParameter works before start only, and rejects unknown keys', async () => {
    const m = manager();
    m.setParameter('name', 'vm1');
    m.setParameter('id', 3);
    expect(m.params).toEqual({ name: 'vm1', id: 3 });
    expect(() => m.setParameter('colour' as 'name', 'red')).toThrow(InvalidArgumentError);
    expect(() => m.setParameter('uuid', 'nope')).toThrow(InvalidArgumentError);
    await m.start('sleep', ['1000']);
    expect(() => m.setParameter('name', 'vm2')).toThrow(InvalidStateError);
  });
});

describe('registerResource', () => {
  it('identity is the file: the same file by another path in the same mode is a no-op, in another mode InvalidArgumentError', () => {
    const m = manager();
    const alias = join(fx.tmp.dir, 'alias.img');
    linkSync(fx.path, alias);
    m.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    m.registerResource({ type: 'disk', path: alias, mode: 'exclusive' });
    expect(m.resources).toHaveLength(1);
    expect(() => m.registerResource({ type: 'disk', path: alias, mode: 'shared' })).toThrow(/same file as/);
    expect(m.resources).toHaveLength(1);
  });

  it('reports a missing file, a bad path or a bad type at registration', () => {
    const m = manager();
    const fds = fdCount();
    expect(() => m.registerResource({ type: 'disk', path: join(fx.tmp.dir, 'missing.img'), mode: 'exclusive' })).toThrow(ResourceAccessError);
    expect(() => m.registerResource({ type: 'disk', path: 'relative.img', mode: 'exclusive' })).toThrow(InvalidArgumentError);
    expect(() => m.registerResource({ type: 'lease' as 'disk', path: fx.path, mode: 'exclusive' })).toThrow(InvalidArgumentError);
    expect(() => m.registerResource({ type: 'disk', path: fx.path, mode: 'write' as 'shared' })).toThrow(InvalidArgumentError);
    expect(fdCount()).toBe(fds);
    expect(m.resources).toEqual([]);
  });

  it('a kernel or filesystem that cannot lock gives UnsupportedError at registration, before anything runs', () => {
    const shim = compileShim('deny-ofd', fx.tmp.dir);
    const marker = join(fx.tmp.dir, 'ran');
    const script = `import { LockManager } from ${JSON.stringify(distUrl)};
      const m = new LockManager();
      try { m.registerResource({ type: 'disk', path: ${JSON.stringify(fx.path)}, mode: 'exclusive' });
            await m.start('touch', [${JSON.stringify(marker)}]); console.log('"started"'); }
      catch (e) { console.log(JSON.stringify(e.name + ' ' + m.state)); }`;
    expect(runScript(script, { LD_PRELOAD: preload(shim), DENY_OFD_ERRNO: '22' })).toBe('UnsupportedError new');
    expect(existsSync(marker)).toBe(false);
  });

  it('is allowed in state new only', async () => {
    const m = manager();
    await m.start('sleep', ['1000']);
    expect(() => m.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' })).toThrow(InvalidStateError);
  });
});

describe('start', () => {
  it('acquires every resource, then spawns; the lease is byte 0 of the image and nothing at 100+', async () => {
    const shared = makeFile(fx.tmp.dir, 'shared.img');
    const ro = makeFile(fx.tmp.dir, 'base.img');
    const m = manager();
    const seen = states(m);
    m.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    m.registerResource({ type: 'disk', path: shared, mode: 'shared' });
    m.registerResource({ type: 'disk', path: ro, mode: 'readonly' });
    await m.start('sleep', ['1000']);
    expect(m.state).toBe('running');
    expect(seen).toEqual(['starting', 'running']);
    expect(alive(m.getChild().pid)).toBe(true);
    expect(observe(fx.path)).toBe('exclusive');
    expect(observe(shared)).toBe('shared');
    expect(observe(ro)).toBe('shared');
    const probe = fx.open(fx.path, 'read');
    expect(probe.getConflict('exclusive', { start: 1, length: 0 })).toBeNull();
  });

  it('fails fast with ResourceBusyError naming the resource, the holder and what was rolled back; spawns nothing', async () => {
    const a = makeFile(fx.tmp.dir, 'a.img');
    const b = makeFile(fx.tmp.dir, 'b.img');
    const holder = await managerPeer();
    await holder.call('create', {});
    await holder.call('register', { type: 'disk', path: b, mode: 'exclusive' });
    await holder.call('start', 'sleep', ['1000']);
    const holderPid = await holder.call<number>('pid');

    const m = manager();
    m.registerResource({ type: 'disk', path: a, mode: 'exclusive' });
    m.registerResource({ type: 'disk', path: b, mode: 'shared' });
    const marker = join(fx.tmp.dir, 'ran');
    const err = (await m.start('touch', [marker]).catch((e: unknown) => e)) as ResourceBusyError;
    expect(err).toBeInstanceOf(ResourceBusyError);
    expect(err.resource).toBe(b);
    expect(err.holder).toMatchObject({ mode: 'exclusive' });
    expect(err.candidates.map((c) => c.pid)).toContain(holderPid);
    expect(err.message).toContain(`${b} is held exclusively by`);
    expect(err.message).toContain(String(holderPid));
    // a.img sorts first by identity only if its inode is lower; either way a.img is free now.
    expect(observe(a)).toBe('free');
    expect(existsSync(marker)).toBe(false);
    expect(m.state).toBe('new');

    // Retry after the holder lets go.
    await holder.call('shutdown', { graceMs: 1000 });
    await m.start('sleep', ['1000']);
    expect(observe(b)).toBe('shared');
  });

  it('rolls back what it took when a later resource in canonical order is busy', async () => {
    const files = [makeFile(fx.tmp.dir, 'x1.img'), makeFile(fx.tmp.dir, 'x2.img'), makeFile(fx.tmp.dir, 'x3.img')];
    const m1 = manager();
    for (const f of files) m1.registerResource({ type: 'disk', path: f, mode: 'exclusive' });
    const order = m1.resources.map((r) => r.path);
    const keys = m1.resources.map((r) => r.identity);
    const sorted = [...keys].sort();
    const last = order[keys.indexOf(sorted[2]!)]!;
    const other = manager();
    other.registerResource({ type: 'disk', path: last, mode: 'exclusive' });
    await other.start('sleep', ['1000']);
    const err = (await m1.start('sleep', ['1000']).catch((e: unknown) => e)) as ResourceBusyError;
    expect(err).toBeInstanceOf(ResourceBusyError);
    expect(err.resource).toBe(last);
    expect(err.rolledBack).toHaveLength(2);
    expect(err.message).toContain('released again');
    for (const f of files.filter((f) => f !== last)) expect(observe(f)).toBe('free');
  });

  it('waits when asked (timeout), in canonical order, so two managers taking [A,B] and [B,A] do not deadlock', async () => {
    const a = makeFile(fx.tmp.dir, 'A.img');
    const b = makeFile(fx.tmp.dir, 'B.img');
    const p1 = await managerPeer();
    const p2 = await managerPeer();
    await p1.call('create', {});
    await p2.call('create', {});
    await p1.call('register', { type: 'disk', path: a, mode: 'exclusive' });
    await p1.call('register', { type: 'disk', path: b, mode: 'exclusive' });
    await p2.call('register', { type: 'disk', path: b, mode: 'exclusive' });
    await p2.call('register', { type: 'disk', path: a, mode: 'exclusive' });
    const first = await p1.call<number>('start', 'sleep', ['1000'], {}, { timeout: 30_000 });
    const second = p2.call<number>('start', 'sleep', ['1000'], {}, { timeout: 30_000 });
    await new Promise((r) => setTimeout(r, 100));
    expect(await p2.call('state')).toBe('starting');
    expect(observe(a)).toBe('exclusive');
    expect(observe(b)).toBe('exclusive');
    await p1.call('shutdown', { graceMs: 1000 });
    expect(alive(first)).toBe(false);
    const pid2 = await second;
    expect(alive(pid2)).toBe(true);
    expect(await p2.call('state')).toBe('running');
  });

  it('a start that times out waiting holds nothing and is back in state new', async () => {
    const m = manager();
    const other = manager();
    const a = makeFile(fx.tmp.dir, 'a.img');
    other.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    await other.start('sleep', ['1000']);
    m.registerResource({ type: 'disk', path: a, mode: 'exclusive' });
    m.registerResource({ type: 'disk', path: fx.path, mode: 'shared' });
    await expect(m.start('sleep', ['1000'], {}, { timeout: 100 })).rejects.toMatchObject({ code: 'ERR_LOCK_TIMEOUT' });
    expect(m.state).toBe('new');
    expect(observe(a)).toBe('free');
  });

  it('free() during a start that waits aborts the wait: start rejects with AbortError, nothing is held or spawned', async () => {
    const other = manager();
    other.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    await other.start('sleep', ['1000']);
    const a = makeFile(fx.tmp.dir, 'a.img');
    const m = manager();
    m.registerResource({ type: 'disk', path: a, mode: 'exclusive' });
    m.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    const marker = join(fx.tmp.dir, 'ran');
    const starting = m.start('touch', [marker], {}, { timeout: 60_000 }).catch((e: unknown) => e);
    await new Promise((r) => setTimeout(r, 50));
    expect(m.state).toBe('starting');
    await m.free();
    expect(await starting).toMatchObject({ name: 'AbortError', cause: expect.objectContaining({ code: 'ERR_INVALID_STATE' }) });
    expect(m.state).toBe('freed');
    expect(observe(a)).toBe('free');
    expect(existsSync(marker)).toBe(false);
  });

  it('bad arguments: InvalidArgumentError, nothing held, nothing spawned, state new', async () => {
    const m = manager();
    m.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    const bad: Array<() => Promise<void>> = [
      () => m.start(),
      () => m.start('sleep', ['1'], {}, { timeout: -1 }),
      () => m.start('sleep', ['1'], {}, { colour: 1 } as never),
      () => m.start('sleep', ['a\0b']),
      () => m.start('sleep', ['1'], { stdio: 'sideways' as never }),
      () => m.start('sleep', ['1'], { bogus: true } as never),
    ];
    for (const call of bad) {
      await expect(call()).rejects.toBeInstanceOf(InvalidArgumentError);
      expect(m.state).toBe('new');
      expect(observe()).toBe('free');
    }
  });

  it('a start aborted through its signal rejects with AbortError, holds nothing, and is back in state new', async () => {
    const other = manager();
    other.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    await other.start('sleep', ['1000']);
    const m = manager();
    m.registerResource({ type: 'disk', path: fx.path, mode: 'shared' });
    const ac = new AbortController();
    const starting = m.start('sleep', ['1000'], {}, { signal: ac.signal });
    await new Promise((r) => setTimeout(r, 30));
    ac.abort(new Error('operator cancelled'));
    await expect(starting).rejects.toMatchObject({ name: 'AbortError', cause: { message: 'operator cancelled' } });
    expect(m.state).toBe('new');
  });

  it('shutdown() during a start that waits: waits for the start, then stops the child', async () => {
    const other = manager();
    other.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    await other.start('sleep', ['1000']);
    const m = manager();
    m.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    const seen = states(m);
    const starting = m.start('sleep', ['1000'], {}, { timeout: 30_000 });
    await new Promise((r) => setTimeout(r, 30));
    const stopping = m.shutdown({ graceMs: 1000 });
    await other.shutdown();
    await starting;
    await stopping;
    expect(seen).toEqual(['starting', 'running', 'stopping', 'stopped']);
    expect(observe()).toBe('free');
  });

  it('a spawn failure releases every lease, spawns nothing and returns to state new', async () => {
    const m = manager();
    m.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    await expect(m.start('/nonexistent/qemu', [])).rejects.toMatchObject({ code: 'ERR_SPAWN' });
    expect(m.state).toBe('new');
    expect(observe()).toBe('free');
  });
});

describe('the conflict matrix of two managers in two processes', () => {
  const modes = ['exclusive', 'shared', 'readonly'] as const;
  for (const held of modes) {
    for (const wanted of modes) {
      const conflicts = held === 'exclusive' || wanted === 'exclusive';
      it(`${held} held, ${wanted} wanted: ${conflicts ? 'busy' : 'both run'}`, async () => {
        const p = await managerPeer();
        await p.call('create', {});
        await p.call('register', { type: 'disk', path: fx.path, mode: held });
        await p.call('start', 'sleep', ['1000']);
        const m = manager();
        m.registerResource({ type: 'disk', path: fx.path, mode: wanted });
        if (conflicts) await expect(m.start('sleep', ['1000'])).rejects.toBeInstanceOf(ResourceBusyError);
        else await m.start('sleep', ['1000']);
        expect(m.state).toBe(conflicts ? 'new' : 'running');
      });
    }
  }
});

describe('lock lifetime: the supervised process never runs without its locks', () => {
  async function supervisorKilled(lifetime: 'child' | 'supervisor') {
    const p = await managerPeer();
    await p.call('create', { lockLifetime: lifetime });
    await p.call('register', { type: 'disk', path: fx.path, mode: 'exclusive' });
    const child = await p.call<number>('start', 'sleep', ['1000']);
    expect(observe()).toBe('exclusive');
    await p.kill('SIGKILL');
    return child;
  }

  it("'child': after SIGKILL of the supervisor the child keeps running and keeps the lock until it exits", async () => {
    const child = await supervisorKilled('child');
    for (let i = 0; i < 20; i++) {
      expect(alive(child)).toBe(true);
      expect(observe()).toBe('exclusive');
      await new Promise((r) => setTimeout(r, 10));
    }
    process.kill(child, 'SIGKILL');
    await waitUntil(() => !alive(child), 5000, 'the orphaned child to die');
    await waitUntil(() => observe() === 'free', 5000, 'the lock to go with the child');
  });

  it("'supervisor': after SIGKILL of the supervisor the child dies, and is never seen running unlocked", async () => {
    const child = await supervisorKilled('supervisor');
    // An observer: whenever the child is seen alive, the lock must be seen held.
    let sawUnlockedChild = false;
    await waitUntil(() => {
      const free = observe() === 'free';
      const running = alive(child);
      if (free && running) sawUnlockedChild = true;
      return !running;
    }, 5000, 'the child to die with its supervisor');
    expect(sawUnlockedChild).toBe(false);
    expect(observe()).toBe('free');
  });
});

describe('running: hotplug, exit, shutdown, free', () => {
  it('acquireResource and releaseResource are idempotent, and their failures leave the child running', async () => {
    const extra = makeFile(fx.tmp.dir, 'extra.img');
    const { busy, m } = await busyDiskAndRunningManager();
    const pid = m.getChild().pid;
    expect(await m.acquireResource({ type: 'disk', path: extra, mode: 'exclusive' })).toEqual({ wasHeld: false });
    expect(await m.acquireResource({ type: 'disk', path: extra, mode: 'exclusive' })).toEqual({ wasHeld: true });
    expect(observe(extra)).toBe('exclusive');
    await expect(m.acquireResource({ type: 'disk', path: extra, mode: 'shared' })).rejects.toBeInstanceOf(InvalidArgumentError);
    await expect(m.acquireResource({ type: 'disk', path: busy, mode: 'shared' })).rejects.toBeInstanceOf(ResourceBusyError);
    await expect(m.acquireResource({ type: 'disk', path: busy, mode: 'shared' }, { timeout: 50 })).rejects.toMatchObject({ code: 'ERR_LOCK_TIMEOUT' });
    await expect(m.acquireResource({ type: 'disk', path: join(fx.tmp.dir, 'nope.img'), mode: 'shared' })).rejects.toBeInstanceOf(ResourceAccessError);
    expect(m.state).toBe('running');
    expect(alive(pid)).toBe(true);
    expect(await m.releaseResource({ type: 'disk', path: extra })).toEqual({ wasHeld: true });
    expect(await m.releaseResource({ type: 'disk', path: extra })).toEqual({ wasHeld: false });
    expect(await m.releaseResource({ type: 'disk', path: busy })).toEqual({ wasHeld: false });
    expect(observe(extra)).toBe('free');
  });

  it('a hotplug still waiting when the child exits fails with InvalidStateError and leaves nothing held', async () => {
    const { busy, other, m } = await busyDiskAndRunningManager();
    // Settled into a value at once: it rejects while the test awaits other things.
    const acquiring = m.acquireResource({ type: 'disk', path: busy, mode: 'exclusive' }, { timeout: 30_000 }).catch((e: unknown) => e);
    await new Promise((r) => setTimeout(r, 30));
    process.kill(m.getChild().pid, 'SIGKILL');
    await new Promise((r) => m.once('exit', r));
    // The holder still holds it: the wait must end because the child is gone, not because the disk came free.
    expect(await acquiring).toBeInstanceOf(InvalidStateError);
    expect(m.resources).toEqual([]);
    await other.shutdown();
    expect(observe(busy)).toBe('free');
  });

  it('shutdown() ends a hotplug that is waiting: InvalidStateError, nothing held, shutdown resolves', async () => {
    const { busy, m } = await busyDiskAndRunningManager();
    const acquiring = m.acquireResource({ type: 'disk', path: busy, mode: 'shared' }, { timeout: 60_000 }).catch((e: unknown) => e);
    await new Promise((r) => setTimeout(r, 30));
    await m.shutdown({ graceMs: 1000 });
    expect(await acquiring).toBeInstanceOf(InvalidStateError);
    expect(m.state).toBe('stopped');
    expect(m.resources).toEqual([]);
  });

  it('two concurrent acquires of one disk: the second waits for the first, and nothing is held behind the manager', async () => {
    const { busy, other, m } = await busyDiskAndRunningManager();
    const patient = m.acquireResource({ type: 'disk', path: busy, mode: 'exclusive' }, { timeout: 30_000 });
    const hasty = m.acquireResource({ type: 'disk', path: busy, mode: 'exclusive' });
    await new Promise((r) => setTimeout(r, 50));
    await other.shutdown();
    expect(await patient).toEqual({ wasHeld: false });
    expect(await hasty).toEqual({ wasHeld: true });
    expect(m.resources.filter((r) => r.held)).toHaveLength(1);
    expect(await m.releaseResource({ type: 'disk', path: busy })).toEqual({ wasHeld: true });
    expect(observe(busy)).toBe('free');
  });

  it('a registered resource can be released while running, even though the child holds its fd', async () => {
    const m = manager();
    m.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    await m.start('sleep', ['1000']);
    expect(await m.releaseResource({ type: 'disk', path: fx.path })).toEqual({ wasHeld: true });
    expect(observe()).toBe('free');
  });

  it('when the child exits by itself: exit event with its status, locks released after the reap, state stopped', async () => {
    const m = manager();
    m.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    const exit = new Promise((r) => m.once('exit', r));
    const seen = states(m);
    await m.start('sh', ['-c', 'sleep 0.1; exit 3']);
    expect(observe()).toBe('exclusive');
    expect(await exit).toEqual({ code: 3, signal: null });
    expect(m.state).toBe('stopped');
    expect(seen).toEqual(['starting', 'running', 'stopped']);
    expect(observe()).toBe('free');
  });

  it('a child that crashes: exit event with its signal, locks released, state stopped', async () => {
    const m = manager();
    m.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    const exit = new Promise((r) => m.once('exit', r));
    await m.start('sh', ['-c', 'sleep 0.05; kill -SEGV $$']);
    expect(await exit).toEqual({ code: null, signal: 'SIGSEGV' });
    expect(m.state).toBe('stopped');
    expect(observe()).toBe('free');
  });

  it('attach (RFC NEW_ATTACH): supervises a running process, holds its leases, and releases them when it exits', async () => {
    const { spawn } = await import('node:child_process');
    const vm = spawn('sleep', ['1000'], { stdio: 'ignore' });
    await new Promise((r) => vm.once('spawn', r));
    const m = manager({ attach: vm.pid!, lockLifetime: 'supervisor' });
    m.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    await expect(m.start('sleep', ['1'])).rejects.toBeInstanceOf(InvalidArgumentError);
    const exit = new Promise((r) => m.once('exit', r));
    await m.start();
    expect(m.getChild()).toEqual({ pid: vm.pid });
    expect(observe()).toBe('exclusive');
    vm.kill('SIGTERM');
    // Not our child: its status is unknown to us (Node's child_process reaps it).
    expect(await exit).toEqual({ code: null, signal: null });
    expect(observe()).toBe('free');
    expect(m.state).toBe('stopped');
  });

  it('shutdown sends SIGTERM, then SIGKILL after graceMs; concurrent calls share one promise; it is idempotent', async () => {
    const m = manager();
    m.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    const ready = join(fx.tmp.dir, 'trap-set');
    await m.start('sh', ['-c', `trap "" TERM; touch ${ready}; while :; do sleep 0.05; done`]);
    const pid = m.getChild().pid;
    await waitUntil(() => existsSync(ready), 5000, 'the child to ignore SIGTERM');
    const exits: unknown[] = [];
    m.on('exit', (s) => exits.push(s));
    const a = m.shutdown({ graceMs: 200 });
    const b = m.shutdown({ graceMs: 200 });
    expect(m.state).toBe('stopping');
    await Promise.all([a, b]);
    expect(exits).toEqual([{ code: null, signal: 'SIGKILL' }]);
    expect(alive(pid)).toBe(false);
    expect(observe()).toBe('free');
    expect(m.state).toBe('stopped');
    await m.shutdown();
    expect(exits).toHaveLength(1);
  });

  it('free kills now, releases and closes every fd; idempotent in every state', async () => {
    const fds = fdCount();
    const m = manager();
    m.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    await m.start('sleep', ['1000']);
    const pid = m.getChild().pid;
    await Promise.all([m.free(), m.free()]);
    expect(m.state).toBe('freed');
    expect(alive(pid)).toBe(false);
    expect(observe()).toBe('free');
    await waitUntil(() => fdCount() === fds, 5000, 'fds to close');
    await m.free();
    const unused = manager();
    unused.registerResource({ type: 'disk', path: fx.path, mode: 'shared' });
    await unused.free();
    expect(unused.state).toBe('freed');
    await m[Symbol.asyncDispose]();
  });

  it("a 'state' listener that calls free() on 'starting' gets no child and no leases; 'freed' is final", async () => {
    const m = manager();
    m.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    const seen = states(m);
    m.on('state', (s) => {
      if (s === 'starting') void m.free();
    });
    const marker = join(fx.tmp.dir, 'ran');
    await expect(m.start('touch', [marker])).rejects.toMatchObject({ name: 'AbortError' });
    await m.free();
    expect(m.state).toBe('freed');
    expect(seen.at(-1)).toBe('freed');
    expect(seen).not.toContain('running');
    expect(existsSync(marker)).toBe(false);
    expect(observe()).toBe('free');
  });

  it("a throwing 'exit' or 'state' listener becomes a 'warning'; free() still closes everything", async () => {
    const m = manager();
    m.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    const warnings: string[] = [];
    m.on('warning', (w) => warnings.push(w.message));
    m.on('exit', () => {
      throw new Error('exit listener bug');
    });
    await m.start('sh', ['-c', 'exit 0']);
    m.on('state', (s) => {
      if (s === 'freed') throw new Error('state listener bug');
    });
    await waitUntil(() => m.state === 'stopped', 5000, 'the child to exit');
    await m.free();
    expect(m.state).toBe('freed');
    expect(warnings).toEqual(['exit listener bug', 'state listener bug']);
    expect(observe()).toBe('free');
    expect(fdsOn(fx.path)).toEqual([]);
  });

  it('supervisorArgs() refuses what the CLI cannot express, and carries every parameter', async () => {
    const m = manager({ params: { name: 'vm1', uri: 'qemu:///system' } });
    m.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive', qemuCompatible: true });
    expect(m.supervisorArgs()).toEqual(['run', '--lockspace', 'direct', '--exclusive', fx.path, '--qemu-compatible', '--lifetime', 'child', '--name', 'vm1', '--uri', 'qemu:///system', '--']);
    m.registerResource({ type: 'disk', path: makeFile(fx.tmp.dir, 'b.img'), mode: 'shared' });
    expect(() => m.supervisorArgs()).toThrow(/only some of these are QEMU-compatible/);
    const attached = manager({ attach: process.pid });
    expect(() => attached.supervisorArgs()).toThrow(InvalidStateError);
  });

  it.skipIf(!isRoot)('attach to a process we may not signal fails at start with UnsupportedError, holding nothing', async () => {
    const { spawn } = await import('node:child_process');
    const vm = spawn('sleep', ['1000'], { stdio: 'ignore' });
    await new Promise((r) => vm.once('spawn', r));
    try {
      chmodSync(fx.tmp.dir, 0o755);
      chmodSync(fx.path, 0o666);
      const script = `import { LockManager } from ${JSON.stringify(distUrl)};
        const m = new LockManager({ attach: ${vm.pid} });
        m.registerResource({ type: 'disk', path: ${JSON.stringify(fx.path)}, mode: 'shared' });
        const r = await m.start().then(() => 'started', (e) => e.name + ' ' + e.cause?.code + ' ' + m.state);
        await m.free();
        console.log(JSON.stringify(r));`;
      const r = spawnSync('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, '--input-type=module', '-e', script], {
        encoding: 'utf8',
        timeout: 30_000,
      });
      expect(r.stderr).toBe('');
      expect(JSON.parse(r.stdout)).toBe('UnsupportedError EPERM new');
      expect(observe()).toBe('free');
    } finally {
      vm.kill('SIGKILL');
    }
  });

  it('calls in the wrong state reject with InvalidStateError naming the state and the states that allow it', async () => {
    const m = manager();
    expect(() => m.getChild()).toThrow(/getChild\(\) is not allowed in state 'new'; it is allowed in 'incoming', 'running', 'migrating', 'migrated', 'stopping'/);
    await expect(m.acquireResource({ type: 'disk', path: fx.path, mode: 'shared' })).rejects.toBeInstanceOf(InvalidStateError);
    await expect(m.releaseResource({ type: 'disk', path: fx.path })).rejects.toBeInstanceOf(InvalidStateError);
    await expect(m.verify()).rejects.toBeInstanceOf(InvalidStateError);
    await m.start('sleep', ['1000']);
    await expect(m.start('sleep', ['1000'])).rejects.toThrow(/start\(\) is not allowed in state 'running'/);
    await m.free();
    await expect(m.start('sleep', ['1000'])).rejects.toThrow(/state 'freed'/);
  });
});

describe('verify and lock failure', () => {
  // The child shares the lease's open file description (lockLifetime 'child'),
  // so it can really drop the lock: the loss a network filesystem can cause.
  async function lostLock(onLockFailure: 'poweroff' | 'pause' | 'ignore', verifyInterval?: number) {
    const m = manager({ onLockFailure, verifyInterval });
    m.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    const failures: unknown[] = [];
    m.on('lock-failure', (f) => failures.push(f));
    const exited = new Promise((r) => m.once('exit', r));
    // The child finds the image among its own fds and unlocks byte 0 through it.
    const script = `import { native } from ${JSON.stringify(new URL('../../dist/os/native.js', import.meta.url).href)};
      import { readdirSync, readlinkSync } from 'node:fs';
      for (const fd of readdirSync('/proc/self/fd')) {
        try { if (readlinkSync('/proc/self/fd/' + fd) === process.argv[1]) native.setlk(Number(fd), 2, 0, 1); } catch {}
      }
      setInterval(() => {}, 1000);`;
    await m.start(process.execPath, ['--input-type=module', '-e', script, fx.path]);
    const pid = m.getChild().pid;
    await waitUntil(() => observe() === 'free', 10_000, 'the child to drop the lock');
    return { m, failures, pid, exited };
  }

  it('verify() reports nothing when every lock is held', async () => {
    const m = manager();
    m.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    await m.start('sleep', ['1000']);
    expect(await m.verify()).toEqual({ lost: [] });
  });

  it("a lost lock with onLockFailure 'poweroff': lock-failure event, the child is killed, state stopped", async () => {
    const { m, failures, exited } = await lostLock('poweroff');
    expect(await m.verify()).toEqual({ lost: [fx.path] });
    expect(failures).toEqual([{ resource: fx.path, reason: expect.stringContaining('no longer held'), action: 'poweroff' }]);
    expect(await exited).toEqual({ code: null, signal: 'SIGKILL' });
    expect(m.state).toBe('stopped');
  });

  it("a lost lock with onLockFailure 'pause': the child is stopped (SIGSTOP), not killed", async () => {
    const { m, failures, pid } = await lostLock('pause');
    expect(await m.verify()).toEqual({ lost: [fx.path] });
    expect(failures).toHaveLength(1);
    await waitUntil(() => /^\d+ \(.*\) T /.test(readFileSync(`/proc/${pid}/stat`, 'utf8')), 5000, 'the child to be stopped');
    expect(m.state).toBe('running');
  });

  it("a lost lock with onLockFailure 'ignore': the event only; the child runs on", async () => {
    const { m, failures, pid } = await lostLock('ignore');
    expect(await m.verify()).toEqual({ lost: [fx.path] });
    expect(failures).toEqual([expect.objectContaining({ action: 'ignore' })]);
    expect(alive(pid)).toBe(true);
    expect(m.state).toBe('running');
  });

  it("a throwing 'lock-failure' listener does not stop poweroff", async () => {
    const { m, exited } = await lostLock('poweroff');
    const warnings: string[] = [];
    m.on('warning', (w) => warnings.push(w.message));
    m.on('lock-failure', () => {
      throw new Error('listener bug');
    });
    expect(await m.verify()).toEqual({ lost: [fx.path] });
    expect(await exited).toEqual({ code: null, signal: 'SIGKILL' });
    expect(warnings).toEqual(['listener bug']);
  });

  it('verifyInterval finds a lost lock without being asked', async () => {
    const { failures, exited } = await lostLock('poweroff', 50);
    expect(await exited).toEqual({ code: null, signal: 'SIGKILL' });
    expect(failures).toHaveLength(1);
  });
});

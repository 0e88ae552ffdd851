// The conformance suite: the rows of docs/contract.md, written once and run
// against every lockspace (one line per backend: direct.test.ts,
// indirect.test.ts, sanlock.test.ts). Where lockspaces legitimately differ, a
// row reads the capability (lib/lockspaces/driver.ts) and asserts the
// declared behaviour; it is never skipped for a backend.
//
// Host A is this process, host B a manager peer process (backends.ts). Every
// test leaves nothing held: afterEach frees every manager, kills the VMs of
// killed supervisors, and waits until a third party sees the whole pool free.
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import {
  AbortError,
  attachProcess,
  InvalidArgumentError,
  InvalidStateError,
  LockManager,
  LockTimeoutError,
  ResourceAccessError,
  ResourceBusyError,
  SpawnError,
  UnsupportedError,
  type SupervisedProcess,
  type AdoptOptions,
  type LockManagerOptions,
  type ResourceMode,
  type ResourceSpec,
} from '../../lib/index.js';
import { supervisionInfo } from '../../lib/os/supervise.js';
import { fdCount, uniqueName, waitUntil } from '../helpers.js';
import type { Backend, Host, PoolResource } from './backends.js';
import { LocalSide, RemoteSide, type Side } from './sides.js';

const TARGET = 'qemu+ssh://host-b/system';
const SOURCE = 'qemu+ssh://host-a/system';
const MODES: readonly ResourceMode[] = ['exclusive', 'shared', 'readonly'];

/** The one-letter state of a process (R, S, T, Z ...), or null once it is gone. */
function procState(pid: number): string | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
  } catch {
    return null;
  }
}

/** Polls an asynchronous condition until it holds, or fails after ms. */
async function eventually(check: () => Promise<boolean>, what: string, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** This process's fds that refer to one of `paths`. */
function ourFdsOn(paths: ReadonlySet<string>): string[] {
  return readdirSync('/proc/self/fd').filter((fd) => {
    try {
      return paths.has(readlinkSync(`/proc/self/fd/${fd}`));
    } catch {
      return false;
    }
  });
}

/** Running or stopped, not a zombie. */
const alive = (pid: number): boolean => {
  const s = procState(pid);
  return s !== null && s !== 'Z' && s !== 'X';
};

/** Managers, peers and VMs of one test, and the backend's pool. */
class Rig {
  readonly b: Backend;
  readonly #locals: LockManager[] = [];
  readonly #remotes: RemoteSide[] = [];
  /**
   * VMs started through a side, watched through a pidfd: one whose supervisor
   * a test killed lives on (lockLifetime 'child'). Never a bare pid: on this
   * busy machine a pid is reused within minutes, and a stale one may be
   * anybody's process.
   */
  readonly #vms: SupervisedProcess[] = [];

  constructor(b: Backend) {
    this.b = b;
    beforeAll(() => b.setup(), 120_000);
    afterAll(() => b.teardown(), 60_000);
    afterEach(async () => {
      for (const m of this.#locals.splice(0)) await m.free();
      for (const r of this.#remotes.splice(0)) {
        if (r.peer.child.exitCode === null && r.peer.child.signalCode === null) await r.call('free').catch(() => undefined);
        await r.peer.kill();
      }
      for (const vm of this.#vms.splice(0)) {
        vm.signal('SIGKILL');
        await vm.exited;
      }
      await b.settle();
    }, 60_000);
  }

  disk(i: number): PoolResource {
    return this.b.disks[i]!;
  }

  get lease(): PoolResource {
    return this.b.lease;
  }

  /** A LockManager on host A with this backend's lockspace. */
  a(options: LockManagerOptions = {}): LockManager {
    const m = new LockManager({ lockspace: this.b.lockspace('A'), ...options });
    this.#locals.push(m);
    return m;
  }

  /** A manager on `host`, created (or a migration target made with fromInquire when `token` is given). */
  async side(host: Host, options: LockManagerOptions = {}, token?: string, resources?: ResourceSpec[]): Promise<Side> {
    let s: Side;
    if (host === 'A') {
      s = new LocalSide((m) => this.#locals.push(m));
    } else {
      const r = await RemoteSide.start(this.b.env('B'));
      this.#remotes.push(r);
      s = r;
    }
    if (token === undefined) await s.call('create', { lockspace: this.b.lockspace(host), ...options });
    else await s.call('fromInquire', token, { lockspace: this.b.lockspace(host), ...options, resources });
    return s;
  }

  /**
   * A manager on host A that adopts the running VM `vm` (on host A) and its
   * leases (LockManager.adopt): in this process ('this'), or in a new
   * supervisor process ('new process').
   */
  async adopter(host: 'this' | 'new process', vm: number, resources: ResourceSpec[], options: Omit<AdoptOptions, 'resources'> = {}): Promise<Side> {
    const s = host === 'this' ? new LocalSide((m) => this.#locals.push(m)) : await RemoteSide.start(this.b.env('A'));
    if (s instanceof RemoteSide) this.#remotes.push(s);
    await s.call('adopt', vm, { lockspace: this.b.lockspace('A'), ...options, resources });
    return s;
  }

  /** A supervisor process on host A (a manager peer with host A's environment) running a VM that holds `specs`. */
  async supervisorOnA(specs: ResourceSpec[], options: LockManagerOptions = {}): Promise<{ side: RemoteSide; vm: number }> {
    const side = await RemoteSide.start(this.b.env('A'));
    this.#remotes.push(side);
    await side.call('create', { lockspace: this.b.lockspace('A'), ...options });
    for (const s of specs) await side.call('register', s);
    return { side, vm: await this.run(side) };
  }

  /** Starts `sleep 1000` on a side; resolves the VM's pid. */
  async run(s: Side, wait?: { timeout?: number }): Promise<number> {
    // IPC turns a trailing undefined into null, which start() refuses.
    const vm = await (wait === undefined ? s.call<number>('start', 'sleep', ['1000']) : s.call<number>('start', 'sleep', ['1000'], {}, wait));
    this.#vms.push(attachProcess(vm).unref());
    return vm;
  }

  /** A manager on `host` running a VM that holds `specs`. */
  async holder(host: Host, specs: ResourceSpec[], options: LockManagerOptions = {}): Promise<{ side: Side; vm: number }> {
    const side = await this.side(host, options);
    for (const s of specs) await side.call('register', s);
    return { side, vm: await this.run(side) };
  }

  /** A marker a command touches before it execs: whether it ever ran. */
  marker(name: string): string {
    return join(this.b.scratch, uniqueName(name));
  }
}

export function conformance(backend: Backend): void {
  const why = backend.unavailable();
  if (why !== null) console.warn(`conformance suite for the ${backend.name} lockspace skipped: ${why}`);

  describe.skipIf(why !== null)(`conformance: ${backend.name} lockspace`, () => {
    const t = new Rig(backend);
    const caps = backend.capabilities;

    describe('capabilities', () => {
      it('the manager reports the capabilities the lockspace declares (docs/contract.md, "Capabilities by lockspace")', () => {
        expect(t.a().capabilities).toEqual(caps);
      });

      it(`attach: ${caps.attach ? 'a running process is supervised, its leases held for it and released when it exits' : 'refused at construction with UnsupportedError naming the capability'}`, async () => {
        const { spawn } = await import('node:child_process');
        const vm = spawn('sleep', ['1000'], { stdio: 'ignore' });
        await new Promise((r) => vm.once('spawn', r));
        try {
          if (!caps.attach) {
            expect(() => t.a({ attach: vm.pid!, lockLifetime: 'supervisor' })).toThrow(UnsupportedError);
            expect(() => t.a({ attach: vm.pid!, lockLifetime: 'supervisor' })).toThrow(/lacks the capability 'attach'/);
            return;
          }
          const m = t.a({ attach: vm.pid!, lockLifetime: 'supervisor' });
          m.registerResource(t.disk(0).spec('exclusive'));
          const exit = new Promise((r) => m.once('exit', r));
          await m.start();
          expect(m.getChild()).toEqual({ pid: vm.pid });
          expect(await backend.observe(t.disk(0))).toBe('exclusive');
          vm.kill('SIGTERM');
          expect(await exit).toEqual({ code: null, signal: null });
          expect(m.state).toBe('stopped');
          expect(await backend.observe(t.disk(0))).toBe('free');
        } finally {
          vm.kill('SIGKILL');
        }
      });
    });

    describe('the mode matrix: two managers on two hosts', () => {
      for (const [first, second] of [['A', 'B'], ['B', 'A']] as const) {
        for (const held of MODES) {
          for (const wanted of MODES) {
            // readonly and shared exclude each other where the lockspace declares it (capability readersExcludeWriters).
            const both = held !== 'exclusive' && wanted !== 'exclusive' && (held === wanted || !caps.readersExcludeWriters);
            it(`host ${first} holds ${held}, host ${second} wants ${wanted}: ${both ? 'both run' : 'busy, nothing spawned'}`, async () => {
              const d = t.disk(0);
              const h = await t.holder(first, [d.spec(held)]);
              const w = await t.side(second);
              await w.call('register', d.spec(wanted));
              const marker = t.marker('ran');
              if (both) {
                await w.call('start', 'sh', ['-c', `touch ${marker}; exec sleep 1000`]);
                expect(await w.call('state')).toBe('running');
                expect(await backend.observe(d)).toBe('shared');
              } else {
                const err = await w.fail('start', 'sh', ['-c', `touch ${marker}; exec sleep 1000`]);
                expect(err.name).toBe('ResourceBusyError');
                expect(err.message).toContain(d.path);
                expect(await w.call('state')).toBe('new');
                expect(existsSync(marker)).toBe(false);
                expect(await backend.observe(d)).toBe(held === 'exclusive' ? 'exclusive' : 'shared');
              }
              expect(await h.side.call('state')).toBe('running');
            });
          }
        }
      }
    });

    describe('all or nothing, with rollback', () => {
      it('a busy resource: ResourceBusyError naming it and who holds it, what was taken released again (rolledBack), nothing held, nothing spawned', async () => {
        const disks = [t.disk(0), t.disk(1), t.disk(2)];
        let widest: string[] = [];
        // Whichever disk is busy, the others are rolled back: the one that
        // comes last in the lockspace's lock order has all the others taken
        // (and released again) before it.
        for (const busy of disks) {
          const h = await t.holder('B', [busy.spec('exclusive')]);
          const m = t.a();
          for (const d of disks) m.registerResource(d.spec(d === busy ? 'shared' : 'exclusive'));
          const marker = t.marker('ran');
          const err = (await m.start('sh', ['-c', `touch ${marker}; exec sleep 1000`]).catch((e: unknown) => e)) as ResourceBusyError;
          expect(err).toBeInstanceOf(ResourceBusyError);
          expect(err.resource).toBe(busy.path);
          expect(err.message).toMatch(backend.holderNamed({ supervisor: h.side.pid, vm: h.vm }));
          const others = disks.filter((d) => d !== busy).map((d) => d.path);
          for (const p of err.rolledBack) expect(others).toContain(p);
          if (err.rolledBack.length > 0) expect(err.message).toContain('released again');
          if (err.rolledBack.length > widest.length) widest = err.rolledBack;
          expect(m.state).toBe('new');
          expect(m.resources.every((r) => !r.held)).toBe(true);
          expect(existsSync(marker)).toBe(false);
          for (const d of disks.filter((x) => x !== busy)) expect(await backend.observe(d)).toBe('free');
          await h.side.call('shutdown', { graceMs: 1000 });
          // Retried once the holder has gone: all of them.
          await m.start('sleep', ['1000']);
          for (const d of disks) expect(await backend.observe(d)).toBe(d === busy ? 'shared' : 'exclusive');
          await m.free();
          await backend.settle();
        }
        expect(widest).toHaveLength(2);
      });

      it('hotplug of a busy resource: ResourceBusyError, non-fatal: the child runs on, nothing is held', async () => {
        const h = await t.holder('B', [t.disk(1).spec('exclusive')]);
        const m = t.a();
        m.registerResource(t.disk(0).spec('exclusive'));
        await m.start('sleep', ['1000']);
        const err = (await m.acquireResource(t.disk(1).spec('shared')).catch((e: unknown) => e)) as ResourceBusyError;
        expect(err).toBeInstanceOf(ResourceBusyError);
        expect(err.message).toMatch(backend.holderNamed({ supervisor: h.side.pid, vm: h.vm }));
        expect(m.state).toBe('running');
        expect(alive(m.getChild().pid)).toBe(true);
        expect(m.resources.map((r) => r.path)).toEqual([t.disk(0).path]);
        expect(await backend.observe(t.disk(0))).toBe('exclusive');
      });
    });

    describe('idempotence', () => {
      it('registering a resource again in the same mode is a no-op; in another mode InvalidArgumentError', () => {
        const m = t.a();
        m.registerResource(t.disk(0).spec('exclusive'));
        m.registerResource(t.disk(0).spec('exclusive'));
        expect(() => m.registerResource(t.disk(0).spec('shared'))).toThrow(InvalidArgumentError);
        m.registerResource(t.lease.spec('shared'));
        m.registerResource(t.lease.spec('shared'));
        expect(m.resources.map((r) => [r.path, r.mode])).toEqual([
          [t.disk(0).path, 'exclusive'],
          [t.lease.path, 'shared'],
        ]);
      });

      it('acquireResource of a held resource is { wasHeld: true }; releaseResource of an unheld one { wasHeld: false }', async () => {
        const m = t.a();
        m.registerResource(t.disk(0).spec('exclusive'));
        await m.start('sleep', ['1000']);
        expect(await m.acquireResource(t.disk(0).spec('exclusive'))).toEqual({ wasHeld: true });
        expect(await m.acquireResource(t.disk(1).spec('shared'))).toEqual({ wasHeld: false });
        expect(await backend.observe(t.disk(1))).toBe('shared');
        expect(await m.acquireResource(t.disk(1).spec('shared'))).toEqual({ wasHeld: true });
        await expect(m.acquireResource(t.disk(1).spec('exclusive'))).rejects.toThrow(InvalidArgumentError);
        expect(await m.releaseResource(t.disk(1).ref())).toEqual({ wasHeld: true });
        expect(await backend.observe(t.disk(1))).toBe('free');
        expect(await m.releaseResource(t.disk(1).ref())).toEqual({ wasHeld: false });
        expect(await m.releaseResource(t.disk(2).ref())).toEqual({ wasHeld: false });
        expect(await m.releaseResource(t.lease.ref())).toEqual({ wasHeld: false });
        expect(m.state).toBe('running');
      });

      it('a release is complete when releaseResource() resolves: another host takes the resource at once', async () => {
        const m = t.a();
        m.registerResource(t.disk(0).spec('exclusive'));
        await m.start('sleep', ['1000']);
        expect(await m.acquireResource(t.disk(1).spec('exclusive'))).toEqual({ wasHeld: false });
        const b = await t.side('B');
        await b.call('register', t.disk(1).spec('exclusive'));
        expect((await b.fail('start', 'sleep', ['1000'])).name).toBe('ResourceBusyError');
        expect(await m.releaseResource(t.disk(1).ref())).toEqual({ wasHeld: true });
        await t.run(b);
        expect(await b.call('state')).toBe('running');
      });

      it('shutdown and free are idempotent: concurrent calls share one exit, later calls are no-ops, in every state', async () => {
        const idle = t.a();
        await idle.shutdown();
        expect(idle.state).toBe('new');
        const m = t.a();
        m.registerResource(t.disk(0).spec('exclusive'));
        await m.start('sleep', ['1000']);
        const exits: unknown[] = [];
        m.on('exit', (s) => exits.push(s));
        await Promise.all([m.shutdown({ graceMs: 1000 }), m.shutdown({ graceMs: 1000 })]);
        expect(exits).toHaveLength(1);
        expect(m.state).toBe('stopped');
        expect(await backend.observe(t.disk(0))).toBe('free');
        await m.shutdown();
        await Promise.all([m.free(), m.free()]);
        await m.free();
        await m.shutdown();
        expect(exits).toHaveLength(1);
        expect(m.state).toBe('freed');
        const unused = t.a();
        unused.registerResource(t.disk(1).spec('shared'));
        await unused.free();
        await unused.free();
        expect(unused.state).toBe('freed');
      });
    });

    describe('waiting', () => {
      it('a start that times out: LockTimeoutError, nothing held, state new', async () => {
        await t.holder('B', [t.disk(1).spec('exclusive')]);
        const m = t.a();
        m.registerResource(t.disk(0).spec('exclusive'));
        m.registerResource(t.disk(1).spec('exclusive'));
        const marker = t.marker('ran');
        const err = await m.start('sh', ['-c', `touch ${marker}; exec sleep 1000`], {}, { timeout: 300 }).catch((e: unknown) => e);
        expect(err).toBeInstanceOf(LockTimeoutError);
        expect(m.state).toBe('new');
        expect(existsSync(marker)).toBe(false);
        expect(await backend.observe(t.disk(0))).toBe('free');
      });

      it("a start aborted through its signal: AbortError with the signal's reason, nothing held, state new", async () => {
        await t.holder('B', [t.disk(1).spec('exclusive')]);
        const m = t.a();
        m.registerResource(t.disk(0).spec('exclusive'));
        m.registerResource(t.disk(1).spec('exclusive'));
        const ac = new AbortController();
        const starting = m.start('sleep', ['1000'], {}, { signal: ac.signal }).catch((e: unknown) => e);
        // The outcome is the same whether the abort lands before or during the wait.
        setTimeout(() => ac.abort(new Error('operator cancelled')), 50);
        const err = await starting;
        expect(err).toBeInstanceOf(AbortError);
        expect(err).toMatchObject({ cause: { message: 'operator cancelled' } });
        expect(m.state).toBe('new');
        expect(await backend.observe(t.disk(0))).toBe('free');
      });

      it('a waiting start gets the lease when the holder on the other host exits', async () => {
        const h = await t.holder('B', [t.disk(0).spec('exclusive')]);
        const m = t.a();
        m.registerResource(t.disk(0).spec('exclusive'));
        const started = m.start('sleep', ['1000'], {}, { timeout: 60_000 });
        expect(m.state).toBe('starting');
        await h.side.call('shutdown', { graceMs: 1000 });
        await started;
        expect(m.state).toBe('running');
        expect(await backend.observe(t.disk(0))).toBe('exclusive');
      });

      it('free() during a waiting start: AbortError (cause InvalidStateError), nothing held, nothing spawned, freed', async () => {
        await t.holder('B', [t.disk(1).spec('exclusive')]);
        const m = t.a();
        m.registerResource(t.disk(0).spec('exclusive'));
        m.registerResource(t.disk(1).spec('exclusive'));
        const marker = t.marker('ran');
        const starting = m.start('sh', ['-c', `touch ${marker}; exec sleep 1000`], {}, { timeout: 60_000 }).catch((e: unknown) => e);
        await m.free();
        const err = await starting;
        expect(err).toBeInstanceOf(AbortError);
        expect((err as AbortError).cause).toBeInstanceOf(InvalidStateError);
        expect(m.state).toBe('freed');
        expect(existsSync(marker)).toBe(false);
        expect(await backend.observe(t.disk(0))).toBe('free');
      });

      it('a hotplug that times out: LockTimeoutError, non-fatal, nothing held', async () => {
        await t.holder('B', [t.disk(1).spec('exclusive')]);
        const m = t.a();
        await m.start('sleep', ['1000']);
        await expect(m.acquireResource(t.disk(1).spec('exclusive'), { timeout: 300 })).rejects.toBeInstanceOf(LockTimeoutError);
        expect(m.state).toBe('running');
        expect(m.resources).toEqual([]);
      });
    });

    describe('the child', () => {
      it("its exit releases everything: 'exit' with its status, state stopped, and the other host takes every lease at once", async () => {
        const m = t.a();
        m.registerResource(t.disk(0).spec('exclusive'));
        m.registerResource(t.disk(1).spec('shared'));
        m.registerResource(t.lease.spec('exclusive'));
        const exit = new Promise((r) => m.once('exit', r));
        const go = t.marker('go');
        await m.start('sh', ['-c', `while [ ! -e ${go} ]; do sleep 0.05; done; exit 3`]);
        expect(await backend.observe(t.disk(0))).toBe('exclusive');
        spawnSync('touch', [go]);
        expect(await exit).toEqual({ code: 3, signal: null });
        expect(m.state).toBe('stopped');
        for (const r of [t.disk(0), t.disk(1), t.lease]) expect(await backend.observe(r)).toBe('free');
        const b = await t.side('B');
        for (const r of [t.disk(0), t.disk(1), t.lease]) await b.call('register', r.spec('exclusive'));
        await t.run(b);
      });

      it('a spawn that fails: SpawnError, every lease released, state new', async () => {
        const m = t.a();
        m.registerResource(t.disk(0).spec('exclusive'));
        const err = await m.start('/nonexistent/qemu', []).catch((e: unknown) => e);
        expect(err).toBeInstanceOf(SpawnError);
        expect(m.state).toBe('new');
        expect(await backend.observe(t.disk(0))).toBe('free');
      });
    });

    describe('hotplug', () => {
      it(`a hot-plugged lease ${caps.hotplugHeldByChild ? 'is the VM\'s own: it outlives a killed supervisor' : 'is held by the supervisor: it goes with a killed supervisor'} under lockLifetime 'child' (capability hotplugHeldByChild); the leases taken at start stay with the VM`, async () => {
        const h = await t.holder('B', [t.disk(0).spec('exclusive')], { lockLifetime: 'child' });
        expect(await h.side.call('acquire', t.disk(1).spec('exclusive'))).toEqual({ wasHeld: false });
        expect(await backend.observe(t.disk(1))).toBe('exclusive');
        await (h.side as RemoteSide).peer.kill('SIGKILL');
        expect(alive(h.vm)).toBe(true);
        expect(await backend.observe(t.disk(0))).toBe('exclusive');
        const x = t.a();
        x.registerResource(t.disk(1).spec('exclusive'));
        if (caps.hotplugHeldByChild) {
          expect(await backend.observe(t.disk(1))).toBe('exclusive');
          await expect(x.start('sleep', ['1000'])).rejects.toBeInstanceOf(ResourceBusyError);
        } else {
          await eventually(async () => (await backend.observe(t.disk(1))) === 'free', 'the hot-plugged lease to go with its supervisor');
          await x.start('sleep', ['1000']);
          expect(x.state).toBe('running');
        }
        const y = t.a();
        y.registerResource(t.disk(0).spec('shared'));
        await expect(y.start('sleep', ['1000'])).rejects.toBeInstanceOf(ResourceBusyError);
      });
    });

    describe('adopting a running VM: a supervisor restart (LockManager.adopt)', () => {
      /**
       * A supervisor process on host A runs a VM under lockLifetime 'child'
       * holding disk 0 exclusive, disk 1 shared and the named lease
       * exclusive, and is SIGKILLed. The VM runs on with its leases, which a
       * third party still finds held.
       */
      async function orphan(): Promise<{ vm: number; specs: ResourceSpec[] }> {
        const specs = [t.disk(0).spec('exclusive'), t.disk(1).spec('shared'), t.lease.spec('exclusive')];
        const h = await t.supervisorOnA(specs, { lockLifetime: 'child' });
        await h.side.peer.kill('SIGKILL');
        expect(alive(h.vm)).toBe(true);
        await thirdPartyRefused();
        return { vm: h.vm, specs };
      }

      /** A third party on host A is refused each of the VM's leases, in every mode that conflicts. */
      async function thirdPartyRefused(): Promise<void> {
        for (const [r, mode] of [
          [t.disk(0), 'exclusive'],
          [t.disk(0), 'shared'],
          [t.disk(1), 'exclusive'],
          [t.lease, 'readonly'],
        ] as const) {
          const x = t.a();
          x.registerResource(r.spec(mode));
          const err = await x.start('sleep', ['1000']).catch((e: unknown) => e);
          expect(err, `${r.path} ${mode}`).toBeInstanceOf(ResourceBusyError);
          await x.free();
        }
        expect(await backend.observe(t.disk(0))).toBe('exclusive');
        expect(await backend.observe(t.disk(1))).toBe('shared');
      }

      if (!caps.adopt) {
        it("refused with UnsupportedError naming the capability 'adopt'; the VM keeps its leases", async () => {
          const { vm, specs } = await orphan();
          const fds = fdCount();
          const err = await LockManager.adopt(vm, { lockspace: backend.lockspace('A'), resources: specs }).catch((e: unknown) => e);
          expect(err).toBeInstanceOf(UnsupportedError);
          expect((err as Error).message).toMatch(/lacks the capability 'adopt'/);
          expect(fdCount()).toBe(fds);
          expect(alive(vm)).toBe(true);
          await thirdPartyRefused();
        });
        return;
      }

      it("adopted from this process: running, the same leases held (verified), third parties still refused; shutdown stops the VM: 'exit' with status unknown, everything free", async () => {
        // Counted before the orphan exists: the rig's watch of the VM ends with it, as ours does.
        const watched = supervisionInfo().watched;
        const { vm, specs } = await orphan();
        const s = (await t.adopter('this', vm, specs)) as LocalSide;
        const m = s.mgr;
        expect(m.state).toBe('running');
        expect(m.getChild()).toEqual({ pid: vm });
        expect(m.resources.map((r) => [r.mode, r.held])).toEqual(specs.map((r) => [r.mode, true]));
        expect(m.resources.map((r) => r.path)).toEqual(expect.arrayContaining([t.disk(0).path, t.disk(1).path]));
        expect(await m.verify()).toEqual({ lost: [] });
        await thirdPartyRefused();
        const exit = new Promise((r) => m.once('exit', r));
        await m.shutdown({ graceMs: 1000 });
        // Not our child: its status went to its parent; the pidfd tells only that it exited.
        expect(await exit).toEqual({ code: null, signal: null });
        expect(m.state).toBe('stopped');
        expect(alive(vm)).toBe(false);
        for (const r of [t.disk(0), t.disk(1), t.lease]) expect(await backend.observe(r)).toBe('free');
        const files = new Set(m.resources.flatMap((r) => [r.path, ...r.lockFiles]));
        expect(ourFdsOn(files).length).toBeGreaterThan(0);
        await m.free();
        // Every descriptor taken from the VM closed again, and the pidfd watch gone.
        // (A whole-process fd count is not stable here: earlier tests' peers close their channels lazily.)
        expect(ourFdsOn(files)).toEqual([]);
        await waitUntil(() => supervisionInfo().watched === watched, 10_000, "the rig's watch of the VM to see its exit too");
        expect(supervisionInfo().watched).toBe(watched);
        const x = t.a();
        for (const r of [t.disk(0), t.disk(1), t.lease]) x.registerResource(r.spec('exclusive'));
        await x.start('sleep', ['1000']);
        expect(x.state).toBe('running');
      });

      it('adopted from a new supervisor process: it shuts the VM down and reports its exit', async () => {
        const { vm, specs } = await orphan();
        const s = await t.adopter('new process', vm, specs);
        expect(await s.call('state')).toBe('running');
        expect(await s.call('child')).toBe(vm);
        expect(await s.call('verify')).toEqual({ lost: [] });
        await thirdPartyRefused();
        await s.call('shutdown', { graceMs: 1000 });
        expect(await s.call('state')).toBe('stopped');
        expect(await s.call('events')).toContainEqual(['exit', { code: null, signal: null }]);
        for (const r of [t.disk(0), t.disk(1), t.lease]) expect(await backend.observe(r)).toBe('free');
      });

      it("the VM exits on its own: 'exit' (status unknown), state stopped, its leases free", async () => {
        const { vm, specs } = await orphan();
        const m = ((await t.adopter('this', vm, specs)) as LocalSide).mgr;
        const exit = new Promise((r) => m.once('exit', r));
        const watch = attachProcess(vm);
        watch.signal('SIGKILL');
        await watch.exited;
        expect(await exit).toEqual({ code: null, signal: null });
        expect(m.state).toBe('stopped');
        for (const r of [t.disk(0), t.disk(1), t.lease]) expect(await backend.observe(r)).toBe('free');
      });

      it('hotplug: acquireResource takes a new lease, releaseResource lets go of a new one and of an adopted one alike; the VM runs on', async () => {
        const { vm, specs } = await orphan();
        const m = ((await t.adopter('this', vm, specs)) as LocalSide).mgr;
        expect(await m.acquireResource(t.disk(2).spec('exclusive'))).toEqual({ wasHeld: false });
        expect(await backend.observe(t.disk(2))).toBe('exclusive');
        const x = t.a();
        x.registerResource(t.disk(2).spec('shared'));
        await expect(x.start('sleep', ['1000'])).rejects.toBeInstanceOf(ResourceBusyError);
        // Held already in that mode: a no-op, as for a lease taken at start.
        expect(await m.acquireResource(t.disk(0).spec('exclusive'))).toEqual({ wasHeld: true });
        expect(await m.releaseResource({ type: 'disk', path: t.disk(2).path })).toEqual({ wasHeld: true });
        expect(await backend.observe(t.disk(2))).toBe('free');
        // An adopted lease is the VM's and ours alike: releasing it lets go of the VM's too.
        expect(await m.releaseResource({ type: 'disk', path: t.disk(1).path })).toEqual({ wasHeld: true });
        await eventually(async () => (await backend.observe(t.disk(1))) === 'free', 'the released adopted lease to be free');
        const y = t.a();
        y.registerResource(t.disk(1).spec('exclusive'));
        await y.start('sleep', ['1000']);
        expect(m.state).toBe('running');
        expect(alive(vm)).toBe(true);
        expect(await backend.observe(t.disk(0))).toBe('exclusive');
        expect(await m.verify()).toEqual({ lost: [] });
      });

      it('migrate out to a target: cancelled and taken back, then completed; a third party is refused at every step', async () => {
        const { vm, specs } = await orphan();
        const src = ((await t.adopter('this', vm, [specs[0]!])) as LocalSide).mgr;
        let token = await src.prepareMigrate(TARGET);
        let tgt = await t.side('B', {}, token, [t.disk(0).spec('exclusive')]);
        await t.run(tgt);
        expect(await tgt.call('state')).toBe('incoming');
        if (caps.handoverGuard) expect(backend.observeGuard(t.disk(0))).toBe('exclusive');
        await src.completeMigrateOut(TARGET);
        expect(src.state).toBe('migrated');
        // Without a handover guard a third party may take the lease in this window (another row covers that).
        if (caps.handoverGuard) {
          const third = t.a();
          third.registerResource(t.disk(0).spec('exclusive'));
          const during = (await third.start('sleep', ['1000']).catch((e: unknown) => e)) as ResourceBusyError;
          expect(during).toBeInstanceOf(ResourceBusyError);
          expect(during.migrationInProgress).toBe(true);
        }
        // The migration failed: the source takes its lease back, on the VM's own description.
        await src.completeMigrateOut(TARGET, { cancel: true });
        expect(src.state).toBe('running');
        expect(await src.verify()).toEqual({ lost: [] });
        await tgt.call('completeMigrateIn', SOURCE, { cancel: true, graceMs: 1000 });
        expect(await backend.observe(t.disk(0))).toBe('exclusive');
        const third2 = t.a();
        third2.registerResource(t.disk(0).spec('shared'));
        await expect(third2.start('sleep', ['1000'])).rejects.toBeInstanceOf(ResourceBusyError);
        // Again, to the end.
        token = await src.prepareMigrate(TARGET);
        tgt = await t.side('B', {}, token, [t.disk(0).spec('exclusive')]);
        await t.run(tgt);
        const incoming = tgt.call('completeMigrateIn', SOURCE, { timeout: 60_000 });
        await src.completeMigrateOut(TARGET);
        await incoming;
        expect(await tgt.call('state')).toBe('running');
        await src.shutdown({ graceMs: 1000 });
        expect(src.state).toBe('stopped');
        expect(alive(vm)).toBe(false);
        expect(await backend.observe(t.disk(0))).toBe('exclusive');
        const third3 = t.a();
        third3.registerResource(t.disk(0).spec('shared'));
        await expect(third3.start('sleep', ['1000'])).rejects.toBeInstanceOf(ResourceBusyError);
      });

      it('a VM whose supervisor still runs: ResourceBusyError naming that supervisor; nothing taken, no fd left, both run on', async () => {
        const specs = [t.disk(0).spec('exclusive'), t.lease.spec('exclusive')];
        const h = await t.supervisorOnA(specs, { lockLifetime: 'child' });
        const fds = fdCount();
        const err = (await LockManager.adopt(h.vm, { lockspace: backend.lockspace('A'), resources: specs }).catch((e: unknown) => e)) as ResourceBusyError;
        expect(err).toBeInstanceOf(ResourceBusyError);
        expect(err.message).toContain(`still has a supervisor: its parent ${h.side.pid}`);
        expect(err.candidates.map((c) => c.pid)).toEqual([h.side.pid]);
        expect(fdCount()).toBe(fds);
        expect(await h.side.call('state')).toBe('running');
        expect(await h.side.call('verify')).toEqual({ lost: [] });
        expect(await backend.observe(t.disk(0))).toBe('exclusive');
        // Once it is gone, the same call adopts.
        await h.side.peer.kill('SIGKILL');
        const m = ((await t.adopter('this', h.vm, specs)) as LocalSide).mgr;
        expect(m.state).toBe('running');
      });

      it('bad input: a resource the process does not hold, or not in that mode, or a process holding nothing: a typed error; nothing held, no fd or watch left, the VM keeps its leases', async () => {
        const { vm, specs } = await orphan();
        const idle = spawnSync('true').pid!; // exited: no such process any more
        const { spawn } = await import('node:child_process');
        const other = spawn('sleep', ['1000'], { stdio: 'ignore' });
        await new Promise((r) => other.once('spawn', r));
        try {
          const fds = fdCount();
          const watched = supervisionInfo().watched;
          const adopt = (pid: number, resources: ResourceSpec[], extra: Record<string, unknown> = {}): Promise<unknown> =>
            LockManager.adopt(pid, { lockspace: backend.lockspace('A'), resources, ...extra }).catch((e: unknown) => e);
          const cases: Array<[string, Promise<unknown>, new (...a: never[]) => Error, RegExp]> = [
            ['a disk it does not hold', adopt(vm, [t.disk(2).spec('exclusive')]), InvalidArgumentError, /does not hold an exclusive lease/],
            ['all or nothing: a held one, then one it does not hold', adopt(vm, [specs[0]!, t.disk(2).spec('shared')]), InvalidArgumentError, /does not hold a shared lease/],
            ['a shared disk named exclusive', adopt(vm, [t.disk(1).spec('exclusive')]), InvalidArgumentError, /holds it shared, not exclusive/],
            ['an exclusive disk named shared', adopt(vm, [t.disk(0).spec('shared')]), InvalidArgumentError, /holds it exclusively, not shared/],
            ['a process holding nothing', adopt(other.pid!, specs), InvalidArgumentError, /does not hold/],
            ['a process that is gone', adopt(idle, specs), InvalidArgumentError, /cannot attach|no such process/i],
            ['no resources', adopt(vm, []), InvalidArgumentError, /resources must list/],
            ['lockLifetime supervisor', adopt(vm, specs, { lockLifetime: 'supervisor' }), InvalidArgumentError, /lockLifetime must be 'child'/],
            ['QEMU-compatible locks', adopt(vm, [{ ...t.disk(0).spec('exclusive'), qemuCompatible: true } as ResourceSpec]), UnsupportedError, /QEMU-compatible/],
            ['an unknown option', adopt(vm, specs, { colour: 1 }), InvalidArgumentError, /colour/],
          ];
          for (const [what, result, Class, message] of cases) {
            const err = await result;
            expect(err, what).toBeInstanceOf(Class);
            expect((err as Error).message, what).toMatch(message);
          }
          // A given-up watch's pidfd is closed by the event loop's close phase, not at once.
          await waitUntil(() => fdCount() <= fds, 10_000, 'the pidfds of the given-up adoptions to be closed');
          expect(fdCount()).toBe(fds);
          expect(supervisionInfo().watched).toBe(watched);
          expect(alive(vm)).toBe(true);
          await thirdPartyRefused();
          expect(await backend.observe(t.disk(2))).toBe('free');
          // Undisturbed: the right list adopts it.
          const m = ((await t.adopter('this', vm, specs)) as LocalSide).mgr;
          expect(await m.verify()).toEqual({ lost: [] });
        } finally {
          other.kill('SIGKILL');
        }
      });
    });

    describe('lock loss and onLockFailure', () => {
      it('verify() reports nothing lost while every lease is held', async () => {
        const m = t.a();
        m.registerResource(t.disk(0).spec('exclusive'));
        m.registerResource(t.disk(1).spec('shared'));
        m.registerResource(t.lease.spec('exclusive'));
        await m.start('sleep', ['1000']);
        expect(await m.verify()).toEqual({ lost: [] });
      });

      if (!caps.losable) {
        it('not losable (capability losable false): nothing outside the protocol takes a lease away; verify() finds nothing lost', async () => {
          expect(backend.lose).toBeNull();
          const m = t.a({ verifyInterval: 20 });
          const failures: unknown[] = [];
          m.on('lock-failure', (f) => failures.push(f));
          m.registerResource(t.disk(0).spec('exclusive'));
          await m.start('sleep', ['1000']);
          expect(await m.verify()).toEqual({ lost: [] });
          expect(failures).toEqual([]);
          expect(m.state).toBe('running');
        });
        return;
      }

      for (const action of ['poweroff', 'pause', 'ignore'] as const) {
        it(`a lease lost behind the holder's back, onLockFailure '${action}': verify() reports it, 'lock-failure' is emitted, ${action === 'poweroff' ? 'the child is killed' : action === 'pause' ? 'the child is stopped (SIGSTOP)' : 'the child runs on'}`, async () => {
          const m = t.a({ onLockFailure: action });
          const failures: unknown[] = [];
          m.on('lock-failure', (f) => failures.push(f));
          m.registerResource(t.disk(0).spec('exclusive'));
          m.registerResource(t.disk(1).spec('exclusive'));
          const exited = new Promise((r) => m.once('exit', r));
          await m.start('sleep', ['1000']);
          const vm = m.getChild().pid;
          await backend.lose!(m, t.disk(0));
          expect(await m.verify()).toEqual({ lost: [t.disk(0).path] });
          expect(failures).toEqual([{ resource: t.disk(0).path, reason: expect.stringMatching(/no longer held/), action }]);
          if (action === 'poweroff') {
            expect(await exited).toEqual({ code: null, signal: 'SIGKILL' });
            expect(m.state).toBe('stopped');
            expect(await backend.observe(t.disk(1))).toBe('free');
          } else if (action === 'pause') {
            await waitUntil(() => procState(vm) === 'T', 10_000, 'the child to be stopped');
            expect(m.state).toBe('running');
          } else {
            expect(alive(vm)).toBe(true);
            expect(m.state).toBe('running');
            expect(await m.verify()).toEqual({ lost: [t.disk(0).path] });
          }
        });
      }

      it('verifyInterval finds a lost lease without being asked, and powers the child off', async () => {
        const m = t.a({ verifyInterval: 50 });
        m.registerResource(t.disk(0).spec('exclusive'));
        const failed = new Promise((r) => m.once('lock-failure', r));
        const exited = new Promise((r) => m.once('exit', r));
        await m.start('sleep', ['1000']);
        await backend.lose!(m, t.disk(0));
        expect(await failed).toMatchObject({ resource: t.disk(0).path, action: 'poweroff' });
        expect(await exited).toEqual({ code: null, signal: 'SIGKILL' });
      });
    });

    describe('named leases', () => {
      it('a lease { type: lease } excludes across hosts: exclusive against exclusive or shared is busy; free once the holder stops', async () => {
        const h = await t.holder('B', [t.lease.spec('exclusive')]);
        expect(await backend.observe(t.lease)).toBe('exclusive');
        for (const mode of MODES) {
          const m = t.a();
          m.registerResource(t.lease.spec(mode));
          const err = (await m.start('sleep', ['1000']).catch((e: unknown) => e)) as ResourceBusyError;
          expect(err).toBeInstanceOf(ResourceBusyError);
          expect(err.resource).toBe(t.lease.path);
          expect(m.state).toBe('new');
        }
        await h.side.call('shutdown', { graceMs: 1000 });
        const m = t.a();
        m.registerResource(t.lease.spec('exclusive'));
        await m.start('sleep', ['1000']);
        expect(await backend.observe(t.lease)).toBe('exclusive');
      });

      it(`shared leases coexist across hosts; a readonly one ${caps.readersExcludeWriters ? 'is refused beside them (capability readersExcludeWriters)' : 'coexists with them too'}`, async () => {
        await t.holder('B', [t.lease.spec('shared')]);
        const m = t.a();
        m.registerResource(t.lease.spec('shared'));
        await m.start('sleep', ['1000']);
        expect(await backend.observe(t.lease)).toBe('shared');
        const r = t.a();
        r.registerResource(t.lease.spec('readonly'));
        if (caps.readersExcludeWriters) {
          await expect(r.start('sleep', ['1000'])).rejects.toMatchObject({ name: 'ResourceBusyError' });
          expect(r.state).toBe('new');
        } else {
          await r.start('sleep', ['1000']);
          expect(r.state).toBe('running');
        }
      });
    });

    describe('qemuCompatible', () => {
      it('while held exclusive and QEMU-compatible, qemu-io cannot write the image and can still read it; after release it writes', async (ctx) => {
        const probe = spawnSync('qemu-io', ['--version']);
        if (probe.error !== undefined) {
          console.log(`qemuCompatible row skipped: qemu-io is not installed (${probe.error.message}); Debian: apt-get install qemu-utils`);
          ctx.skip();
        }
        const image = t.disk(0).path;
        const qemu = (...args: string[]) => {
          const r = spawnSync('qemu-io', ['-f', 'raw', ...args, image], { encoding: 'utf8' });
          return { code: r.status, out: `${r.stdout}${r.stderr}` };
        };
        const m = t.a();
        m.registerResource(t.disk(0).spec('exclusive', { qemuCompatible: true }));
        await m.start('sleep', ['1000']);
        const write = qemu('-c', 'write 0 512');
        expect(write.code).not.toBe(0);
        expect(write.out).toContain('Failed to get "write" lock');
        expect(qemu('-r', '-c', 'read 0 512').code).toBe(0);
        await m.shutdown({ graceMs: 1000 });
        expect(qemu('-c', 'write 0 512').code).toBe(0);
      });
    });

    describe('migration from host A to host B', () => {
      /** A source on host A holding disk 0 exclusively, and its target on host B, started: 'incoming'. */
      async function handover(): Promise<{ src: LockManager; tgt: Side; tgtVm: number }> {
        const src = t.a();
        src.registerResource(t.disk(0).spec('exclusive'));
        await src.start('sleep', ['1000']);
        const token = await src.prepareMigrate(TARGET);
        const tgt = await t.side('B', {}, token, [t.disk(0).spec('exclusive')]);
        const tgtVm = await t.run(tgt);
        expect(await tgt.call('state')).toBe('incoming');
        if (caps.handoverGuard) expect(backend.observeGuard(t.disk(0))).toBe('exclusive');
        return { src, tgt, tgtVm };
      }

      it('success: the target waits for the source to let go, then holds the lease; the source can no longer take it back', async () => {
        const { src, tgt } = await handover();
        expect(src.state).toBe('migrating');
        const incoming = tgt.call('completeMigrateIn', SOURCE, { timeout: 60_000 });
        await src.completeMigrateOut(TARGET);
        expect(src.state).toBe('migrated');
        await incoming;
        expect(await tgt.call('state')).toBe('running');
        expect(await backend.observe(t.disk(0))).toBe('exclusive');
        expect(backend.observeGuard(t.disk(0))).toBe('free');
        expect(await tgt.call('verify')).toEqual({ lost: [] });
        const back = await src.completeMigrateOut(TARGET, { cancel: true }).catch((e: unknown) => e);
        expect(back).toBeInstanceOf(ResourceBusyError);
        expect(src.state).toBe('migrated');
        const third = t.a();
        third.registerResource(t.disk(0).spec('exclusive'));
        const err = (await third.start('sleep', ['1000']).catch((e: unknown) => e)) as ResourceBusyError;
        expect(err).toBeInstanceOf(ResourceBusyError);
        expect(err.migrationInProgress).toBe(false);
        await src.shutdown({ graceMs: 1000 });
        expect(await backend.observe(t.disk(0))).toBe('exclusive');
        expect(await tgt.call('state')).toBe('running');
      });

      it('the source cancels while migrating: it never let go and runs on; the target can only time out, then cancel', async () => {
        const { src, tgt, tgtVm } = await handover();
        await src.completeMigrateOut(TARGET, { cancel: true });
        expect(src.state).toBe('running');
        expect(await src.verify()).toEqual({ lost: [] });
        const err = await tgt.fail('completeMigrateIn', SOURCE, { timeout: 300 });
        expect(err.name).toBe('LockTimeoutError');
        expect(err.message).toContain(SOURCE);
        expect(await tgt.call('state')).toBe('incoming');
        await tgt.call('completeMigrateIn', SOURCE, { cancel: true, graceMs: 1000 });
        expect(await tgt.call('state')).toBe('stopped');
        expect(alive(tgtVm)).toBe(false);
        expect(backend.observeGuard(t.disk(0))).toBe('free');
        expect(await backend.observe(t.disk(0))).toBe('exclusive');
        // Running again: it can migrate anew.
        await src.prepareMigrate(TARGET);
        expect(src.state).toBe('migrating');
      });

      it('the source cancels after it let go: it takes the lease back; the target cannot complete and cancels', async () => {
        const { src, tgt } = await handover();
        await src.completeMigrateOut(TARGET);
        expect(src.state).toBe('migrated');
        await src.completeMigrateOut(TARGET, { cancel: true });
        expect(src.state).toBe('running');
        expect(await src.verify()).toEqual({ lost: [] });
        expect(await backend.observe(t.disk(0))).toBe('exclusive');
        const err = await tgt.fail('completeMigrateIn', SOURCE, { timeout: 300 });
        if (caps.migrationState) {
          // The take-back is a new acquire: the lease's version moved on, and the target knows it never will get it.
          expect(err.name).toBe('ResourceBusyError');
          expect(err.message).toMatch(/changed hands/);
        } else {
          expect(err.name).toBe('LockTimeoutError');
        }
        expect(await tgt.call('state')).toBe('incoming');
        await tgt.call('completeMigrateIn', SOURCE, { cancel: true, graceMs: 1000 });
        expect(await tgt.call('state')).toBe('stopped');
        expect(await backend.observe(t.disk(0))).toBe('exclusive');
      });

      it('the target cancels while incoming, before the source prepared anything more: its VM stops, the source runs on', async () => {
        const { src, tgt, tgtVm } = await handover();
        await tgt.call('completeMigrateIn', SOURCE, { cancel: true, graceMs: 1000 });
        expect(await tgt.call('state')).toBe('stopped');
        expect(alive(tgtVm)).toBe(false);
        // Idempotent.
        await tgt.call('completeMigrateIn', SOURCE, { cancel: true });
        expect(backend.observeGuard(t.disk(0))).toBe('free');
        await src.completeMigrateOut(TARGET, { cancel: true });
        expect(src.state).toBe('running');
        expect(await src.verify()).toEqual({ lost: [] });
      });

      it('the target cancels while it waits in completeMigrateIn: the wait ends with InvalidStateError, the source keeps its lease', async () => {
        const { src, tgt } = await handover();
        const waiting = tgt.fail('completeMigrateIn', SOURCE, { timeout: 60_000 });
        await tgt.call('completeMigrateIn', SOURCE, { cancel: true, graceMs: 1000 });
        const err = await waiting;
        expect(err.name).toBe('InvalidStateError');
        expect(await tgt.call('state')).toBe('stopped');
        expect(src.state).toBe('migrating');
        await src.completeMigrateOut(TARGET, { cancel: true });
        expect(await src.verify()).toEqual({ lost: [] });
      });

      it('the target cancels after the source let go: the source takes the lease back', async () => {
        const { src, tgt } = await handover();
        await src.completeMigrateOut(TARGET);
        await tgt.call('completeMigrateIn', SOURCE, { cancel: true, graceMs: 1000 });
        expect(await tgt.call('state')).toBe('stopped');
        expect(await backend.observe(t.disk(0))).toBe('free');
        await src.completeMigrateOut(TARGET, { cancel: true });
        expect(src.state).toBe('running');
        expect(await backend.observe(t.disk(0))).toBe('exclusive');
        expect(await src.verify()).toEqual({ lost: [] });
      });

      it('the source VM exits mid-migration: its leases go with it, the source ends stopped, the target acquires', async () => {
        const { src, tgt } = await handover();
        const exited = new Promise((r) => src.once('exit', r));
        src.signal('SIGKILL');
        await exited;
        expect(src.state).toBe('stopped');
        await tgt.call('completeMigrateIn', SOURCE, { timeout: 60_000 });
        expect(await tgt.call('state')).toBe('running');
        expect(await backend.observe(t.disk(0))).toBe('exclusive');
      });

      it(`a third party during the handover: ${caps.handoverGuard ? 'refused by the handover guard, migration in progress; the target completes' : 'no guard (capability handoverGuard): it may take the lease in the window, and then the target fails ("changed hands") and never runs with it'}`, async () => {
        const { src, tgt } = await handover();
        const third = () => {
          const m = t.a();
          m.registerResource(t.disk(0).spec('exclusive'));
          return m;
        };
        // While the source holds the lease: busy, saying whether a migration is in progress where the lockspace can tell.
        const during = (await third().start('sleep', ['1000']).catch((e: unknown) => e)) as ResourceBusyError;
        expect(during).toBeInstanceOf(ResourceBusyError);
        expect(during.migrationInProgress).toBe(caps.handoverGuard);
        await src.completeMigrateOut(TARGET);
        // The window: the source has let go, the target has not taken it yet.
        const x = third();
        if (caps.handoverGuard) {
          const err = (await x.start('sleep', ['1000']).catch((e: unknown) => e)) as ResourceBusyError;
          expect(err).toBeInstanceOf(ResourceBusyError);
          expect(err.migrationInProgress).toBe(true);
          expect(x.state).toBe('new');
          expect(await backend.observe(t.disk(0))).toBe('free');
          await tgt.call('completeMigrateIn', SOURCE, { timeout: 60_000 });
          expect(await tgt.call('state')).toBe('running');
          expect(await backend.observe(t.disk(0))).toBe('exclusive');
          return;
        }
        await x.start('sleep', ['1000']);
        expect(x.state).toBe('running');
        // Never two holders: while the third party runs, and after it stopped,
        // the target finds that the lease changed hands (the source's lease
        // version, capability migrationState) and never takes it.
        expect(caps.migrationState).toBe(true);
        for (const when of ['while the third party runs', 'after it stopped']) {
          if (when === 'after it stopped') await x.shutdown({ graceMs: 1000 });
          const err = await tgt.fail('completeMigrateIn', SOURCE, { timeout: 60_000 });
          expect(err.name, when).toBe('ResourceBusyError');
          expect(err.message, when).toMatch(/changed hands/);
          expect(await tgt.call('state')).toBe('incoming');
        }
        expect(await backend.observe(t.disk(0))).toBe('free');
        await tgt.call('completeMigrateIn', SOURCE, { cancel: true, graceMs: 1000 });
        expect(await tgt.call('state')).toBe('stopped');
      });

      it("the token is checked against the target's own resources and lockspace: InvalidArgumentError, nothing opened", async () => {
        const src = t.a();
        src.registerResource(t.disk(0).spec('exclusive'));
        src.registerResource(t.lease.spec('shared'));
        await src.start('sleep', ['1000']);
        const token = await src.prepareMigrate(TARGET);
        const mine = [t.disk(0).spec('exclusive'), t.lease.spec('shared')];
        const lockspace = backend.lockspace('B');
        const fds = fdCount();
        const bad: Array<[ResourceSpec[], RegExp]> = [
          [[t.disk(1).spec('exclusive'), t.lease.spec('shared')], /does not match/],
          [[t.disk(0).spec('shared'), t.lease.spec('shared')], /does not match/],
          [[t.disk(0).spec('exclusive')], /does not match/],
          [[...mine, t.disk(2).spec('readonly')], /does not match/],
        ];
        for (const [resources, why] of bad) {
          expect(() => LockManager.fromInquire(token, { lockspace, resources }), JSON.stringify(resources)).toThrow(InvalidArgumentError);
          expect(() => LockManager.fromInquire(token, { lockspace, resources })).toThrow(why);
        }
        expect(() => LockManager.fromInquire(token, { lockspace: backend.otherLockspace(), resources: mine })).toThrow(/comes from a lockspace/);
        expect(() => LockManager.fromInquire(`${token.slice(0, -3)}xyz`, { lockspace, resources: mine })).toThrow(InvalidArgumentError);
        expect(fdCount()).toBe(fds);
        // The matching configuration makes a target that holds nothing yet.
        const tgt = await t.side('B', {}, token, mine);
        expect(await tgt.call('state')).toBe('new');
        expect(await backend.observe(t.disk(0))).toBe('exclusive');
      });
    });

    describe('bad input: the same typed error on every lockspace, nothing held, nothing spawned', () => {
      it('registerResource: ResourceAccessError for a missing file, InvalidArgumentError for a bad path, type, mode or lease name', () => {
        const m = t.a();
        const fds = fdCount();
        const cases: Array<[unknown, new (...a: never[]) => Error]> = [
          [{ type: 'disk', path: join(backend.scratch, 'missing.img'), mode: 'exclusive' }, ResourceAccessError],
          [{ type: 'disk', path: 'relative.img', mode: 'exclusive' }, InvalidArgumentError],
          [{ type: 'disk', path: t.disk(0).path, mode: 'write' }, InvalidArgumentError],
          [{ type: 'volume', path: t.disk(0).path, mode: 'exclusive' }, InvalidArgumentError],
          [{ type: 'disk', path: t.disk(0).path, mode: 'exclusive', colour: 'red' }, InvalidArgumentError],
          [{ ...t.lease.spec('exclusive'), key: 'a/b' }, InvalidArgumentError],
          [{ ...t.lease.spec('exclusive'), key: '..' }, InvalidArgumentError],
          [{ ...t.lease.spec('exclusive'), path: 'relative' }, InvalidArgumentError],
          ['disk', InvalidArgumentError],
        ];
        for (const [spec, cls] of cases) expect(() => m.registerResource(spec as ResourceSpec), JSON.stringify(spec)).toThrow(cls);
        expect(m.resources).toEqual([]);
        expect(fdCount()).toBe(fds);
      });

      it('new LockManager: InvalidArgumentError for lockspace options wrong for this kind, and for bad manager options', () => {
        for (const lockspace of backend.badLockspaces()) expect(() => new LockManager({ lockspace } as LockManagerOptions), JSON.stringify(lockspace)).toThrow(InvalidArgumentError);
        const lockspace = backend.lockspace('A');
        const bad: unknown[] = [{ onLockFailure: 'panic' }, { lockLifetime: 'forever' }, { verifyInterval: 0 }, { flags: { migrate: 'yes' } }, { params: { uuid: 'nope' } }, { colour: 1 }];
        for (const o of bad) expect(() => new LockManager({ lockspace, ...(o as object) }), JSON.stringify(o)).toThrow(InvalidArgumentError);
      });

      it('start: InvalidArgumentError for bad arguments, checked before any lease is taken; state new; nothing held', async () => {
        const m = t.a();
        m.registerResource(t.disk(0).spec('exclusive'));
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
          expect(await backend.observe(t.disk(0))).toBe('free');
        }
        await m.start('sleep', ['1000']);
        expect(m.state).toBe('running');
      });

      it('start: bad arguments with a disk held elsewhere are InvalidArgumentError, never busy (checked before any lease is taken, whichever the lockspace takes first)', async () => {
        const d = t.disk(0);
        const h = await t.holder('B', [d.spec('exclusive')]);
        const m = t.a();
        m.registerResource(d.spec('exclusive'));
        const bad: Array<() => Promise<void>> = [() => m.start('sleep', ['a\0b']), () => m.start('sleep', ['1'], { env: { A: '\0' } }), () => m.start('sleep', ['1'], { stdio: 'sideways' as never })];
        for (const call of bad) {
          await expect(call()).rejects.toBeInstanceOf(InvalidArgumentError);
          expect(m.state).toBe('new');
        }
        expect(await backend.observe(d)).toBe('exclusive');
        expect(await h.side.call('state')).toBe('running');
      });

      it('calls in the wrong state: InvalidStateError, nothing changes', async () => {
        const m = t.a();
        m.registerResource(t.disk(0).spec('exclusive'));
        expect(() => m.getChild()).toThrow(InvalidStateError);
        await expect(m.acquireResource(t.disk(1).spec('shared'))).rejects.toBeInstanceOf(InvalidStateError);
        await expect(m.releaseResource(t.disk(0).ref())).rejects.toBeInstanceOf(InvalidStateError);
        await expect(m.verify()).rejects.toBeInstanceOf(InvalidStateError);
        await expect(m.prepareMigrate(TARGET)).rejects.toBeInstanceOf(InvalidStateError);
        await expect(m.completeMigrateIn(SOURCE)).rejects.toBeInstanceOf(InvalidStateError);
        await expect(m.completeMigrateOut(TARGET)).rejects.toBeInstanceOf(InvalidStateError);
        expect(m.state).toBe('new');
        await m.start('sleep', ['1000']);
        await expect(m.start('sleep', ['1000'])).rejects.toBeInstanceOf(InvalidStateError);
        expect(() => m.registerResource(t.disk(1).spec('shared'))).toThrow(InvalidStateError);
        expect(() => m.setParameter('name', 'vm')).toThrow(InvalidStateError);
        expect(m.state).toBe('running');
        expect(await backend.observe(t.disk(0))).toBe('exclusive');
        await m.free();
        await expect(m.start('sleep', ['1000'])).rejects.toBeInstanceOf(InvalidStateError);
      });

      it('hotplug and migration calls with bad arguments: non-fatal typed errors, the manager runs on', async () => {
        const m = t.a();
        m.registerResource(t.disk(0).spec('exclusive'));
        await m.start('sleep', ['1000']);
        await expect(m.acquireResource({ type: 'disk', path: join(backend.scratch, 'missing.img'), mode: 'shared' })).rejects.toBeInstanceOf(ResourceAccessError);
        await expect(m.acquireResource({ type: 'disk', path: 'relative.img', mode: 'shared' })).rejects.toBeInstanceOf(InvalidArgumentError);
        await expect(m.acquireResource(t.disk(1).spec('shared'), { timeout: -5 })).rejects.toBeInstanceOf(InvalidArgumentError);
        await expect(m.acquireResource({ ...t.lease.spec('shared'), key: '' } as ResourceSpec)).rejects.toBeInstanceOf(InvalidArgumentError);
        await expect(m.prepareMigrate('')).rejects.toBeInstanceOf(InvalidArgumentError);
        await m.prepareMigrate(TARGET);
        await expect(m.completeMigrateOut('qemu://elsewhere/system')).rejects.toBeInstanceOf(InvalidArgumentError);
        await expect(m.completeMigrateOut(TARGET, { cancel: 'yes' } as never)).rejects.toBeInstanceOf(InvalidArgumentError);
        expect(m.state).toBe('migrating');
        expect(alive(m.getChild().pid)).toBe(true);
        expect(m.resources.map((r) => r.path)).toEqual([t.disk(0).path]);
        expect(await m.verify()).toEqual({ lost: [] });
      });
    });
  });
}

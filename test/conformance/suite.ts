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
import { existsSync, readFileSync } from 'node:fs';
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
  type LockManagerOptions,
  type ResourceMode,
  type ResourceSpec,
} from '../../lib/index.js';
import { fdCount, waitUntil } from '../helpers.js';
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
    return join(this.b.scratch, `${name}-${Math.random().toString(36).slice(2, 8)}`);
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
            const both = held !== 'exclusive' && wanted !== 'exclusive';
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

      it('shared leases coexist across hosts', async () => {
        await t.holder('B', [t.lease.spec('shared')]);
        const m = t.a();
        m.registerResource(t.lease.spec('readonly'));
        await m.start('sleep', ['1000']);
        expect(await backend.observe(t.lease)).toBe('shared');
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

      it('start: InvalidArgumentError for bad arguments, before or after the leases were taken; state new; nothing held', async () => {
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

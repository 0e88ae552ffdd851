// LockManager: libvirt's lock-manager contract (RFC of 2010 and its review),
// with every failure specified. One manager supervises one VM process and holds
// its disk leases from start to shutdown. docs/contract.md is this file in
// prose; states.ts is its state table, validation.ts its argument checks,
// resources.ts what it does to its set of resources. It speaks to its
// lockspace through the driver contract (lib/lockspaces/driver.ts) and decides
// from the lockspace's capabilities, never from its kind.
import { EventEmitter } from 'node:events';
import { fileURLToPath } from 'node:url';
import type { Capability } from '../lockspaces/driver.js';
import { openLockspace } from '../lockspaces/index.js';
import type { LockspaceDriver } from '../lockspaces/driver.js';
import { AbortError, InvalidArgumentError, InvalidStateError, LockManagerError, LockTimeoutError, ResourceBusyError, UnsupportedError, holdersOf, type ProcessInfo } from '../os/errors.js';
import { describeProcess, processStartTime, runsLockmgr, watchedBy, watchingParent } from '../os/proc-locks.js';
import { attachProcess, checkSpawn, type ExitStatus, type SpawnOptions, type SupervisedProcess } from '../os/supervise.js';
import { CHANNELS, publish, traced } from '../os/trace.js';
import { checkOptions, checkSignal, checkTimeout, describe } from '../os/validate.js';
import { ResourceSet, type Resource } from './resources.js';
import { StateMachine, WITH_CHILD, type ManagerState } from './states.js';
import { supervisorArgs } from './supervisor-args.js';
import { decodeToken, encodeToken } from './token.js';
import type {
  AdoptOptions,
  FromInquireOptions,
  LockFailure,
  LockFailureAction,
  LockLifetime,
  LockManagerEvents,
  LockManagerOptions,
  ManagerParams,
  MigrateInOptions,
  MigrateOutOptions,
  ResourceMode,
  ResourceRef,
  ResourceSpec,
  VerifyResult,
  WaitOptions,
} from './types.js';
import { MANAGER_OPTIONS, MAX_TIMER_MS, checkFlag, checkManagerOptions, checkParam, checkResource, checkSignallable, checkUri, requireMode, tokenMismatch } from './validation.js';

export type * from './types.js';

/** The lockmgr CLI shipped with this package (bin/lockmgr.js). */
const CLI = fileURLToPath(new URL('../../bin/lockmgr.js', import.meta.url));

export class LockManager extends EventEmitter<LockManagerEvents> implements AsyncDisposable {
  readonly #sm = new StateMachine((state, previous) => this.#emitSafe('state', state, previous));
  readonly #params: ManagerParams;
  readonly #space: LockspaceDriver;
  readonly #resources: ResourceSet;
  readonly #lifetime: LockLifetime;
  readonly #onLockFailure: LockFailureAction;
  readonly #attach: number | undefined;
  readonly #verifyInterval: number | undefined;
  /** A migration target: start() takes guards, completeMigrateIn() the leases. */
  readonly #incoming: boolean;
  #child: SupervisedProcess | null = null;
  #childBorn: bigint | null = null;
  #command: string[] = [];
  // The lifecycle's promises: each set by one step and read by the others.
  #starting: Promise<void> | null = null;
  #stopped: Promise<void> | null = null;
  #shutdown: Promise<void> | null = null;
  #free: Promise<void> | null = null;
  /** A completeMigrateIn() or a take-back in progress. */
  #handover: Promise<void> | null = null;
  /** Hotplugs in flight, by resource: a second acquire of the same disk waits for the first. */
  readonly #hotplugs = new Map<Resource, Promise<{ wasHeld: boolean }>>();
  // What interrupts a wait: free() a start(); the child's exit, shutdown and free() a hotplug or handover; a cancel a completeMigrateIn().
  #startAbort: AbortController | null = null;
  #runAbort: AbortController | null = null;
  #handoverAbort: AbortController | null = null;
  #verifyTimer: NodeJS.Timeout | null = null;
  /** The target named by prepareMigrate(), while 'migrating' or 'migrated'. */
  #targetUri: string | null = null;
  /** Made by adopt(): the process was started by another supervisor. */
  #adopted = false;

  constructor(options?: LockManagerOptions) {
    super();
    const o = checkOptions<LockManagerOptions>(options, MANAGER_OPTIONS, 'LockManager options');
    const c = checkManagerOptions(o);
    this.#params = c.params;
    this.#lifetime = c.lockLifetime;
    this.#onLockFailure = c.onLockFailure;
    this.#attach = c.attach;
    this.#incoming = c.migrate;
    this.#verifyInterval = c.verifyInterval;
    this.#space = openLockspace(o.lockspace);
    this.#space.onWarning = (err) => this.#warn(err);
    this.#resources = new ResourceSet(this.#space);
    if (this.#attach !== undefined) this.#requireCapability('attach', 'attach to a running process');
  }

  get state(): ManagerState {
    return this.#sm.state;
  }

  /** The domain parameters, as set by the constructor and setParameter(). */
  get params(): Readonly<ManagerParams> {
    return { ...this.#params };
  }

  /** What the manager's lockspace can do (docs/lockspaces.md, "Capabilities"). */
  get capabilities(): Readonly<Record<Capability, boolean>> {
    return this.#space.capabilities;
  }

  /** The registered and hot-plugged resources: path, mode and whether the lease is held now. */
  get resources(): Array<{ path: string; mode: ResourceMode; held: boolean; identity: string; lockFiles: string[] }> {
    return this.#resources.values().map((r) => ({ path: r.path, mode: r.mode, held: r.held, identity: r.lease.key, lockFiles: [...r.lease.locations] }));
  }

  /**
   * The descriptors a QEMU started by this manager opens its QEMU-compatible
   * disks through, in registration order: the child inherits each at this
   * number, also named in its environment (LOCKMGR_QEMU_FD: the first;
   * LOCKMGR_QEMU_FDS: all, space-separated). QEMU must open the image through
   * it (qemuDiskArgs()): its own open of the path would meet our locks and
   * fail with 'Failed to get "write" lock' (docs/cli.md). access: read-write
   * for exclusive and shared, unless the image cannot be opened so (then QEMU
   * cannot write it either); read-only for readonly.
   */
  get qemuDescriptors(): Array<{ path: string; mode: ResourceMode; fd: number; access: 'read' | 'readwrite' }> {
    return this.#resources.values().flatMap((r) => (r.qemuImage === undefined ? [] : [{ path: r.path, mode: r.mode, fd: r.qemuImage.fd, access: r.qemuImage.access }]));
  }

  /** Sets a domain parameter before start. Keys: 'id' | 'uuid' | 'name' | 'uri'. */
  setParameter<K extends keyof ManagerParams>(key: K, value: NonNullable<ManagerParams[K]>): void {
    this.#sm.require('setParameter');
    const [k, v] = checkParam(key, value);
    (this.#params as Record<string, unknown>)[k] = v;
  }

  /**
   * Registers a resource to acquire at start. The file is opened now, so a
   * missing file, a wrong access mode or a filesystem without lock support is
   * reported here, before anything runs. Registering the same file again (by
   * any path) in the same mode is a no-op; in another mode, InvalidArgumentError.
   */
  registerResource(spec: ResourceSpec): void {
    this.#sm.require('registerResource');
    this.#resources.open(checkResource(spec, 'resource'), false);
  }

  /** Acquires every registered resource (all or nothing), then spawns or attaches. */
  async start(command?: string, args: readonly string[] = [], spawnOptions: SpawnOptions = {}, options?: WaitOptions): Promise<void> {
    this.#sm.require('start');
    const waitOptions = checkOptions<WaitOptions>(options, ['timeout', 'signal'], 'start options');
    const timeout = checkTimeout(waitOptions.timeout);
    const signal = checkSignal(waitOptions.signal);
    if (this.#attach !== undefined && command !== undefined) {
      throw new InvalidArgumentError(`start() takes no command when attaching to pid ${this.#attach}`);
    }
    if (this.#attach === undefined && typeof command !== 'string') {
      throw new InvalidArgumentError(`start() needs a command, got ${describe(command)}`);
    }
    const spawnOpts = this.#spawnOptions(spawnOptions);
    // Before any lease is taken, in every lockspace alike (some spawn before
    // they acquire, some after): bad arguments are never reported as a busy
    // disk, and cost nothing.
    if (command !== undefined) checkSpawn(command, args, spawnOpts);
    this.#startAbort = new AbortController();
    const abort = signal === undefined ? this.#startAbort.signal : AbortSignal.any([signal, this.#startAbort.signal]);
    // Assigned before 'starting' is emitted, and the work begins a microtask
    // later: a 'state' listener that calls free() finds something to abort.
    this.#starting = Promise.resolve().then(() => this.#start(command, args, spawnOpts, timeout, abort, timeout !== undefined || signal !== undefined));
    this.#sm.set('starting');
    try {
      await this.#starting;
    } finally {
      this.#starting = null;
      this.#startAbort = null;
    }
  }

  async #start(command: string | undefined, args: readonly string[], spawnOptions: SpawnOptions, timeout: number | undefined, signal: AbortSignal, wait: boolean): Promise<void> {
    const abandoned = (): boolean => this.#free !== null || this.#sm.state !== 'starting';
    const deadline = timeout === undefined ? undefined : Date.now() + timeout;
    const left = (): number | undefined => (deadline === undefined ? undefined : Math.max(0, deadline - Date.now()));
    let child: SupervisedProcess;
    try {
      if (abandoned()) throw new AbortError('start() was abandoned: free() was called', { cause: signal.reason });
      // A process we may not signal could never be stopped or killed, and shutdown()/free() would be stuck.
      if (this.#attach !== undefined) checkSignallable(this.#attach);
      child = await this.#space.start({
        command,
        args,
        spawnOptions: command === undefined ? spawnOptions : this.#withQemuDescriptors(spawnOptions),
        attach: this.#attach,
        leases: this.#resources.leases(),
        limits: { signal, timeout, deadline },
        // The lockspace calls this where its leases must be taken (before the
        // spawn, or for the child's pid before it execs). A migration target
        // takes only the guard now; the source still holds the leases.
        take: async (s) => {
          const opts = { wait, timeout: left(), signal: s ?? signal, onBusy: this.#busyListener() };
          if (this.#incoming) await this.#resources.guard(opts);
          else await this.#resources.acquire(this.#resources.values(), opts);
          if (abandoned()) throw new AbortError('start() was abandoned: free() was called', { cause: signal.reason });
        },
      });
    } catch (err) {
      this.#releaseAll();
      this.#sm.set('new');
      throw err;
    }
    this.#command = command === undefined ? [] : [command, ...args];
    this.#child = child;
    // Only processes started since can have inherited its lease fds (the orphan scan at its exit).
    this.#childBorn = processStartTime(child.pid);
    this.#runAbort = new AbortController();
    this.#stopped = child.exited.then(async (status) => this.#onExit(status, await this.#space.exitFailure(status).catch(() => null)));
    if (this.#incoming) {
      this.#sm.set('incoming');
      return;
    }
    this.#sm.set('running');
    this.#startVerify();
  }

  /**
   * Hotplug: acquires one more resource while running. Where the lockspace
   * ties leases to open files, it is held by the supervisor (a running child
   * cannot be handed new fds), so under lockLifetime 'child' it is the one
   * lease that does not outlive the supervisor (capability
   * hotplugHeldByChild). Held already in this mode: a no-op. Failures leave
   * the manager running.
   */
  async acquireResource(spec: ResourceSpec, options?: WaitOptions): Promise<{ wasHeld: boolean }> {
    this.#sm.require('acquireResource');
    const checked = checkResource(spec, 'resource');
    const w = checkOptions<WaitOptions>(options, ['timeout', 'signal'], 'acquireResource options');
    const timeout = checkTimeout(w.timeout);
    const signal = checkSignal(w.signal);
    for (;;) {
      const r = this.#resources.open(checked, true);
      if (r.held) return { wasHeld: true };
      const inFlight = this.#hotplugs.get(r);
      if (inFlight !== undefined) {
        // Another acquire of this disk is under way: let it finish, then look again.
        await inFlight.catch(() => undefined);
        this.#sm.require('acquireResource');
        continue;
      }
      const attempt = this.#hotplug(r, timeout, signal);
      this.#hotplugs.set(r, attempt);
      try {
        return await attempt;
      } finally {
        if (this.#hotplugs.get(r) === attempt) this.#hotplugs.delete(r);
      }
    }
  }

  async #hotplug(r: Resource, timeout: number | undefined, signal: AbortSignal | undefined): Promise<{ wasHeld: boolean }> {
    try {
      await this.#acquireUnless(this.#runAbort!.signal, [r], { timeout, signal, wait: timeout !== undefined || signal !== undefined });
    } catch (err) {
      if (r.hotplugged) this.#resources.forget(r);
      throw err;
    }
    if (this.#sm.state !== 'running') {
      // The child exited or free() ran while we acquired: nothing may hold this now.
      this.#resources.forget(r);
      throw new InvalidStateError(`acquireResource: the manager became '${this.#sm.state}' while acquiring ${r.path}; the lease was released`);
    }
    return { wasHeld: false };
  }

  /** Releases one resource while running. Not held: { wasHeld: false }. */
  async releaseResource(ref: ResourceRef): Promise<{ wasHeld: boolean }> {
    this.#sm.require('releaseResource');
    const r = this.#resources.find(checkResource(ref, 'resource'));
    if (r === undefined || !r.held) return { wasHeld: false };
    this.#resources.forget(r);
    // Released means released: a lock service called from a native thread must have answered.
    await this.#space.settled();
    return { wasHeld: true };
  }

  /**
   * The lock state a migration target needs (RFC Inquire): an opaque,
   * versioned token naming this lock manager, its lockspace, the domain
   * parameters and every resource with its mode. The target checks it against
   * its own configuration (fromInquire). Allowed in every state but 'freed'.
   */
  inquire(): string {
    this.#sm.require('inquire');
    return encodeToken({ lockspace: this.#space.config, params: this.params, resources: this.#resources.values().map((r) => r.spec), leaseState: this.#space.exportState() });
  }

  /**
   * A migration target for the source that made `token` with inquire(), in
   * state 'new' with flags.migrate. The target's own configuration names its
   * resources (`options.resources`, as libvirt's target has the domain
   * definition): they are registered, and the token must list exactly the same
   * ones in the same modes. A path that only the token names is never opened.
   * InvalidArgumentError for a truncated, altered or foreign token, one from
   * another lockspace than options.lockspace (default: the images themselves), or one whose
   * resources differ from options.resources; nothing is left open.
   */
  static fromInquire(token: string, options: FromInquireOptions): LockManager {
    const state = decodeToken(token);
    const o = checkOptions<FromInquireOptions>(options, ['params', 'lockspace', 'lockLifetime', 'onLockFailure', 'verifyInterval', 'resources'], 'fromInquire options');
    if (!Array.isArray(o.resources)) {
      throw new InvalidArgumentError(
        `fromInquire options.resources must be the target's own list of resources (the token is checked against it, never trusted for paths), got ${describe(o.resources)}`,
      );
    }
    const mine = o.params?.uuid;
    if (mine !== undefined && state.params.uuid !== undefined && String(mine).toLowerCase() !== state.params.uuid) {
      throw new InvalidArgumentError(`the migration token is for domain ${state.params.uuid}, not ${describe(mine)}`);
    }
    const specs = o.resources.map((r, i) => checkResource(r, `resources[${i}]`));
    for (const [i, spec] of specs.entries()) requireMode(spec.mode, `resources[${i}].mode`);
    const differs = tokenMismatch(state.resources, specs);
    if (differs !== null) throw new InvalidArgumentError(`the migration token does not match this target's resources: ${differs}`);
    const { resources: _resources, ...managerOptions } = o;
    // The source's parameters, then the target's own (a domain's id differs per host).
    const mgr = new LockManager({ ...managerOptions, params: { ...state.params, ...o.params }, flags: { migrate: true } });
    if (!mgr.#space.sameAs(state.lockspace)) {
      throw new InvalidArgumentError(
        `the migration token comes from a lockspace ${describeConfig(state.lockspace)}, and this manager's is ${mgr.#space.describe()}: ` +
          'source and target must lock the same files, or neither excludes the other',
      );
    }
    mgr.#space.importState(state.leaseState);
    try {
      for (const spec of specs) mgr.#resources.open(spec, false);
    } catch (err) {
      mgr.#resources.clear();
      mgr.#sm.set('freed');
      throw err;
    }
    return mgr;
  }

  /**
   * Takes over a running process and its leases from a supervisor that is
   * gone (a restart, a crash: it ran it under lockLifetime 'child'), and acts
   * from then on as if it had started it: shutdown, hotplug, migration, lock
   * failures, the 'exit' event. The caller names every resource with its mode,
   * from its own configuration (as for fromInquire): for each, the lockspace
   * takes over the very lease the process holds (capability adopt: for OFD
   * lockspaces, the process's own open file descriptions, through
   * pidfd_getfd), and every lease is then verified held. Resolves a manager in
   * state 'running'.
   *
   * The process is not our child: its exit is seen (pidfd) but its status
   * went to its parent, so 'exit' reports { code: null, signal: null }.
   *
   * InvalidArgumentError when the process does not hold a named resource in
   * that mode (or a bad pid or option); UnsupportedError without the
   * capability, for QEMU-compatible resources, or for a process we may not
   * signal or take descriptors from. On any failure nothing is held by us,
   * nothing is left open and the process keeps every lease it had.
   */
  static async adopt(pid: number, options: AdoptOptions): Promise<LockManager> {
    const o = checkOptions<AdoptOptions>(options, ['params', 'lockspace', 'lockLifetime', 'onLockFailure', 'verifyInterval', 'resources'], 'adopt options');
    if (typeof pid !== 'number' || !Number.isInteger(pid) || pid <= 0 || pid > 0x7fffffff) {
      throw new InvalidArgumentError(`adopt() needs a process id (an integer > 0), got ${describe(pid)}`);
    }
    if (o.lockLifetime !== undefined && o.lockLifetime !== 'child') {
      throw new InvalidArgumentError(`adopt options.lockLifetime must be 'child': an adopted process is not ours to kill when this supervisor dies, got ${describe(o.lockLifetime)}`);
    }
    if (!Array.isArray(o.resources) || o.resources.length === 0) {
      throw new InvalidArgumentError(`adopt options.resources must list every resource the process holds, with its mode (from your own configuration), got ${describe(o.resources)}`);
    }
    const specs = o.resources.map((r, i) => checkResource(r, `resources[${i}]`));
    for (const [i, spec] of specs.entries()) {
      requireMode(spec.mode, `resources[${i}].mode`);
      if (spec.type === 'disk' && spec.qemuCompatible === true) {
        throw new UnsupportedError(`adopt options.resources[${i}]: QEMU-compatible locks cannot be adopted yet (docs/contract.md, "LockManager.adopt")`);
      }
    }
    const { resources: _resources, ...managerOptions } = o;
    const mgr = new LockManager({ ...managerOptions, lockLifetime: 'child' });
    mgr.#requireCapability('adopt', `adopt a running process's leases`);
    checkSignallable(pid);
    // A live `lockmgr run` given for its VM: it holds the VM's leases too, but
    // taking it over would make two managers of that VM.
    const watched = runsLockmgr(pid) ? watchedBy(pid) : [];
    if (watched.length > 0) {
      throw new InvalidArgumentError(`process ${pid} is a lockmgr supervisor (it watches process ${watched.join(', ')}): take over the process it supervises once it is gone, not it`);
    }
    // Two managers of one VM would each release the other's leases.
    const supervisor = watchingParent(pid);
    if (supervisor !== null) {
      throw new ResourceBusyError(`process ${pid} still has a supervisor: its parent ${describeProcess(supervisor)} watches it; a process can be taken over only once its supervisor is gone`, {
        candidates: [supervisor],
      });
    }
    // The pidfd pins the process: every descriptor is taken through it, never through a pid that could be reused.
    const child = attachProcess(pid);
    mgr.#sm.set('starting');
    try {
      for (const spec of specs) await mgr.#resources.adopt(spec, child);
      const lost = await mgr.#resources.lost();
      if (lost.length > 0) throw new InvalidStateError(`process ${pid}'s lease on ${lost.map((r) => r.path).join(', ')} was found not held after it was taken over`);
      if (child.exitStatus !== null) throw new InvalidStateError(`process ${pid} exited while it was being taken over`);
    } catch (err) {
      // Given up: our descriptors close, and the process keeps every lease it holds.
      mgr.#resources.clear({ keepLocks: true });
      child.unwatch();
      mgr.#sm.set('freed');
      throw err;
    }
    mgr.#adopted = true;
    mgr.#child = child;
    // Only processes started since can share its leases when it exits (its orphans).
    mgr.#childBorn = processStartTime(pid);
    mgr.#runAbort = new AbortController();
    mgr.#stopped = child.exited.then(async (status) => mgr.#onExit(status, await mgr.#space.exitFailure(status).catch(() => null)));
    mgr.#sm.set('running');
    mgr.#startVerify();
    return mgr;
  }

  /**
   * Target: waits for the source to let go of the leases, takes them, then
   * drops the guard: 'incoming' -> 'running'. A timeout or abort leaves the
   * manager 'incoming' with its guard (retry, or cancel). With { cancel: true }:
   * drops the guard, stops the incoming child (SIGTERM, graceMs, SIGKILL) and
   * ends 'stopped'; idempotent.
   */
  async completeMigrateIn(sourceUri: string, options?: MigrateInOptions): Promise<void> {
    const uri = checkUri(sourceUri, 'sourceUri');
    const o = checkOptions<MigrateInOptions>(options, ['timeout', 'signal', 'cancel', 'graceMs'], 'completeMigrateIn options');
    const timeout = checkTimeout(o.timeout);
    const signal = checkSignal(o.signal);
    const graceMs = checkTimeout(o.graceMs, 'graceMs');
    if (checkFlag(o.cancel, 'cancel')) return this.#cancelMigrateIn(graceMs);
    this.#sm.require('completeMigrateIn');
    if (this.#handover !== null) throw new InvalidStateError('completeMigrateIn() is already in progress');
    this.#handoverAbort = new AbortController();
    const stop = AbortSignal.any([this.#runAbort!.signal, this.#handoverAbort.signal]);
    this.#handover = (async () => {
      try {
        await this.#acquireUnless(stop, this.#resources.values(), { wait: true, timeout, signal, checkGuard: false });
      } catch (err) {
        if (err instanceof LockTimeoutError) {
          throw new LockTimeoutError(`completeMigrateIn: the source (${uri}) did not let go in time: ${err.message}`, { ...holdersOf(err), timeout: err.timeout, holder: err.holder, cause: err });
        }
        throw err;
      }
      if (this.#sm.state !== 'incoming') {
        this.#releaseAll();
        throw new InvalidStateError(`completeMigrateIn: the manager became '${this.#sm.state}' while it waited; the leases were released`);
      }
      // Only now: from the source's release to here, the guard kept fresh acquirers out.
      for (const r of this.#resources.values()) this.#resources.releaseGuard(r);
      // The source's lease state was for this handover only: a later hotplug acquires afresh.
      this.#space.importState(undefined);
      this.#sm.set('running');
      this.#startVerify();
    })();
    try {
      await this.#handover;
    } finally {
      this.#handover = null;
      this.#handoverAbort = null;
    }
  }

  async #cancelMigrateIn(graceMs: number | undefined): Promise<void> {
    if (!this.#incoming) this.#sm.require('completeMigrateIn');
    this.#sm.require('cancelMigrateIn', 'completeMigrateIn');
    this.#handoverAbort?.abort(new InvalidStateError('completeMigrateIn({ cancel: true }) was called while it was waiting; nothing was acquired'));
    await this.#handover?.catch(() => undefined);
    // The handover may have completed before the abort reached it: then the
    // VM runs here now, and cancelling would stop the only copy of it.
    this.#sm.require('cancelMigrateIn', 'completeMigrateIn({ cancel: true })');
    if (this.#sm.state === 'incoming') for (const r of this.#resources.values()) this.#resources.releaseGuard(r);
    await this.shutdown({ graceMs });
  }

  /**
   * Source: a migration to `targetUri` begins: 'running' -> 'migrating'.
   * Hotplug is refused until it ends, so the token this returns (inquire())
   * stays true for the whole migration: give this one to the target.
   */
  async prepareMigrate(targetUri: string): Promise<string> {
    const uri = checkUri(targetUri, 'targetUri');
    this.#sm.require('prepareMigrate');
    if (this.#hotplugs.size > 0) throw new InvalidStateError('prepareMigrate(): an acquireResource() is still in progress; await it first');
    this.#targetUri = uri;
    this.#sm.set('migrating');
    return this.inquire();
  }

  /**
   * Source: the caller has paused the process; releases every lease so the
   * target can take it: 'migrating' -> 'migrated' (the process still runs until
   * shut down). With { cancel: true }: the migration failed; from 'migrating'
   * keeps the leases, from 'migrated' takes them back (fail fast, or waiting per
   * timeout/signal; busy if the target took them), and returns to 'running'.
   */
  async completeMigrateOut(targetUri: string, options?: MigrateOutOptions): Promise<void> {
    const uri = checkUri(targetUri, 'targetUri');
    const o = checkOptions<MigrateOutOptions>(options, ['timeout', 'signal', 'cancel'], 'completeMigrateOut options');
    const timeout = checkTimeout(o.timeout);
    const signal = checkSignal(o.signal);
    const cancel = checkFlag(o.cancel, 'cancel');
    this.#sm.require('completeMigrateOut');
    if (uri !== this.#targetUri) {
      throw new InvalidArgumentError(`completeMigrateOut(): the migration in progress is to ${describe(this.#targetUri)}, not ${describe(uri)}`);
    }
    if (this.#handover !== null) throw new InvalidStateError('completeMigrateOut({ cancel: true }) is already taking the leases back');
    if (!cancel) {
      if (this.#sm.state === 'migrated') return;
      this.#stopVerify();
      // The child shares these open file descriptions: a take-back must lock
      // the same ones, so a lock file is pinned, not deleted.
      this.#releaseAll({ keepFiles: true });
      // 'migrated' means released: a lock service called from a native thread must have answered.
      await this.#space.settled();
      this.#sm.set('migrated');
      return;
    }
    if (this.#sm.state === 'migrated') {
      const stop = this.#runAbort!.signal;
      this.#handover = (async () => {
        // Not a fresh acquire: the target's guard is expected, and this is the source taking back its own.
        await this.#acquireUnless(stop, this.#resources.values(), { timeout, signal, wait: timeout !== undefined || signal !== undefined, checkGuard: false });
        if (this.#sm.state !== 'migrated') {
          this.#releaseAll();
          throw new InvalidStateError(`completeMigrateOut: the manager became '${this.#sm.state}' while it took the leases back; they were released`);
        }
      })();
      try {
        await this.#handover;
      } finally {
        this.#handover = null;
      }
    }
    this.#targetUri = null;
    this.#sm.set('running');
    this.#startVerify();
  }

  /** The supervised process. */
  getChild(): { pid: number } {
    this.#sm.require('getChild');
    return { pid: this.#child!.pid };
  }

  /** Sends a signal to the supervised process through its pidfd (no pid-reuse race). false once it has exited. */
  signal(signal: NodeJS.Signals | number): boolean {
    this.#sm.require('signal');
    return this.#child!.signal(signal);
  }

  /** The lockmgr CLI that can hold the same resources in a separate process. */
  supervisorPath(): string {
    return CLI;
  }

  /**
   * argv for supervisorPath(): `run`, the lockspace, the resources, lifetime
   * and params, `--`, and the command when start() was given one.
   * InvalidStateError when the CLI cannot express this manager.
   */
  supervisorArgs(): string[] {
    if (this.#adopted) throw new InvalidStateError('supervisorArgs(): an adopted process cannot be handed to `lockmgr run`: its leases are held already, by it and by this manager');
    return supervisorArgs({
      attach: this.#attach,
      incoming: this.#incoming,
      lockspace: this.#space.cliSpec(),
      resources: this.#resources.values(),
      lifetime: this.#lifetime,
      params: this.#params,
      command: this.#command,
    });
  }

  /**
   * Checks that every held lease is still ours. A lost one is a lock failure:
   * a 'lock-failure' event, then onLockFailure (poweroff: SIGKILL the child;
   * pause: SIGSTOP it; ignore: nothing more).
   */
  async verify(): Promise<VerifyResult> {
    this.#sm.require('verify');
    const lostResources = await this.#resources.lost();
    if (!this.#sm.is('running', 'migrating')) return { lost: [] };
    const lost = lostResources.map((r) => r.path);
    // The action first: a throwing 'lock-failure' listener must not leave the
    // child running without its lease.
    if (lost.length > 0 && this.#child !== null) {
      try {
        if (this.#onLockFailure === 'poweroff') this.#child.signal('SIGKILL');
        else if (this.#onLockFailure === 'pause') this.#child.signal('SIGSTOP');
      } catch (err) {
        this.#warn(err);
      }
    }
    for (const r of lostResources) {
      const failure: LockFailure = { resource: r.path, reason: `the ${r.mode} lease on ${r.path} is no longer held`, action: this.#onLockFailure };
      this.#emitSafe('lock-failure', failure);
    }
    return { lost };
  }

  /** SIGTERM, graceMs, SIGKILL; resolves once the child is reaped and its leases released. Idempotent. */
  async shutdown(options?: { graceMs?: number }): Promise<void> {
    const o = checkOptions<{ graceMs?: number }>(options, ['graceMs'], 'shutdown options');
    const graceMs = checkTimeout(o.graceMs, 'graceMs') ?? 10_000;
    if (this.#starting) await this.#starting.catch(() => undefined);
    if (WITH_CHILD.includes(this.#sm.state) && this.#sm.state !== 'stopping' && this.#shutdown === null) {
      const child = this.#child!;
      const before = this.#sm.state;
      // stop() sends SIGTERM before it returns; if that fails (a process we
      // may no longer signal), the manager is still running, not stopping.
      const stopping = child.stop({ graceMs });
      this.#sm.set('stopping');
      this.#abortRun('shutdown() was called');
      this.#shutdown = stopping.then(
        () => this.#stopped!,
        (err: unknown) => {
          this.#shutdown = null;
          if (this.#sm.state === 'stopping' && child.exitStatus === null) this.#sm.set(before);
          throw err;
        },
      );
    }
    if (this.#shutdown) await this.#shutdown;
    else if (this.#stopped) await this.#stopped;
  }

  /** Kills the child now (SIGKILL), reaps it, releases and closes everything. Idempotent; valid in every state. */
  free(): Promise<void> {
    this.#free ??= this.#doFree();
    return this.#free;
  }

  // Never rejects: every step that can fail becomes a 'warning', and the
  // manager always ends 'freed' with every fd closed.
  async #doFree(): Promise<void> {
    this.#startAbort?.abort(new InvalidStateError('free() was called while start() was waiting for its resources'));
    this.#abortRun('free() was called');
    if (this.#starting) await this.#starting.catch(() => undefined);
    let reaped = true;
    if (this.#child !== null && this.#child.exitStatus === null) {
      try {
        this.#child.signal('SIGKILL');
      } catch (err) {
        // Only an attached process can refuse (start() probes for that); it
        // runs on, and its leases go with this free() all the same.
        reaped = false;
        this.#warn(err);
      }
    }
    if (this.#stopped && reaped) await this.#stopped.catch((err: unknown) => this.#warn(err));
    this.#stopVerify();
    this.#releaseAll();
    this.#resources.clear();
    this.#sm.set('freed');
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.free();
  }

  #onExit(status: ExitStatus, lost: string | null): void {
    this.#stopVerify();
    this.#abortRun('the supervised process exited');
    // The lock service killed the child for a lease it could no longer renew: it applied 'poweroff' itself.
    if (lost !== null) for (const r of this.#resources.values()) if (r.held) this.#emitSafe('lock-failure', { resource: r.path, reason: lost, action: 'poweroff' });
    // The child is reaped: only now may its leases go (invariant 2), and not
    // those that something it started still shares (docs/contract.md, "Orphans").
    try {
      for (const [r, { processes, through }] of this.#resources.releaseExited({ bornSince: this.#childBorn ?? undefined })) {
        this.#emitSafe('orphans', { resource: r.path, processes, through });
      }
    } catch (err) {
      this.#warn(err);
    }
    this.#releaseAll();
    if (this.#sm.state !== 'freed') this.#sm.set('stopped');
    this.#emitSafe('exit', status);
  }

  /**
   * acquire() that `stop` (the manager's own: the child's exit, shutdown,
   * free, a cancel) also ends, with stop's reason as the error. `wait` must be
   * explicit: stop is not the caller's signal.
   */
  async #acquireUnless(stop: AbortSignal, resources: Iterable<Resource>, options: { wait: boolean; timeout?: number; signal?: AbortSignal; checkGuard?: boolean }): Promise<void> {
    try {
      await this.#resources.acquire(resources, { ...options, onBusy: this.#busyListener(), signal: options.signal === undefined ? stop : AbortSignal.any([options.signal, stop]) });
    } catch (err) {
      if (stop.aborted) throw stop.reason as Error;
      throw err;
    }
  }

  /**
   * The lockspace's onBusy, only while someone listens for 'wait': naming who
   * is in the way scans /proc, which a wait nobody reports must not pay for.
   */
  #busyListener(): ((busy: ResourceBusyError) => void) | undefined {
    return this.listenerCount('wait') > 0 ? this.#onBusy : undefined;
  }

  /** A wait for a busy lease begins: the 'wait' event says who is in the way. */
  readonly #onBusy = (busy: ResourceBusyError): void => {
    this.#emitSafe('wait', busy);
  };

  #abortRun(why: string): void {
    this.#runAbort?.abort(new InvalidStateError(`${why} while it was waiting; nothing was acquired`));
  }

  #releaseAll(options: { keepFiles?: boolean } = {}): void {
    for (const r of this.#resources.values()) {
      try {
        this.#resources.release(r, options);
        this.#resources.releaseGuard(r);
      } catch (err) {
        this.#warn(err);
      }
    }
  }

  #requireCapability(capability: Capability, what: string): void {
    if (!this.#space.capabilities[capability]) {
      throw new UnsupportedError(`lockspace ${this.#space.describe()} cannot ${what} (it lacks the capability '${capability}'; docs/lockspaces.md)`);
    }
  }

  #spawnOptions(options: SpawnOptions): SpawnOptions {
    if (options === null || typeof options !== 'object') {
      throw new InvalidArgumentError(`spawn options must be an object, got ${describe(options)}`);
    }
    if (this.#lifetime === 'supervisor') {
      const pds = (options as { parentDeathSignal?: unknown }).parentDeathSignal;
      if (pds !== undefined && pds !== 'SIGKILL') {
        throw new InvalidArgumentError(`lockLifetime 'supervisor' kills the child with SIGKILL when the supervisor dies; parentDeathSignal ${describe(pds)} would let it run unlocked`);
      }
      return { ...options, parentDeathSignal: 'SIGKILL' };
    }
    return options;
  }

  /** The spawn options plus the QEMU descriptors: kept open in the child, and named in its environment. */
  #withQemuDescriptors(options: SpawnOptions): SpawnOptions {
    const fds = this.qemuDescriptors.map((d) => d.fd);
    // Malformed env or keepFds: left for spawnSupervised() to reject, in its words.
    if (fds.length === 0 || (options.env !== undefined && (typeof options.env !== 'object' || options.env === null))) return options;
    if (options.keepFds !== undefined && !Array.isArray(options.keepFds)) return options;
    const env = { ...(options.env ?? process.env), LOCKMGR_QEMU_FD: String(fds[0]), LOCKMGR_QEMU_FDS: fds.join(' ') };
    // A loop device's backing file too, unnamed (QEMU opens the device): QEMU's locks on it are then the child's as well, as the lease's are.
    const backing = this.#resources.values().flatMap((r) => (r.qemuBacking === undefined ? [] : [r.qemuBacking.fd]));
    return { ...options, env, keepFds: [...(options.keepFds ?? []), ...fds, ...backing] };
  }

  #startVerify(): void {
    if (this.#verifyInterval === undefined || this.#verifyTimer !== null) return;
    this.#verifyTimer = setInterval(() => {
      if (this.#sm.is('running', 'migrating')) this.verify().catch((err: unknown) => this.#warn(err));
    }, Math.min(this.#verifyInterval, MAX_TIMER_MS));
    this.#verifyTimer.unref();
  }

  #stopVerify(): void {
    if (this.#verifyTimer !== null) clearInterval(this.#verifyTimer);
    this.#verifyTimer = null;
  }

  /** A failure with no caller to reject: a 'warning' event, or a process warning when nobody listens. */
  #warn(err: unknown): void {
    const warning = err instanceof LockManagerError ? err : new LockManagerError(err instanceof Error ? err.message : String(err), { cause: err });
    if (this.listenerCount('warning') === 0) {
      process.emitWarning(warning);
      return;
    }
    try {
      this.emit('warning', warning);
    } catch (listenerError) {
      process.emitWarning(listenerError instanceof Error ? listenerError : String(listenerError));
    }
  }

  /** Emits an event; a listener that throws becomes a 'warning' instead of breaking the state machine. */
  #emitSafe<K extends keyof LockManagerEvents>(event: K, ...args: LockManagerEvents[K]): void {
    // diagnostics_channel sees lock loss and the child's exit whether or not the manager's owner listens.
    if (event === 'lock-failure' && traced(CHANNELS.lockLost)) publish(CHANNELS.lockLost, { manager: this, ...(args[0] as LockFailure) });
    if (event === 'exit' && traced(CHANNELS.childExit)) publish(CHANNELS.childExit, { manager: this, pid: this.#child?.pid, ...(args[0] as ExitStatus) });
    try {
      (this.emit as (e: K, ...a: LockManagerEvents[K]) => boolean)(event, ...args);
    } catch (err) {
      this.#warn(err);
    }
  }
}

/** A lockspace configuration as a token carries it, in a few words. */
function describeConfig(config: { kind: string }): string {
  const options = Object.entries(config)
    .filter(([k]) => k !== 'kind')
    .map(([k, v]) => `${k} ${String(v)}`);
  return options.length === 0 ? config.kind : `${config.kind} (${options.join(', ')})`;
}

export type { ExitStatus, ProcessInfo };

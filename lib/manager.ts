// LockManager: libvirt's lock-manager contract (RFC of 2010 and its review),
// with every failure specified. One manager supervises one VM process and holds
// its disk leases from start to shutdown. docs/contract.md is this file in
// prose: the states, what each method may do in each, and every failure.
//
//   new --start()--> starting --> running --(child exits | shutdown())--> stopped
//    ^                  |            |                                      |
//    +---(acquire or    |         stopping                                  |
//         spawn failed)-+                                                   |
//   any state --free()--> freed  <------------------------------------------+
import { EventEmitter } from 'node:events';
import { fileURLToPath } from 'node:url';
import { InvalidArgumentError, InvalidStateError, LockManagerError, type ProcessInfo } from './errors.js';
import { directLockspace, type LockspaceConfig, type Lockspace, type ResourceMode } from './lockspace.js';
import { qemuProfile } from './qemu.js';
import { acquireAll, releaseOne, stillHeld, type AcquireOptions, type Resource } from './resources.js';
import { attachProcess, spawnSupervised, type ExitStatus, type SpawnOptions, type SupervisedProcess } from './supervise.js';
import { checkOneOf, checkOptions, checkPath, checkSignal, checkTimeout, describe } from './validate.js';

export type ManagerState = 'new' | 'starting' | 'running' | 'stopping' | 'stopped' | 'freed';
export type LockLifetime = 'child' | 'supervisor';
export type LockFailureAction = 'poweroff' | 'pause' | 'ignore';
export type { ResourceMode, LockspaceConfig };

export interface ManagerParams {
  /** The domain's id: an integer >= 0. */
  id?: number;
  /** The domain's UUID in RFC 4122 text form. */
  uuid?: string;
  name?: string;
  uri?: string;
}

export interface LockManagerOptions {
  params?: ManagerParams;
  lockspace?: LockspaceConfig;
  /** 'child' (default): the child outlives a dead supervisor and keeps its locks. 'supervisor': the child is SIGKILLed when the supervisor dies. */
  lockLifetime?: LockLifetime;
  /** What a lost lock does to the child. Default 'poweroff'. */
  onLockFailure?: LockFailureAction;
  /** Supervise this running process instead of spawning one (RFC NEW_ATTACH). */
  attach?: number;
  flags?: { migrate?: boolean };
  /** Run verify() every this many milliseconds while running. */
  verifyInterval?: number;
}

export interface ResourceSpec {
  type: 'disk';
  path: string;
  mode: ResourceMode;
  /**
   * Also take QEMU-style permission locks (bytes 100+ of the image), so that
   * qemu-img and qemu-io refuse to write (exclusive) or resize the image while
   * it is held, and a QEMU process using the image makes the acquire fail.
   */
  qemuCompatible?: boolean;
}

export interface ResourceRef {
  type: 'disk';
  path: string;
}

export interface WaitOptions {
  timeout?: number;
  signal?: AbortSignal;
}

export interface LockFailure {
  /** The resource whose lock was found lost. */
  resource: string;
  reason: string;
  action: LockFailureAction;
}

export interface VerifyResult {
  /** Paths of the resources whose locks were found lost. */
  lost: string[];
}

interface ManagedResource extends Resource {
  /** Taken by acquireResource() while running: held by the supervisor only. */
  hotplugged: boolean;
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const PARAM_KEYS = ['id', 'uuid', 'name', 'uri'] as const;
const MODES = ['exclusive', 'shared', 'readonly'] as const;

function requireMode(mode: ResourceMode | undefined): ResourceMode {
  if (mode === undefined) throw new InvalidArgumentError(`resource.mode must be one of ${MODES.map((m) => `'${m}'`).join(', ')}`);
  return mode;
}

function checkParam(key: unknown, value: unknown): [keyof ManagerParams, ManagerParams[keyof ManagerParams]] {
  const k = checkOneOf(key, PARAM_KEYS, 'parameter key');
  switch (k) {
    case 'id':
      if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0) {
        throw new InvalidArgumentError(`params.id must be an integer >= 0, got ${describe(value)}`);
      }
      return [k, value];
    case 'uuid':
      if (typeof value !== 'string' || !UUID.test(value)) {
        throw new InvalidArgumentError(`params.uuid must be a UUID in RFC 4122 text form (8-4-4-4-12 hex digits), got ${describe(value)}`);
      }
      return [k, value.toLowerCase()];
    case 'name':
    case 'uri':
      if (typeof value !== 'string' || value === '' || value.includes('\0')) {
        throw new InvalidArgumentError(`params.${k} must be a non-empty string without NUL bytes, got ${describe(value)}`);
      }
      return [k, value];
  }
}

function checkResource(value: unknown, what: string): { path: string; mode?: ResourceMode; qemuCompatible: boolean } {
  const spec = checkOptions<ResourceSpec>(value, ['type', 'path', 'mode', 'qemuCompatible'], what);
  if (value === undefined) throw new InvalidArgumentError(`${what} is required`);
  if (spec.type !== 'disk') {
    throw new InvalidArgumentError(`${what}.type must be 'disk' (leases need a sanlock lockspace), got ${describe(spec.type)}`);
  }
  const path = checkPath(spec.path, `${what}.path`);
  if (spec.qemuCompatible !== undefined && typeof spec.qemuCompatible !== 'boolean') {
    throw new InvalidArgumentError(`${what}.qemuCompatible must be a boolean, got ${describe(spec.qemuCompatible)}`);
  }
  const mode = spec.mode === undefined ? undefined : checkOneOf(spec.mode, MODES, `${what}.mode`);
  return { path, mode, qemuCompatible: spec.qemuCompatible === true };
}

/** The lockmgr CLI shipped with this package (bin/lockmgr.js). */
const CLI = fileURLToPath(new URL('../bin/lockmgr.js', import.meta.url));

export interface LockManagerEvents {
  state: [state: ManagerState, previous: ManagerState];
  exit: [status: ExitStatus];
  'lock-failure': [failure: LockFailure];
  warning: [warning: LockManagerError];
}

export class LockManager extends EventEmitter<LockManagerEvents> implements AsyncDisposable {
  #state: ManagerState = 'new';
  readonly #params: ManagerParams = {};
  readonly #space: Lockspace;
  readonly #lifetime: LockLifetime;
  readonly #onLockFailure: LockFailureAction;
  readonly #attach: number | undefined;
  readonly #verifyInterval: number | undefined;
  /** By identity key: one entry per file, whatever path reached it. */
  readonly #resources = new Map<string, ManagedResource>();
  #child: SupervisedProcess | null = null;
  #command: string[] = [];
  #starting: Promise<void> | null = null;
  /** Aborts a start() that is waiting for busy resources, when free() is called. */
  #startAbort: AbortController | null = null;
  #stopped: Promise<void> | null = null;
  #shutdown: Promise<void> | null = null;
  #free: Promise<void> | null = null;
  #verifyTimer: NodeJS.Timeout | null = null;

  constructor(options?: LockManagerOptions) {
    super();
    const o = checkOptions<LockManagerOptions>(options, ['params', 'lockspace', 'lockLifetime', 'onLockFailure', 'attach', 'flags', 'verifyInterval'], 'LockManager options');
    for (const [k, v] of Object.entries(checkOptions<ManagerParams>(o.params, PARAM_KEYS, 'params'))) {
      if (v === undefined) continue;
      const [key, value] = checkParam(k, v);
      (this.#params as Record<string, unknown>)[key] = value;
    }
    const space = checkOptions<LockspaceConfig>(o.lockspace, ['kind'], 'lockspace');
    if (space.kind !== undefined) checkOneOf(space.kind, ['direct'] as const, 'lockspace.kind');
    this.#space = directLockspace();
    this.#lifetime = o.lockLifetime === undefined ? 'child' : checkOneOf(o.lockLifetime, ['child', 'supervisor'] as const, 'lockLifetime');
    this.#onLockFailure = o.onLockFailure === undefined ? 'poweroff' : checkOneOf(o.onLockFailure, ['poweroff', 'pause', 'ignore'] as const, 'onLockFailure');
    if (o.attach !== undefined) {
      if (typeof o.attach !== 'number' || !Number.isInteger(o.attach) || o.attach <= 0) {
        throw new InvalidArgumentError(`attach must be a process id (an integer > 0), got ${describe(o.attach)}`);
      }
      if (o.lockLifetime === 'child') {
        throw new InvalidArgumentError("lockLifetime 'child' cannot be used with attach: a running process cannot be handed the lock fds");
      }
      this.#attach = o.attach;
    }
    const flags = checkOptions<{ migrate?: boolean }>(o.flags, ['migrate'], 'flags');
    if (flags.migrate !== undefined && flags.migrate !== false) {
      throw new InvalidArgumentError('flags.migrate is not supported yet (see the migration issue)');
    }
    this.#verifyInterval = checkTimeout(o.verifyInterval, 'verifyInterval');
    if (this.#verifyInterval === 0) throw new InvalidArgumentError('verifyInterval must be > 0 milliseconds');
  }

  get state(): ManagerState {
    return this.#state;
  }

  /** The domain parameters, as set by the constructor and setParameter(). */
  get params(): Readonly<ManagerParams> {
    return { ...this.#params };
  }

  /** The registered and hot-plugged resources: path, mode and whether the lease is held now. */
  get resources(): Array<{ path: string; mode: ResourceMode; held: boolean; identity: string }> {
    return [...this.#resources.values()].map((r) => ({ path: r.path, mode: r.mode, held: r.held, identity: r.file.identity.key }));
  }

  /** Sets a domain parameter before start. Keys: 'id' | 'uuid' | 'name' | 'uri'. */
  setParameter<K extends keyof ManagerParams>(key: K, value: NonNullable<ManagerParams[K]>): void {
    this.#require('setParameter', ['new']);
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
    this.#require('registerResource', ['new']);
    const { path, mode, qemuCompatible } = checkResource(spec, 'resource');
    this.#open(path, requireMode(mode), qemuCompatible, false);
  }

  /** Acquires every registered resource (all or nothing), then spawns or attaches. */
  async start(command?: string, args: readonly string[] = [], spawnOptions: SpawnOptions = {}, options?: WaitOptions): Promise<void> {
    this.#require('start', ['new']);
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
    this.#setState('starting');
    this.#startAbort = new AbortController();
    const abort = signal === undefined ? this.#startAbort.signal : AbortSignal.any([signal, this.#startAbort.signal]);
    const wait = timeout !== undefined || signal !== undefined;
    this.#starting = this.#start(command, args, spawnOpts, { timeout, signal: abort, wait });
    try {
      await this.#starting;
    } finally {
      this.#starting = null;
      this.#startAbort = null;
    }
  }

  async #start(command: string | undefined, args: readonly string[], spawnOptions: SpawnOptions, wait: AcquireOptions): Promise<void> {
    try {
      await acquireAll(this.#space, this.#resources.values(), wait);
    } catch (err) {
      this.#setState('new');
      throw err;
    }
    let child: SupervisedProcess;
    try {
      if (this.#attach !== undefined) {
        child = attachProcess(this.#attach);
      } else {
        // Under both lifetimes the child gets the lease fds. For 'supervisor'
        // that is not redundant: a dying process's files are closed before its
        // children get their parent-death signal, so with the fds in the
        // supervisor alone the child would run unlocked for that moment (the
        // lifetime test's observer saw it). With a copy in the child, the
        // locks go only when the child is gone.
        const keepFds = [...(spawnOptions.keepFds ?? []), ...[...this.#resources.values()].map((r) => r.file.fd)];
        child = spawnSupervised(command!, args, { ...spawnOptions, keepFds });
        this.#command = [command!, ...args];
      }
    } catch (err) {
      this.#releaseAll();
      this.#setState('new');
      throw err;
    }
    this.#child = child;
    this.#stopped = child.exited.then((status) => this.#onExit(status));
    this.#setState('running');
    if (this.#verifyInterval !== undefined) {
      this.#verifyTimer = setInterval(() => {
        this.verify().catch((err: unknown) => this.#warn(err));
      }, this.#verifyInterval);
      this.#verifyTimer.unref();
    }
  }

  /**
   * Hotplug: acquires one more resource while running. It is held by the
   * supervisor (a running child cannot be handed new fds), so under lockLifetime
   * 'child' it is the one lease that does not outlive the supervisor. Held
   * already in this mode: a no-op. Failures leave the manager running.
   */
  async acquireResource(spec: ResourceSpec, options?: WaitOptions): Promise<{ wasHeld: boolean }> {
    this.#require('acquireResource', ['running']);
    const { path, mode, qemuCompatible } = checkResource(spec, 'resource');
    const wait = checkOptions<WaitOptions>(options, ['timeout', 'signal'], 'acquireResource options');
    const w = { timeout: checkTimeout(wait.timeout), signal: checkSignal(wait.signal) };
    const r = this.#open(path, requireMode(mode), qemuCompatible, true);
    if (r.held) return { wasHeld: true };
    try {
      await acquireAll(this.#space, [r], w);
    } catch (err) {
      if (r.hotplugged) this.#forget(r);
      throw err;
    }
    if (this.#state !== 'running') {
      // The child exited or free() ran while we waited: nothing may hold this now.
      this.#forget(r);
      throw new InvalidStateError(`acquireResource: the manager became '${this.#state}' while acquiring ${path}; the lease was released`);
    }
    return { wasHeld: false };
  }

  /** Releases one resource while running. Not held: { wasHeld: false }. */
  async releaseResource(ref: ResourceRef): Promise<{ wasHeld: boolean }> {
    this.#require('releaseResource', ['running']);
    const { path } = checkResource(ref, 'resource');
    const r = this.#find(path);
    if (r === undefined || !r.held) return { wasHeld: false };
    releaseOne(this.#space, r);
    this.#forget(r);
    return { wasHeld: true };
  }

  /** The supervised process. */
  getChild(): { pid: number } {
    this.#require('getChild', ['running', 'stopping']);
    return { pid: this.#child!.pid };
  }

  /** Sends a signal to the supervised process through its pidfd (no pid-reuse race). false once it has exited. */
  signal(signal: NodeJS.Signals | number): boolean {
    this.#require('signal', ['running', 'stopping']);
    return this.#child!.signal(signal);
  }

  /** The lockmgr CLI that can hold the same resources in a separate process. */
  supervisorPath(): string {
    return CLI;
  }

  /** argv for supervisorPath(): `run`, the resources, lifetime and params, `--`, and the command when start() was given one. */
  supervisorArgs(): string[] {
    const argv = ['run'];
    for (const r of this.#resources.values()) argv.push(`--${r.mode}`, r.path);
    if ([...this.#resources.values()].some((r) => r.qemu !== undefined)) argv.push('--qemu-compatible');
    argv.push('--lifetime', this.#lifetime);
    for (const key of ['name', 'uuid', 'id'] as const) {
      if (this.#params[key] !== undefined) argv.push(`--${key}`, String(this.#params[key]));
    }
    argv.push('--', ...this.#command);
    return argv;
  }

  /**
   * Checks that every held lease is still ours. A lost one is a lock failure:
   * a 'lock-failure' event, then onLockFailure (poweroff: SIGKILL the child;
   * pause: SIGSTOP it; ignore: nothing more).
   */
  async verify(): Promise<VerifyResult> {
    this.#require('verify', ['running']);
    const lost: string[] = [];
    for (const r of this.#resources.values()) {
      if (r.held && !stillHeld(this.#space, r)) lost.push(r.path);
    }
    for (const resource of lost) {
      const failure: LockFailure = { resource, reason: `the ${this.#find(resource)?.mode} lease on ${resource} is no longer held`, action: this.#onLockFailure };
      this.emit('lock-failure', failure);
    }
    if (lost.length > 0 && this.#child !== null) {
      if (this.#onLockFailure === 'poweroff') this.#child.signal('SIGKILL');
      else if (this.#onLockFailure === 'pause') this.#child.signal('SIGSTOP');
    }
    return { lost };
  }

  /** SIGTERM, graceMs, SIGKILL; resolves once the child is reaped and its leases released. Idempotent. */
  async shutdown(options?: { graceMs?: number }): Promise<void> {
    const o = checkOptions<{ graceMs?: number }>(options, ['graceMs'], 'shutdown options');
    const graceMs = checkTimeout(o.graceMs, 'graceMs') ?? 10_000;
    if (this.#starting) await this.#starting.catch(() => undefined);
    if (this.#state === 'running') {
      this.#setState('stopping');
      const child = this.#child!;
      this.#shutdown = child.stop({ graceMs }).then(() => this.#stopped!);
    }
    if (this.#shutdown) await this.#shutdown;
    else if (this.#stopped) await this.#stopped;
  }

  /** Kills the child now (SIGKILL), reaps it, releases and closes everything. Idempotent; valid in every state. */
  free(): Promise<void> {
    this.#free ??= this.#doFree();
    return this.#free;
  }

  async #doFree(): Promise<void> {
    this.#startAbort?.abort(new InvalidStateError('free() was called while start() was waiting for its resources'));
    if (this.#starting) await this.#starting.catch(() => undefined);
    if (this.#child !== null && this.#child.exitStatus === null) this.#child.signal('SIGKILL');
    if (this.#stopped) await this.#stopped;
    this.#stopVerify();
    this.#releaseAll();
    for (const r of this.#resources.values()) r.file.close();
    this.#resources.clear();
    this.#setState('freed');
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.free();
  }

  #onExit(status: ExitStatus): void {
    this.#stopVerify();
    // The child is reaped: only now may its leases go (invariant 2).
    this.#releaseAll();
    if (this.#state !== 'freed') this.#setState('stopped');
    this.emit('exit', status);
  }

  /** Opens (or finds) the resource for `path`; throws if it is registered differently. */
  #open(path: string, mode: ResourceMode, qemuCompatible: boolean, hotplug: boolean): ManagedResource {
    const file = this.#space.openLease(path, mode);
    const existing = this.#resources.get(file.identity.key);
    if (existing !== undefined) {
      file.close();
      const same = existing.path === path ? `'${path}'` : `'${path}' (the same file as '${existing.path}')`;
      if (existing.mode !== mode) {
        throw new InvalidArgumentError(`${same} is already ${existing.held ? 'held' : 'registered'} ${existing.mode}, not ${mode}; release it first`);
      }
      if ((existing.qemu !== undefined) !== qemuCompatible) {
        throw new InvalidArgumentError(`${same} is already ${existing.held ? 'held' : 'registered'} ${existing.qemu ? 'with' : 'without'} QEMU-compatible locks`);
      }
      return existing;
    }
    try {
      // A probe: a filesystem that cannot lock says so now, before anything runs.
      file.getConflict(this.#space.lockMode(mode), this.#space.leaseRange);
    } catch (err) {
      file.close();
      throw err;
    }
    const r: ManagedResource = { path, mode, file, held: false, hotplugged: hotplug, qemu: qemuCompatible ? qemuProfile(mode) : undefined };
    this.#resources.set(file.identity.key, r);
    return r;
  }

  #find(path: string): ManagedResource | undefined {
    for (const r of this.#resources.values()) if (r.path === path) return r;
    let key: string;
    try {
      const probe = this.#space.openLease(path, 'readonly');
      key = probe.identity.key;
      probe.close();
    } catch {
      return undefined;
    }
    return this.#resources.get(key);
  }

  #forget(r: ManagedResource): void {
    releaseOne(this.#space, r);
    r.file.close();
    this.#resources.delete(r.file.identity.key);
  }

  #releaseAll(): void {
    for (const r of this.#resources.values()) {
      try {
        releaseOne(this.#space, r);
      } catch (err) {
        this.#warn(err);
      }
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

  #stopVerify(): void {
    if (this.#verifyTimer !== null) clearInterval(this.#verifyTimer);
    this.#verifyTimer = null;
  }

  #warn(err: unknown): void {
    const warning = err instanceof LockManagerError ? err : new LockManagerError(String(err), { cause: err });
    this.emit('warning', warning);
  }

  #setState(state: ManagerState): void {
    const previous = this.#state;
    if (previous === state) return;
    this.#state = state;
    this.emit('state', state, previous);
  }

  #require(method: string, allowed: readonly ManagerState[]): void {
    if (!allowed.includes(this.#state)) {
      throw new InvalidStateError(`${method}() is not allowed in state '${this.#state}'; it is allowed in ${allowed.map((s) => `'${s}'`).join(', ')}`);
    }
  }
}

export type { ExitStatus, ProcessInfo };

// LockManager: libvirt's lock-manager contract (RFC of 2010 and its review),
// with every failure specified. One manager supervises one VM process and holds
// its disk leases from start to shutdown. docs/contract.md is this file in
// prose: the states, what each method may do in each, and every failure.
//
//   new --start()--> starting --> running --(child exits | shutdown())--> stopped
//    ^                  |   |        |                                      |
//    +---(acquire or    |   |     stopping                                  |
//         spawn failed)-+   |                                               |
//   any state --free()--> freed  <------------------------------------------+
//
// Migration (docs/contract.md, "Migration"):
//   target (flags.migrate): starting --> incoming --completeMigrateIn()--> running
//                                        incoming --(cancel | child exits)--> stopped
//   source: running --prepareMigrate()--> migrating --completeMigrateOut()--> migrated
//           migrating | migrated --completeMigrateOut({ cancel })--> running
//           migrating | migrated --(child exits)--> stopped
import { EventEmitter } from 'node:events';
import { normalize } from 'node:path';
import { fileURLToPath } from 'node:url';
import { AbortError, InvalidArgumentError, InvalidStateError, LockManagerError, LockTimeoutError, UnsupportedError, systemError, type ProcessInfo } from '../os/errors.js';
import { indirectLockspace, openLeaseResource } from '../lockspaces/indirect.js';
import { checkSanlockConfig, sanlockLockspace } from '../lockspaces/sanlock.js';
import { directLockspace, lockModeOf, LEASE_RANGE, type Lease, type LockspaceConfig, type Lockspace, type ResourceMode } from '../lockspaces/driver.js';
import { decodeToken, describeLockspace, encodeToken, sameLockspace, type TokenResource } from './token.js';
import { qemuProfile } from '../os/qemu.js';
import { acquireAll, releaseGuard, releaseOne, stillHeld, takeGuards, type AcquireOptions, type Resource } from './resources.js';
import { attachProcess, spawnSupervised, type ExitStatus, type SpawnOptions, type SupervisedProcess } from '../os/supervise.js';
import { checkOneOf, checkOptions, checkPath, checkSignal, checkTimeout, describe } from '../os/validate.js';

export type ManagerState = 'new' | 'starting' | 'incoming' | 'running' | 'migrating' | 'migrated' | 'stopping' | 'stopped' | 'freed';
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
  /** migrate: this manager is a migration target: start() takes the handover guard, completeMigrateIn() the leases. */
  flags?: { migrate?: boolean };
  /** Run verify() every this many milliseconds while running. */
  verifyInterval?: number;
}

export interface DiskSpec {
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

/** libvirt's lease: the file `<path>/<lockspace>/<key>`, in any lockspace. */
export interface LeaseSpec {
  type: 'lease';
  /** The lockspace's name: a directory under path. */
  lockspace: string;
  key: string;
  /** The directory that holds the lockspaces. */
  path: string;
  mode: ResourceMode;
}

export type ResourceSpec = DiskSpec | LeaseSpec;

export type ResourceRef = Pick<DiskSpec, 'type' | 'path'> | Omit<LeaseSpec, 'mode'>;

export interface WaitOptions {
  timeout?: number;
  signal?: AbortSignal;
}

export interface MigrateInOptions extends WaitOptions {
  /** Give up the incoming migration: drop the guard, stop the incoming child (graceMs, then SIGKILL), end 'stopped'. */
  cancel?: boolean;
  graceMs?: number;
}

export interface MigrateOutOptions extends WaitOptions {
  /** The migration failed: keep the leases, or take them back, and return to 'running'. */
  cancel?: boolean;
}

/** LockManager.fromInquire()'s options: a target's own configuration. */
export interface FromInquireOptions extends Omit<LockManagerOptions, 'flags' | 'attach'> {
  /** The target's resources, from its own configuration; the token must name exactly these. */
  resources: ResourceSpec[];
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
  /** How it was registered, for inquire(). */
  readonly spec: TokenResource;
}

/** A checked resource spec; mode is missing in a ResourceRef. */
type CheckedSpec = (Omit<DiskSpec, 'mode'> | Omit<LeaseSpec, 'mode'>) & { mode?: ResourceMode; qemuCompatible?: boolean };

/**
 * A resource's identity within this manager: the image file itself (so two
 * paths of one file, hard links included, are one resource in every
 * lockspace), or the lease's key for a named lease.
 */
function identityOf(lease: Lease): string {
  return lease.image?.identity.key ?? lease.key;
}

/** The states in which a supervised process runs. */
const WITH_CHILD: readonly ManagerState[] = ['incoming', 'running', 'migrating', 'migrated', 'stopping'];

/** The largest pid_t. */
const MAX_PID = 0x7fffffff;
/** The longest delay setTimeout/setInterval honour. */
const MAX_TIMER_MS = 2 ** 31 - 1;

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const PARAM_KEYS = ['id', 'uuid', 'name', 'uri'] as const;
const MODES = ['exclusive', 'shared', 'readonly'] as const;

/** kill(pid, 0): UnsupportedError (EPERM) when we may not signal the process, InvalidArgumentError when it does not exist. */
function checkSignallable(pid: number): void {
  try {
    process.kill(pid, 0);
  } catch (err) {
    const errno = -((err as NodeJS.ErrnoException).errno ?? 0);
    const cause = systemError(errno, 'kill');
    if ((err as NodeJS.ErrnoException).code === 'EPERM') {
      throw new UnsupportedError(`cannot attach to process ${pid}: this process may not signal it, so it could never stop or kill it (${cause.message})`, { cause });
    }
    throw new InvalidArgumentError(`cannot attach to process ${pid}: ${cause.message}`, { cause });
  }
}

function requireMode(mode: ResourceMode | undefined, what = 'resource.mode'): ResourceMode {
  if (mode === undefined) throw new InvalidArgumentError(`${what} must be one of ${MODES.map((m) => `'${m}'`).join(', ')}`);
  return mode;
}

function specText(r: TokenResource | CheckedSpec): string {
  const what = r.type === 'lease' ? `lease ${r.lockspace}/${r.key} in ${r.path}` : `disk ${r.path}`;
  return `${what} (${r.mode ?? 'no mode'}${r.type === 'disk' && r.qemuCompatible ? ', QEMU-compatible' : ''})`;
}

const specKey = (r: TokenResource | CheckedSpec): string =>
  r.type === 'lease' ? JSON.stringify(['lease', normalize(r.path), r.lockspace, r.key]) : JSON.stringify(['disk', normalize(r.path)]);

/**
 * Why a migration token's resources differ from the target's own, or null:
 * the same resources (by type and path, a lease also by lockspace and key),
 * each in the same mode and with the same QEMU-compatibility.
 */
function tokenMismatch(token: readonly TokenResource[], mine: readonly CheckedSpec[]): string | null {
  const theirs = new Map(token.map((r) => [specKey(r), r]));
  const ours = new Map(mine.map((r) => [specKey(r), r]));
  for (const [key, r] of theirs) {
    const m = ours.get(key);
    if (m === undefined) return `the token names ${specText(r)}, which this target did not register`;
    if (m.mode !== r.mode || (r.type === 'disk' && r.qemuCompatible !== (m.qemuCompatible === true))) {
      return `the token has ${specText(r)}, and this target ${specText(m)}`;
    }
  }
  for (const [key, m] of ours) if (!theirs.has(key)) return `this target registered ${specText(m)}, which the source does not hold`;
  return null;
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

function checkResource(value: unknown, what: string): CheckedSpec {
  if (value === undefined) throw new InvalidArgumentError(`${what} is required`);
  const type = checkOneOf(checkOptions<{ type?: unknown }>(value, ['type', 'path', 'mode', 'qemuCompatible', 'lockspace', 'key'], what).type, ['disk', 'lease'] as const, `${what}.type`);
  if (type === 'lease') {
    const spec = checkOptions<LeaseSpec>(value, ['type', 'path', 'mode', 'lockspace', 'key'], what);
    const path = checkPath(spec.path, `${what}.path`);
    for (const k of ['lockspace', 'key'] as const) {
      if (typeof spec[k] !== 'string') throw new InvalidArgumentError(`${what}.${k} must be a string, got ${describe(spec[k])}`);
    }
    const mode = spec.mode === undefined ? undefined : checkOneOf(spec.mode, MODES, `${what}.mode`);
    return { type, path: normalize(path), lockspace: spec.lockspace as string, key: spec.key as string, mode };
  }
  const spec = checkOptions<DiskSpec>(value, ['type', 'path', 'mode', 'qemuCompatible'], what);
  const path = checkPath(spec.path, `${what}.path`);
  if (spec.qemuCompatible !== undefined && typeof spec.qemuCompatible !== 'boolean') {
    throw new InvalidArgumentError(`${what}.qemuCompatible must be a boolean, got ${describe(spec.qemuCompatible)}`);
  }
  const mode = spec.mode === undefined ? undefined : checkOneOf(spec.mode, MODES, `${what}.mode`);
  return { type, path, mode, qemuCompatible: spec.qemuCompatible === true };
}

/**
 * acquireAll() that `stop` (the manager's own: the child's exit, shutdown,
 * free, a cancel) also ends, with stop's reason as the error. `wait` must be
 * explicit: stop is not the caller's signal.
 */
async function acquireUnless(stop: AbortSignal, resources: Iterable<Resource>, options: AcquireOptions & { wait: boolean }): Promise<void> {
  try {
    await acquireAll(resources, { ...options, signal: options.signal === undefined ? stop : AbortSignal.any([options.signal, stop]) });
  } catch (err) {
    if (stop.aborted) throw stop.reason as Error;
    throw err;
  }
}

function checkFlag(value: unknown, what: string): boolean {
  if (value !== undefined && typeof value !== 'boolean') throw new InvalidArgumentError(`${what} must be a boolean, got ${describe(value)}`);
  return value === true;
}

/** A URI naming the other side of a migration: informational, and checked to be the same across one migration's calls. */
function checkUri(value: unknown, what: string): string {
  if (typeof value !== 'string' || value === '' || value.includes('\0')) {
    throw new InvalidArgumentError(`${what} must be a non-empty string without NUL bytes, got ${describe(value)}`);
  }
  return value;
}

function makeLockspace(value: unknown): Lockspace {
  const kindOf = checkOptions<{ kind?: unknown }>(value, ['kind', 'dir', 'lockspace', 'path', 'hostId'], 'lockspace').kind;
  const kind = kindOf === undefined ? 'direct' : checkOneOf(kindOf, ['direct', 'indirect', 'sanlock'] as const, 'lockspace.kind');
  if (kind === 'sanlock') {
    return sanlockLockspace(checkSanlockConfig(checkOptions<Record<string, unknown>>(value, ['kind', 'lockspace', 'path', 'hostId'], 'lockspace')));
  }
  const config = checkOptions<{ dir?: unknown }>(value, ['kind', 'dir'], 'lockspace');
  if (kind === 'direct') {
    if (config.dir !== undefined) throw new InvalidArgumentError("lockspace.dir is for kind 'indirect'; a direct lockspace locks the images themselves");
    return directLockspace();
  }
  return indirectLockspace({ kind, dir: checkPath(config.dir, 'lockspace.dir') });
}

/** The lockmgr CLI shipped with this package (bin/lockmgr.js). */
const CLI = fileURLToPath(new URL('../../bin/lockmgr.js', import.meta.url));

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
  /** Aborts hotplug waits when the child exits or the manager stops or is freed. */
  #hotplugAbort: AbortController | null = null;
  /** Hotplugs in flight, by identity key: a second acquire of the same disk waits for the first. */
  readonly #hotplugs = new Map<string, Promise<{ wasHeld: boolean }>>();
  #stopped: Promise<void> | null = null;
  #shutdown: Promise<void> | null = null;
  #free: Promise<void> | null = null;
  #verifyTimer: NodeJS.Timeout | null = null;
  /** A migration target: start() takes guards, completeMigrateIn() the leases. */
  readonly #incoming: boolean;
  /** The target named by prepareMigrate(), while 'migrating' or 'migrated'. */
  #targetUri: string | null = null;
  /** A completeMigrateIn() or a take-back in progress. */
  #handover: Promise<void> | null = null;
  /** Aborts a completeMigrateIn() wait when it is cancelled. */
  #handoverAbort: AbortController | null = null;

  constructor(options?: LockManagerOptions) {
    super();
    const o = checkOptions<LockManagerOptions>(options, ['params', 'lockspace', 'lockLifetime', 'onLockFailure', 'attach', 'flags', 'verifyInterval'], 'LockManager options');
    for (const [k, v] of Object.entries(checkOptions<ManagerParams>(o.params, PARAM_KEYS, 'params'))) {
      if (v === undefined) continue;
      const [key, value] = checkParam(k, v);
      (this.#params as Record<string, unknown>)[key] = value;
    }
    this.#space = makeLockspace(o.lockspace);
    this.#space.onWarning = (err) => this.#warn(err);
    // An attached process cannot be handed the lock fds: its lifetime is the supervisor's.
    this.#lifetime = o.lockLifetime === undefined ? (o.attach === undefined ? 'child' : 'supervisor') : checkOneOf(o.lockLifetime, ['child', 'supervisor'] as const, 'lockLifetime');
    this.#onLockFailure = o.onLockFailure === undefined ? 'poweroff' : checkOneOf(o.onLockFailure, ['poweroff', 'pause', 'ignore'] as const, 'onLockFailure');
    if (o.attach !== undefined) {
      // pid_t is 32 bits: a larger number is no process, and would reach kill() as a type error.
      if (typeof o.attach !== 'number' || !Number.isInteger(o.attach) || o.attach <= 0 || o.attach > MAX_PID) {
        throw new InvalidArgumentError(`attach must be a process id (an integer > 0), got ${describe(o.attach)}`);
      }
      if (o.lockLifetime === 'child') {
        throw new InvalidArgumentError("lockLifetime 'child' cannot be used with attach: a running process cannot be handed the lock fds");
      }
      this.#attach = o.attach;
    }
    const flags = checkOptions<{ migrate?: boolean }>(o.flags, ['migrate'], 'flags');
    if (flags.migrate !== undefined && typeof flags.migrate !== 'boolean') {
      throw new InvalidArgumentError(`flags.migrate must be a boolean, got ${describe(flags.migrate)}`);
    }
    this.#incoming = flags.migrate === true;
    if (this.#incoming && this.#attach !== undefined) {
      throw new InvalidArgumentError('flags.migrate cannot be used with attach: a migration target spawns the incoming process');
    }
    this.#verifyInterval = checkTimeout(o.verifyInterval, 'verifyInterval');
    if (this.#verifyInterval === 0) throw new InvalidArgumentError('verifyInterval must be > 0 milliseconds');
    // setInterval() turns a longer delay into 1 ms: a check meant for once a month would run a thousand times a second.
    if (this.#verifyInterval !== undefined && this.#verifyInterval > MAX_TIMER_MS) {
      throw new InvalidArgumentError(`verifyInterval must be at most ${MAX_TIMER_MS} ms, got ${this.#verifyInterval}`);
    }
  }

  get state(): ManagerState {
    return this.#state;
  }

  /** The domain parameters, as set by the constructor and setParameter(). */
  get params(): Readonly<ManagerParams> {
    return { ...this.#params };
  }

  /** The registered and hot-plugged resources: path, mode and whether the lease is held now. */
  get resources(): Array<{ path: string; mode: ResourceMode; held: boolean; identity: string; lockFiles: string[] }> {
    return [...this.#resources.values()].map((r) => ({ path: r.path, mode: r.mode, held: r.held, identity: r.lease.key, lockFiles: r.lease.slots.map((s) => s.path) }));
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
    this.#open(checkResource(spec, 'resource'), false);
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
    this.#startAbort = new AbortController();
    const abort = signal === undefined ? this.#startAbort.signal : AbortSignal.any([signal, this.#startAbort.signal]);
    const wait = timeout !== undefined || signal !== undefined;
    // Assigned before 'starting' is emitted, and the work begins a microtask
    // later: a 'state' listener that calls free() finds something to abort.
    this.#starting = Promise.resolve().then(() => this.#start(command, args, spawnOpts, { timeout, signal: abort, wait }));
    this.#setState('starting');
    try {
      await this.#starting;
    } finally {
      this.#starting = null;
      this.#startAbort = null;
    }
  }

  async #start(command: string | undefined, args: readonly string[], spawnOptions: SpawnOptions, wait: AcquireOptions): Promise<void> {
    const abandoned = (): boolean => this.#free !== null || this.#state !== 'starting';
    const deadline = wait.timeout === undefined ? undefined : Date.now() + wait.timeout;
    try {
      if (abandoned()) throw new AbortError('start() was abandoned: free() was called', { cause: wait.signal?.reason });
      // A migration target takes only the guard now; the source still holds the leases.
      if (this.#incoming) await takeGuards(this.#resources.values(), wait);
      // A lockspace whose leases belong to a process (sanlock) acquires for the child before it execs, below.
      else if (this.#space.spawnGated === undefined) await acquireAll(this.#resources.values(), wait);
      if (abandoned()) {
        this.#releaseAll();
        throw new AbortError('start() was abandoned: free() was called', { cause: wait.signal?.reason });
      }
    } catch (err) {
      this.#setState('new');
      throw err;
    }
    let child: SupervisedProcess;
    try {
      if (this.#attach !== undefined) {
        // A process we may not signal could never be stopped or killed, and
        // shutdown()/free() would be stuck: refuse it before watching it.
        if (this.#space.spawnGated !== undefined) throw new UnsupportedError(`a ${this.#space.config.kind} lockspace cannot attach to a running process: its leases belong to a process that registered with the lock service before it started`);
        checkSignallable(this.#attach);
        child = attachProcess(this.#attach);
      } else {
        // Under both lifetimes the child gets the lease fds. For 'supervisor'
        // that is not redundant: a dying process's files are closed before its
        // children get their parent-death signal, so with the fds in the
        // supervisor alone the child would run unlocked for that moment (the
        // lifetime test's observer saw it). With a copy in the child, the
        // locks go only when the child is gone.
        // A migration target's child gets the lease files unlocked: the leases
        // completeMigrateIn() takes on the same open file descriptions are then
        // the child's too.
        const keepFds = [...(spawnOptions.keepFds ?? []), ...this.#leaseFds()];
        if (this.#space.spawnGated !== undefined) {
          // The child waits before exec while its leases are taken for its pid; a target's incoming child execs at once.
          const incoming = this.#incoming;
          // It execs only if start() still waits for it: free(), the signal and the deadline close the gate (the helper exits, the leases go).
          const beforeExec = async (pid: number, signal: AbortSignal): Promise<void> => {
            if (!incoming) await acquireAll(this.#resources.values(), { ...wait, timeout: deadline === undefined ? undefined : Math.max(0, deadline - Date.now()), signal });
            if (abandoned()) throw new AbortError('start() was abandoned: free() was called', { cause: wait.signal?.reason });
          };
          child = await this.#space.spawnGated(command!, args, { ...spawnOptions, keepFds }, beforeExec, { signal: wait.signal, timeout: wait.timeout, deadline });
        } else {
          child = spawnSupervised(command!, args, { ...spawnOptions, keepFds });
        }
        this.#command = [command!, ...args];
      }
    } catch (err) {
      this.#releaseAll();
      this.#setState('new');
      throw err;
    }
    this.#child = child;
    this.#hotplugAbort = new AbortController();
    this.#stopped = child.exited.then(async (status) => this.#onExit(status, (await this.#space.exitFailure?.(status)) ?? null));
    if (this.#incoming) {
      this.#setState('incoming');
      return;
    }
    this.#setState('running');
    this.#startVerify();
  }

  #startVerify(): void {
    if (this.#verifyInterval === undefined || this.#verifyTimer !== null) return;
    this.#verifyTimer = setInterval(() => {
      if (this.#state === 'running' || this.#state === 'migrating') this.verify().catch((err: unknown) => this.#warn(err));
    }, this.#verifyInterval);
    this.#verifyTimer.unref();
  }

  #leaseFds(): number[] {
    return [...this.#resources.values()].flatMap((r) => r.lease.slots.map((s) => s.file.fd));
  }

  /**
   * Hotplug: acquires one more resource while running. It is held by the
   * supervisor (a running child cannot be handed new fds), so under lockLifetime
   * 'child' it is the one lease that does not outlive the supervisor. Held
   * already in this mode: a no-op. Failures leave the manager running.
   */
  async acquireResource(spec: ResourceSpec, options?: WaitOptions): Promise<{ wasHeld: boolean }> {
    this.#require('acquireResource', ['running']);
    const checked = checkResource(spec, 'resource');
    const wait = checkOptions<WaitOptions>(options, ['timeout', 'signal'], 'acquireResource options');
    const timeout = checkTimeout(wait.timeout);
    const signal = checkSignal(wait.signal);
    for (;;) {
      const r = this.#open(checked, true);
      if (r.held) return { wasHeld: true };
      const key = identityOf(r.lease);
      const inFlight = this.#hotplugs.get(key);
      if (inFlight !== undefined) {
        // Another acquire of this disk is under way: let it finish, then look again.
        await inFlight.catch(() => undefined);
        this.#require('acquireResource', ['running']);
        continue;
      }
      const attempt = this.#hotplug(r, { timeout, signal });
      this.#hotplugs.set(key, attempt);
      try {
        return await attempt;
      } finally {
        if (this.#hotplugs.get(key) === attempt) this.#hotplugs.delete(key);
      }
    }
  }

  async #hotplug(r: ManagedResource, w: WaitOptions): Promise<{ wasHeld: boolean }> {
    const stop = this.#hotplugAbort!.signal;
    const wait = w.timeout !== undefined || w.signal !== undefined;
    try {
      await acquireUnless(stop, [r], { timeout: w.timeout, signal: w.signal, wait });
    } catch (err) {
      if (r.hotplugged) this.#forget(r);
      throw err;
    }
    if (this.#state !== 'running') {
      // The child exited or free() ran while we acquired: nothing may hold this now.
      this.#forget(r);
      throw new InvalidStateError(`acquireResource: the manager became '${this.#state}' while acquiring ${r.path}; the lease was released`);
    }
    return { wasHeld: false };
  }

  /** Releases one resource while running. Not held: { wasHeld: false }. */
  async releaseResource(ref: ResourceRef): Promise<{ wasHeld: boolean }> {
    this.#require('releaseResource', ['running']);
    const r = this.#find(checkResource(ref, 'resource'));
    if (r === undefined || !r.held) return { wasHeld: false };
    releaseOne(r);
    this.#forget(r);
    return { wasHeld: true };
  }

  /**
   * The lock state a migration target needs (RFC Inquire): an opaque,
   * versioned token naming this lock manager, its lockspace, the domain
   * parameters and every resource with its mode. The target passes it to
   * LockManager.fromInquire(). Allowed in every state but 'freed'.
   */
  inquire(): string {
    this.#require('inquire', ['new', 'starting', 'incoming', 'running', 'migrating', 'migrated', 'stopping', 'stopped']);
    return encodeToken({ lockspace: this.#space.config, params: this.params, resources: [...this.#resources.values()].map((r) => r.spec), leaseState: this.#space.migrationState?.() });
  }

  /**
   * A migration target for the source that made `token` with inquire(), in
   * state 'new' with flags.migrate. The target's own configuration names its
   * resources (`options.resources`, as libvirt's target has the domain
   * definition): they are registered, and the token must list exactly the same
   * ones in the same modes. A path that only the token names is never opened.
   * InvalidArgumentError for a truncated, altered or foreign token, one from
   * another lockspace than options.lockspace (default: direct), or one whose
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
    if (!sameLockspace(mgr.#space.config, state.lockspace)) {
      throw new InvalidArgumentError(
        `the migration token comes from a lockspace ${describeLockspace(state.lockspace)}, and this manager's is ${describeLockspace(mgr.#space.config)}: ` +
          'source and target must lock the same files, or neither excludes the other',
      );
    }
    mgr.#space.setMigrationState?.(state.leaseState);
    try {
      for (const spec of specs) mgr.#open(spec, false);
    } catch (err) {
      for (const r of mgr.#resources.values()) r.lease.close();
      mgr.#resources.clear();
      mgr.#setState('freed');
      throw err;
    }
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
    if (checkFlag(o.cancel, 'cancel')) {
      if (!this.#incoming) this.#require('completeMigrateIn', ['incoming']);
      this.#require('completeMigrateIn', ['incoming', 'stopping', 'stopped']);
      this.#handoverAbort?.abort(new InvalidStateError('completeMigrateIn({ cancel: true }) was called while it was waiting; nothing was acquired'));
      await this.#handover?.catch(() => undefined);
      // The handover may have completed before the abort reached it: then the
      // VM runs here now, and cancelling would stop the only copy of it.
      this.#require('completeMigrateIn({ cancel: true })', ['incoming', 'stopping', 'stopped']);
      if (this.#state === 'incoming') for (const r of this.#resources.values()) releaseGuard(r);
      await this.shutdown({ graceMs });
      return;
    }
    this.#require('completeMigrateIn', ['incoming']);
    if (this.#handover !== null) throw new InvalidStateError('completeMigrateIn() is already in progress');
    this.#handoverAbort = new AbortController();
    const stop = AbortSignal.any([this.#hotplugAbort!.signal, this.#handoverAbort.signal]);
    this.#handover = (async () => {
      try {
        await acquireUnless(stop, this.#resources.values(), { wait: true, timeout, signal, checkGuard: false });
      } catch (err) {
        if (err instanceof LockTimeoutError) {
          throw new LockTimeoutError(`completeMigrateIn: the source (${uri}) did not let go in time: ${err.message}`, { timeout: err.timeout, holder: err.holder, cause: err });
        }
        throw err;
      }
      if (this.#state !== 'incoming') {
        this.#releaseAll();
        throw new InvalidStateError(`completeMigrateIn: the manager became '${this.#state}' while it waited; the leases were released`);
      }
      // Only now: from the source's release to here, the guard kept fresh acquirers out.
      for (const r of this.#resources.values()) releaseGuard(r);
      // The source's lease versions were for this handover only (sanlock): a later hotplug acquires afresh.
      this.#space.setMigrationState?.(undefined);
      this.#setState('running');
      this.#startVerify();
    })();
    try {
      await this.#handover;
    } finally {
      this.#handover = null;
      this.#handoverAbort = null;
    }
  }

  /**
   * Source: a migration to `targetUri` begins: 'running' -> 'migrating'.
   * Hotplug is refused until it ends, so the token this returns (inquire())
   * stays true for the whole migration: give this one to the target.
   */
  async prepareMigrate(targetUri: string): Promise<string> {
    const uri = checkUri(targetUri, 'targetUri');
    this.#require('prepareMigrate', ['running']);
    if (this.#hotplugs.size > 0) {
      throw new InvalidStateError('prepareMigrate(): an acquireResource() is still in progress; await it first');
    }
    this.#targetUri = uri;
    this.#setState('migrating');
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
    this.#require('completeMigrateOut', ['migrating', 'migrated']);
    if (uri !== this.#targetUri) {
      throw new InvalidArgumentError(`completeMigrateOut(): the migration in progress is to ${describe(this.#targetUri)}, not ${describe(uri)}`);
    }
    if (this.#handover !== null) throw new InvalidStateError('completeMigrateOut({ cancel: true }) is already taking the leases back');
    if (!cancel) {
      if (this.#state === 'migrated') return;
      this.#stopVerify();
      // The child shares these open file descriptions: a take-back must lock
      // the same ones, so an indirect lock file is pinned, not deleted.
      this.#releaseAll({ keepFiles: true });
      // 'migrated' means released: a lock service called from a native thread must have answered.
      await this.#space.settled?.();
      this.#setState('migrated');
      return;
    }
    if (this.#state === 'migrated') {
      const stop = this.#hotplugAbort!.signal;
      this.#handover = (async () => {
        // Not a fresh acquire: the target's guard is expected, and this is the source taking back its own.
        await acquireUnless(stop, this.#resources.values(), { timeout, signal, wait: timeout !== undefined || signal !== undefined, checkGuard: false });
        if (this.#state !== 'migrated') {
          this.#releaseAll();
          throw new InvalidStateError(`completeMigrateOut: the manager became '${this.#state}' while it took the leases back; they were released`);
        }
      })();
      try {
        await this.#handover;
      } finally {
        this.#handover = null;
      }
    }
    this.#targetUri = null;
    this.#setState('running');
    this.#startVerify();
  }

  /** The supervised process. */
  getChild(): { pid: number } {
    this.#require('getChild', WITH_CHILD);
    return { pid: this.#child!.pid };
  }

  /** Sends a signal to the supervised process through its pidfd (no pid-reuse race). false once it has exited. */
  signal(signal: NodeJS.Signals | number): boolean {
    this.#require('signal', WITH_CHILD);
    return this.#child!.signal(signal);
  }

  /** The lockmgr CLI that can hold the same resources in a separate process. */
  supervisorPath(): string {
    return CLI;
  }

  /**
   * argv for supervisorPath(): `run`, the resources, lifetime and params, `--`,
   * and the command when start() was given one. InvalidStateError when the CLI
   * cannot express this manager: an attached process, or QEMU-compatible
   * locks on some resources but not all (the CLI's flag applies to all).
   */
  supervisorArgs(): string[] {
    if (this.#attach !== undefined) throw new InvalidStateError('supervisorArgs(): lockmgr run cannot attach to a running process');
    if (this.#incoming) throw new InvalidStateError('supervisorArgs(): lockmgr run cannot be a migration target');
    if (this.#space.config.kind === 'sanlock') throw new InvalidStateError('supervisorArgs(): lockmgr run does not take a sanlock lockspace yet');
    const resources = [...this.#resources.values()];
    if (resources.some((r) => r.lease.kind === 'lease')) throw new InvalidStateError('supervisorArgs(): lockmgr run takes disks only, not leases');
    const qemu = resources.filter((r) => r.qemu !== undefined).length;
    if (qemu > 0 && qemu < resources.length) {
      throw new InvalidStateError('supervisorArgs(): lockmgr run applies --qemu-compatible to every resource, and only some of these are QEMU-compatible');
    }
    const argv = ['run'];
    if (this.#space.config.kind === 'indirect') argv.push('--lockspace', this.#space.config.dir);
    for (const r of resources) argv.push(`--${r.mode}`, r.path);
    if (qemu > 0) argv.push('--qemu-compatible');
    argv.push('--lifetime', this.#lifetime);
    for (const key of ['name', 'uuid', 'id', 'uri'] as const) {
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
    this.#require('verify', ['running', 'migrating']);
    const lostResources = [...this.#resources.values()].filter((r) => r.held && !stillHeld(r));
    // Leases that are no OFD lock (sanlock) are asked of their lock service.
    const owned = [...this.#resources.values()].filter((r) => r.held && r.lease.owned?.stillHeld !== undefined);
    if (owned.length > 0) {
      const ok = await Promise.all(owned.map((r) => r.lease.owned!.stillHeld!()));
      if (this.#state !== 'running' && this.#state !== 'migrating') return { lost: [] };
      lostResources.push(...owned.filter((r, i) => !ok[i] && r.held));
    }
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
    if (WITH_CHILD.includes(this.#state) && this.#state !== 'stopping' && this.#shutdown === null) {
      const child = this.#child!;
      const before = this.#state;
      // stop() sends SIGTERM before it returns; if that fails (a process we
      // may no longer signal), the manager is still running, not stopping.
      const stopping = child.stop({ graceMs });
      this.#setState('stopping');
      this.#abortHotplugs('shutdown() was called');
      this.#shutdown = stopping.then(
        () => this.#stopped!,
        (err: unknown) => {
          this.#shutdown = null;
          if (this.#state === 'stopping' && child.exitStatus === null) this.#setState(before);
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
    this.#abortHotplugs('free() was called');
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
    for (const r of this.#resources.values()) r.lease.close();
    this.#resources.clear();
    this.#setState('freed');
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.free();
  }

  #onExit(status: ExitStatus, lost: string | null = null): void {
    this.#stopVerify();
    this.#abortHotplugs('the supervised process exited');
    // The lock service killed the child for a lease it could no longer renew (sanlock): it applied 'poweroff' itself.
    if (lost !== null) for (const r of this.#resources.values()) if (r.held) this.#emitSafe('lock-failure', { resource: r.path, reason: lost, action: 'poweroff' });
    // The child is reaped: only now may its leases go (invariant 2).
    this.#releaseAll();
    if (this.#state !== 'freed') this.#setState('stopped');
    this.#emitSafe('exit', status);
  }

  #abortHotplugs(why: string): void {
    this.#hotplugAbort?.abort(new InvalidStateError(`${why} while it was waiting; nothing was acquired`));
  }

  /** Opens the lease of a checked spec. */
  #openLease(spec: CheckedSpec, mode: ResourceMode): Lease {
    if (spec.type === 'lease' && this.#space.config.kind === 'sanlock') {
      throw new UnsupportedError("a sanlock lockspace takes disks only: { type: 'lease' } is an OFD lock file, which would not exclude other hosts");
    }
    if (spec.type === 'lease') return openLeaseResource({ lockspace: spec.lockspace, key: spec.key, path: spec.path }, mode);
    return this.#space.openDisk(spec.path, mode);
  }

  /** Opens (or finds) the resource for a spec; throws if it is registered differently. */
  #open(spec: CheckedSpec, hotplug: boolean): ManagedResource {
    const mode = requireMode(spec.mode);
    const qemuCompatible = spec.qemuCompatible === true;
    const lease = this.#openLease(spec, mode);
    const path = lease.path;
    const existing = this.#resources.get(identityOf(lease));
    if (existing !== undefined) {
      lease.close();
      const same = existing.path === path ? `'${path}'` : `'${path}' (the same ${lease.kind === 'lease' ? 'lease' : 'file'} as '${existing.path}')`;
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
      for (const slot of lease.slots) slot.file.getConflict(lockModeOf(mode), LEASE_RANGE);
    } catch (err) {
      lease.close();
      throw err;
    }
    const token: TokenResource =
      spec.type === 'lease' ? { type: 'lease', lockspace: spec.lockspace, key: spec.key, path: spec.path, mode } : { type: 'disk', path, mode, qemuCompatible };
    const r: ManagedResource = { path, mode, lease, held: false, guarded: false, hotplugged: hotplug, spec: token, qemu: qemuCompatible ? qemuProfile(mode) : undefined };
    this.#resources.set(identityOf(lease), r);
    return r;
  }

  #find(spec: CheckedSpec): ManagedResource | undefined {
    if (spec.type === 'lease') {
      // A lease is named by its spec alone: no probe, which would create its directory.
      for (const r of this.#resources.values()) {
        if (r.spec.type === 'lease' && r.spec.path === spec.path && r.spec.lockspace === spec.lockspace && r.spec.key === spec.key) return r;
      }
      return undefined;
    }
    for (const r of this.#resources.values()) if (r.path === spec.path) return r;
    let key: string;
    try {
      const probe = this.#openLease(spec, 'readonly');
      key = identityOf(probe);
      probe.close();
    } catch {
      return undefined;
    }
    return this.#resources.get(key);
  }

  #forget(r: ManagedResource): void {
    releaseOne(r);
    r.lease.close();
    const key = identityOf(r.lease);
    if (this.#resources.get(key) === r) this.#resources.delete(key);
  }

  #releaseAll(options: { keepFiles?: boolean } = {}): void {
    for (const r of this.#resources.values()) {
      try {
        releaseOne(r, options);
        releaseGuard(r);
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
    try {
      (this.emit as (e: K, ...a: LockManagerEvents[K]) => boolean)(event, ...args);
    } catch (err) {
      this.#warn(err);
    }
  }

  #setState(state: ManagerState): void {
    const previous = this.#state;
    // 'freed' is final, whatever a late step of start() or an exit may want.
    if (previous === state || previous === 'freed') return;
    this.#state = state;
    this.#emitSafe('state', state, previous);
  }

  #require(method: string, allowed: readonly ManagerState[]): void {
    if (!allowed.includes(this.#state)) {
      throw new InvalidStateError(`${method}() is not allowed in state '${this.#state}'; it is allowed in ${allowed.map((s) => `'${s}'`).join(', ')}`);
    }
  }
}

export type { ExitStatus, ProcessInfo };

// The lockspace driver contract: the one table of operations every lockspace
// implements, and the capabilities it declares (as libvirt's lock_driver.h
// declares USES_STATE and friends). The manager (lib/manager) dispatches
// through it and decides from capabilities, never from a kind; no file outside
// lib/lockspaces names a backend. docs/architecture.md is this file in prose.
import type { LockHolders, ProcessInfo, ResourceBusyError } from '../os/errors.js';
import type { LockableFile } from '../os/locks.js';
import type { ExitStatus, SpawnOptions, SupervisedProcess } from '../os/supervise.js';

export type ResourceMode = 'exclusive' | 'shared' | 'readonly';

/** A resource as its owner names it: a disk (regular file or block device), or libvirt's named lease. */
export type ResourceName = { type: 'disk'; path: string } | { type: 'lease'; lockspace: string; key: string; path: string };

/** A lockspace's configuration, as the caller gives it and as a migration token carries it. */
export interface LockspaceConfig {
  readonly kind: string;
}

/** What a lockspace can do. Every difference between lockspaces a user can see is one of these. */
export interface Capabilities {
  /**
   * A process that is already running can be supervised (LockManager's
   * `attach`): the supervisor holds its leases for it. Without it, leases
   * belong to a process that registered with the lock service before it ran.
   */
  readonly attach: boolean;
  /**
   * A running process that holds its leases (started by another manager under
   * lockLifetime 'child', whose supervisor is gone) can be adopted
   * (LockManager.adopt): the new manager takes over the very leases the
   * process holds, verifies each, and acts as if it had started it. Without
   * it, adopt() is refused.
   */
  readonly adopt: boolean;
  /**
   * A migration target holds a handover guard from its start() until it holds
   * the leases, so no third party gets a lease between the source's release
   * and the target's acquire. Without it, a third party that takes a lease
   * during a handover makes the target fail: never two holders, but the
   * migration is lost.
   */
  readonly handoverGuard: boolean;
  /**
   * A held lease can be lost by something outside the protocol (a lock file
   * deleted by a tmp cleaner, a lease the lock service could not renew):
   * verify() finds it, and `lockmgr run` verifies by default.
   */
  readonly losable: boolean;
  /**
   * Leases taken while the process runs (hotplug) are the process's own, as
   * the ones taken at start are: they outlive a killed supervisor under
   * lockLifetime 'child'. Without it they are the supervisor's only.
   */
  readonly hotplugHeldByChild: boolean;
  /** The lockspace has state of its own that a migration target needs (exportState/importState; libvirt's USES_STATE). */
  readonly migrationState: boolean;
  /** Leases exclude across hosts that share the lockspace's storage, not only within one running kernel. */
  readonly multiHost: boolean;
  /**
   * A readonly lease and a shared (writing) one exclude each other: a reader
   * of a base image or install medium must see no writer at all. Readers
   * still share with readers, shared writers with shared writers. Without it,
   * readonly and shared are compatible, as in lockmgr before issue 14.
   */
  readonly readersExcludeWriters: boolean;
}

export type Capability = keyof Capabilities;

/** A resource's lease in a lockspace: opened, not yet taken. */
export interface Lease {
  /**
   * The resource's identity in this lockspace: the same string in every
   * process (and, where the lockspace is shared, every host) that names this
   * resource. Sorts the one global lock order.
   */
  readonly key: string;
  /** The path the resource was registered with (a named lease: its lock file). */
  readonly path: string;
  readonly kind: 'file' | 'block-device' | 'lease';
  readonly mode: ResourceMode;
  /**
   * The image, open for the file's identity (hard links and symlinks are one
   * resource); the manager reopens it through /proc/self/fd for QEMU's own
   * locks. null for a named lease.
   */
  readonly image: LockableFile | null;
  /** Descriptors the supervised process inherits so that the lease is its own too (OFD locks belong to the open file description). */
  readonly fds: readonly number[];
  /** Where the lease lives, for `resources` and messages: lock files, or the lock service's resource. */
  readonly locations: readonly string[];
  /**
   * Releases everything it holds and closes it. Idempotent. keepLocks: only
   * closes this process's descriptors or handles, so a lease adopted from a
   * process that still holds it stays that process's (an adoption given up).
   */
  close(options?: { keepLocks?: boolean }): void;
}

export interface TakeOptions {
  /** Wait while someone else holds a conflicting lease (else fail fast). */
  wait: boolean;
  timeout?: number;
  signal?: AbortSignal;
  /** With wait: called before each wait for a busy lease, with the busy error it would have been (who is in the way). */
  onBusy?: (busy: ResourceBusyError) => void;
}

/** What stops a start before the command runs. */
export interface StartLimits {
  /** free() or the caller's abort. */
  signal?: AbortSignal;
  /** start()'s timeout, and its deadline (Date.now() based). */
  timeout?: number;
  deadline?: number;
}

/** How the manager asks a lockspace to start the supervised process. */
export interface StartPlan {
  /** The command, or attach: the pid of a running process to supervise. */
  command?: string;
  args: readonly string[];
  spawnOptions: SpawnOptions;
  attach?: number;
  /** The leases the process is started with (their fds go to it where the lockspace needs that). */
  leases: readonly Lease[];
  /**
   * Takes what the process must hold before it runs (the leases, or a
   * migration target's guards). The lockspace calls it where its leases must
   * be taken: before the spawn, or for the child's pid before it execs.
   */
  take(signal: AbortSignal | undefined): Promise<void>;
  limits: StartLimits;
}

/** A lease's state as `lockmgr status` shows it, read without creating or locking anything. */
export interface LeaseStatus {
  /** The lockspace, in a few words ('direct', 'indirect (dir /var/lib/lockmgr)'). */
  lockspace: string;
  /**
   * Each place the lease lives, with what holds it now. `holders`: where the
   * lease is a byte-range lock on a file, the processes holding byte 0 (and
   * the file's other openers), so that status can name them.
   */
  locations: Array<{ what: string; path: string; exists: boolean; lease: ByteStatus; guard: ByteStatus | null; holders?: LockHolders; detail?: Record<string, unknown> }>;
}

export interface ByteStatus {
  /** 'held': held, in a mode the lockspace cannot tell (a sanlock lease with one owner). */
  state: 'free' | 'exclusive' | 'shared' | 'held';
  /** Who holds it, where the lockspace can tell: a host, or the conflicting lock. */
  holder: { mode: 'exclusive' | 'shared'; start: number; length: number; pid: number } | null;
  /** A host (multi-host lockspaces). */
  host?: string;
}

/**
 * A lockspace: where a resource's lease lives and how it is taken. Every
 * lockspace implements all of it; what it cannot do it declares in its
 * capabilities, and the manager refuses such a combination when it is asked
 * for, with UnsupportedError naming the capability.
 */
export interface LockspaceDriver {
  readonly kind: string;
  /** Its configuration, normalized (a token carries it; sameAs() compares it). */
  readonly config: LockspaceConfig;
  readonly capabilities: Capabilities;
  /** Where failures with no caller go (the manager's 'warning' event). */
  onWarning: (err: unknown) => void;

  /** Opens a resource's lease; nothing is locked. InvalidArgumentError, ResourceAccessError, UnsupportedError. */
  open(name: ResourceName, mode: ResourceMode): Lease;
  /**
   * Takes every lease, all or none, in the one global order (by key: the same
   * in every process, so two managers never deadlock). A busy lease is a
   * ResourceBusyError naming who holds it; a wait that ends is
   * LockTimeoutError or AbortError; the error says which leases were released
   * again (rolledBack). A lease held by a migration target's guard is busy
   * with migrationInProgress, unless `checkGuard` is false (the handover itself).
   */
  acquire(leases: readonly Lease[], options: TakeOptions & { checkGuard?: boolean }): Promise<void>;
  /**
   * Releases one lease. keepFiles: the child shares these open file
   * descriptions and the same ones may be taken again (a migration source that
   * may take its leases back).
   */
  release(lease: Lease, options?: { keepFiles?: boolean }): void;
  /**
   * For each lease, the processes other than this one that hold it with us (one pass for all): after the
   * supervised process was reaped, those it started and left running with the
   * lease's open file descriptions (a daemonized command; docs/contract.md,
   * "Orphans"). Empty where a lease is not an open file description.
   * bornSince: the supervised process's start time (processStartTime): only
   * processes started since then can have inherited its fds.
   */
  sharers(leases: readonly Lease[], options?: { bornSince?: bigint }): Map<Lease, ProcessInfo[]>;
  /**
   * Lets go of the lease without unlocking it: closes our part, so the lease
   * stays held for exactly as long as its sharers keep it. Then as close().
   */
  abandon(lease: Lease): void;
  /** A migration target's guard, all or none, in the global order (capability handoverGuard; a no-op without it). */
  guard(leases: readonly Lease[], options: TakeOptions): Promise<void>;
  releaseGuard(lease: Lease): void;
  /**
   * Takes over the lease of `name` that the running process `holder` holds in
   * `mode` (capability adopt): the returned lease is held, by the holder and
   * by us alike, as if this manager had acquired it for it. Nothing is opened
   * but what `name` names. InvalidArgumentError when the process does not hold
   * it in that mode (nothing is held then, nothing left open);
   * UnsupportedError without the capability.
   */
  adopt(name: ResourceName, mode: ResourceMode, holder: SupervisedProcess): Promise<Lease>;
  /** Whether the lease is still held (asked of the kernel or the lock service). */
  verify(lease: Lease): Promise<boolean>;
  /** Spawns or attaches the supervised process the way this lockspace ties leases to it (see StartPlan.take). */
  start(plan: StartPlan): Promise<SupervisedProcess>;
  /** After the process exited: why, if the lock service killed it for a lost lease; resolves once its leases are free for others. */
  exitFailure(status: ExitStatus): Promise<string | null>;
  /** Resolves once every queued release has reached the lock service. */
  settled(): Promise<void>;
  /** The lock state a migration target acquires with (capability migrationState; else undefined). */
  exportState(): string | undefined;
  importState(state: string | undefined): void;
  /** Whether a configuration (a migration token's) names the same lockspace: source and target must lock the same things. */
  sameAs(config: LockspaceConfig): boolean;
  /** How a human reads it: 'direct', 'indirect (dir /var/lib/lockmgr)'. */
  describe(): string;
  /** How `lockmgr run --lockspace` names it (lib/lockspaces/index.ts parses it back). */
  cliSpec(): string;
  /** Where `path`'s lease lives and who holds it, without creating or locking anything (`lockmgr status`). */
  inspect(name: ResourceName): Promise<LeaseStatus>;
}

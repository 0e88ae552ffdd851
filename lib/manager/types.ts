// The LockManager's public types (docs/contract.md).
import type { ResourceMode } from '../lockspaces/driver.js';
import type { LockspaceOptions } from '../lockspaces/index.js';
import type { LockManagerError, ProcessInfo, ResourceBusyError } from '../os/errors.js';
import type { ExitStatus } from '../os/supervise.js';
import type { ManagerState } from './states.js';

export type { ResourceMode, LockspaceOptions, ManagerState };

export type LockLifetime = 'child' | 'supervisor';
export type LockFailureAction = 'poweroff' | 'pause' | 'ignore';

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
  /** Where the leases live (default: on the images themselves): docs/lockspaces.md. */
  lockspace?: LockspaceOptions;
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

/**
 * LockManager.adopt()'s options: the adopting supervisor's own configuration,
 * as the one that started the VM had it.
 */
export interface AdoptOptions extends Omit<LockManagerOptions, 'flags' | 'attach' | 'lockLifetime'> {
  /**
   * Every resource the VM holds that this manager takes over, with its mode,
   * from the caller's configuration: each must be held by the process in that
   * mode, and nothing else is opened.
   */
  resources: ResourceSpec[];
  /** Only 'child' (the default): an adopted process is not ours to kill when we die, and keeps its leases. */
  lockLifetime?: 'child';
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

/**
 * A lease the supervised process left behind: when it was reaped, other
 * processes (ones it started: a daemon, a background job) still had the
 * lease's open file descriptions, or the resource's QEMU descriptor
 * (qemuDescriptors), and so their locks. The manager unlocked neither: each
 * stays held until the last of them exits or closes it.
 */
export interface Orphans {
  resource: string;
  processes: ProcessInfo[];
  /** What they still have open: 'lease' (the lease's descriptions), 'qemu' (the QEMU descriptor, with QEMU's locks), or both. */
  through: Array<'lease' | 'qemu'>;
}

export interface LockManagerEvents {
  state: [state: ManagerState, previous: ManagerState];
  /** Emitted before 'exit', once per resource left to orphans. */
  orphans: [orphans: Orphans];
  exit: [status: ExitStatus];
  'lock-failure': [failure: LockFailure];
  warning: [warning: LockManagerError];
  /**
   * A wait for a busy resource begins (start(), acquireResource() or a
   * migration step that was given a timeout or signal): `busy` is the error
   * it would have failed with, naming who is in the way. Once per lease waited for.
   */
  wait: [busy: ResourceBusyError];
}


// Leases that are OFD locks on files: what the direct lockspace (the image
// itself) and the indirect one (lock files in a shared directory) share.
//
// Every lease file uses the same bytes:
//   byte 0  the lease: a write lock is exclusive, a read lock shared/readonly.
//           libvirt's virtlockd locks the same byte, so the two exclude each other.
//   byte 1  the migration guard: locked by a migration target from its start()
//           until it holds the lease, in the lease's mode (docs/contract.md,
//           "Migration").
//   byte 2  a pin (indirect lock files only): read-locked by a migration
//           source that released its lease but may take it back, so that the
//           file its child shares is not deleted and recreated meanwhile.
// QEMU's own image locks live at bytes 100 and up (lib/os/qemu.ts) and are
// taken on the image itself (Lease.image), whatever the lockspace.
//
// An OFD lock belongs to the open file description: the supervised process is
// given the lease fds, so the leases are its own too and outlive a killed
// supervisor (lockLifetime 'child'), and any running process can be attached.
import { lstatSync } from 'node:fs';
import { LockTimeoutError, ResourceBusyError, holdersOf, type LockHolder, type LockHolders } from '../os/errors.js';
import { openLockable, type ByteRange, type LockableFile, type LockMode } from '../os/locks.js';
import { holdersWords, lockHolders } from '../os/proc-locks.js';
import { canonicalBlockNode, openDiskFile } from '../os/disks.js';

export { canonicalBlockNode, openDiskFile };
import { attachProcess, spawnSupervised, type ExitStatus, type SupervisedProcess } from '../os/supervise.js';
import { byKey, checkMode, deadlineOf, remaining, rolledBack } from './common.js';
import type { Capabilities, Lease, LeaseStatus, LockspaceConfig, LockspaceDriver, ResourceMode, ResourceName, StartPlan, TakeOptions } from './driver.js';

export const LEASE_RANGE: Readonly<ByteRange> = Object.freeze({ start: 0, length: 1 });
export const GUARD_RANGE: Readonly<ByteRange> = Object.freeze({ start: 1, length: 1 });
export const PIN_RANGE: Readonly<ByteRange> = Object.freeze({ start: 2, length: 1 });

/** The lock that stands for a resource mode. libvirt leaves readonly disks unlocked; we take a read lock, so a reader and an exclusive writer exclude each other. */
export function lockModeOf(mode: ResourceMode): LockMode {
  return mode === 'exclusive' ? 'exclusive' : 'shared';
}

/** One file that carries a lease, or part of one. */
export interface LeaseSlot {
  /** The open lock file. An indirect slot may replace it in take(): read it again afterwards. */
  readonly file: LockableFile;
  /** The file's path, for messages. */
  readonly path: string;
  /**
   * Its place in the one global lock order: the same string in every process
   * that locks this file (a file's identity; an indirect lock file's path).
   */
  readonly key: string;
  /**
   * Locks `range`. false when busy and not waiting; LockTimeoutError or
   * AbortError when a wait ends without it. An indirect slot also makes sure
   * that the file it locked is still the one its name points at.
   */
  take(mode: LockMode, range: Readonly<ByteRange>, options: TakeOptions): Promise<boolean>;
  /**
   * Unlocks `range`. An indirect slot that then holds nothing deletes its file
   * if nobody else has it locked; with `keep`, it pins the file instead (it
   * will be locked again through the same open file description, which a
   * child shares).
   */
  release(range: Readonly<ByteRange>, options?: { keep?: boolean }): void;
  /** Releases everything and closes. Idempotent. */
  close(): void;
}

/** A lease made of OFD locks on one or more files. */
export class OfdLease implements Lease {
  readonly key: string;
  readonly path: string;
  readonly kind: Lease['kind'];
  readonly mode: ResourceMode;
  readonly image: LockableFile | null;
  /** The lock files, in the order they are locked. */
  readonly slots: readonly LeaseSlot[];
  #closed = false;

  constructor(key: string, path: string, kind: Lease['kind'], mode: ResourceMode, slots: readonly LeaseSlot[], image: LockableFile | null) {
    this.key = key;
    this.path = path;
    this.kind = kind;
    this.mode = mode;
    this.slots = slots;
    this.image = image;
  }

  get fds(): number[] {
    // Read now: an indirect slot may have replaced its file since it was opened.
    return this.slots.map((s) => s.file.fd);
  }

  get locations(): string[] {
    return this.slots.map((s) => s.path);
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    // Released in the reverse of the locking order.
    for (const s of [...this.slots].reverse()) s.close();
    if (this.image !== null && !this.slots.some((s) => s.file === this.image)) this.image.close();
  }
}

/** A slot on a file that never moves: the image itself. */
export function fixedSlot(file: LockableFile): LeaseSlot {
  return {
    file,
    path: file.path,
    key: file.identity.key,
    async take(mode, range, o) {
      if (!o.wait) return file.tryLock(mode, range);
      await file.lock(mode, range, { timeout: o.timeout, signal: o.signal });
      return true;
    },
    release: (range) => file.unlock(range),
    close: () => file.close(),
  };
}

type Step = { lease: OfdLease; slot: LeaseSlot };

/**
 * The lease files of all `leases`, in the one global lock order (by slot key:
 * a file's identity, or a lock file's path), the same in every process, so
 * two managers never deadlock, even when two resources share a lock file
 * (hard links in an indirect lockspace).
 */
function lockOrder(leases: readonly OfdLease[]): Step[] {
  return leases.flatMap((lease) => lease.slots.map((slot) => ({ lease, slot }))).sort((a, b) => byKey(a.slot.key, b.slot.key));
}

const heldAs = (mode: 'exclusive' | 'shared'): string => (mode === 'exclusive' ? 'exclusively' : 'shared');

const MIGRATING = 'a migration is in progress: a migration target holds its handover guard (byte 1)';

/**
 * Whether a migration target holds the guard of this lease file in a way that
 * excludes an acquirer of `mode`: F_OFD_GETLK, which places no lock. A target
 * guards an exclusive disk with a write lock (it excludes everyone) and a
 * shared or readonly one with a read lock (it excludes only exclusive
 * acquirers: shared ones are compatible with both the source and the target).
 */
function guardHeld(slot: LeaseSlot, mode: ResourceMode): boolean {
  try {
    return !slot.file.closed && slot.file.getConflict(lockModeOf(mode), GUARD_RANGE) !== null;
  } catch {
    return false;
  }
}

/**
 * Who holds the lock that is in the way of `mode` on `range` of a slot's file,
 * from the kernel's records (lockHolders: fdinfo, /proc/locks), and who else
 * has it open. Never throws: an error path must not fail for want of /proc.
 */
function whoHolds(slot: LeaseSlot, mode: LockMode, range: Readonly<ByteRange>, conflict: LockHolder | null): LockHolders {
  try {
    return lockHolders(slot.file.closed ? slot.path : slot.file.fd, mode, range, { conflict });
  } catch {
    return { holders: [], openers: [], unreadable: [], fdinfoAvailable: false };
  }
}

function conflictOf(slot: LeaseSlot, mode: LockMode, range: Readonly<ByteRange>): LockHolder | null {
  try {
    return slot.file.closed ? null : slot.file.getConflict(mode, range);
  } catch {
    return null;
  }
}

const lockFileOf = (lease: OfdLease, slot: LeaseSlot): string | undefined => (slot.path === lease.path ? undefined : slot.path);

/**
 * The busy error for a lease someone else holds: the conflicting lock
 * (F_OFD_GETLK), the processes that hold it and the others that have the
 * lease file open (lockHolders).
 */
export function busyError(lease: OfdLease, slot: LeaseSlot = lease.slots[0]!): ResourceBusyError {
  const mode = lockModeOf(lease.mode);
  const holder = conflictOf(slot, mode, LEASE_RANGE);
  const found = whoHolds(slot, mode, LEASE_RANGE, holder);
  const { by, also } = holdersWords(found, slot.path);
  const how = holder === null ? 'held' : `held ${heldAs(holder.mode)}`;
  const where = slot.path === lease.path ? '' : ` (its lock file ${slot.path})`;
  const migrating = guardHeld(slot, lease.mode);
  // What a multi-resource acquire released again is added by withRollback().
  return new ResourceBusyError(`${lease.path}${where} is ${how} by ${by}${also}${migrating ? `; ${MIGRATING}` : ''}`, {
    holder,
    resource: lease.path,
    lockFile: lockFileOf(lease, slot),
    ...found,
    migrationInProgress: migrating,
  });
}

/** A busy error for the handover guard (byte 1): a migration target holds it. */
function guardBusy(lease: OfdLease, slot: LeaseSlot, message: (by: string) => string): ResourceBusyError {
  const mode = lockModeOf(lease.mode);
  const holder = conflictOf(slot, mode, GUARD_RANGE);
  const found = whoHolds(slot, mode, GUARD_RANGE, holder);
  const { by, also } = holdersWords(found, slot.path);
  return new ResourceBusyError(`${message(by)}${also}`, { holder, resource: lease.path, lockFile: lockFileOf(lease, slot), ...found, migrationInProgress: true });
}

/** A fresh acquirer found the guard held in its way: the resource is being handed over. */
function migrationBusy(lease: OfdLease, slot: LeaseSlot): ResourceBusyError {
  return guardBusy(lease, slot, (by) => `${lease.path} cannot be acquired: ${MIGRATING}, held by ${by}`);
}

/**
 * Takes one slot's lease byte, or throws a complete busy or timeout error.
 * Before a wait, onBusy learns who is in the way.
 */
async function takeSlot(lease: OfdLease, slot: LeaseSlot, options: TakeOptions, deadline: number | undefined): Promise<void> {
  const mode = lockModeOf(lease.mode);
  if (options.wait && options.onBusy !== undefined) {
    if (await slot.take(mode, LEASE_RANGE, { wait: false })) return;
    options.onBusy(busyError(lease, slot));
  }
  let ok: boolean;
  try {
    ok = await slot.take(mode, LEASE_RANGE, { wait: options.wait, timeout: remaining(deadline), signal: options.signal });
  } catch (err) {
    if (!(err instanceof LockTimeoutError)) throw err;
    // The file's own timeout error names who is in the way; add the lease's words.
    const migrating = guardHeld(slot, lease.mode) ? `; ${MIGRATING}` : '';
    throw new LockTimeoutError(`${err.message}${migrating}`, {
      ...holdersOf(err),
      resource: lease.path,
      lockFile: lockFileOf(lease, slot),
      timeout: err.timeout,
      holder: err.holder,
      cause: err,
    });
  }
  if (!ok) throw busyError(lease, slot);
}

function namesInode(slot: LeaseSlot): boolean {
  try {
    const st = lstatSync(slot.path, { bigint: true });
    return st.dev === slot.file.identity.dev && st.ino === slot.file.identity.ino;
  } catch {
    return false;
  }
}

/** The lock a third party sees on one byte of a file: F_OFD_GETLK for a write lock. */
export function byteStatus(file: LockableFile, start: number): { state: 'free' | 'exclusive' | 'shared'; holder: LockHolder | null } {
  const holder = file.getConflict('exclusive', { start, length: 1 });
  return { state: holder === null ? 'free' : holder.mode, holder };
}

/** The processes holding a lease's byte 0 (this process's probe `file` left out), and the file's other openers. */
export function leaseHolders(file: LockableFile): LockHolders {
  return lockHolders(file.fd, 'exclusive', { start: 0, length: 1 });
}

/** What OFD lockspaces can do. */
export const OFD_CAPABILITIES = {
  attach: true,
  handoverGuard: true,
  hotplugHeldByChild: false,
  migrationState: false,
} as const satisfies Partial<Capabilities>;

/**
 * The part of the driver contract every OFD lockspace shares: acquiring in
 * the global slot order, the guard, release, verification and starting the
 * process with the lease fds. A lockspace adds how a resource becomes slots.
 */
export abstract class OfdLockspace implements LockspaceDriver {
  abstract readonly kind: string;
  abstract readonly config: LockspaceConfig;
  abstract readonly capabilities: Capabilities;
  onWarning: (err: unknown) => void = () => undefined;

  /** How a resource becomes lease files in this lockspace. */
  protected abstract openLease(name: ResourceName, mode: ResourceMode): OfdLease;

  /** Opens the lease and probes it: a filesystem that cannot lock says so now, before anything runs. */
  open(name: ResourceName, mode: ResourceMode): OfdLease {
    const lease = this.openLease(name, checkMode(mode));
    try {
      for (const slot of lease.slots) slot.file.getConflict(lockModeOf(mode), LEASE_RANGE);
    } catch (err) {
      lease.close();
      throw err;
    }
    return lease;
  }
  abstract sameAs(config: LockspaceConfig): boolean;
  abstract describe(): string;
  abstract cliSpec(): string;
  abstract inspect(name: ResourceName): Promise<LeaseStatus>;

  /**
   * Lease first, guard second: a target holds the guard before the source
   * lets go of the lease, so whoever gets the lease after the source finds
   * the guard held. Testing the guard first would leave a window between the
   * test and the lease.
   */
  async acquire(leases: readonly Lease[], options: TakeOptions & { checkGuard?: boolean }): Promise<void> {
    const todo = leases as readonly OfdLease[];
    const deadline = deadlineOf(options.timeout);
    const checkGuard = options.checkGuard ?? true;
    const left = new Map(todo.map((l) => [l, l.slots.length]));
    const taken: Step[] = [];
    try {
      for (const step of lockOrder(todo)) {
        await takeSlot(step.lease, step.slot, options, deadline);
        taken.push(step);
        const n = left.get(step.lease)! - 1;
        left.set(step.lease, n);
        if (n === 0 && checkGuard) {
          for (const slot of step.lease.slots) if (guardHeld(slot, step.lease.mode)) throw migrationBusy(step.lease, slot);
        }
      }
    } catch (err) {
      for (const t of [...taken].reverse()) t.slot.release(LEASE_RANGE);
      throw rolledBack(err, taken.map((t) => t.lease));
    }
  }

  release(lease: Lease, options: { keepFiles?: boolean } = {}): void {
    for (const slot of [...(lease as OfdLease).slots].reverse()) slot.release(LEASE_RANGE, { keep: options.keepFiles === true });
  }

  /**
   * Locks byte 1 of every lease file, in the same global order as acquire(),
   * all or none: a write lock for an exclusive resource, a read lock for a
   * shared or readonly one (two targets of one shared disk, two VMs on one
   * base image migrating at once, are compatible). A conflicting guard is
   * another migration of the same disk.
   */
  async guard(leases: readonly Lease[], options: TakeOptions): Promise<void> {
    const deadline = deadlineOf(options.timeout);
    const taken: Step[] = [];
    try {
      for (const step of lockOrder(leases as readonly OfdLease[])) {
        const { lease, slot } = step;
        if (!(await slot.take(lockModeOf(lease.mode), GUARD_RANGE, { wait: options.wait, timeout: remaining(deadline), signal: options.signal }))) {
          throw guardBusy(lease, slot, (by) => `${lease.path}: another migration of it is in progress: its handover guard (byte 1) is held by ${by}`);
        }
        taken.push(step);
      }
    } catch (err) {
      for (const t of [...taken].reverse()) t.slot.release(GUARD_RANGE);
      throw rolledBack(err, taken.map((t) => t.lease));
    }
  }

  releaseGuard(lease: Lease): void {
    for (const slot of [...(lease as OfdLease).slots].reverse()) slot.release(GUARD_RANGE);
  }

  /**
   * Whether the lease is still ours: from a second open file description of
   * the same inode (through /proc/self/fd, so a renamed or replaced image path
   * cannot mislead it), F_OFD_GETLK must see a lock that conflicts with ours.
   * It cannot tell our lock from another holder's of the same kind; see
   * docs/contract.md. A lock file in a shared directory must also still be the
   * one its name points at: a deleted or replaced lock file lets the next
   * acquirer in.
   */
  async verify(lease: Lease): Promise<boolean> {
    const l = lease as OfdLease;
    for (const slot of l.slots) {
      const probe = openLockable(`/proc/self/fd/${slot.file.fd}`, { access: 'read' });
      try {
        const conflict = probe.getConflict(l.mode === 'exclusive' ? 'shared' : 'exclusive', LEASE_RANGE);
        if (conflict === null || (l.mode === 'exclusive' && conflict.mode !== 'exclusive')) return false;
      } finally {
        probe.close();
      }
      if (slot.file !== l.image && !namesInode(slot)) return false;
    }
    return true;
  }

  /**
   * Takes the leases (plan.take), then spawns the command with their fds, or
   * attaches. Under both lifetimes the child gets the lease fds: a dying
   * process's files are closed before its children get their parent-death
   * signal, so with the fds in the supervisor alone the child would run
   * unlocked for that moment. A migration target's child gets the lease files
   * unlocked: the leases it takes later on the same open file descriptions
   * are then the child's too.
   */
  async start(plan: StartPlan): Promise<SupervisedProcess> {
    await plan.take(plan.limits.signal);
    if (plan.attach !== undefined) return attachProcess(plan.attach);
    const keepFds = [...(plan.spawnOptions.keepFds ?? []), ...plan.leases.flatMap((l) => l.fds)];
    return spawnSupervised(plan.command!, plan.args, { ...plan.spawnOptions, keepFds });
  }

  async exitFailure(_status: ExitStatus): Promise<string | null> {
    return null;
  }

  async settled(): Promise<void> {}

  exportState(): string | undefined {
    return undefined;
  }

  importState(_state: string | undefined): void {}
}

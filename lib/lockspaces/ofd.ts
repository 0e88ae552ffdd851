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
import { lstatSync, readdirSync, statSync } from 'node:fs';
import { LockTimeoutError, ResourceAccessError, ResourceBusyError, type LockHolder, type ProcessInfo } from '../os/errors.js';
import { openLockable, type ByteRange, type LockableFile, type LockMode } from '../os/locks.js';
import { commandLine, describeProcess, processesWithOpen, sharersOf } from '../os/proc-locks.js';
import { canonicalBlockNode, loopBacking, openDiskFile } from '../os/disks.js';

export { canonicalBlockNode, openDiskFile };

/**
 * The backing file of a loop device `image`, opened for its lease, or null
 * when `image` is not a loop device: its lease must cover both (the loop
 * device writes the file). Checked to be the inode the loop device is bound to.
 */
export function openLoopBacking(image: LockableFile, access: 'read' | 'readwrite'): LockableFile | null {
  const backing = loopBacking(image);
  if (backing === null) return null;
  const file = openDiskFile(backing.path, access);
  if (file.kind === 'file' && (file.identity.dev !== backing.dev || file.identity.ino !== backing.ino)) {
    file.close();
    throw new ResourceAccessError(`the backing file '${backing.path}' of loop device '${image.path}' was replaced while its lease was being opened; try again`);
  }
  return file;
}
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
  /** Closes without unlocking or deleting anything: whoever shares the open file description keeps its locks. Idempotent. */
  abandon(): void;
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

  /** The open files of this lease, each once (the image may be a slot's file). */
  get files(): LockableFile[] {
    const files = this.slots.map((s) => s.file);
    if (this.image !== null && !files.includes(this.image)) files.push(this.image);
    return files.filter((f) => !f.closed);
  }

  abandon(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const s of this.slots) s.abandon();
    if (this.image !== null && !this.image.closed) this.image.close();
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
    release: (range) => {
      if (!file.closed) file.unlock(range);
    },
    close: () => file.close(),
    abandon: () => file.close(),
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

/** @internal Test seams: run between finding a conflict and naming its holder (a holder that exits right then). */
export const busyHooks: { afterConflict?: () => void } = {};

/** Whether this process has `slot`'s file open through another fd than the slot's own. */
function openInSelfBesides(slot: LeaseSlot): boolean {
  return sharersOrSelf(slot.path, slot.file.closed ? -1 : slot.file.fd);
}

function sharersOrSelf(path: string, except: number): boolean {
  let target;
  try {
    target = statSync(path);
  } catch {
    return false;
  }
  for (const fd of readdirSync('/proc/self/fd')) {
    if (Number(fd) === except) continue;
    try {
      const st = statSync(`/proc/self/fd/${fd}`);
      if (target.isBlockDevice() ? st.isBlockDevice() && st.rdev === target.rdev : st.dev === target.dev && st.ino === target.ino) return true;
    } catch {
      // Closed since the listing (or the listing's own fd).
    }
  }
  return false;
}

/**
 * Who has the lease file open, in words. Nobody outside this process: the
 * conflict is ours (another manager here), or its holder let go between the
 * conflict and this scan (it exited: 13 of 187 busy errors in a fail-fast race
 * said "in this process" for that); `stillHeld` re-probes to tell them apart.
 */
function who(path: string, slot?: LeaseSlot, stillHeld?: () => boolean): { candidates: ProcessInfo[]; text: string; gone: boolean } {
  const candidates = processesWithOpen(path, { excludeSelf: true });
  if (candidates.length > 0) {
    return { candidates, gone: false, text: `${candidates.length === 1 ? 'pid' : 'one of pids'} ${candidates.map(describeProcess).join(', ')} (OFD locks record no pid: these have it open)` };
  }
  if (slot !== undefined && stillHeld?.() === false) {
    return { candidates, gone: true, text: 'a holder that has just let go (it exited or closed the file; nobody else has it open now): try again' };
  }
  if (slot === undefined || openInSelfBesides(slot)) return { candidates, gone: false, text: 'another open file description in this process' };
  return { candidates, gone: false, text: 'a process this one cannot see (on another host sharing the storage, or one it may not inspect)' };
}

/**
 * The busy error for a lease someone else holds: the conflicting lock, and
 * who has the lease file open, from F_OFD_GETLK and /proc.
 */
export function busyError(lease: OfdLease, slot: LeaseSlot = lease.slots[0]!): ResourceBusyError {
  const conflict = (): LockHolder | null => {
    try {
      return slot.file.getConflict(lockModeOf(lease.mode), LEASE_RANGE);
    } catch {
      return null;
    }
  };
  const holder = conflict();
  busyHooks.afterConflict?.();
  let candidates: ProcessInfo[];
  let by: string;
  if (holder !== null && holder.pid > 0) {
    candidates = [{ pid: holder.pid, command: commandLine(holder.pid) }];
    by = `pid ${describeProcess(candidates[0]!)}`;
  } else {
    ({ candidates, text: by } = who(slot.path, slot, () => conflict() !== null));
  }
  const how = holder === null ? 'held' : `held ${heldAs(holder.mode)}`;
  const where = slot.path === lease.path ? '' : ` (its lock file ${slot.path})`;
  const migrating = guardHeld(slot, lease.mode);
  // What a multi-resource acquire released again is added by withRollback().
  return new ResourceBusyError(`${lease.path}${where} is ${how} by ${by}${migrating ? `; ${MIGRATING}` : ''}`, {
    holder,
    resource: lease.path,
    candidates,
    migrationInProgress: migrating,
  });
}

/** A fresh acquirer found the guard held in its way: the resource is being handed over. */
function migrationBusy(lease: OfdLease, slot: LeaseSlot): ResourceBusyError {
  const { candidates, text } = who(slot.path);
  return new ResourceBusyError(`${lease.path} cannot be acquired: ${MIGRATING}, held by ${text}`, {
    resource: lease.path,
    candidates,
    migrationInProgress: true,
  });
}

/** Takes one slot's lease byte, or throws a complete busy or timeout error. */
async function takeSlot(lease: OfdLease, slot: LeaseSlot, wait: boolean, deadline: number | undefined, signal: AbortSignal | undefined): Promise<void> {
  let ok: boolean;
  try {
    ok = await slot.take(lockModeOf(lease.mode), LEASE_RANGE, { wait, timeout: remaining(deadline), signal });
  } catch (err) {
    if (!(err instanceof LockTimeoutError)) throw err;
    // Name who is in the way, as a busy error does.
    const candidates = processesWithOpen(slot.path, { excludeSelf: true });
    const by = candidates.length > 0 ? `; it is open in ${candidates.map(describeProcess).join(', ')}` : '';
    const migrating = guardHeld(slot, lease.mode) ? `; ${MIGRATING}` : '';
    throw new LockTimeoutError(`${err.message}${by}${migrating}`, { timeout: err.timeout, holder: err.holder, cause: err });
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
        await takeSlot(step.lease, step.slot, options.wait, deadline, options.signal);
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

  /** Other processes with a duplicate of one of the lease's open file descriptions (kcmp), each once. */
  sharers(leases: readonly Lease[], options: { bornSince?: bigint } = {}): Map<Lease, ProcessInfo[]> {
    const all = leases as readonly OfdLease[];
    const scan = (): Map<Lease, ProcessInfo[]> => {
      const byFd = sharersOf(all.flatMap((l) => l.files.map((f) => f.fd)), options);
      return new Map(
        all.map((l) => {
          const found = new Map<number, ProcessInfo>();
          for (const f of l.files) for (const p of byFd.get(f.fd) ?? []) found.set(p.pid, p);
          return [l, [...found.values()]];
        }),
      );
    };
    try {
      return scan();
    } catch (err) {
      // Out of fds just as the command exited (ulimit -n reached): the image
      // fd of a lease kept in lock files holds no part of the lease (only
      // QEMU's locks, released with the lease anyway); closing one lets /proc
      // be read, so the lock files can still be released and deleted.
      const spare = all.find((l) => l.image !== null && !l.image.closed && !l.slots.some((s) => s.file === l.image));
      if ((err as NodeJS.ErrnoException).code !== 'EMFILE' || spare === undefined) throw err;
      spare.image!.close();
      return scan();
    }
  }

  abandon(lease: Lease): void {
    (lease as OfdLease).abandon();
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
          const { candidates, text } = who(slot.path);
          throw new ResourceBusyError(`${lease.path}: another migration of it is in progress: its handover guard (byte 1) is held by ${text}`, {
            resource: lease.path,
            candidates,
            migrationInProgress: true,
          });
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

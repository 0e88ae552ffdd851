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
//   byte 3  read-locked by every shared lease, byte 4 by every readonly one,
//           after byte 0: a readonly and a shared lease exclude each other.
//           Read locks cannot say "readers with readers, writers with
//           writers, never the two", so each takes its own byte, then checks
//           the other's (F_OFD_GETLK), as QEMU does its permission bytes: of
//           two racers at least the later sees the earlier; both may fail,
//           never both pass. virtlockd and lockmgr before issue 14 take only
//           byte 0, and see no difference between the two.
// QEMU's own image locks live at bytes 100 and up (lib/os/qemu.ts) and are
// taken on the image itself, whatever the lockspace, through a descriptor the
// manager opens for them (lib/manager/resources.ts), never the lease's.
//
// An OFD lock belongs to the open file description: the supervised process is
// given the lease fds, so the leases are its own too and outlive a killed
// supervisor (lockLifetime 'child'), and any running process can be attached.
import { lstatSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { InvalidArgumentError, InvalidStateError, LockTimeoutError, ResourceBusyError, holdersOf, type LockHolder, type LockHolders, type ProcessInfo } from '../os/errors.js';
import { lockableFromFd, openLockable, type ByteRange, type LockableFile, type LockMode } from '../os/locks.js';
import { describeProcess, fdsOf, holdersWords, lockHolders, parseFdinfoLocks, processesSharing, runsLockmgr, sharersOf, watchedBy, type ProcLock } from '../os/proc-locks.js';
import { canonicalBlockNode, openDiskFile, openLoopBacking } from '../os/disks.js';

import { attachProcess, spawnSupervised, type ExitStatus, type SupervisedProcess } from '../os/supervise.js';
import { byKey, checkMode, deadlineOf, pauseFor, remaining, rolledBack } from './common.js';
import type { Capabilities, Lease, LeaseStatus, LockspaceConfig, LockspaceDriver, ResourceMode, ResourceName, StartPlan, TakeOptions } from './driver.js';

export { canonicalBlockNode, openDiskFile, openLoopBacking };

export const LEASE_RANGE: Readonly<ByteRange> = Object.freeze({ start: 0, length: 1 });
export const GUARD_RANGE: Readonly<ByteRange> = Object.freeze({ start: 1, length: 1 });
export const PIN_RANGE: Readonly<ByteRange> = Object.freeze({ start: 2, length: 1 });
export const SHARED_CLASS_RANGE: Readonly<ByteRange> = Object.freeze({ start: 3, length: 1 });
export const READONLY_CLASS_RANGE: Readonly<ByteRange> = Object.freeze({ start: 4, length: 1 });
/** The last of the bytes 0-N a lease takes on an image or lock file (lease, guard, pin, the two classes): what only lockmgr locks. */
export const LAST_LEASE_BYTE: number = READONLY_CLASS_RANGE.start!;

/** The class byte a mode takes, and the one it must find free; null for exclusive (byte 0 says it all). */
function classOf(mode: ResourceMode): { mine: Readonly<ByteRange>; theirs: Readonly<ByteRange>; theirMode: ResourceMode } | null {
  if (mode === 'shared') return { mine: SHARED_CLASS_RANGE, theirs: READONLY_CLASS_RANGE, theirMode: 'readonly' };
  if (mode === 'readonly') return { mine: READONLY_CLASS_RANGE, theirs: SHARED_CLASS_RANGE, theirMode: 'shared' };
  return null;
}

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
  /** What the file is to the resource, for messages when it is not the resource's own path: 'lock file' unless said. */
  readonly role?: string;
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
  /** Releases everything and closes. Idempotent. keepLocks: closes only our descriptor (an adopted one stays held by the process it came from). */
  close(options?: { keepLocks?: boolean }): void;
  /** The same slot over `file`, a description adopted from another process that holds `range` on it. */
  adopted(file: LockableFile, range: Readonly<ByteRange>): LeaseSlot;
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

  close(options?: { keepLocks?: boolean }): void {
    if (this.#closed) return;
    this.#closed = true;
    // Released in the reverse of the locking order.
    for (const s of [...this.slots].reverse()) s.close(options);
    if (this.image !== null && !this.slots.some((s) => s.file === this.image)) this.image.close();
  }

  /** The open files of this lease, each once (the image may be a slot's file). */
  get files(): LockableFile[] {
    const files = this.slots.map((s) => s.file);
    if (this.image !== null && !files.includes(this.image)) files.push(this.image);
    return files.filter((f) => !f.closed);
  }

}

/** A slot on a file that never moves: the image itself. */
export function fixedSlot(file: LockableFile, role?: string): LeaseSlot {
  return {
    file,
    path: file.path,
    role,
    key: file.identity.key,
    async take(mode, range, o) {
      if (!o.wait) return file.tryLock(mode, range);
      await file.lock(mode, range, { timeout: o.timeout, signal: o.signal });
      return true;
    },
    release: (range) => {
      if (!file.closed) file.unlock(range);
    },
    // Closing our fd leaves the description's locks to whoever else has it open (an adopted VM).
    close: () => file.close(),
    adopted: (other) => fixedSlot(other, role),
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
 * Who is in the way when the kernel's records name nobody: the holder let go
 * between the conflict and the scan (it exited: 13 of 187 busy errors in a
 * fail-fast race once said "in this process" for that), the conflict is ours
 * (another manager here), or the holder is out of sight. A re-probe tells them apart.
 */
function nobodyWords(slot: LeaseSlot, mode: LockMode, range: Readonly<ByteRange>): string {
  if (conflictOf(slot, mode, range) === null) return 'a holder that has just let go (it exited or closed the file; nobody else has it open now): try again';
  if (openInSelfBesides(slot)) return 'another open file description in this process';
  return 'a process this one cannot see (on another host sharing the storage, or one it may not inspect)';
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

/**
 * Who holds `range` in the way of `mode` (whoHolds), in words. Nobody named
 * as a holder: the conflict may have gone meanwhile (a holder that exited),
 * which a re-probe tells (nobodyWords). Every busy error of a slot names its holder so.
 */
function holderWords(slot: LeaseSlot, mode: LockMode, range: Readonly<ByteRange>, holder: LockHolder | null): { found: LockHolders; by: string; also: string } {
  const found = whoHolds(slot, mode, range, holder);
  const words = holdersWords(found, slot.path);
  const named = found.holders.length > 0 || (found.unreadable.length > 0 && conflictOf(slot, mode, range) !== null) || (!found.fdinfoAvailable && found.openers.length > 0);
  return { found, by: named ? words.by : nobodyWords(slot, mode, range), also: words.also };
}

function conflictOf(slot: LeaseSlot, mode: LockMode, range: Readonly<ByteRange>): LockHolder | null {
  try {
    return slot.file.closed ? null : slot.file.getConflict(mode, range);
  } catch {
    return null;
  }
}

/** The error fields that say which of a lease's files is in the way, when it is not the resource's own. */
const lockFileOf = (lease: OfdLease, slot: LeaseSlot): { lockFile?: string; lockFileRole?: string } => (slot.path === lease.path ? {} : { lockFile: slot.path, lockFileRole: slot.role ?? 'lock file' });

/** " (its lock file PATH)", " (its backing file PATH)", or '' for the resource's own file. */
const whereWords = (resource: string, slot: Pick<LeaseSlot, 'path' | 'role'>): string => (slot.path === resource ? '' : ` (its ${slot.role ?? 'lock file'} ${slot.path})`);

/**
 * The busy error for a lease someone else holds: the conflicting lock
 * (F_OFD_GETLK), the processes that hold it and the others that have the
 * lease file open (lockHolders).
 */
export function busyError(lease: OfdLease, slot: LeaseSlot = lease.slots[0]!): ResourceBusyError {
  const mode = lockModeOf(lease.mode);
  const holder = conflictOf(slot, mode, LEASE_RANGE);
  busyHooks.afterConflict?.();
  const { found, by, also } = holderWords(slot, mode, LEASE_RANGE, holder);
  const how = holder === null ? 'held' : `held ${heldAs(holder.mode)}`;
  const where = whereWords(lease.path, slot);
  const migrating = guardHeld(slot, lease.mode);
  // What a multi-resource acquire released again is added by withRollback().
  return new ResourceBusyError(`${lease.path}${where} is ${how} by ${by}${also}${migrating ? `; ${MIGRATING}` : ''}`, {
    holder,
    resource: lease.path,
    ...lockFileOf(lease, slot),
    ...found,
    migrationInProgress: migrating,
  });
}

/** A busy error for the handover guard (byte 1): a migration target holds it. */
function guardBusy(lease: OfdLease, slot: LeaseSlot, message: (by: string) => string): ResourceBusyError {
  const mode = lockModeOf(lease.mode);
  const holder = conflictOf(slot, mode, GUARD_RANGE);
  const { found, by, also } = holderWords(slot, mode, GUARD_RANGE, holder);
  return new ResourceBusyError(`${message(by)}${also}`, { holder, resource: lease.path, ...lockFileOf(lease, slot), ...found, migrationInProgress: true });
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
  let ok = false;
  if (options.wait && options.onBusy !== undefined) {
    ok = await slot.take(mode, LEASE_RANGE, { wait: false });
    if (!ok) options.onBusy(busyError(lease, slot));
  }
  if (!ok) {
    try {
      ok = await slot.take(mode, LEASE_RANGE, { wait: options.wait, timeout: remaining(deadline), signal: options.signal });
    } catch (err) {
      if (!(err instanceof LockTimeoutError)) throw err;
      // The file's own timeout error names who is in the way; add the lease's words.
      const migrating = guardHeld(slot, lease.mode) ? `; ${MIGRATING}` : '';
      throw new LockTimeoutError(`${err.message}${migrating}`, {
        ...holdersOf(err),
        resource: lease.path,
        ...lockFileOf(lease, slot),
        timeout: err.timeout,
        holder: err.holder,
        cause: err,
      });
    }
    if (!ok) throw busyError(lease, slot);
  }
  await takeClass(lease, slot, options.wait, deadline, options.signal, options.timeout, options.onBusy);
}

/** How often a waiting class check looks again, at most (it starts at 10 ms and doubles). */
const CLASS_POLL_MAX_MS = 250;

/**
 * After byte 0: the mode's class byte, then the other class's must be free
 * (take, then check). Waiting, it looks again with F_OFD_GETLK on a timer:
 * a shared or readonly lease file may be open read-only (a base image on a
 * read-only filesystem), and a read-only descriptor cannot block for the
 * write lock that would wait for the other class to leave. On failure byte 0
 * is released again.
 */
async function takeClass(
  lease: OfdLease,
  slot: LeaseSlot,
  wait: boolean,
  deadline: number | undefined,
  signal: AbortSignal | undefined,
  timeout = 0,
  onBusy?: (busy: ResourceBusyError) => void,
): Promise<void> {
  const cls = classOf(lease.mode);
  if (cls === null) return;
  let pause = 10;
  let told = onBusy === undefined;
  try {
    for (;;) {
      // Nobody write-locks a class byte: a read lock on one fails only under a whole-file deleter, which take() waits out.
      if (await slot.take('shared', cls.mine, { wait: false })) {
        if (slot.file.getConflict('exclusive', cls.theirs) === null) return;
        slot.release(cls.mine);
      }
      if (!wait) throw classBusy(lease, slot, cls.theirMode);
      const left = remaining(deadline);
      if (left !== undefined && left <= 0) {
        const holder = conflictOf(slot, 'exclusive', cls.theirs);
        const { found, by, also } = holderWords(slot, 'exclusive', cls.theirs, holder);
        throw new LockTimeoutError(`${lease.path}: still held ${cls.theirMode} by ${by} when the timeout ran out (readonly and shared leases exclude each other)${also}`, {
          ...found,
          resource: lease.path,
          ...lockFileOf(lease, slot),
          timeout,
          holder,
        });
      }
      if (!told) {
        // A wait begins: who is in the way, as for byte 0 (the CLI's waiting line).
        told = true;
        onBusy!(classBusy(lease, slot, cls.theirMode));
      }
      await pauseFor(Math.min(pause, left ?? pause), signal);
      pause = Math.min(pause * 2, CLASS_POLL_MAX_MS);
    }
  } catch (err) {
    slot.release(LEASE_RANGE);
    throw err;
  }
}

/** Releases one slot's lease: the class byte first, since an indirect slot deletes its file only when its last byte goes. */
function releaseSlot(lease: Lease, slot: LeaseSlot, keep = false): void {
  const cls = classOf(lease.mode);
  if (cls !== null) slot.release(cls.mine);
  slot.release(LEASE_RANGE, { keep });
}

function classBusy(lease: OfdLease, slot: LeaseSlot, theirMode: ResourceMode): ResourceBusyError {
  const range = classOf(lease.mode)!.theirs;
  const holder = conflictOf(slot, 'exclusive', range);
  busyHooks.afterConflict?.();
  const { found, by, also } = holderWords(slot, 'exclusive', range, holder);
  const where = whereWords(lease.path, slot);
  return new ResourceBusyError(`${lease.path}${where} is held ${theirMode} by ${by}: a ${lease.mode} lease and a ${theirMode} one exclude each other${also}`, {
    holder,
    resource: lease.path,
    ...lockFileOf(lease, slot),
    ...found,
  });
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

/** Whether an open file description's locks include `mode` on exactly `range`. */
function holdsRange(locks: readonly ProcLock[], mode: LockMode, range: Readonly<ByteRange>): boolean {
  const type = mode === 'exclusive' ? 'WRITE' : 'READ';
  const start = range.start ?? 0;
  const end = (range.length ?? 0) === 0 ? null : start + (range.length ?? 0) - 1;
  return locks.some((l) => l.type === type && l.start === start && l.end === end);
}

/**
 * A descriptor of ours for the open file description through which `holder`
 * holds `mode` on LEASE_RANGE of the file `like` is (same inode, or the same
 * block device): found in /proc/PID/fdinfo, taken with pidfd_getfd, and
 * checked again on our own fd (/proc/self/fdinfo), which now names the same
 * description. InvalidArgumentError when the process holds no such lock.
 */
function adoptDescription(holder: SupervisedProcess, like: LockableFile, mode: ResourceMode, resource: string, slot: LeaseSlot): LockableFile {
  const lock = lockModeOf(mode);
  const target = { dev: like.identity.dev, ino: like.identity.ino, block: like.kind === 'block-device' };
  const open = fdsOf(holder.pid, target);
  // Byte 0 in the mode's lock, and for shared and readonly the mode's own class byte: they read-lock byte 0 alike.
  const cls = classOf(mode);
  const holdsMode = (locks: readonly ProcLock[], m: ResourceMode): boolean => {
    const c = classOf(m);
    return holdsRange(locks, lockModeOf(m), LEASE_RANGE) && (c === null || holdsRange(locks, 'shared', c.mine));
  };
  const match = open.find((f) => holdsMode(f.locks, mode));
  const what = `${resource}${whereWords(resource, slot)}`;
  if (match === undefined) {
    const other = (['exclusive', 'shared', 'readonly'] as const).find((m) => m !== mode && open.some((f) => holdsMode(f.locks, m)));
    const why =
      open.length === 0
        ? slot.path === resource
          ? 'it does not have it open'
          : `it does not have that ${slot.role ?? 'lock file'} open${slot.role === undefined ? ' (did its lockmgr keep its locks elsewhere, in another lockspace?)' : ''}`
        : other !== undefined
          ? `it holds it ${other === 'exclusive' ? 'exclusively' : other}, not ${mode}`
          : `none of its ${open.length} descriptor(s) of it holds byte 0${cls === null ? '' : ` and byte ${cls.mine.start}`}`;
    throw new InvalidArgumentError(`process ${holder.pid} does not hold ${mode === 'exclusive' ? 'an' : 'a'} ${mode} lease on ${what}: ${why}`);
  }
  // Its supervisor still alive, or another adopter: two managers of one VM
  // would each release the other's lease. Other sharers (a helper the VM
  // daemonized) are its own: they stay, and are orphans if they outlive it.
  const managers = processesSharing(holder.pid, match.fd, target).filter((p) => runsLockmgr(p.pid) || watchedBy(p.pid).includes(holder.pid));
  if (managers.length > 0) {
    throw new ResourceBusyError(
      `process ${holder.pid} still has a supervisor: ${managers.map(describeProcess).join(', ')} shares its ${mode} lease on ${what}; ` +
        'a process can be taken over only once its supervisor is gone',
      { resource, candidates: managers },
    );
  }
  const file = lockableFromFd(holder.takeFd(match.fd), slot.path, match.access === 'readwrite' ? 'readwrite' : 'read');
  let ours: ProcLock[] = [];
  try {
    ours = parseFdinfoLocks(readFileSync(`/proc/self/fdinfo/${file.fd}`, 'utf8'));
  } catch {
    ours = [];
  }
  // The process may have released it or closed that fd (and reused the number) between the two reads.
  if (file.identity.key !== like.identity.key || !holdsRange(ours, lock, LEASE_RANGE)) {
    file.close();
    throw new InvalidStateError(`process ${holder.pid} let go of its ${mode} lease on ${what} while it was being adopted`);
  }
  return file;
}

/** The processes holding a lease's byte 0 (this process's probe `file` left out), and the file's other openers. */
export function leaseHolders(file: LockableFile): LockHolders {
  return lockHolders(file.fd, 'exclusive', { start: 0, length: 1 });
}

/** What OFD lockspaces can do. */
export const OFD_CAPABILITIES = {
  attach: true,
  adopt: true,
  handoverGuard: true,
  hotplugHeldByChild: false,
  migrationState: false,
  readersExcludeWriters: true,
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
      for (const t of [...taken].reverse()) releaseSlot(t.lease, t.slot);
      throw rolledBack(err, taken.map((t) => t.lease));
    }
  }

  release(lease: Lease, options: { keepFiles?: boolean } = {}): void {
    for (const slot of [...(lease as OfdLease).slots].reverse()) releaseSlot(lease, slot, options.keepFiles === true);
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
    // Our descriptors only: the locks stay with whoever shares the descriptions.
    lease.close({ keepLocks: true });
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
   * Takes over the lease `holder` holds: our lease files are opened by name as
   * for open() (so nothing the caller did not name is opened), then, for each,
   * the holder's own open file description that holds byte 0 in this mode
   * becomes ours too (adoptDescription): the same description, so the same
   * lock, released by our unlock as if we had taken it. Our own fresh
   * descriptions, which hold nothing, are closed again.
   */
  async adopt(name: ResourceName, mode: ResourceMode, holder: SupervisedProcess): Promise<Lease> {
    const fresh = this.open(name, mode);
    const slots: LeaseSlot[] = [];
    let image = fresh.image;
    try {
      for (const slot of fresh.slots) {
        const file = adoptDescription(holder, slot.file, mode, fresh.path, slot);
        slots.push(slot.adopted(file, LEASE_RANGE));
        if (slot.file === fresh.image) image = file;
      }
    } catch (err) {
      for (const s of slots.reverse()) s.close({ keepLocks: true });
      fresh.close();
      throw err;
    }
    // The image, where it is not a lease file, stays open for the new lease (QEMU's locks, identity).
    for (const s of [...fresh.slots].reverse()) s.close();
    return new OfdLease(fresh.key, fresh.path, fresh.kind, mode, slots, image);
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

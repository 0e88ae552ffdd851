// A manager's set of resources: identity, canonical order, all-or-nothing
// acquire with rollback, release, the migration guard, and verification that
// locks are still held.
import { lstatSync } from 'node:fs';
import { LockTimeoutError, ResourceBusyError, type LockHolder, type ProcessInfo } from '../os/errors.js';
import { GUARD_RANGE, LEASE_RANGE, lockModeOf, type Lease, type LeaseSlot, type ResourceMode } from '../lockspaces/driver.js';
import { openLockable } from '../os/locks.js';
import { commandLine, describeProcess, processesWithOpen } from '../os/proc-locks.js';
import { releaseQemuLocks, takeQemuLocks, type QemuProfile } from '../os/qemu.js';

export interface Resource {
  readonly path: string;
  readonly mode: ResourceMode;
  /** The lock files that carry the lease; lease.key is the resource's identity. */
  readonly lease: Lease;
  /** Also take QEMU-style permission locks on the image (lib/os/qemu.ts). */
  readonly qemu?: QemuProfile;
  held: boolean;
  /** A migration target holds the guard byte of every lease file. */
  guarded: boolean;
}

export interface AcquireOptions {
  timeout?: number;
  signal?: AbortSignal;
  /** Wait for busy resources (default: when timeout or signal is given). False: fail fast. */
  wait?: boolean;
  /**
   * Refuse a resource whose migration guard someone holds (default true): a
   * fresh acquirer (start, hotplug) must not take a disk that is being handed
   * over. False for the handover itself: the target taking the leases, and the
   * source taking them back after a cancelled migration.
   */
  checkGuard?: boolean;
}

const byKey = (a: string, b: string): number => (a < b ? -1 : a > b ? 1 : 0);

/** Canonical order: by identity key, the same in every process, so two managers never deadlock. */
export function canonicalOrder<T extends { lease: Lease }>(resources: Iterable<T>): T[] {
  return [...resources].sort((a, b) => byKey(a.lease.key, b.lease.key));
}

type Step = { r: Resource; slot: LeaseSlot };

/**
 * The lease files of all `resources`, in the one global lock order (by slot
 * key: a file's identity, or a lock file's path), the same in every process,
 * so two managers never deadlock, even when two resources share a lock file
 * (hard links in an indirect lockspace).
 */
function lockOrder(resources: readonly Resource[]): Step[] {
  return resources.flatMap((r) => r.lease.slots.map((slot) => ({ r, slot }))).sort((a, b) => byKey(a.slot.key, b.slot.key));
}

/** Whether to wait, and until when: waiting by default when a timeout or signal is given. */
function waitPlan(options: AcquireOptions): { wait: boolean; deadline: number | undefined } {
  return {
    wait: options.wait ?? (options.timeout !== undefined || options.signal !== undefined),
    deadline: options.timeout === undefined ? undefined : Date.now() + options.timeout,
  };
}

/** `err`, saying which of `touched` (all but the one that failed) were released again. */
function rolledBack(err: unknown, touched: Iterable<Resource>): unknown {
  const failed = err instanceof ResourceBusyError ? err.resource : null;
  return withRollback(err, [...new Set(touched)].filter((r) => r.path !== failed).map((r) => r.path));
}

const heldAs = (mode: 'exclusive' | 'shared'): string => (mode === 'exclusive' ? 'exclusively' : 'shared');

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

function who(path: string): { candidates: ProcessInfo[]; text: string } {
  const candidates = processesWithOpen(path, { excludeSelf: true });
  const text =
    candidates.length > 0
      ? `${candidates.length === 1 ? 'pid' : 'one of pids'} ${candidates.map(describeProcess).join(', ')} (OFD locks record no pid: these have it open)`
      : 'another open file description in this process';
  return { candidates, text };
}

const MIGRATING = 'a migration is in progress: a migration target holds its handover guard (byte 1)';

/**
 * The busy error for a resource someone else holds: the conflicting lock, and
 * who has the lease file open, from F_OFD_GETLK and /proc.
 */
export function busyError(r: Resource, slot: LeaseSlot = r.lease.slots[0]!): ResourceBusyError {
  let holder: LockHolder | null = null;
  try {
    holder = slot.file.getConflict(lockModeOf(r.mode), LEASE_RANGE);
  } catch {
    holder = null;
  }
  let candidates: ProcessInfo[];
  let by: string;
  if (holder !== null && holder.pid > 0) {
    candidates = [{ pid: holder.pid, command: commandLine(holder.pid) }];
    by = `pid ${describeProcess(candidates[0]!)}`;
  } else {
    ({ candidates, text: by } = who(slot.path));
  }
  const how = holder === null ? 'held' : `held ${heldAs(holder.mode)}`;
  const where = slot.path === r.path ? '' : ` (its lock file ${slot.path})`;
  const migrating = guardHeld(slot, r.mode);
  // What a multi-resource acquire released again is added by withRollback().
  return new ResourceBusyError(`${r.path}${where} is ${how} by ${by}${migrating ? `; ${MIGRATING}` : ''}`, {
    holder,
    resource: r.path,
    candidates,
    migrationInProgress: migrating,
  });
}

/** A fresh acquirer found the guard held in its way: the resource is being handed over. */
function migrationBusy(r: Resource, slot: LeaseSlot): ResourceBusyError {
  const { candidates, text } = who(slot.path);
  return new ResourceBusyError(`${r.path} cannot be acquired: ${MIGRATING}, held by ${text}`, {
    resource: r.path,
    candidates,
    migrationInProgress: true,
  });
}

/** The same busy or timeout error, saying which leases were released again. */
function withRollback(err: unknown, back: string[]): unknown {
  if (back.length === 0) return err;
  const suffix = `; released again: ${back.join(', ')}`;
  if (err instanceof ResourceBusyError) {
    return new ResourceBusyError(`${err.message}${suffix}`, {
      holder: err.holder,
      resource: err.resource ?? undefined,
      candidates: err.candidates,
      rolledBack: back,
      migrationInProgress: err.migrationInProgress,
      cause: err.cause,
    });
  }
  if (err instanceof LockTimeoutError) {
    return new LockTimeoutError(`${err.message}${suffix}`, { timeout: err.timeout, holder: err.holder, cause: err });
  }
  return err;
}

const remaining = (deadline: number | undefined): number | undefined => (deadline === undefined ? undefined : Math.max(0, deadline - Date.now()));

/** Takes one slot's lease byte, or throws a complete busy or timeout error. */
async function takeSlot(r: Resource, slot: LeaseSlot, wait: boolean, deadline: number | undefined, signal: AbortSignal | undefined): Promise<void> {
  let ok: boolean;
  try {
    ok = await slot.take(lockModeOf(r.mode), LEASE_RANGE, { wait, timeout: remaining(deadline), signal });
  } catch (err) {
    if (!(err instanceof LockTimeoutError)) throw err;
    // Name who is in the way, as a busy error does.
    const candidates = processesWithOpen(slot.path, { excludeSelf: true });
    const by = candidates.length > 0 ? `; it is open in ${candidates.map(describeProcess).join(', ')}` : '';
    const migrating = guardHeld(slot, r.mode) ? `; ${MIGRATING}` : '';
    throw new LockTimeoutError(`${err.message}${by}${migrating}`, { timeout: err.timeout, holder: err.holder, cause: err });
  }
  if (!ok) throw busyError(r, slot);
}

/** Once all of a resource's lease files are locked: the guard test, then QEMU's locks. Throws having taken nothing more. */
function completeOne(r: Resource, checkGuard: boolean): void {
  // Lease first, guard second: a target holds the guard before the source
  // lets go of the lease, so whoever gets the lease after the source finds
  // the guard held. Testing the guard first would leave a window between the
  // test and the lease.
  if (checkGuard) {
    for (const slot of r.lease.slots) if (guardHeld(slot, r.mode)) throw migrationBusy(r, slot);
  }
  if (r.qemu !== undefined && r.lease.image !== null) takeQemuLocks(r.lease.image, r.path, r.qemu);
}

/**
 * Takes every resource's lease, or none: on the first failure everything
 * taken is released in reverse order and the error says which resources were
 * released again. The lease files are locked in lockOrder(). Without timeout or signal
 * it never waits (fail fast). QEMU conflicts always fail fast: QEMU's locks are
 * not waited for.
 */
export async function acquireAll(resources: Iterable<Resource>, options: AcquireOptions = {}): Promise<void> {
  const { wait, deadline } = waitPlan(options);
  const checkGuard = options.checkGuard ?? true;
  const todo = canonicalOrder(resources).filter((r) => !r.held);
  const left = new Map(todo.map((r) => [r, r.lease.slots.length]));
  const taken: Step[] = [];
  const complete: Resource[] = [];
  const owned: Resource[] = [];
  try {
    // Leases that are no OFD lock (sanlock) belong to a process: taken whole, in canonical order.
    for (const r of todo) {
      if (r.lease.owned === undefined) continue;
      await r.lease.owned.take(r.mode, { wait, timeout: remaining(deadline), signal: options.signal });
      owned.push(r);
    }
    for (const step of lockOrder(todo)) {
      await takeSlot(step.r, step.slot, wait, deadline, options.signal);
      taken.push(step);
      const n = left.get(step.r)! - 1;
      left.set(step.r, n);
      if (n === 0) {
        completeOne(step.r, checkGuard);
        complete.push(step.r);
      }
    }
  } catch (err) {
    for (const r of [...complete].reverse()) if (r.qemu !== undefined && r.lease.image !== null) releaseQemuLocks(r.lease.image, r.qemu);
    for (const t of taken.reverse()) t.slot.release(LEASE_RANGE);
    for (const r of owned.reverse()) r.lease.owned!.release();
    throw rolledBack(err, [...owned, ...taken.map((t) => t.r)]);
  }
  for (const r of todo) r.held = true;
}

/**
 * Releases one lease. The lease stays open: the resource stays registered.
 * keepFiles: a child shares these open file descriptions and the same ones
 * may be locked again (a migration source that may take its leases back), so
 * an indirect lock file must not be deleted and recreated under it.
 */
export function releaseOne(r: Resource, options: { keepFiles?: boolean } = {}): void {
  if (r.held) {
    r.held = false;
    if (r.qemu !== undefined && r.lease.image !== null && !r.lease.image.closed) releaseQemuLocks(r.lease.image, r.qemu);
    for (const slot of [...r.lease.slots].reverse()) slot.release(LEASE_RANGE, { keep: options.keepFiles === true });
    r.lease.owned?.release();
  }
}

/**
 * A migration target's guard: locks byte 1 of every lease file, in the same
 * global order as acquireAll(), all or none: a write lock for an exclusive
 * resource, a read lock for a shared or readonly one (two targets of one
 * shared disk, two VMs on one base image migrating at once, are compatible).
 * A conflicting guard is another migration of the same disk.
 */
export async function takeGuards(resources: Iterable<Resource>, options: AcquireOptions = {}): Promise<void> {
  const { wait, deadline } = waitPlan(options);
  const todo = canonicalOrder(resources).filter((r) => !r.guarded);
  const taken: Step[] = [];
  try {
    for (const step of lockOrder(todo)) {
      const { r, slot } = step;
      if (!(await slot.take(lockModeOf(r.mode), GUARD_RANGE, { wait, timeout: remaining(deadline), signal: options.signal }))) {
        const { candidates, text } = who(slot.path);
        throw new ResourceBusyError(`${r.path}: another migration of it is in progress: its handover guard (byte 1) is held by ${text}`, {
          resource: r.path,
          candidates,
          migrationInProgress: true,
        });
      }
      taken.push(step);
    }
  } catch (err) {
    for (const t of taken.reverse()) t.slot.release(GUARD_RANGE);
    throw rolledBack(err, taken.map((t) => t.r));
  }
  for (const r of todo) r.guarded = true;
}

export function releaseGuard(r: Resource): void {
  if (!r.guarded) return;
  r.guarded = false;
  for (const slot of [...r.lease.slots].reverse()) slot.release(GUARD_RANGE);
}

/**
 * Whether the lease is still ours: from a second open file description of the
 * same inode (through /proc/self/fd, so a renamed or replaced image path cannot
 * mislead it), F_OFD_GETLK must see a lock that conflicts with ours. It cannot
 * tell our lock from another holder's of the same kind; see docs/contract.md.
 * A lock file in a shared directory must also still be the one its name points
 * at: a deleted or replaced lock file lets the next acquirer in.
 */
export function stillHeld(r: Resource): boolean {
  for (const slot of r.lease.slots) {
    const probe = openLockable(`/proc/self/fd/${slot.file.fd}`, { access: 'read' });
    try {
      const conflict = probe.getConflict(r.mode === 'exclusive' ? 'shared' : 'exclusive', LEASE_RANGE);
      if (conflict === null || (r.mode === 'exclusive' && conflict.mode !== 'exclusive')) return false;
    } finally {
      probe.close();
    }
    if (slot.file !== r.lease.image && !namesInode(slot)) return false;
  }
  return true;
}

function namesInode(slot: LeaseSlot): boolean {
  try {
    const st = lstatSync(slot.path, { bigint: true });
    return st.dev === slot.file.identity.dev && st.ino === slot.file.identity.ino;
  } catch {
    return false;
  }
}

// A manager's set of resources: identity, canonical order, all-or-nothing
// acquire with rollback, release, the migration guard, and verification that
// locks are still held.
import { lstatSync } from 'node:fs';
import { LockTimeoutError, ResourceBusyError, type LockHolder, type ProcessInfo } from './errors.js';
import { GUARD_RANGE, LEASE_RANGE, lockModeOf, type Lease, type LeaseSlot, type ResourceMode } from './lockspace.js';
import { openLockable } from './locks.js';
import { commandLine, describeProcess, processesWithOpen } from './proc-locks.js';
import { releaseQemuLocks, takeQemuLocks, type QemuProfile } from './qemu.js';

export interface Resource {
  readonly path: string;
  readonly mode: ResourceMode;
  /** The lock files that carry the lease; lease.key is the resource's identity. */
  readonly lease: Lease;
  /** Also take QEMU-style permission locks on the image (lib/qemu.ts). */
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

/** Canonical order: by identity key, the same in every process, so two managers never deadlock. */
export function canonicalOrder<T extends { lease: Lease }>(resources: Iterable<T>): T[] {
  return [...resources].sort((a, b) => (a.lease.key < b.lease.key ? -1 : a.lease.key > b.lease.key ? 1 : 0));
}

const heldAs = (mode: 'exclusive' | 'shared'): string => (mode === 'exclusive' ? 'exclusively' : 'shared');

/** Whether another open file description holds the migration guard of this lease file. */
function guardHeld(slot: LeaseSlot): boolean {
  try {
    return slot.file.getConflict('shared', GUARD_RANGE) !== null;
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
  const migrating = guardHeld(slot);
  // What a multi-resource acquire released again is added by withRollback().
  return new ResourceBusyError(`${r.path}${where} is ${how} by ${by}${migrating ? `; ${MIGRATING}` : ''}`, {
    holder,
    resource: r.path,
    candidates,
    migrationInProgress: migrating,
  });
}

/** A fresh acquirer found the guard held: the resource is being handed over. */
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

/** Takes one resource's lease (and its QEMU locks), or throws a complete error and holds nothing of it. */
async function takeOne(r: Resource, wait: boolean, deadline: number | undefined, signal: AbortSignal | undefined, checkGuard: boolean): Promise<void> {
  if (r.lease.owned !== undefined) return r.lease.owned.take(r.mode, { wait, timeout: remaining(deadline), signal });
  const mode = lockModeOf(r.mode);
  const taken: LeaseSlot[] = [];
  const undo = () => {
    for (const s of taken.reverse()) s.release(LEASE_RANGE);
  };
  for (const slot of r.lease.slots) {
    let ok: boolean;
    try {
      ok = await slot.take(mode, LEASE_RANGE, { wait, timeout: remaining(deadline), signal });
    } catch (err) {
      undo();
      if (!(err instanceof LockTimeoutError)) throw err;
      // Name who is in the way, as a busy error does.
      const candidates = processesWithOpen(slot.path, { excludeSelf: true });
      const by = candidates.length > 0 ? `; it is open in ${candidates.map(describeProcess).join(', ')}` : '';
      const migrating = guardHeld(slot) ? `; ${MIGRATING}` : '';
      throw new LockTimeoutError(`${err.message}${by}${migrating}`, { timeout: err.timeout, holder: err.holder, cause: err });
    }
    if (!ok) {
      const busy = busyError(r, slot);
      undo();
      throw busy;
    }
    taken.push(slot);
  }
  // Lease first, guard second: a target write-locks the guard before the
  // source lets go of the lease, so whoever gets the lease after the source
  // finds the guard held. Testing the guard first would leave a window between
  // the test and the lease.
  if (checkGuard) {
    for (const slot of r.lease.slots) {
      if (slot.file.tryLock('shared', GUARD_RANGE)) {
        slot.file.unlock(GUARD_RANGE);
        continue;
      }
      const busy = migrationBusy(r, slot);
      undo();
      throw busy;
    }
  }
  if (r.qemu === undefined || r.lease.image === null) return;
  try {
    takeQemuLocks(r.lease.image, r.path, r.qemu);
  } catch (err) {
    undo();
    throw err;
  }
}

/**
 * Takes every resource's lease, in canonical order, or none: on the first
 * failure the leases already taken are released in reverse order and the error
 * says which. Without timeout or signal it never waits (fail fast). QEMU
 * conflicts always fail fast: QEMU's locks are not waited for.
 */
export async function acquireAll(resources: Iterable<Resource>, options: AcquireOptions = {}): Promise<void> {
  const wait = options.wait ?? (options.timeout !== undefined || options.signal !== undefined);
  const deadline = options.timeout === undefined ? undefined : Date.now() + options.timeout;
  const taken: Resource[] = [];
  for (const r of canonicalOrder(resources)) {
    if (r.held) continue;
    try {
      await takeOne(r, wait, deadline, options.signal, options.checkGuard ?? true);
    } catch (err) {
      for (const t of taken.reverse()) releaseOne(t);
      throw withRollback(err, taken.map((t) => t.path));
    }
    r.held = true;
    taken.push(r);
  }
}

/** Releases one lease. The lease stays open: the resource stays registered. */
export function releaseOne(r: Resource): void {
  if (r.held) {
    r.held = false;
    if (r.qemu !== undefined && r.lease.image !== null && !r.lease.image.closed) releaseQemuLocks(r.lease.image, r.qemu);
    for (const slot of [...r.lease.slots].reverse()) slot.release(LEASE_RANGE);
    r.lease.owned?.release();
  }
}

/**
 * A migration target's guard: write-locks byte 1 of every lease file of every
 * resource, in canonical order, or none. A guard held by someone else is
 * another handover of the same disk (or, for an instant, a fresh acquirer
 * testing it): fail-fast mode waits up to `settle` ms for the latter.
 */
export async function takeGuards(resources: Iterable<Resource>, options: AcquireOptions & { settle: number }): Promise<void> {
  const wait = options.wait ?? (options.timeout !== undefined || options.signal !== undefined);
  const deadline = options.timeout === undefined ? undefined : Date.now() + options.timeout;
  const taken: Resource[] = [];
  try {
    for (const r of canonicalOrder(resources)) {
      if (r.guarded) continue;
      const slots: LeaseSlot[] = [];
      try {
        for (const slot of r.lease.slots) {
          try {
            await slot.take('exclusive', GUARD_RANGE, wait ? { wait, timeout: remaining(deadline), signal: options.signal } : { wait: true, timeout: options.settle, signal: options.signal });
          } catch (err) {
            if (wait || !(err instanceof LockTimeoutError)) throw err;
            const { candidates, text } = who(slot.path);
            throw new ResourceBusyError(`${r.path}: another migration of it is in progress: its handover guard (byte 1) is held by ${text}`, {
              resource: r.path,
              candidates,
              migrationInProgress: true,
            });
          }
          slots.push(slot);
        }
      } catch (err) {
        for (const s of slots.reverse()) s.release(GUARD_RANGE);
        throw err;
      }
      r.guarded = true;
      taken.push(r);
    }
  } catch (err) {
    for (const t of taken.reverse()) releaseGuard(t);
    throw withRollback(err, taken.map((t) => t.path));
  }
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

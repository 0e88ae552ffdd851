// A manager's set of resources: identity, canonical order, all-or-nothing
// acquire with rollback, release, and verification that locks are still held.
import { LockTimeoutError, ResourceBusyError, type LockHolder, type ProcessInfo } from './errors.js';
import type { Lockspace, ResourceMode } from './lockspace.js';
import { openLockable, type LockableFile } from './locks.js';
import { commandLine, describeProcess, processesWithOpen } from './proc-locks.js';
import { releaseQemuLocks, takeQemuLocks, type QemuProfile } from './qemu.js';

export interface Resource {
  readonly path: string;
  readonly mode: ResourceMode;
  /** The open lease file; its identity is the resource's identity. */
  readonly file: LockableFile;
  /** Also take QEMU-style permission locks on the image (lib/qemu.ts). */
  readonly qemu?: QemuProfile;
  held: boolean;
}

export interface AcquireOptions {
  timeout?: number;
  signal?: AbortSignal;
  /** Wait for busy resources (default: when timeout or signal is given). False: fail fast. */
  wait?: boolean;
}

/** Canonical order: by identity key, the same in every process, so two managers never deadlock. */
export function canonicalOrder<T extends { file: LockableFile }>(resources: Iterable<T>): T[] {
  return [...resources].sort((a, b) => (a.file.identity.key < b.file.identity.key ? -1 : a.file.identity.key > b.file.identity.key ? 1 : 0));
}

const heldAs = (mode: 'exclusive' | 'shared'): string => (mode === 'exclusive' ? 'exclusively' : 'shared');

/**
 * The busy error for a resource someone else holds: the conflicting lock, and
 * who has the file open, from F_OFD_GETLK and /proc.
 */
export function busyError(space: Lockspace, r: Resource): ResourceBusyError {
  let holder: LockHolder | null = null;
  try {
    holder = r.file.getConflict(space.lockMode(r.mode), space.leaseRange);
  } catch {
    holder = null;
  }
  let candidates: ProcessInfo[];
  let who: string;
  if (holder !== null && holder.pid > 0) {
    candidates = [{ pid: holder.pid, command: commandLine(holder.pid) }];
    who = `by pid ${describeProcess(candidates[0]!)}`;
  } else {
    candidates = processesWithOpen(r.path, { excludeSelf: true });
    who =
      candidates.length > 0
        ? `by ${candidates.length === 1 ? 'pid' : 'one of pids'} ${candidates.map(describeProcess).join(', ')} (OFD locks record no pid: these have it open)`
        : 'by another open file description in this process';
  }
  const how = holder === null ? 'held' : `held ${heldAs(holder.mode)}`;
  // What a multi-resource acquire released again is added by withRollback().
  return new ResourceBusyError(`${r.path} is ${how} ${who}`, { holder, resource: r.path, candidates });
}

/** The same busy or timeout error, saying which leases were released again. */
function withRollback(err: unknown, back: string[]): unknown {
  if (back.length === 0) return err;
  const suffix = `; released again: ${back.join(', ')}`;
  if (err instanceof ResourceBusyError) {
    return new ResourceBusyError(`${err.message}${suffix}`, { holder: err.holder, resource: err.resource ?? undefined, candidates: err.candidates, rolledBack: back, cause: err.cause });
  }
  if (err instanceof LockTimeoutError) {
    return new LockTimeoutError(`${err.message}${suffix}`, { timeout: err.timeout, holder: err.holder, cause: err });
  }
  return err;
}

/** Takes one resource's lease (and its QEMU locks), or throws a complete error and holds nothing of it. */
async function takeOne(space: Lockspace, r: Resource, wait: boolean, deadline: number | undefined, signal: AbortSignal | undefined): Promise<void> {
  const mode = space.lockMode(r.mode);
  if (!wait) {
    if (!r.file.tryLock(mode, space.leaseRange)) throw busyError(space, r);
  } else {
    const timeout = deadline === undefined ? undefined : Math.max(0, deadline - Date.now());
    try {
      await r.file.lock(mode, space.leaseRange, { timeout, signal });
    } catch (err) {
      if (!(err instanceof LockTimeoutError)) throw err;
      // Name who is in the way, as a busy error does.
      const candidates = processesWithOpen(r.path, { excludeSelf: true });
      const who = candidates.length > 0 ? `; it is open in ${candidates.map(describeProcess).join(', ')}` : '';
      throw new LockTimeoutError(`${err.message}${who}`, { timeout: err.timeout, holder: err.holder, cause: err });
    }
  }
  if (r.qemu === undefined) return;
  try {
    takeQemuLocks(r.file, r.path, r.qemu);
  } catch (err) {
    r.file.unlock(space.leaseRange);
    throw err;
  }
}

/**
 * Takes every resource's lease, in canonical order, or none: on the first
 * failure the leases already taken are released in reverse order and the error
 * says which. Without timeout or signal it never waits (fail fast). QEMU
 * conflicts always fail fast: QEMU's locks are not waited for.
 */
export async function acquireAll(space: Lockspace, resources: Iterable<Resource>, options: AcquireOptions = {}): Promise<void> {
  const wait = options.wait ?? (options.timeout !== undefined || options.signal !== undefined);
  const deadline = options.timeout === undefined ? undefined : Date.now() + options.timeout;
  const taken: Resource[] = [];
  for (const r of canonicalOrder(resources)) {
    if (r.held) continue;
    try {
      await takeOne(space, r, wait, deadline, options.signal);
    } catch (err) {
      for (const t of taken.reverse()) releaseOne(space, t);
      throw withRollback(err, taken.map((t) => t.path));
    }
    r.held = true;
    taken.push(r);
  }
}

/** Releases one lease. The file stays open: the resource stays registered. */
export function releaseOne(space: Lockspace, r: Resource): void {
  if (r.held && !r.file.closed) {
    if (r.qemu !== undefined) releaseQemuLocks(r.file, r.qemu);
    r.file.unlock(space.leaseRange);
  }
  r.held = false;
}

/**
 * Whether the lease is still ours: from a second open file description of the
 * same inode (through /proc/self/fd, so a renamed or replaced image path cannot
 * mislead it), F_OFD_GETLK must see a lock that conflicts with ours. It cannot
 * tell our lock from another holder's of the same kind; see docs/contract.md.
 */
export function stillHeld(space: Lockspace, r: Resource): boolean {
  const probe = openLockable(`/proc/self/fd/${r.file.fd}`, { access: 'read' });
  try {
    const conflict = probe.getConflict(r.mode === 'exclusive' ? 'shared' : 'exclusive', space.leaseRange);
    return conflict !== null && (r.mode !== 'exclusive' || conflict.mode === 'exclusive');
  } finally {
    probe.close();
  }
}

// A manager's resources: each registered or hot-plugged resource with its
// lease in the manager's lockspace, and what is done to the set the same way
// in every lockspace: one entry per file whatever path reached it, the
// all-or-nothing acquire (the lockspace's, then QEMU's locks on the image),
// release, the migration guard and verification.
import { InvalidArgumentError, ResourceAccessError, ResourceExhaustedError, type ProcessInfo } from '../os/errors.js';
import { loopBacking, openLoopBacking, type LoopBacking } from '../os/disks.js';
import { openLockable, type LockableFile } from '../os/locks.js';
import { sharersOf } from '../os/proc-locks.js';
import { QEMU_PROFILES, releaseQemuLocks, takeQemuLocks, type QemuProfile } from '../os/qemu.js';
import { withRollback } from '../lockspaces/common.js';
import type { Capabilities, Lease, LockspaceDriver, ResourceMode, ResourceName, TakeOptions } from '../lockspaces/driver.js';
import type { SupervisedProcess } from '../os/supervise.js';
import type { TokenResource } from './token.js';
import type { CheckedSpec } from './validation.js';
import { requireMode } from './validation.js';

export interface Resource {
  readonly path: string;
  readonly mode: ResourceMode;
  /** Its lease in the manager's lockspace. */
  readonly lease: Lease;
  /** QEMU-style permission locks to take on the image too (lib/os/qemu.ts). */
  readonly qemu: QemuProfile | undefined;
  /**
   * With qemu: the image's own open file description that carries those
   * locks, given to the child for QEMU to open through -add-fd (its locks
   * then merge with ours instead of conflicting). Read-write unless readonly:
   * QEMU uses only a descriptor of the access mode it asks for.
   */
  readonly qemuImage: LockableFile | undefined;
  /**
   * With qemuImage on a loop device: its backing file, opened the same way
   * for the same locks, so that a QEMU opening the file directly is refused
   * too. The child inherits it as it does the lease's descriptors.
   */
  readonly qemuBacking: LockableFile | undefined;
  /** The file a loop device writes, to tell two names of one disk apart; null otherwise. */
  readonly backing: LoopBacking | null;
  /** How it was registered, for inquire(). */
  readonly spec: TokenResource;
  held: boolean;
  /** A migration target holds its guard. */
  guarded: boolean;
  /** Taken by acquireResource() while running. */
  hotplugged: boolean;
}

/**
 * The QEMU permissions that stand for a resource mode: exclusive is a writer
 * that shares neither writing nor resizing (a VM with share-rw=off); shared a
 * writer that shares writing (share-rw=on); readonly a reader that lets nobody
 * write (readonly=on): what QEMU's own devices of that kind hold.
 */
export function qemuProfile(mode: ResourceMode): QemuProfile {
  return mode === 'exclusive' ? QEMU_PROFILES.exclusiveWriter : mode === 'shared' ? QEMU_PROFILES.sharedWriter : QEMU_PROFILES.reader;
}

/** Opens for QEMU's locks: read-write unless readonly, or read-only where writing is not permitted. */
function openForQemu<T>(open: (access: 'read' | 'readwrite') => T, mode: ResourceMode): T {
  if (mode === 'readonly') return open('read');
  try {
    return open('readwrite');
  } catch (err) {
    // A file nobody may write (immutable, a read-only mount): QEMU could not
    // write it either, and QEMU's locks are read locks, which read access carries.
    if (err instanceof ResourceAccessError) return open('read');
    throw err;
  }
}

/**
 * A second open file description of the image `lease` opened (through
 * /proc/self/fd: the same inode, whatever happened to the path since), and of
 * a loop device's backing file: QEMU's locks go on both, all or nothing.
 */
function openQemuFiles(image: LockableFile, mode: ResourceMode): { qemuImage: LockableFile; qemuBacking: LockableFile | undefined } {
  const qemuImage = openForQemu((access) => openLockable(`/proc/self/fd/${image.fd}`, { access }), mode);
  try {
    return { qemuImage, qemuBacking: openForQemu((access) => openLoopBacking(qemuImage, access), mode) ?? undefined };
  } catch (err) {
    qemuImage.close();
    throw err;
  }
}

/** The files QEMU's locks of a resource are on. */
const qemuFilesOf = (r: Resource): LockableFile[] => (r.qemu === undefined ? [] : [r.qemuImage, r.qemuBacking].filter((f) => f !== undefined && !f.closed) as LockableFile[]);

/** What a loop device writes; null for anything else (an unreadable binding was refused by the lockspace already, or is not a lease of ours). */
function backingOf(lease: Lease): LoopBacking | null {
  try {
    return lease.image === null ? null : loopBacking(lease.image);
  } catch {
    return null;
  }
}

/**
 * Why a new resource (`path`, `image`, `backing`) is the same disk as `r`
 * under another name, or null: a loop device and its backing file, or two
 * loop devices of one file. Their leases would collide in one manager (a run
 * waiting on itself forever), and the two names are one disk to lock anyway.
 */
function sameDisk(r: Resource, path: string, image: LockableFile | null, backing: LoopBacking | null): string | null {
  const over = (b: LoopBacking | null, f: LockableFile | null): boolean => b !== null && f !== null && f.kind === 'file' && f.identity.dev === b.dev && f.identity.ino === b.ino;
  if (over(r.backing, image)) return `${r.path} is a loop device over ${path}`;
  if (over(backing, r.lease.image)) return `${path} is a loop device over ${r.path}`;
  if (r.backing !== null && backing !== null && r.backing.dev === backing.dev && r.backing.ino === backing.ino) return `both are loop devices over ${backing.path}`;
  return null;
}

/** What orphans of a resource still have open: its lease's descriptions, QEMU's descriptors (qemuDescriptors), or both. */
export type OrphanedThrough = 'lease' | 'qemu';

/**
 * A resource's identity within a manager: the image file itself (so two paths
 * of one file, hard links included, are one resource in every lockspace), or
 * the lease's key for a named lease.
 */
const identityOf = (lease: Lease): string => lease.image?.identity.key ?? lease.key;

const nameOf = (spec: CheckedSpec): ResourceName =>
  spec.type === 'lease' ? { type: 'lease', lockspace: spec.lockspace, key: spec.key, path: spec.path } : { type: 'disk', path: spec.path };

const tokenOf = (spec: CheckedSpec, lease: Lease, mode: ResourceMode): TokenResource =>
  spec.type === 'lease'
    ? { type: 'lease', lockspace: spec.lockspace, key: spec.key, path: spec.path, mode }
    : { type: 'disk', path: lease.path, mode, qemuCompatible: spec.qemuCompatible === true };

const byKey = (a: Resource, b: Resource): number => (a.lease.key < b.lease.key ? -1 : a.lease.key > b.lease.key ? 1 : 0);

export class ResourceSet {
  readonly #space: LockspaceDriver;
  /** By identity: one entry per file, whatever path reached it. */
  readonly #byIdentity = new Map<string, Resource>();

  constructor(space: LockspaceDriver) {
    this.#space = space;
  }

  get capabilities(): Capabilities {
    return this.#space.capabilities;
  }

  values(): Resource[] {
    return [...this.#byIdentity.values()];
  }

  get size(): number {
    return this.#byIdentity.size;
  }

  /**
   * Opens (or finds) the resource of a spec: InvalidArgumentError if it is
   * registered already in another mode or QEMU-compatibility.
   */
  open(spec: CheckedSpec, hotplug: boolean): Resource {
    const mode = requireMode(spec.mode);
    const qemuCompatible = spec.qemuCompatible === true;
    const lease = this.#space.open(nameOf(spec), mode);
    const existing = this.#byIdentity.get(identityOf(lease));
    if (existing !== undefined) {
      lease.close();
      const same = existing.path === lease.path ? `'${lease.path}'` : `'${lease.path}' (the same ${lease.kind === 'lease' ? 'lease' : 'file'} as '${existing.path}')`;
      if (existing.mode !== mode) {
        throw new InvalidArgumentError(`${same} is already ${existing.held ? 'held' : 'registered'} ${existing.mode}, not ${mode}; release it first`);
      }
      if ((existing.qemu !== undefined) !== qemuCompatible) {
        throw new InvalidArgumentError(`${same} is already ${existing.held ? 'held' : 'registered'} ${existing.qemu ? 'with' : 'without'} QEMU-compatible locks`);
      }
      return existing;
    }
    const backing = backingOf(lease);
    let qemuFiles: ReturnType<typeof openQemuFiles> | undefined;
    try {
      this.#checkOneName(lease, backing);
      if (qemuCompatible && lease.image !== null) qemuFiles = openQemuFiles(lease.image, mode);
    } catch (err) {
      lease.close();
      throw err;
    }
    const r: Resource = {
      path: lease.path,
      mode,
      lease,
      held: false,
      guarded: false,
      hotplugged: hotplug,
      spec: tokenOf(spec, lease, mode),
      qemu: qemuFiles === undefined ? undefined : qemuProfile(mode),
      qemuImage: qemuFiles?.qemuImage,
      qemuBacking: qemuFiles?.qemuBacking,
      backing,
    };
    this.#byIdentity.set(identityOf(lease), r);
    return r;
  }

  /**
   * Takes over the lease a running process holds for `spec` (the lockspace's
   * adopt()): registered and held, as if acquired at start. InvalidArgumentError
   * for a resource named twice; the lockspace's own errors otherwise.
   */
  async adopt(spec: CheckedSpec, holder: SupervisedProcess): Promise<Resource> {
    const mode = requireMode(spec.mode);
    const lease = await this.#space.adopt(nameOf(spec), mode, holder);
    const id = identityOf(lease);
    const existing = this.#byIdentity.get(id);
    if (existing !== undefined) {
      lease.close({ keepLocks: true });
      throw new InvalidArgumentError(`'${lease.path}' is named twice (the same ${lease.kind === 'lease' ? 'lease' : 'file'} as '${existing.path}')`);
    }
    const backing = backingOf(lease);
    try {
      this.#checkOneName(lease, backing);
    } catch (err) {
      lease.close({ keepLocks: true });
      throw err;
    }
    const r: Resource = {
      path: lease.path,
      mode,
      lease,
      held: true,
      guarded: false,
      hotplugged: false,
      spec: tokenOf(spec, lease, mode),
      qemu: undefined,
      qemuImage: undefined,
      qemuBacking: undefined,
      backing,
    };
    this.#byIdentity.set(id, r);
    return r;
  }

  /** InvalidArgumentError when a new lease is a registered disk under another name (sameDisk). */
  #checkOneName(lease: Lease, backing: LoopBacking | null): void {
    for (const r of this.values()) {
      const why = sameDisk(r, lease.path, lease.image, backing);
      if (why !== null) throw new InvalidArgumentError(`${r.path} and ${lease.path} are the same disk: ${why}`);
    }
  }

  /** The resource a reference names (by its spec, its path, or the file's identity), or undefined. */
  find(spec: CheckedSpec): Resource | undefined {
    if (spec.type === 'lease') {
      return this.values().find((r) => r.spec.type === 'lease' && r.spec.path === spec.path && r.spec.lockspace === spec.lockspace && r.spec.key === spec.key);
    }
    const byPath = this.values().find((r) => r.path === spec.path);
    if (byPath !== undefined) return byPath;
    try {
      // Another path to a registered file: the same identity (a block device's is its device number, whatever the node).
      const probe = openLockable(spec.path, { access: 'read' });
      const key = probe.identity.key;
      probe.close();
      return this.#byIdentity.get(key);
    } catch {
      return undefined;
    }
  }

  /** Releases, closes and forgets one resource. */
  forget(r: Resource): void {
    this.release(r);
    r.lease.close();
    r.qemuImage?.close();
    r.qemuBacking?.close();
    const key = identityOf(r.lease);
    if (this.#byIdentity.get(key) === r) this.#byIdentity.delete(key);
  }

  /** Closes every lease and forgets them all. keepLocks: an adoption given up, the process keeps what it holds. */
  clear(options?: { keepLocks?: boolean }): void {
    for (const r of this.#byIdentity.values()) {
      r.lease.close(options);
      r.qemuImage?.close();
      r.qemuBacking?.close();
    }
    this.#byIdentity.clear();
  }

  /**
   * Takes every resource's lease, or none: the lockspace's all-or-nothing
   * acquire in the global order, then QEMU's locks on each image (never
   * waited for: QEMU does not wait for ours either). On a failure everything
   * taken is released and the error says which resources were released
   * again. Without timeout or signal it never waits (fail fast).
   */
  async acquire(resources: Iterable<Resource>, options: TakeOptions & { checkGuard?: boolean }): Promise<void> {
    const todo = [...resources].filter((r) => !r.held).sort(byKey);
    await this.#space.acquire(
      todo.map((r) => r.lease),
      { ...options, checkGuard: (options.checkGuard ?? true) && this.#space.capabilities.handoverGuard },
    );
    const taken: Array<{ file: LockableFile; profile: QemuProfile }> = [];
    let at: Resource | undefined;
    try {
      for (const r of todo) {
        at = r;
        for (const file of qemuFilesOf(r)) {
          // A loop device's backing file is named as itself: that is where QEMU's conflict is.
          takeQemuLocks(file, file === r.qemuImage ? r.path : file.path, r.qemu!);
          taken.push({ file, profile: r.qemu! });
        }
      }
    } catch (err) {
      for (const t of taken.reverse()) releaseQemuLocks(t.file, t.profile);
      for (const r of [...todo].reverse()) this.#space.release(r.lease);
      throw withRollback(err, todo.filter((r) => r !== at).map((r) => r.path));
    }
    for (const r of todo) r.held = true;
  }

  /**
   * Releases one lease; the resource stays registered. keepFiles: a child
   * shares these open file descriptions and the same ones may be locked again
   * (a migration source that may take its leases back).
   */
  release(r: Resource, options: { keepFiles?: boolean } = {}): void {
    if (!r.held) return;
    r.held = false;
    for (const file of qemuFilesOf(r)) releaseQemuLocks(file, r.qemu!);
    this.#space.release(r.lease, options);
  }

  /**
   * After the supervised process was reaped: releases every held resource,
   * except those whose lease descriptions, or QEMU descriptors, processes it
   * started still share (found by kcmp over /proc): unlocking would unlock
   * theirs, so those are left to them (abandon, and our QEMU descriptors
   * closed without unlocking) and returned with what they share. If the look
   * fails (out of fds), every lease is left to the kernel, which is right
   * either way (released at our close when nobody shares it; only lock files
   * may stay, for the next user to reuse), and the error is thrown after.
   */
  releaseExited(options: { bornSince?: bigint }): Map<Resource, { processes: ProcessInfo[]; through: OrphanedThrough[] }> {
    const held = this.values().filter((r) => r.held);
    const orphans = new Map<Resource, { processes: ProcessInfo[]; through: OrphanedThrough[] }>();
    let sharers: Map<Lease, ProcessInfo[]>;
    let qemuSharers: Map<number, ProcessInfo[]>;
    try {
      sharers = this.#space.sharers(held.map((r) => r.lease), options);
      const qemuFds = held.flatMap((r) => qemuFilesOf(r).map((f) => f.fd));
      qemuSharers = qemuFds.length === 0 ? new Map() : sharersOf(qemuFds, options);
    } catch (err) {
      for (const r of held) {
        r.held = false;
        this.#space.abandon(r.lease);
      }
      throw new ResourceExhaustedError(
        `could not check whether processes started by the command still hold its leases (${(err as Error).message}); they were not unlocked but left to the kernel, which releases each when the last process holding it closes it`,
        { cause: err },
      );
    }
    for (const r of held) {
      const byLease = sharers.get(r.lease) ?? [];
      const byQemu = qemuFilesOf(r).flatMap((f) => qemuSharers.get(f.fd) ?? []);
      if (byLease.length + byQemu.length === 0) continue;
      r.held = false;
      this.#space.abandon(r.lease);
      for (const f of qemuFilesOf(r)) f.close();
      const processes = new Map([...byLease, ...byQemu].map((p) => [p.pid, p]));
      const through: OrphanedThrough[] = [...(byLease.length > 0 ? ['lease' as const] : []), ...(byQemu.length > 0 ? ['qemu' as const] : [])];
      orphans.set(r, { processes: [...processes.values()], through });
    }
    return orphans;
  }

  /** A migration target's guard on every resource, all or none (a lockspace without handover guards has nothing to take). */
  async guard(options: TakeOptions): Promise<void> {
    if (!this.#space.capabilities.handoverGuard) return;
    const todo = this.values().filter((r) => !r.guarded).sort(byKey);
    await this.#space.guard(todo.map((r) => r.lease), options);
    for (const r of todo) r.guarded = true;
  }

  releaseGuard(r: Resource): void {
    if (!r.guarded) return;
    r.guarded = false;
    this.#space.releaseGuard(r.lease);
  }

  /** The held resources whose lease the lockspace says is no longer held. */
  async lost(): Promise<Resource[]> {
    const held = this.values().filter((r) => r.held);
    const ok = await Promise.all(held.map((r) => this.#space.verify(r.lease)));
    return held.filter((r, i) => !ok[i] && r.held);
  }

  leases(): Lease[] {
    return this.values().map((r) => r.lease);
  }
}

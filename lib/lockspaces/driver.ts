// Where a resource's lease lives. A lockspace turns a resource (a disk path,
// or a named lease) into a Lease: the one or more lock files that carry it.
//
// Every lease file uses the same two bytes:
//   byte 0  the lease: a write lock is exclusive, a read lock shared/readonly.
//           libvirt's virtlockd locks the same byte, so the two exclude each other.
//   byte 1  the migration guard: locked by a migration target from its start()
//           until it holds the lease, in the lease's mode (docs/contract.md,
//           "Migration").
//   byte 2  a pin (indirect lock files only): read-locked by a migration
//           source that released its lease but may take it back, so that the
//           file its child shares is not deleted and recreated meanwhile.
// QEMU's own image locks live at bytes 100 and up (design.md section 6) and
// are taken on the image itself (Lease.image), whatever the lockspace.
//
// The direct lockspace (this file) uses the image or block device itself as
// its one lease file. The indirect one (lockspace-indirect.ts) uses files in a
// shared directory.
import { readFileSync, statSync } from 'node:fs';
import { openLockable, type ByteRange, type LockableFile, type LockMode } from '../os/locks.js';
import { major, minor } from '../os/proc-locks.js';
import type { ExitStatus, SpawnOptions, SupervisedProcess } from '../os/supervise.js';

export type ResourceMode = 'exclusive' | 'shared' | 'readonly';

export interface DirectLockspaceConfig {
  kind: 'direct';
}

export interface IndirectLockspaceConfig {
  kind: 'indirect';
  /** The directory of lock files, shared by every host that must see the leases. */
  dir: string;
}

export interface SanlockLockspaceConfig {
  kind: 'sanlock';
  /** The sanlock lockspace's name, the same on every host (lib/lockspaces/sanlock-client.ts, docs/sanlock.md). */
  lockspace: string;
  /** The shared device or file holding the lockspace and the lease index; the same storage on every host. */
  path: string;
  /** This host's id in the lockspace, as joined (for lease-loss diagnosis and messages). */
  hostId: number;
}

export type LockspaceConfig = DirectLockspaceConfig | IndirectLockspaceConfig | SanlockLockspaceConfig;

export const LEASE_RANGE: Readonly<ByteRange> = Object.freeze({ start: 0, length: 1 });
export const GUARD_RANGE: Readonly<ByteRange> = Object.freeze({ start: 1, length: 1 });
export const PIN_RANGE: Readonly<ByteRange> = Object.freeze({ start: 2, length: 1 });

/** The lock that stands for a resource mode. libvirt leaves readonly disks unlocked; we take a read lock, so a reader and an exclusive writer exclude each other. */
export function lockModeOf(mode: ResourceMode): LockMode {
  return mode === 'exclusive' ? 'exclusive' : 'shared';
}

export interface TakeOptions {
  /** Wait while someone else holds a conflicting lock (else fail fast). */
  wait: boolean;
  timeout?: number;
  signal?: AbortSignal;
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

/**
 * A lease that is not an OFD lock: a sanlock lease belongs to a registered
 * process, not to open files, so it has no slots and is taken and released as
 * a whole (lockspace-sanlock.ts).
 */
export interface OwnedLease {
  /** Takes the lease for the lockspace's owner process: ResourceBusyError (naming the holding host), LockTimeoutError, AbortError. */
  take(mode: ResourceMode, options: TakeOptions): Promise<void>;
  /** Queues the release (the daemon call runs on a native thread); failures go to Lockspace.onWarning. */
  release(): void;
  /** Whether the lock service still has the lease for its owner (verify()); asked on a native thread. */
  stillHeld?(): Promise<boolean>;
}

/** What stops a gated spawn before the command runs (spawnGated). */
export interface GateLimits {
  /** free() or the caller's abort. */
  signal?: AbortSignal;
  /** start()'s timeout, and its deadline (Date.now() based). */
  timeout?: number;
  deadline?: number;
}

/** A resource's lease in a lockspace. */
export interface Lease {
  /** The resource's identity: the same string in every process (and, where the lockspace is shared, every host) that names this resource. Sorts the canonical order. */
  readonly key: string;
  /** The path the resource was registered with. */
  readonly path: string;
  readonly kind: 'file' | 'block-device' | 'lease';
  /** The lock files, in the order they are locked. */
  readonly slots: readonly LeaseSlot[];
  /** The image itself, for QEMU-style locks; null for a lease resource. In the direct lockspace it is the one slot's file. */
  readonly image: LockableFile | null;
  /** Closes every slot and the image. Idempotent. */
  close(): void;
  /** Set for a lease that is not an OFD lock (sanlock); its slots are then empty. */
  readonly owned?: OwnedLease;
}

export interface Lockspace {
  readonly config: LockspaceConfig;
  /** Opens the lease of a disk: a regular file or block device. */
  openDisk(path: string, mode: ResourceMode): Lease;
  /**
   * Only where leases belong to a process (sanlock): spawns the command
   * through a gate, calls beforeExec(pid) while the child waits before exec
   * (the manager acquires there, with the signal given), and lets it exec
   * only if that resolves and limits have not run out.
   */
  spawnGated?(
    command: string,
    args: readonly string[],
    options: SpawnOptions,
    beforeExec: (pid: number, signal: AbortSignal) => Promise<void>,
    limits?: GateLimits,
  ): Promise<SupervisedProcess>;
  /** Resolves once every queued release has reached the lock service. */
  settled?(): Promise<void>;
  /** The lease state a migration target acquires with (in the inquire() token). */
  migrationState?(): string | undefined;
  setMigrationState?(state: string | undefined): void;
  /** After the child exited: why, if the lock service killed it for a lost lease. */
  exitFailure?(status: ExitStatus): Promise<string | null>;
  /** Where failures with no caller go (set by the manager). */
  onWarning?: (err: unknown) => void;
}

/**
 * The kernel's own device node for a block device (`/dev/` + DEVNAME from
 * sysfs), or null if there is none with the same device number.
 */
export function canonicalBlockNode(rdev: bigint): string | null {
  try {
    const uevent = readFileSync(`/sys/dev/block/${major(rdev)}:${minor(rdev)}/uevent`, 'utf8');
    const name = /^DEVNAME=(.+)$/m.exec(uevent)?.[1];
    if (name === undefined) return null;
    const node = `/dev/${name}`;
    const st = statSync(node, { bigint: true });
    return st.isBlockDevice() && st.rdev === rdev ? node : null;
  } catch {
    return null;
  }
}

/**
 * Opens a disk for locking. OFD locks live on an inode, and two device nodes of
 * one disk (a mknod alias, a container's own /dev) are two inodes that would
 * not exclude each other: a block device is therefore always opened through
 * its canonical node. Where that node is missing, the given path is used, and
 * only managers that use the same node exclude each other (docs/contract.md).
 */
export function openDiskFile(path: string, access: 'read' | 'readwrite'): LockableFile {
  const file = openLockable(path, { access });
  if (file.kind !== 'block-device') return file;
  const node = canonicalBlockNode(file.identity.dev);
  if (node === null || node === path) return file;
  try {
    return openLockable(node, { access });
  } finally {
    file.close();
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

export function directLockspace(): Lockspace {
  return {
    config: { kind: 'direct' },
    openDisk(path, mode) {
      // A shared or readonly lease is a read lock, which needs only read
      // access: a disk on a read-only filesystem, or a base image the VM may
      // not write, can still be leased shared.
      const file = openDiskFile(path, mode === 'exclusive' ? 'readwrite' : 'read');
      return {
        key: file.identity.key,
        path,
        kind: file.kind,
        slots: [fixedSlot(file)],
        image: file,
        close: () => file.close(),
      };
    },
  };
}

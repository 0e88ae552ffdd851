// Where a resource's lease lives. The direct lockspace puts it on the image or
// block device itself, at byte 0, length 1, exactly where libvirt's virtlockd
// puts its lock, so the two exclude each other. QEMU's own image locks live at
// bytes 100 and up (design.md section 6); a direct lease never touches them.
import { openLockable, type ByteRange, type LockableFile, type LockMode } from './locks.js';

export type ResourceMode = 'exclusive' | 'shared' | 'readonly';

export interface DirectLockspaceConfig {
  kind: 'direct';
}

export type LockspaceConfig = DirectLockspaceConfig;

export interface Lockspace {
  readonly config: LockspaceConfig;
  /** The byte range that is the lease. */
  readonly leaseRange: Readonly<ByteRange>;
  /** Opens the file that carries `path`'s lease, with the access its mode needs. */
  openLease(path: string, mode: ResourceMode): LockableFile;
  /** The lock that stands for a resource mode. */
  lockMode(mode: ResourceMode): LockMode;
}

export const LEASE_RANGE: Readonly<ByteRange> = Object.freeze({ start: 0, length: 1 });

export function directLockspace(): Lockspace {
  return {
    config: { kind: 'direct' },
    leaseRange: LEASE_RANGE,
    // A shared or readonly lease is a read lock, which needs only read access:
    // a disk on a read-only filesystem, or a base image the VM may not write,
    // can still be leased shared.
    openLease: (path, mode) => openLockable(path, { access: mode === 'exclusive' ? 'readwrite' : 'read' }),
    // libvirt leaves readonly disks unlocked; we take a read lock, so a reader
    // and an exclusive writer exclude each other.
    lockMode: (mode) => (mode === 'exclusive' ? 'exclusive' : 'shared'),
  };
}

// Where a resource's lease lives. The direct lockspace puts it on the image or
// block device itself, at byte 0, length 1, exactly where libvirt's virtlockd
// puts its lock, so the two exclude each other. QEMU's own image locks live at
// bytes 100 and up (design.md section 6); a direct lease never touches them.
import { readFileSync, statSync } from 'node:fs';
import { openLockable, type ByteRange, type LockableFile, type LockMode } from './locks.js';
import { major, minor } from './proc-locks.js';

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
 * Opens the file that carries a direct lease. OFD locks live on an inode, and
 * two device nodes of one disk (a mknod alias, a container's own /dev) are two
 * inodes that would not exclude each other: a block device's lease is
 * therefore always taken on its canonical node. Where that node is missing,
 * the given path is used, and only managers that use the same node exclude
 * each other (docs/contract.md).
 */
function openDirectLease(path: string, mode: ResourceMode): LockableFile {
  const access = mode === 'exclusive' ? 'readwrite' : 'read';
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

export function directLockspace(): Lockspace {
  return {
    config: { kind: 'direct' },
    leaseRange: LEASE_RANGE,
    // A shared or readonly lease is a read lock, which needs only read access:
    // a disk on a read-only filesystem, or a base image the VM may not write,
    // can still be leased shared.
    openLease: openDirectLease,
    // libvirt leaves readonly disks unlocked; we take a read lock, so a reader
    // and an exclusive writer exclude each other.
    lockMode: (mode) => (mode === 'exclusive' ? 'exclusive' : 'shared'),
  };
}

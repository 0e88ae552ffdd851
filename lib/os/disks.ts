// Disks as the kernel knows them: a block device by its own device node.
import { readFileSync, statSync } from 'node:fs';
import { openLockable, type LockableFile } from './locks.js';
import { major, minor } from './proc-locks.js';

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


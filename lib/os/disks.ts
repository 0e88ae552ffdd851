// Disks as the kernel knows them: a block device by its own device node.
import { readFileSync, statSync } from 'node:fs';
import { ResourceAccessError } from './errors.js';
import { openLockable, type LockableFile } from './locks.js';
import { native } from './native.js';
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


/** A loop device's backing file, as the kernel has it bound. */
export interface LoopBacking {
  /** The path the kernel recorded (/sys/dev/block/M:m/loop/backing_file). */
  path: string;
  dev: bigint;
  ino: bigint;
  offset: bigint;
}

const LOOP_FIELDS = 4;

/**
 * The file behind a loop device, or null if `file` is not a bound loop
 * device. Writing either writes the other, so a loop device's lease must
 * cover its backing file too (and two loop devices of one file then exclude
 * each other). The identity comes from LOOP_GET_STATUS64 (device and inode),
 * the path from sysfs; a path that no longer names that inode (the file was
 * renamed, deleted or replaced since losetup) is a ResourceAccessError: its
 * lease could not be found by anyone who opens the file by name.
 */
export function loopBacking(file: LockableFile): LoopBacking | null {
  if (file.kind !== 'block-device') return null;
  const out = new BigUint64Array(LOOP_FIELDS);
  // ENOTTY/EINVAL: not a loop device; ENXIO: a loop device with nothing bound.
  if (native.loopStatus(file.fd, out) < 0) return null;
  const sys = `/sys/dev/block/${major(file.identity.dev)}:${minor(file.identity.dev)}/loop/backing_file`;
  let path: string;
  try {
    path = readFileSync(sys, 'utf8').replace(/\n$/, '');
  } catch (err) {
    throw new ResourceAccessError(`cannot read the backing file of loop device '${file.path}' from ${sys}: ${(err as Error).message}`, { cause: err });
  }
  const [dev, ino, offset] = [out[0]!, out[1]!, out[2]!];
  let st;
  try {
    st = statSync(path, { bigint: true });
  } catch {
    st = null;
  }
  if (st === null || st.dev !== dev || st.ino !== ino) {
    throw new ResourceAccessError(
      `loop device '${file.path}' is bound to '${path}' (device ${dev}, inode ${ino}), which no longer names that file (deleted, renamed or replaced): its lease cannot cover it. Detach it (losetup -d) and set it up again`,
    );
  }
  return { path, dev, ino, offset };
}

/**
 * The backing file of a loop device `image`, opened for locking, or null
 * when `image` is not a loop device: a lease, and QEMU's locks, must cover
 * both (the loop device writes the file). Checked to be the inode the loop device is bound to.
 */
export function openLoopBacking(image: LockableFile, access: 'read' | 'readwrite'): LockableFile | null {
  const backing = loopBacking(image);
  if (backing === null) return null;
  const file = openDiskFile(backing.path, access);
  if (file.kind === 'file' && (file.identity.dev !== backing.dev || file.identity.ino !== backing.ino)) {
    file.close();
    throw new ResourceAccessError(`the backing file '${backing.path}' of loop device '${image.path}' was replaced while it was being opened for locking; try again`);
  }
  return file;
}

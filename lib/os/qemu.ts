// QEMU's own image locks, read and imitated.
//
// QEMU (block/file-posix.c) takes OFD read locks on the image: byte 100+i while
// it holds permission i, byte 200+i while it refuses to share permission i. It
// finds conflicts by probing with a write-lock F_OFD_GETLK: to hold permission
// i nobody may be refusing it (200+i), to refuse it nobody may hold it (100+i).
// Measured here with Debian's QEMU 7.2: qemu-io holds
// 100-101 read-write and 100 read-only; qemu-nbd also refuses resize (203); a
// VM with share-rw=off also refuses write (201). Our byte-0 lease is outside
// this range and never disturbs QEMU.
import { InvalidArgumentError, ResourceBusyError, type LockHolders, type ProcessInfo } from './errors.js';
import { openLockable, type LockableFile } from './locks.js';
import { holdersWords, lockHolders, locksOn, processesWithOpen, type ProcLock } from './proc-locks.js';

export const QEMU_PERMISSIONS = ['consistent-read', 'write', 'write-unchanged', 'resize', 'graph-mod'] as const;
export type QemuPermission = (typeof QEMU_PERMISSIONS)[number];

/** Byte 100+i: permission i is held. */
export const QEMU_PERM_BASE = 100;
/** Byte 200+i: permission i is not shared. */
export const QEMU_SHARED_BASE = 200;

const byteOf = (base: number, p: QemuPermission): { start: number; length: number } => ({ start: base + QEMU_PERMISSIONS.indexOf(p), length: 1 });

export interface QemuLockState {
  /** Permissions some open file description holds. */
  held: QemuPermission[];
  /** Permissions some open file description refuses to share. */
  unshared: QemuPermission[];
  /** The /proc/locks entries in QEMU's byte range (100-299). */
  locks: ProcLock[];
  /** Processes that have the image open: QEMU's locks are OFD locks, which record no pid. */
  candidates: ProcessInfo[];
}

/** Which QEMU permissions others hold on the image, and which they refuse to share. */
export function qemuLockState(path: string): QemuLockState {
  const probe = openLockable(path, { access: 'read' });
  try {
    const held: QemuPermission[] = [];
    const unshared: QemuPermission[] = [];
    for (const p of QEMU_PERMISSIONS) {
      if (probe.getConflict('exclusive', byteOf(QEMU_PERM_BASE, p)) !== null) held.push(p);
      if (probe.getConflict('exclusive', byteOf(QEMU_SHARED_BASE, p)) !== null) unshared.push(p);
    }
    const locks = locksOn(path).filter((l) => l.start >= QEMU_PERM_BASE && l.start < QEMU_SHARED_BASE + 100);
    const candidates = held.length + unshared.length > 0 ? processesWithOpen(path) : [];
    return { held, unshared, locks, candidates };
  } finally {
    probe.close();
  }
}

/** What a QEMU user of the image holds and refuses to share. */
export interface QemuProfile {
  hold: readonly QemuPermission[];
  unshare: readonly QemuPermission[];
}

/**
 * The profiles lockmgr takes, one per resource mode: a writer that shares
 * neither writing nor resizing (a VM with share-rw=off); a writer that shares
 * writing but not resizing (a VM with share-rw=on holds 100-101); a reader
 * that lets nobody write or resize (a VM with readonly=on refuses write, 201,
 * unless share-rw=on). Measured with Debian's QEMU 7.2 (docs/cli.md).
 */
export const QEMU_PROFILES = {
  exclusiveWriter: { hold: ['consistent-read', 'write'], unshare: ['write', 'resize'] },
  sharedWriter: { hold: ['consistent-read', 'write'], unshare: ['resize'] },
  reader: { hold: ['consistent-read'], unshare: ['write', 'resize'] },
} as const satisfies Record<string, QemuProfile>;

/** The first QEMU permission in the way of `profile`, tested as QEMU tests it, or null. */
export function qemuConflict(file: LockableFile, profile: QemuProfile): { permission: QemuPermission; reason: 'held' | 'unshared' } | null {
  for (const p of profile.hold) {
    if (file.getConflict('exclusive', byteOf(QEMU_SHARED_BASE, p)) !== null) return { permission: p, reason: 'unshared' };
  }
  for (const p of profile.unshare) {
    if (file.getConflict('exclusive', byteOf(QEMU_PERM_BASE, p)) !== null) return { permission: p, reason: 'held' };
  }
  return null;
}

/**
 * Takes QEMU-style locks for `profile` on the image, or throws
 * ResourceBusyError naming the QEMU process in the way. As QEMU does it
 * (raw_handle_perm_lock: apply the lock bytes, then check): lock first, then
 * probe. Of two takers racing, at least the later one sees the other's bytes,
 * so two writers can never both pass; testing first would let both pass.
 */
export function takeQemuLocks(file: LockableFile, path: string, profile: QemuProfile): void {
  const bytes = [...profile.hold.map((p) => byteOf(QEMU_PERM_BASE, p)), ...profile.unshare.map((p) => byteOf(QEMU_SHARED_BASE, p))];
  const undo = (n: number) => {
    for (const taken of bytes.slice(0, n)) file.unlock(taken);
  };
  for (const [i, range] of bytes.entries()) {
    // QEMU only ever read-locks these bytes; a write lock here is someone else's.
    if (!file.tryLock('shared', range)) {
      undo(i);
      throw new ResourceBusyError(`${path}: another process write-locks byte ${range.start}, in QEMU's lock range`, { resource: path });
    }
  }
  const conflict = qemuConflict(file, profile);
  if (conflict === null) return;
  undo(bytes.length);
  // Who: the holders of that permission's byte, from the kernel's records.
  const byte = byteOf(conflict.reason === 'held' ? QEMU_PERM_BASE : QEMU_SHARED_BASE, conflict.permission);
  let found: LockHolders = { holders: [], openers: [], unreadable: [], fdinfoAvailable: false };
  try {
    found = lockHolders(file.fd, 'exclusive', byte, { conflict: file.getConflict('exclusive', byte) });
  } catch {
    // The error must not fail for want of /proc.
  }
  const { by, also } = holdersWords(found, path);
  const what = conflict.reason === 'held' ? `holds the QEMU "${conflict.permission}" permission` : `refuses to share the QEMU "${conflict.permission}" permission`;
  throw new ResourceBusyError(`${path}: another process ${what} (held by ${by}${also})`, { resource: path, ...found });
}

export function releaseQemuLocks(file: LockableFile, profile: QemuProfile): void {
  for (const p of profile.hold) file.unlock(byteOf(QEMU_PERM_BASE, p));
  for (const p of profile.unshare) file.unlock(byteOf(QEMU_SHARED_BASE, p));
}

export interface QemuDiskOptions {
  /** The block node's name (node-name and the device's drive=); the file node is `${id}-file`. */
  id: string;
  /** The lease's mode: exclusive (share-rw=off), shared (share-rw=on), readonly (read-only=on). */
  mode: 'exclusive' | 'shared' | 'readonly';
  /** The format driver on top of the file node. Default 'raw'. */
  format?: string;
  /** The guest device, or null for none. Default 'virtio-blk-pci' (a drive without a device takes only byte 100). */
  device?: string | null;
}

/**
 * QEMU's arguments that open a disk through the inherited descriptor `fd`
 * (LockManager.qemuDescriptors): -add-fd into fd set `fd`, a file node on
 * /dev/fdset/N, the format node, the device. QEMU dups the descriptor, so its
 * locks land on our open file description and merge with ours. -drive cannot
 * do it: it opens read-only first, and finds no read-only descriptor in the set.
 */
export function qemuDiskArgs(fd: number, options: QemuDiskOptions): string[] {
  if (!Number.isInteger(fd) || fd < 3) throw new InvalidArgumentError(`qemuDiskArgs() needs an inherited descriptor >= 3, got ${String(fd)}`);
  const { id, mode } = options;
  if (typeof id !== 'string' || !/^[A-Za-z][A-Za-z0-9_.-]*$/.test(id)) throw new InvalidArgumentError(`qemuDiskArgs() id must be a QEMU node name (a letter, then letters, digits, '-', '_', '.'), got ${String(id)}`);
  if (mode !== 'exclusive' && mode !== 'shared' && mode !== 'readonly') throw new InvalidArgumentError(`qemuDiskArgs() mode must be 'exclusive', 'shared' or 'readonly', got ${String(mode)}`);
  const format = options.format ?? 'raw';
  const device = options.device === undefined ? 'virtio-blk-pci' : options.device;
  // A comma would smuggle options into QEMU's key=value lists.
  if (typeof format !== 'string' || !/^[A-Za-z0-9_-]+$/.test(format)) throw new InvalidArgumentError(`qemuDiskArgs() format must be a QEMU driver name, got ${String(format)}`);
  if (device !== null && (typeof device !== 'string' || !/^[A-Za-z0-9_.-]+$/.test(device))) throw new InvalidArgumentError(`qemuDiskArgs() device must be a QEMU device type or null, got ${String(device)}`);
  const ro = mode === 'readonly' ? ',read-only=on' : '';
  const args = [
    '-add-fd',
    `fd=${fd},set=${fd}`,
    '-blockdev',
    `driver=file,filename=/dev/fdset/${fd},node-name=${id}-file${ro}`,
    '-blockdev',
    `driver=${format},file=${id}-file,node-name=${id}${ro}`,
  ];
  if (device !== null) args.push('-device', `${device},drive=${id}${mode === 'shared' ? ',share-rw=on' : ''}`);
  return args;
}

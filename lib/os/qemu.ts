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
import { ResourceBusyError, type LockHolders, type ProcessInfo } from './errors.js';
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

/** The profiles lockmgr takes: a writer that shares neither writing nor resizing (a VM with share-rw=off), and a reader that refuses resizing (as qemu-nbd does). */
export const QEMU_PROFILES = {
  exclusiveWriter: { hold: ['consistent-read', 'write'], unshare: ['write', 'resize'] },
  reader: { hold: ['consistent-read'], unshare: ['resize'] },
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

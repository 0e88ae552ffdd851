// Named leases, libvirt's <lease>: the lock file <path>/<lockspace>/<key>.
// It lives in a directory of its own, so it is the same in every OFD
// lockspace; it is created when missing and never deleted (libvirt's are not
// either: the name is the caller's).
import { mkdirSync } from 'node:fs';
import { join, normalize } from 'node:path';
import { InvalidArgumentError } from '../os/errors.js';
import { openLockable } from '../os/locks.js';
import { checkOptions, checkPath, describe } from '../os/validate.js';
import type { LeaseStatus, ResourceMode } from './driver.js';
import { checkLockDir, isErrno, LockFileSlot, statError } from './lock-files.js';
import { byteStatus, leaseHolders, OfdLease } from './ofd.js';

/** A named lease, libvirt's `<lease>`: the lock file `<path>/<lockspace>/<key>`. */
export interface LeaseResourceSpec {
  lockspace: string;
  key: string;
  path: string;
}

/** Checks a lease name part (libvirt's lockspace or key): a single path component. */
function checkNamePart(value: unknown, what: string): string {
  if (typeof value !== 'string') throw new InvalidArgumentError(`${what} must be a string, got ${describe(value)}`);
  if (value === '') throw new InvalidArgumentError(`${what} must not be empty`);
  if (value.includes('\0')) throw new InvalidArgumentError(`${what} must not contain a NUL byte: ${describe(value)}`);
  if (value.includes('/')) throw new InvalidArgumentError(`${what} must not contain '/': ${describe(value)}`);
  if (value === '.' || value === '..') throw new InvalidArgumentError(`${what} must not be '.' or '..'`);
  if (Buffer.byteLength(value) > 255) throw new InvalidArgumentError(`${what} is ${Buffer.byteLength(value)} bytes long; a file name has at most 255`);
  return value;
}

/** The lease's lock file, its name parts checked. */
export function leaseFilePath(spec: LeaseResourceSpec): string {
  const s = checkOptions<LeaseResourceSpec & { type?: unknown }>(spec, ['type', 'lockspace', 'key', 'path'], 'lease');
  const lockspace = checkNamePart(s.lockspace, 'lease lockspace');
  const key = checkNamePart(s.key, 'lease key');
  return join(normalize(checkPath(s.path, 'lease path')), lockspace, key);
}

/**
 * Opens a named lease: checks `<path>` (checkLockDir), creates
 * `<path>/<lockspace>` 0700 if missing and checks it, and opens the lock
 * file (created if missing; an implausible one is refused).
 */
export function openNamedLease(spec: LeaseResourceSpec, mode: ResourceMode): OfdLease {
  const file = leaseFilePath(spec);
  const sub = join(file, '..');
  checkLockDir(join(sub, '..'), 'lease path');
  try {
    mkdirSync(sub, { mode: 0o700 });
  } catch (err) {
    if (!isErrno(err, 'EEXIST')) throw statError(err, sub, `cannot create the lease directory '${sub}'`);
  }
  checkLockDir(sub, 'lease directory');
  const slot = new LockFileSlot(file, { deletable: false });
  return new OfdLease(`lease:${file}`, file, 'lease', mode, [slot], null);
}

/** Who holds a named lease, read without creating anything. */
export function inspectNamedLease(spec: LeaseResourceSpec): LeaseStatus {
  const path = leaseFilePath(spec);
  let file;
  try {
    file = openLockable(path, { access: 'read' });
  } catch {
    return { lockspace: 'lease file', locations: [{ what: 'lease file', path, exists: false, lease: { state: 'free', holder: null }, guard: { state: 'free', holder: null } }] };
  }
  try {
    return { lockspace: 'lease file', locations: [{ what: 'lease file', path, exists: true, lease: byteStatus(file, 0), guard: byteStatus(file, 1), holders: leaseHolders(file) }] };
  } finally {
    file.close();
  }
}

void InvalidArgumentError;
void describe;

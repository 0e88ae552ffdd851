// OFD byte-range locks on files and block devices.
//
// An OFD lock belongs to the open file description, not to the process: closing
// another fd of the same file never drops it, two openLockable() calls on one
// file in one process conflict like two processes do, and an fd handed to a
// child (keepFds) carries the lock with it.
//
// tryLock() is one F_OFD_SETLK on the calling thread. lock() tries the same
// first; only on conflict does it park an F_OFD_SETLKW on a dedicated native
// waiter thread (native/waiters.cc), never on the event loop or libuv's pool.
import { fstatSync, statfsSync, type BigIntStats } from 'node:fs';
import {
  AbortError,
  InvalidArgumentError,
  InvalidStateError,
  LockTimeoutError,
  ResourceAccessError,
  errnoOf,
  fromErrno,
  systemError,
  type LockHolder,
  type LockHolders,
  type LockManagerError,
} from './errors.js';
import { constants, native } from './native.js';
import { holdersWords, lockHolders } from './proc-locks.js';
import { cancelWait, startWait, watchAbort } from './waits.js';
import { checkOffset, checkOneOf, checkOptions, checkPath, checkSignal, checkTimeout, describe } from './validate.js';

export type LockMode = 'exclusive' | 'shared';
export type Access = 'read' | 'readwrite';
export type ResourceKind = 'file' | 'block-device';
export type LockConflict = LockHolder;

/** A byte range. Defaults: start 0, length 0, where length 0 means "to the end of the file and beyond". */
export interface ByteRange {
  start?: number;
  length?: number;
}

export interface OpenOptions {
  /** 'readwrite' (default) allows exclusive and shared locks; 'read' allows shared locks only. */
  access?: Access;
  /**
   * Open or create a lock file. Only with access 'readwrite'. A missing file is
   * created (O_EXCL, mode 0600). An existing one is used only if it is
   * plausibly a lock file: a regular file, empty, with one link, owned by this
   * user or root, without set-id bits; anything else is refused with a
   * ResourceAccessError before it is opened for writing. The last path
   * component is never followed through a symlink.
   */
  create?: boolean;
}

export interface LockOptions {
  /** Milliseconds to wait for a conflicting lock to go; 0 tries once. Default: wait as long as it takes. */
  timeout?: number;
  /** Aborting it ends the wait with an AbortError. */
  signal?: AbortSignal;
}

/**
 * Which file this is, whatever path reached it: dev and inode for a regular
 * file, the device number (rdev) for a block device, whose inode differs per
 * device node. `key` is a string form that sorts the same in every process.
 */
export interface ResourceIdentity {
  readonly dev: bigint;
  readonly ino: bigint;
  readonly key: string;
}

const { SHARED, EXCLUSIVE, UNLOCK } = constants.lock;

// setlk's answers for "a conflicting lock is held".
const BUSY = -errnoOf('EAGAIN');
const BUSY_OLD = -errnoOf('EACCES');
const EBADF = errnoOf('EBADF');
const EINVAL = errnoOf('EINVAL');
const EEXIST = errnoOf('EEXIST');
const ELOOP = errnoOf('ELOOP');
const ENOENT = errnoOf('ENOENT');
/** How often a lock file may vanish between the O_EXCL create and the open of the existing one: each time, another process deleted it. */
const MAX_CREATE_ATTEMPTS = 1000;
const ECANCELED = errnoOf('ECANCELED');
const ETIMEDOUT = errnoOf('ETIMEDOUT');

// The range of the call in progress. tryLock() runs millions of times a second
// in a tight loop; parsing into these instead of a fresh object keeps its
// success path free of allocations.
let rangeStart = 0;
let rangeLength = 0;

function parseRange(range: ByteRange | undefined): void {
  if (range === undefined) {
    rangeStart = 0;
    rangeLength = 0;
    return;
  }
  if (range === null || typeof range !== 'object' || Array.isArray(range)) {
    throw new InvalidArgumentError(`range must be an object { start, length }, got ${describe(range)}`);
  }
  for (const key in range) {
    if (key !== 'start' && key !== 'length') {
      throw new InvalidArgumentError(`range has an unknown key '${key}' (allowed: start, length)`);
    }
  }
  rangeStart = range.start === undefined ? 0 : checkOffset(range.start, 'range.start');
  rangeLength = range.length === undefined ? 0 : checkOffset(range.length, 'range.length');
}

function lockType(mode: LockMode): number {
  if (mode === 'exclusive') return EXCLUSIVE;
  if (mode === 'shared') return SHARED;
  throw new InvalidArgumentError(`mode must be 'exclusive' or 'shared', got ${describe(mode)}`);
}

const article = (mode: LockMode): string => (mode === 'exclusive' ? 'an exclusive' : 'a shared');

function rangeText(start: number, length: number): string {
  if (length === 0) return start === 0 ? 'the whole file' : `bytes ${start} to the end`;
  return length === 1 ? `byte ${start}` : `bytes ${start}-${start + length - 1}`;
}

function holderText(holder: LockHolder): string {
  const who = holder.pid > 0 ? `process ${holder.pid}` : 'another open file description (OFD locks record no pid)';
  return `${holder.mode} lock on ${rangeText(holder.start, holder.length)} held by ${who}`;
}

interface PendingWait {
  id: number;
  readonly file: LockableFile;
  readonly mode: LockMode;
  readonly start: number;
  readonly length: number;
  readonly timeout: number | undefined;
  readonly signal: AbortSignal | undefined;
  readonly resolve: () => void;
  readonly reject: (err: LockManagerError) => void;
  /** Stops watching the abort signal. */
  unwatch: (() => void) | undefined;
  /** Already rejected (by close()); its completion only frees the fd. */
  settled: boolean;
}

function abortError(signal: AbortSignal): AbortError {
  return new AbortError('the lock wait was aborted', { cause: signal.reason });
}

const constructing = Symbol('LockableFile');

/** An open file or block device that can be locked. Create it with openLockable(). */
export class LockableFile implements Disposable {
  readonly path: string;
  readonly kind: ResourceKind;
  readonly identity: ResourceIdentity;
  readonly access: Access;
  /** This open created the file (openLockable with `create`, and the name was free). */
  readonly created: boolean;
  #fd: number;
  #closed = false;
  readonly #waits = new Set<PendingWait>();

  /** @internal */
  constructor(token: symbol, fd: number, path: string, kind: ResourceKind, identity: ResourceIdentity, access: Access, created = false) {
    if (token !== constructing) throw new InvalidStateError('use openLockable() to open a lockable file');
    this.created = created;
    this.#fd = fd;
    this.path = path;
    this.kind = kind;
    this.identity = identity;
    this.access = access;
  }

  /** The file descriptor (O_CLOEXEC). Hand it to a child to let the child carry the locks. */
  get fd(): number {
    this.#check('fd');
    return this.#fd;
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** Takes the lock if no one else holds a conflicting one. Never waits. */
  tryLock(mode: LockMode, range?: ByteRange): boolean {
    this.#check('tryLock');
    const type = lockType(mode);
    parseRange(range);
    const rv = native.setlk(this.#fd, type, rangeStart, rangeLength);
    if (rv === 0) return true;
    if (rv === BUSY || rv === BUSY_OLD) return false;
    throw this.#lockError(-rv, mode, rangeStart, rangeLength);
  }

  /**
   * Takes the lock, waiting while someone else holds a conflicting one. Rejects
   * with LockTimeoutError or AbortError when the wait ends without the lock.
   */
  async lock(mode: LockMode, range?: ByteRange, options?: LockOptions): Promise<void> {
    this.#check('lock');
    const type = lockType(mode);
    parseRange(range);
    const start = rangeStart;
    const length = rangeLength;
    const opts = checkOptions<LockOptions>(options, ['timeout', 'signal'], 'lock options');
    const timeout = checkTimeout(opts.timeout);
    const signal = checkSignal(opts.signal);
    if (signal?.aborted) throw abortError(signal);
    const rv = native.setlk(this.#fd, type, start, length);
    if (rv === 0) return;
    if (rv !== BUSY && rv !== BUSY_OLD) throw this.#lockError(-rv, mode, start, length);
    if (timeout === 0) throw this.#timeoutError(mode, start, length, 0);
    return this.#wait(type, mode, start, length, timeout, signal);
  }

  /** Releases the range. Unlocking what is not locked is a no-op. */
  unlock(range?: ByteRange): void {
    this.#check('unlock');
    parseRange(range);
    const rv = native.setlk(this.#fd, UNLOCK, rangeStart, rangeLength);
    if (rv !== 0) throw fromErrno('fcntl', -rv, this.path, `cannot unlock ${rangeText(rangeStart, rangeLength)} of '${this.path}'`);
  }

  /** The lock that would block `mode` on the range (F_OFD_GETLK), or null. Our own locks never conflict. */
  getConflict(mode: LockMode, range?: ByteRange): LockConflict | null {
    this.#check('getConflict');
    const type = lockType(mode);
    parseRange(range);
    return this.#conflict(type, rangeStart, rangeLength);
  }

  /**
   * Closes the file. Its locks go with it, unless a child still holds a copy of
   * the fd. Pending lock() calls reject with InvalidStateError. Idempotent.
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#waits.size === 0) {
      this.#closeFd();
      return;
    }
    // Waiter threads still use the fd number: closing it now could let a new
    // open() reuse the number under them. Unlock the whole file, so what is
    // held goes now, then retire the fd: its open file description goes as
    // soon as the woken waiters leave the kernel, taking with it any lock
    // granted to one of them after the unlock. The number itself is released
    // when the last waiter has reported.
    native.setlk(this.#fd, UNLOCK, 0, 0);
    native.retireFd(this.#fd);
    for (const wait of this.#waits) {
      wait.settled = true;
      wait.unwatch?.();
      wait.reject(new InvalidStateError(`'${this.path}' was closed while a lock() was waiting`));
      cancelWait(wait.id);
    }
  }

  [Symbol.dispose](): void {
    this.close();
  }

  /** @internal Called with the errno a waiter thread finished with. */
  static finishWait(wait: PendingWait, errno: number): void {
    const file = wait.file;
    file.#waits.delete(wait);
    wait.unwatch?.();
    if (!wait.settled) {
      if (errno === 0) wait.resolve();
      else if (errno === ECANCELED && wait.signal?.aborted) wait.reject(abortError(wait.signal));
      else if (errno === ETIMEDOUT) wait.reject(file.#timeoutError(wait.mode, wait.start, wait.length, wait.timeout ?? 0));
      else wait.reject(file.#lockError(errno, wait.mode, wait.start, wait.length));
    }
    if (file.#closed && file.#waits.size === 0) file.#closeFd();
  }

  #wait(type: number, mode: LockMode, start: number, length: number, timeout: number | undefined, signal: AbortSignal | undefined): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const wait: PendingWait = { id: 0, file: this, mode, start, length, timeout, signal, resolve, reject, unwatch: undefined, settled: false };
      wait.id = startWait(this.#fd, type, start, length, timeout, (errno) => LockableFile.finishWait(wait, errno), this.path);
      this.#waits.add(wait);
      if (signal !== undefined) wait.unwatch = watchAbort(signal, () => cancelWait(wait.id));
    });
  }

  #conflict(type: number, start: number, length: number): LockConflict | null {
    const rv = native.getlk(this.#fd, type, start, length, conflictScratch);
    if (rv !== 0) throw this.#lockError(-rv, type === EXCLUSIVE ? 'exclusive' : 'shared', start, length);
    if (conflictScratch[0] === UNLOCK) return null;
    return {
      mode: conflictScratch[0] === EXCLUSIVE ? 'exclusive' : 'shared',
      start: conflictScratch[1]!,
      length: conflictScratch[2]!,
      pid: conflictScratch[3]!,
    };
  }

  #lockError(errno: number, mode: LockMode, start: number, length: number): LockManagerError {
    const what = `cannot take ${article(mode)} lock on ${rangeText(start, length)} of '${this.path}'`;
    if (errno === EBADF && mode === 'exclusive' && this.access === 'read') {
      return fromErrno('fcntl', errno, this.path, `${what}: exclusive locks need readwrite access, and it was opened for reading only`);
    }
    return fromErrno('fcntl', errno, this.path, what);
  }

  #timeoutError(mode: LockMode, start: number, length: number, timeout: number): LockTimeoutError {
    let holder: LockHolder | null = null;
    let found: LockHolders | undefined;
    if (!this.#closed) {
      try {
        holder = this.#conflict(mode === 'exclusive' ? EXCLUSIVE : SHARED, start, length);
        // Who: from the kernel's records (fdinfo, /proc/locks), off the fast path.
        found = lockHolders(this.#fd, mode, { start, length }, { conflict: holder });
      } catch {
        // The error must not fail for want of /proc.
      }
    }
    let still = '';
    if (found !== undefined && (holder !== null || found.holders.length > 0)) {
      const { by, also } = holdersWords(found, this.path);
      still = `; still held by ${by}${also}`;
    } else if (holder !== null) {
      still = `; still in the way: ${holderText(holder)}`;
    }
    return new LockTimeoutError(`timed out after ${timeout} ms waiting for ${article(mode)} lock on ${rangeText(start, length)} of '${this.path}'${still}`, {
      timeout,
      holder,
      resource: this.path,
      ...found,
    });
  }

  #closeFd(): void {
    native.closeFd(this.#fd);
    this.#fd = -1;
  }

  #check(what: string): void {
    if (this.#closed) throw new InvalidStateError(`${what}: '${this.path}' is closed`);
  }
}

const conflictScratch = new Float64Array(4);

const statTypes: ReadonlyArray<[(st: BigIntStats) => boolean, string]> = [
  [(st) => st.isCharacterDevice(), 'character device'],
  [(st) => st.isFIFO(), 'FIFO'],
  [(st) => st.isSocket(), 'socket'],
];

/**
 * Pseudo filesystems whose "regular files" are kernel interfaces, not storage.
 * A lease on one excludes nobody it should: /proc/self/... is another file in
 * every process. By statfs f_type (linux/magic.h).
 */
const PSEUDO_FILESYSTEMS = new Map<number, string>([
  [0x9fa0, 'proc'],
  [0x62656572, 'sysfs'],
  [0x64626720, 'debugfs'],
  [0x74726163, 'tracefs'],
  [0x73636673, 'securityfs'],
  [0x27e0eb, 'cgroup'],
  [0x63677270, 'cgroup2'],
  [0x62656570, 'configfs'],
]);

/** The pseudo filesystem the open file `fd` lives on, or null. */
function pseudoFilesystem(fd: number): string | null {
  try {
    // Through the fd's magic link: the filesystem of the file that was opened.
    return PSEUDO_FILESYSTEMS.get(statfsSync(`/proc/self/fd/${fd}`).type) ?? null;
  } catch {
    return null;
  }
}

/** fstat of a descriptor as a typed error (ResourceAccessError, the cause Node's system error). */
function fstatOf(fd: number, path: string): BigIntStats {
  try {
    return fstatSync(fd, { bigint: true });
  } catch (err) {
    throw fromErrno('open', -((err as NodeJS.ErrnoException).errno ?? -EINVAL), path, `cannot stat '${path}'`);
  }
}

/**
 * Why an existing file is not plausibly a lock file, or null. Lock files are
 * made by lock managers (lockmgr, virtlockd): empty, one link, owned by the
 * user that made them or by root, no set-id bits. Anything else was put there
 * by someone else, and using it would let them choose what we lock, hold open
 * for writing, or delete.
 */
function implausibleLockFile(st: BigIntStats): string | null {
  if (st.isSymbolicLink()) return 'is a symbolic link, and lock files are never followed through symlinks';
  if (!st.isFile()) return `is a ${st.isDirectory() ? 'directory' : st.isBlockDevice() ? 'block device' : (statTypes.find(([test]) => test(st))?.[1] ?? 'special file')}, not a lock file`;
  if (st.size !== 0n) return `is not empty (${st.size} bytes): lock files are always empty, so this is some other file`;
  if ((Number(st.mode) & 0o6000) !== 0) return `has its set-user-ID or set-group-ID bit set (mode ${(Number(st.mode) & 0o7777).toString(8).padStart(4, '0')})`;
  const uid = BigInt(process.geteuid?.() ?? 0);
  if (st.uid !== uid && st.uid !== 0n) return `is owned by uid ${st.uid}, neither this user (uid ${uid}) nor root: its owner could delete or replace it under a holder`;
  if (st.nlink > 1n) return `has ${st.nlink} hard links; a lock file has one`;
  return null;
}

/**
 * Whether a lock file may be deleted at its last release: still plausible, and
 * in the form lockmgr creates (mode 0600, owned by this user). A file someone
 * made otherwise is left alone, even when empty.
 */
export function deletableLockFile(st: BigIntStats): boolean {
  return implausibleLockFile(st) === null && st.uid === BigInt(process.geteuid?.() ?? 0) && (Number(st.mode) & 0o7777) === 0o600 && st.nlink === 1n;
}

function typeError(path: string, st: BigIntStats): LockManagerError {
  if (st.isDirectory()) {
    const cause = systemError(errnoOf('EISDIR'), 'open', path);
    return new ResourceAccessError(`cannot lock '${path}': ${cause.message}`, { cause });
  }
  const type = statTypes.find(([test]) => test(st))?.[1] ?? 'special file';
  return new InvalidArgumentError(`'${path}' is a ${type}; only regular files and block devices can be locked (it was not opened)`);
}

/**
 * Opens a regular file or block device for locking; the fd is O_CLOEXEC |
 * O_NOCTTY. What the path names is decided before it is opened for I/O (an
 * O_PATH descriptor and fstat): a character device, FIFO or socket is never
 * opened, and the file that is opened is the inode that was checked.
 *
 * With `create` (lock files): a missing file is created (O_EXCL, mode 0600);
 * an existing one must be a plausible lock file (empty, one link, owned by this
 * user or root, no set-id bits) and is refused otherwise, before it is opened
 * for writing. The last component is never followed through a symlink.
 *
 * Throws InvalidArgumentError for a bad path or option or a file that cannot be
 * locked, ResourceAccessError when the open fails, the path is a directory or
 * (with `create`) the file is not a plausible lock file.
 */
export function openLockable(path: string, options?: OpenOptions): LockableFile {
  checkPath(path);
  const opts = checkOptions<OpenOptions>(options, ['access', 'create'], 'openLockable options');
  const access = opts.access === undefined ? 'readwrite' : checkOneOf(opts.access, ['read', 'readwrite'] as const, 'access');
  if (opts.create !== undefined && typeof opts.create !== 'boolean') {
    throw new InvalidArgumentError(`create must be a boolean, got ${describe(opts.create)}`);
  }
  const create = opts.create === true;
  if (create && access !== 'readwrite') {
    throw new InvalidArgumentError("create needs access 'readwrite': a lock file that may be created must be writable");
  }
  const writable = access === 'readwrite';
  const how = `for ${writable ? 'reading and writing' : 'reading'}`;
  let opath = -1;
  for (let attempt = 0; opath < 0; attempt++) {
    if (create) {
      const fd = native.createFile(path);
      if (fd >= 0) return adopt(fd, path, fstatOf(fd, path), access, true);
      if (-fd !== EEXIST) throw fromErrno('open', -fd, path, `cannot create or open lock file '${path}'`);
    }
    opath = native.openPath(path, create);
    // A lock file deleted by its last holder between our two opens: create it anew.
    if (opath === -ENOENT && create && attempt < MAX_CREATE_ATTEMPTS) continue;
    if (opath < 0) throw fromErrno('open', -opath, path, create ? `cannot create or open lock file '${path}'` : `cannot open '${path}' ${how}`);
  }
  let fd: number;
  let st: BigIntStats;
  try {
    st = fstatOf(opath, path);
    if (create) {
      if (st.isSymbolicLink()) {
        throw fromErrno('open', ELOOP, path, `refused to open lock file '${path}': it is a symbolic link, and lock files are never followed through symlinks (remove it if it is not yours)`);
      }
      const why = implausibleLockFile(st);
      if (why !== null) throw new ResourceAccessError(`refused to use '${path}' as a lock file: it ${why}. It was not opened for writing; remove it if no lock manager of yours made it`);
    }
    if (!st.isFile() && !st.isBlockDevice()) throw typeError(path, st);
    const pseudo = st.isFile() ? pseudoFilesystem(opath) : null;
    if (pseudo !== null) {
      throw new InvalidArgumentError(`'${path}' is on ${pseudo}, a pseudo filesystem of kernel interfaces; only regular files (of a real filesystem) and block devices can be locked`);
    }
    fd = native.reopenFd(opath, writable);
    if (fd < 0) throw fromErrno('open', -fd, path, `cannot open '${path}' ${how}`);
  } finally {
    native.closeFd(opath);
  }
  return adopt(fd, path, st, access, false);
}

function adopt(fd: number, path: string, st: BigIntStats, access: Access, created: boolean): LockableFile {
  if (st.isBlockDevice()) return new LockableFile(constructing, fd, path, 'block-device', { dev: st.rdev, ino: 0n, key: `b:${st.rdev}` }, access, created);
  return new LockableFile(constructing, fd, path, 'file', { dev: st.dev, ino: st.ino, key: `f:${st.dev}:${st.ino}` }, access, created);
}

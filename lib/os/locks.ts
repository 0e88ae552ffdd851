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
// lockSync() is the one call that blocks its own thread in F_OFD_SETLKW, by
// intent: for worker threads, scripts and benchmarks.
import { readlinkSync, type BigIntStats } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
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
import { constants, failedSyscall, native, nativeError } from './native.js';
import { holdersWords, lockHolders } from './proc-locks.js';
import { CHANNELS, publish, traced } from './trace.js';
import { cancelWait, ensureWakeSignal, startWait, watchAbort } from './waits.js';
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

export interface LockSyncOptions {
  /** Milliseconds to wait for a conflicting lock to go; 0 tries once. Default: wait as long as it takes. */
  timeout?: number;
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

/** What an omitted options argument reads as: shared, so the common call allocates nothing for it. */
const NO_OPTIONS: Readonly<Record<string, undefined>> = Object.freeze({});

// The files opened from a caller's descriptor: a set, not a field, so that the
// many files that are not pay nothing per held lock (docs/performance.md).
const ADOPTED = new WeakSet<object>();

/**
 * A file's identity. The key string is made when first read: most held locks
 * never need it, and each would otherwise carry ~40 B of string.
 */
class Identity implements ResourceIdentity {
  readonly dev: bigint;
  readonly ino: bigint;
  #key: string | undefined = undefined;
  constructor(dev: bigint, ino: bigint, block: boolean) {
    this.dev = dev;
    this.ino = ino;
    // The block-device form has ino 0; the prefix is in the key.
    if (block) this.#key = `b:${dev}`;
  }
  get key(): string {
    return (this.#key ??= `f:${this.dev}:${this.ino}`);
  }
}

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
  /** Pending lock() waits; made on the first one (most files never wait: a Set per held lock would cost more than the rest of it). */
  #waits: Set<PendingWait> | undefined = undefined;

  /** @internal */
  constructor(token: symbol, fd: number, path: string, kind: ResourceKind, identity: ResourceIdentity, access: Access, created = false, adopted = false) {
    if (token !== constructing) throw new InvalidStateError('use openLockable() to open a lockable file');
    this.created = created;
    if (adopted) ADOPTED.add(this);
    this.#fd = fd;
    this.path = path;
    this.kind = kind;
    this.identity = identity;
    this.access = access;
  }

  /** The descriptor is a duplicate of the caller's (openLockable(fd or FileHandle)): its open file description, and its locks, are shared with the caller's. */
  get adopted(): boolean {
    return ADOPTED.has(this);
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
    if (rv === 0) {
      if (traced(CHANNELS.grant)) this.#traceLock(CHANNELS.grant, mode, rangeStart, rangeLength, false);
      return true;
    }
    if (rv === BUSY || rv === BUSY_OLD) return false;
    throw this.#lockError(-rv, mode, rangeStart, rangeLength);
  }

  /**
   * Takes the lock, waiting while someone else holds a conflicting one. Rejects
   * with LockTimeoutError or AbortError when the wait ends without the lock.
   */
  lock(mode: LockMode, range?: ByteRange, options?: LockOptions): Promise<void> {
    // Not an async function: returning #wait's promise from one would add two
    // microtask turns to every contended grant. Errors still become rejections.
    try {
      this.#check('lock');
      const type = lockType(mode);
      parseRange(range);
      const start = rangeStart;
      const length = rangeLength;
      const opts: LockOptions = options === undefined ? NO_OPTIONS : checkOptions<LockOptions>(options, ['timeout', 'signal'], 'lock options');
      const timeout = checkTimeout(opts.timeout);
      const signal = checkSignal(opts.signal);
      if (signal?.aborted) throw abortError(signal);
      const rv = native.setlk(this.#fd, type, start, length);
      if (rv === 0) {
        if (traced(CHANNELS.grant)) this.#traceLock(CHANNELS.grant, mode, start, length, false);
        return Promise.resolve();
      }
      if (rv !== BUSY && rv !== BUSY_OLD) throw this.#lockError(-rv, mode, start, length);
      if (timeout === 0) throw this.#timeoutError(mode, start, length, 0);
      if (traced(CHANNELS.wait)) this.#traceLock(CHANNELS.wait, mode, start, length, undefined, timeout);
      return this.#wait(type, mode, start, length, timeout, signal);
    } catch (err) {
      return Promise.reject(err as Error);
    }
  }

  /**
   * Takes the lock, blocking the calling thread in F_OFD_SETLKW while someone
   * else holds a conflicting one: for worker threads, scripts and benchmarks.
   * On the main thread it blocks the event loop for as long as it waits. A
   * timeout ends the wait with LockTimeoutError (the lock not taken); other
   * signals do not end it. There is no AbortSignal: nothing can run on this
   * thread to abort it.
   */
  lockSync(mode: LockMode, range?: ByteRange, options?: LockSyncOptions): void {
    this.#check('lockSync');
    const type = lockType(mode);
    parseRange(range);
    const start = rangeStart;
    const length = rangeLength;
    const opts: LockSyncOptions = options === undefined ? NO_OPTIONS : checkOptions<LockSyncOptions>(options, ['timeout'], 'lockSync options');
    const timeout = checkTimeout(opts.timeout);
    let rv: number;
    if (timeout === undefined) {
      // F_OFD_SETLKW takes a free lock at once: no try first.
      rv = native.lockSync(this.#fd, type, start, length, -1);
    } else {
      // With a deadline, a free lock must not pay for arming the timer.
      rv = native.setlk(this.#fd, type, start, length);
      if (rv === 0) {
        if (traced(CHANNELS.grant)) this.#traceLock(CHANNELS.grant, mode, start, length, false);
        return;
      }
      if (rv !== BUSY && rv !== BUSY_OLD) throw this.#lockError(-rv, mode, start, length);
      if (timeout === 0) throw this.#timeoutError(mode, start, length, 0);
      if (traced(CHANNELS.wait)) this.#traceLock(CHANNELS.wait, mode, start, length, undefined, timeout);
      ensureWakeSignal();
      rv = native.lockSync(this.#fd, type, start, length, timeout);
    }
    if (rv === 0) {
      if (traced(CHANNELS.grant)) this.#traceLock(CHANNELS.grant, mode, start, length, true);
      return;
    }
    if (rv === -ETIMEDOUT) throw this.#timeoutError(mode, start, length, timeout ?? 0);
    // timer_create (ResourceExhaustedError for EAGAIN), or the lock itself.
    if (failedSyscall() !== 'fcntl') throw nativeError(rv, `cannot wait for ${article(mode)} lock on ${rangeText(start, length)} of '${this.path}'`, this.path);
    throw this.#lockError(-rv, mode, start, length);
  }

  /**
   * lock(), resolving to a handle that unlocks the range again: on release(),
   * or at the end of a `using` / `await using` block (TypeScript 5.2+, or a
   * Node with explicit resource management).
   */
  async hold(mode: LockMode, range?: ByteRange, options?: LockOptions): Promise<HeldLock> {
    await this.lock(mode, range, options);
    parseRange(range);
    return new HeldLock(constructing, this, mode, rangeStart, rangeLength);
  }

  /** tryLock(), returning a handle that unlocks the range again (see hold()), or null when a conflicting lock is held. */
  tryHold(mode: LockMode, range?: ByteRange): HeldLock | null {
    if (!this.tryLock(mode, range)) return null;
    return new HeldLock(constructing, this, mode, rangeStart, rangeLength);
  }

  /** Releases the range. Unlocking what is not locked is a no-op. */
  unlock(range?: ByteRange): void {
    this.#check('unlock');
    parseRange(range);
    const rv = native.setlk(this.#fd, UNLOCK, rangeStart, rangeLength);
    if (rv !== 0) throw fromErrno('fcntl', -rv, this.path, `cannot unlock ${rangeText(rangeStart, rangeLength)} of '${this.path}'`);
    if (traced(CHANNELS.release)) publish(CHANNELS.release, { file: this, path: this.path, fd: this.#fd, start: rangeStart, length: rangeLength, closed: false });
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
    if (traced(CHANNELS.release)) publish(CHANNELS.release, { file: this, path: this.path, fd: this.#fd, start: 0, length: 0, closed: true });
    if (this.#waits === undefined || this.#waits.size === 0) {
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
    file.#waits?.delete(wait);
    wait.unwatch?.();
    if (!wait.settled) {
      if (errno === 0) {
        if (traced(CHANNELS.grant)) file.#traceLock(CHANNELS.grant, wait.mode, wait.start, wait.length, true);
        wait.resolve();
      } else if (errno === ECANCELED && wait.signal?.aborted) wait.reject(abortError(wait.signal));
      else if (errno === ETIMEDOUT) wait.reject(file.#timeoutError(wait.mode, wait.start, wait.length, wait.timeout ?? 0));
      else wait.reject(file.#lockError(errno, wait.mode, wait.start, wait.length));
    }
    if (file.#closed && (file.#waits === undefined || file.#waits.size === 0)) file.#closeFd();
  }

  #wait(type: number, mode: LockMode, start: number, length: number, timeout: number | undefined, signal: AbortSignal | undefined): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const wait: PendingWait = { id: 0, file: this, mode, start, length, timeout, signal, resolve, reject, unwatch: undefined, settled: false };
      wait.id = startWait(this.#fd, type, start, length, timeout, (errno) => LockableFile.finishWait(wait, errno), this.path);
      (this.#waits ??= new Set()).add(wait);
      if (signal !== undefined) wait.unwatch = watchAbort(signal, () => cancelWait(wait.id));
    });
  }

  #traceLock(ch: typeof CHANNELS.grant, mode: LockMode, start: number, length: number, waited: boolean | undefined, timeout?: number): void {
    publish(ch, { file: this, path: this.path, fd: this.#fd, mode, start, length, waited, timeout });
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
    // The caller's fd keeps an adopted open file description, and with it
    // every lock, alive: close() releases them as it promises.
    if (this.adopted) native.setlk(this.#fd, UNLOCK, 0, 0);
    native.closeFd(this.#fd);
    this.#fd = -1;
  }

  #check(what: string): void {
    if (this.#closed) throw new InvalidStateError(`${what}: '${this.path}' is closed`);
  }
}

const conflictScratch = new Float64Array(4);

const { MODE, UID, NLINK, SIZE, FS_TYPE, FIELDS, DEV, INO, RDEV, ID_FIELDS, S_IFMT, S_IFREG, S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFSOCK, S_IFLNK } = constants.stat;

/** What openPath/statFd tell about a file: one probe at a time, read before the next. */
const facts = new Float64Array(FIELDS);
const ids = new BigUint64Array(ID_FIELDS);

/** The facts a lock file is judged by, from either source (the native probe, or Node's lstat in lib/lockspaces). */
interface FileFacts {
  /** st_mode & S_IFMT */
  readonly type: number;
  readonly mode: number;
  readonly uid: number;
  readonly nlink: number;
  readonly size: number;
}

function probedFacts(): FileFacts {
  const mode = facts[MODE]!;
  return { type: mode & S_IFMT, mode, uid: facts[UID]!, nlink: facts[NLINK]!, size: facts[SIZE]! };
}

function statsFacts(st: BigIntStats): FileFacts {
  const mode = Number(st.mode);
  return { type: mode & S_IFMT, mode, uid: Number(st.uid), nlink: Number(st.nlink), size: Number(st.size) };
}

const TYPE_NAMES = new Map<number, string>([
  [S_IFDIR, 'directory'],
  [S_IFBLK, 'block device'],
  [S_IFCHR, 'character device'],
  [S_IFIFO, 'FIFO'],
  [S_IFSOCK, 'socket'],
  [S_IFLNK, 'symbolic link'],
]);

const typeName = (type: number): string => TYPE_NAMES.get(type) ?? 'special file';

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

/**
 * Why an existing file is not plausibly a lock file, or null. Lock files are
 * made by lock managers (lockmgr, virtlockd): empty, one link, owned by the
 * user that made them or by root, no set-id bits. Anything else was put there
 * by someone else, and using it would let them choose what we lock, hold open
 * for writing, or delete.
 */
function implausibleLockFile(st: FileFacts): string | null {
  if (st.type === S_IFLNK) return 'is a symbolic link, and lock files are never followed through symlinks';
  if (st.type !== S_IFREG) return `is a ${typeName(st.type)}, not a lock file`;
  if (st.size !== 0) return `is not empty (${st.size} bytes): lock files are always empty, so this is some other file`;
  if ((st.mode & 0o6000) !== 0) return `has its set-user-ID or set-group-ID bit set (mode ${(st.mode & 0o7777).toString(8).padStart(4, '0')})`;
  const uid = process.geteuid?.() ?? 0;
  if (st.uid !== uid && st.uid !== 0) return `is owned by uid ${st.uid}, neither this user (uid ${uid}) nor root: its owner could delete or replace it under a holder`;
  if (st.nlink > 1) return `has ${st.nlink} hard links; a lock file has one`;
  return null;
}

/**
 * Whether a lock file may be deleted at its last release: still plausible, and
 * in the form lockmgr creates (mode 0600, owned by this user). A file someone
 * made otherwise is left alone, even when empty.
 */
export function deletableLockFile(st: BigIntStats): boolean {
  const f = statsFacts(st);
  return implausibleLockFile(f) === null && f.uid === (process.geteuid?.() ?? 0) && (f.mode & 0o7777) === 0o600 && f.nlink === 1;
}

function typeError(path: string, type: number): LockManagerError {
  if (type === S_IFDIR) {
    const cause = systemError(errnoOf('EISDIR'), 'open', path);
    return new ResourceAccessError(`cannot lock '${path}': ${cause.message}`, { cause });
  }
  return new InvalidArgumentError(`'${path}' is a ${typeName(type)}; only regular files and block devices can be locked (it was not opened)`);
}

/**
 * A lock taken with hold() or tryHold(). release() unlocks its range, as
 * unlock(range) does: OFD locks of one open file description on overlapping
 * ranges are one lock, so releasing one handle releases the overlap of the
 * others too. Idempotent; a no-op once the file is closed (which released it).
 */
export class HeldLock implements Disposable, AsyncDisposable {
  readonly file: LockableFile;
  readonly mode: LockMode;
  readonly start: number;
  /** 0: to the end of the file and beyond. */
  readonly length: number;
  #released = false;

  /** @internal */
  constructor(token: symbol, file: LockableFile, mode: LockMode, start: number, length: number) {
    if (token !== constructing) throw new InvalidStateError('use LockableFile.hold() or tryHold() to take a held lock');
    this.file = file;
    this.mode = mode;
    this.start = start;
    this.length = length;
  }

  get released(): boolean {
    return this.#released || this.file.closed;
  }

  release(): void {
    if (this.#released) return;
    this.#released = true;
    if (!this.file.closed) this.file.unlock({ start: this.start, length: this.length });
  }

  [Symbol.dispose](): void {
    this.release();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.release();
  }
}

export interface WithLockOptions extends LockOptions {
  /** The range to lock; default the whole file. */
  range?: ByteRange;
  /** How to open the file; default 'readwrite' for an exclusive lock, 'read' for a shared one. */
  access?: Access;
}

/**
 * Opens `path`, locks it (waiting as lock() does, within `timeout` / until
 * `signal`), runs `fn` with the file, and always closes it (releasing the
 * lock) when `fn` settles: the Web Locks API's request(name, options,
 * callback), for a file. Resolves to what `fn` returns; rejects with what it
 * throws, or with the open's or the wait's error (then `fn` never ran).
 */
export async function withLock<T>(path: string, mode: LockMode, fn: (file: LockableFile) => T | PromiseLike<T>, options?: WithLockOptions): Promise<T> {
  checkOneOf(mode, ['exclusive', 'shared'] as const, 'mode');
  if (typeof fn !== 'function') throw new InvalidArgumentError(`withLock needs a function to run holding the lock, got ${describe(fn)}`);
  const opts: WithLockOptions = options === undefined ? NO_OPTIONS : checkOptions<WithLockOptions>(options, ['timeout', 'signal', 'range', 'access'], 'withLock options');
  const file = openLockable(path, { access: opts.access ?? (mode === 'exclusive' ? 'readwrite' : 'read') });
  try {
    await file.lock(mode, opts.range, { timeout: opts.timeout, signal: opts.signal });
    return await fn(file);
  } finally {
    file.close();
  }
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
export function openLockable(path: string, options?: OpenOptions): LockableFile;
/**
 * Locks what the caller already has open: a file descriptor, or a
 * node:fs/promises FileHandle. The LockableFile works on a duplicate
 * (F_DUPFD_CLOEXEC) of it, so its locks are the caller's open file
 * description's: visible through the caller's fd, carried by it into a child.
 * The caller keeps its fd and closes it as before; close() of the
 * LockableFile releases every lock of that open file description (the
 * caller's own included) and closes the duplicate only. `access` is how the fd
 * was opened; `path` only names the file in messages (default: what
 * /proc/self/fd says).
 */
export function openLockable(fd: number | FileHandle, options?: { path?: string }): LockableFile;
export function openLockable(target: string | number | FileHandle, options?: OpenOptions | { path?: string }): LockableFile {
  if (typeof target !== 'string') return adoptDescriptor(target, options as { path?: string } | undefined);
  const path = target;
  checkPath(path);
  const opts: OpenOptions = options === undefined ? NO_OPTIONS : checkOptions<OpenOptions>(options, ['access', 'create'], 'openLockable options');
  const access = opts.access === undefined ? 'readwrite' : checkOneOf(opts.access, ['read', 'readwrite'] as const, 'access');
  if (opts.create !== undefined && typeof opts.create !== 'boolean') {
    throw new InvalidArgumentError(`create must be a boolean, got ${describe(opts.create)}`);
  }
  const create = opts.create === true;
  if (create && access !== 'readwrite') {
    throw new InvalidArgumentError("create needs access 'readwrite': a lock file that may be created must be writable");
  }
  const writable = access === 'readwrite';
  const how = (): string => `for ${writable ? 'reading and writing' : 'reading'}`;
  let opath = -1;
  for (let attempt = 0; opath < 0; attempt++) {
    if (create) {
      const fd = native.createFile(path);
      if (fd >= 0) {
        const rv = native.statFd(fd, facts, ids);
        if (rv < 0) {
          native.closeFd(fd);
          throw fromErrno('open', -rv, path, `cannot stat '${path}'`);
        }
        return adopt(fd, path, access, true);
      }
      if (-fd !== EEXIST) throw fromErrno('open', -fd, path, `cannot create or open lock file '${path}'`);
    }
    // O_PATH open, fstat and fstatfs in one call: what the path names is
    // known before anything is opened for I/O.
    opath = native.openPath(path, create, facts, ids);
    // A lock file deleted by its last holder between our two opens: create it anew.
    if (opath === -ENOENT && create && attempt < MAX_CREATE_ATTEMPTS) continue;
    if (opath < 0) {
      if (failedSyscall() !== 'open') throw fromErrno('open', -opath, path, `cannot stat '${path}'`);
      throw fromErrno('open', -opath, path, create ? `cannot create or open lock file '${path}'` : `cannot open '${path}' ${how()}`);
    }
  }
  const type = facts[MODE]! & S_IFMT;
  try {
    if (create) {
      if (type === S_IFLNK) {
        throw fromErrno('open', ELOOP, path, `refused to open lock file '${path}': it is a symbolic link, and lock files are never followed through symlinks (remove it if it is not yours)`);
      }
      const why = implausibleLockFile(probedFacts());
      if (why !== null) throw new ResourceAccessError(`refused to use '${path}' as a lock file: it ${why}. It was not opened for writing; remove it if no lock manager of yours made it`);
    }
    if (type !== S_IFREG && type !== S_IFBLK) throw typeError(path, type);
    // fstatfs of the inode itself: the filesystem of the file that will be opened.
    const pseudo = type === S_IFREG ? (PSEUDO_FILESYSTEMS.get(facts[FS_TYPE]!) ?? null) : null;
    if (pseudo !== null) {
      throw new InvalidArgumentError(`'${path}' is on ${pseudo}, a pseudo filesystem of kernel interfaces; only regular files (of a real filesystem) and block devices can be locked`);
    }
  } catch (err) {
    native.closeFd(opath);
    throw err;
  }
  // Opens the checked inode through /proc/self/fd and closes opath.
  const fd = native.reopenFd(opath, writable);
  if (fd < 0) throw fromErrno('open', -fd, path, `cannot open '${path}' ${how()}`);
  return adopt(fd, path, access, false);
}

/** The LockableFile for an fd whose facts are in facts/ids. */
function adopt(fd: number, path: string, access: Access, created: boolean, adopted = false): LockableFile {
  const file =
    (facts[MODE]! & S_IFMT) === S_IFBLK
      ? new LockableFile(constructing, fd, path, 'block-device', new Identity(ids[RDEV]!, 0n, true), access, created, adopted)
      : new LockableFile(constructing, fd, path, 'file', new Identity(ids[DEV]!, ids[INO]!, false), access, created, adopted);
  if (traced(CHANNELS.open)) publish(CHANNELS.open, { file, path, fd, access, kind: file.kind, created, adopted });
  return file;
}

const { O_ACCMODE, O_RDONLY, O_RDWR, O_PATH } = constants.open;

/** openLockable(fd | FileHandle): the caller's open file description, checked as a path's would be, through a duplicate. */
function adoptDescriptor(target: number | FileHandle, options: { path?: string } | undefined): LockableFile {
  const opts = options === undefined ? NO_OPTIONS : checkOptions<{ path?: string }>(options, ['path'], 'openLockable options');
  let fd: number;
  if (typeof target === 'number') {
    if (!Number.isInteger(target) || target < 0 || target > 0x7fffffff) throw new InvalidArgumentError(`fd must be an integer >= 0, got ${describe(target)}`);
    fd = target;
  } else if (target !== null && typeof target === 'object' && typeof (target as { fd?: unknown }).fd === 'number' && typeof (target as { close?: unknown }).close === 'function') {
    fd = target.fd;
    // A closed FileHandle says -1.
    if (fd < 0) throw new InvalidArgumentError('the FileHandle is closed');
  } else {
    throw new InvalidArgumentError(`path must be a string, a file descriptor or a FileHandle, got ${describe(target)}`);
  }
  if (opts.path !== undefined && typeof opts.path !== 'string') throw new InvalidArgumentError(`path must be a string, got ${describe(opts.path)}`);
  let path = opts.path;
  if (path === undefined) {
    try {
      path = readlinkSync(`/proc/self/fd/${fd}`);
    } catch {
      path = `fd ${fd}`;
    }
  }
  const flags = native.statusFlags(fd);
  if (flags < 0) {
    if (-flags === EBADF) throw new InvalidArgumentError(`fd ${fd} is not an open file descriptor`);
    throw fromErrno('fcntl', -flags, path, `cannot read the flags of fd ${fd} ('${path}')`);
  }
  if ((flags & O_PATH) !== 0) throw new InvalidArgumentError(`fd ${fd} ('${path}') was opened with O_PATH, which cannot lock: open the file for reading`);
  const mode = flags & O_ACCMODE;
  if (mode !== O_RDONLY && mode !== O_RDWR) throw new InvalidArgumentError(`fd ${fd} ('${path}') was opened write-only; locks need it open for reading (shared) or reading and writing`);
  const access: Access = mode === O_RDWR ? 'readwrite' : 'read';
  const rv = native.statFd(fd, facts, ids);
  if (rv < 0) throw fromErrno('open', -rv, path, `cannot stat fd ${fd} ('${path}')`);
  const type = facts[MODE]! & S_IFMT;
  if (type !== S_IFREG && type !== S_IFBLK) throw typeError(path, type);
  const pseudo = type === S_IFREG ? (PSEUDO_FILESYSTEMS.get(facts[FS_TYPE]!) ?? null) : null;
  if (pseudo !== null) throw new InvalidArgumentError(`'${path}' is on ${pseudo}, a pseudo filesystem of kernel interfaces; only regular files (of a real filesystem) and block devices can be locked`);
  const dup = native.dupFd(fd);
  if (dup < 0) throw nativeError(dup, `cannot duplicate fd ${fd} ('${path}')`, path);
  return adopt(dup, path, access, false, true);
}

/**
 * A LockableFile over a descriptor this process already owns and tracks as
 * lockable (one from SupervisedProcess.takeFd(): another process's open file
 * description, with the OFD locks it holds). Its access is the description's
 * own (/proc/self/fdinfo flags); its identity is fstat's, as openLockable
 * makes it. Closing it closes only our fd: the locks stay with the other
 * process's copy (unlock them first to release them).
 */
export function lockableFromFd(fd: number, path: string, accessMode: Access): LockableFile {
  const rv = native.statFd(fd, facts, ids);
  if (rv < 0) {
    native.closeFd(fd);
    throw nativeError(rv, `cannot inspect the descriptor of '${path}'`, path);
  }
  const type = facts[MODE]! & S_IFMT;
  if (type === S_IFBLK) return new LockableFile(constructing, fd, path, 'block-device', new Identity(ids[RDEV]!, 0n, true), accessMode);
  if (type !== S_IFREG) {
    native.closeFd(fd);
    throw new InvalidArgumentError(`'${path}' is a ${typeName(type)}, not a regular file or block device`);
  }
  return new LockableFile(constructing, fd, path, 'file', new Identity(ids[DEV]!, ids[INO]!, false), accessMode);
}

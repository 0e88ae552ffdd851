// Lock files: the protocol by which leases live in files of a directory
// (docs/lockspaces.md, "Lock files and the protocol"). The indirect lockspace
// keeps a disk's leases this way, and every OFD lockspace keeps named leases
// (libvirt's <lease>) this way.
//
// Lock files are created on first use and deleted at last release, so a name
// may be unlinked and recreated under a process that has just opened it. Every
// take therefore locks, then checks that the name still points at the inode it
// locked (else starts over), and a delete happens only under a non-blocking
// exclusive lock of the whole file, the same check, then unlink, then unlock.
import { fstatSync, lstatSync, unlinkSync, type BigIntStats } from 'node:fs';
import { InvalidArgumentError, InvalidStateError, LockTimeoutError, ResourceAccessError, ResourceExhaustedError, systemError } from '../os/errors.js';
import { deletableLockFile, openLockable, type ByteRange, type LockableFile, type LockMode } from '../os/locks.js';
import { checkPath } from '../os/validate.js';
import type { TakeOptions } from './driver.js';
import { PIN_RANGE, type LeaseSlot } from './ofd.js';

const WHOLE_FILE: Readonly<ByteRange> = Object.freeze({ start: 0, length: 0 });

/**
 * How many times in a row one take() may find that the file it locked was
 * deleted or replaced before it gives up. Each such retry means another
 * process completed a whole release-and-delete in between; a thousand in a row
 * means someone is churning the name, and a fast-fail take must still end.
 */
export const MAX_TAKE_ATTEMPTS = 1000;

/**
 * How long a take waits for a deleter, even when it must not wait for a
 * holder. A whole-file exclusive lock on a lock file is only ever a deleter's
 * (holders lock byte 0 or 1), held for an lstat and an unlink: reporting it as
 * "busy" would fail a take that nobody actually contends.
 */
export const DELETER_WAIT_MS = 2000;

const ENOENT = 'ENOENT';

export function statError(err: unknown, path: string, message: string): ResourceAccessError {
  const e = err as NodeJS.ErrnoException;
  const cause = typeof e.errno === 'number' ? systemError(-e.errno, e.syscall ?? 'lstat', path) : err;
  const text = cause instanceof Error ? cause.message : String(cause);
  return new ResourceAccessError(`${message}: ${text}`, { cause });
}

/**
 * Checks a directory that holds lock files: an absolute path to an existing
 * directory, not a symlink, owned by root or by us, and not writable by group
 * or others unless sticky. Anyone who can write a directory can delete or
 * replace the lock files in it, and so break every lease kept there. Returns
 * its lstat.
 */
export function checkLockDir(dir: string, what = 'lockspace dir'): BigIntStats {
  checkPath(dir, what);
  let st: BigIntStats;
  try {
    st = lstatSync(dir, { bigint: true });
  } catch (err) {
    throw statError(err, dir, `${what} '${dir}' cannot be used; create it (mode 0700 or 0755, owned by root or this user)`);
  }
  if (st.isSymbolicLink()) {
    throw new InvalidArgumentError(
      `${what} '${dir}' is a symbolic link and was refused: whoever can change the link can move every lease; give the real directory's path instead`,
    );
  }
  if (!st.isDirectory()) throw new InvalidArgumentError(`${what} '${dir}' is not a directory`);
  const mode = Number(st.mode);
  if ((mode & 0o022) !== 0 && (mode & 0o1000) === 0) {
    throw new InvalidArgumentError(
      `${what} '${dir}' is writable by ${mode & 0o020 ? 'its group' : 'others'} (mode ${(mode & 0o7777).toString(8).padStart(4, '0')}) and not sticky: ` +
        `anyone who can write it can delete or replace lock files held by others. Run 'chmod go-w ${dir}' (or 'chmod +t' if it must stay shared)`,
    );
  }
  const uid = BigInt(process.geteuid?.() ?? 0);
  if (st.uid !== 0n && st.uid !== uid) {
    throw new InvalidArgumentError(
      `${what} '${dir}' is owned by uid ${st.uid}, neither root nor this process (uid ${uid}): its owner could delete or replace lock files held by others. Use a directory owned by root or by this user`,
    );
  }
  return st;
}

export function isErrno(err: unknown, code: string): boolean {
  return (err as NodeJS.ErrnoException | null)?.code === code;
}

/**
 * Opens (creating if missing) a lock file: readwrite, 0600, never through a
 * symlink. An existing file must be a plausible lock file (openLockable's
 * `create`: empty, one link, ours or root's, no set-id bits), or it is refused
 * before it is opened for writing.
 */
function openLockFile(path: string): LockableFile {
  return openLockable(path, { access: 'readwrite', create: true });
}

function rangeKey(range: Readonly<ByteRange>): string {
  return `${range.start ?? 0}:${range.length ?? 0}`;
}

/**
 * A lock file in a shared directory, created when missing and, if
 * `deletable`, deleted when its last holder leaves (only when it is still in
 * the form lockmgr creates: empty, ours, mode 0600, one link). Its `file` is
 * replaced when take() finds that the name was deleted or recreated; after a
 * release deleted it, `file` is closed until the next take() recreates it.
 * take() calls on one slot must not overlap. A named lease's file is never
 * deleted (libvirt's are not either): it may be someone's configuration.
 */
export class LockFileSlot implements LeaseSlot {
  readonly path: string;
  readonly key: string;
  #file: LockableFile;
  readonly #held = new Map<string, Readonly<ByteRange>>();
  #taking = false;
  #closed = false;
  readonly #deletable: boolean;

  /**
   * `adopted`: a description of the lock file that another process holds
   * `held` on (lockspace adopt()): the slot starts out holding it, on that
   * same description, instead of opening the name.
   */
  constructor(path: string, options: { deletable: boolean; adopted?: { file: LockableFile; held: Readonly<ByteRange> } }) {
    this.path = path;
    this.key = path;
    this.#deletable = options.deletable;
    if (options.adopted === undefined) {
      this.#file = openLockFile(path);
    } else {
      this.#file = options.adopted.file;
      this.#held.set(rangeKey(options.adopted.held), options.adopted.held);
    }
  }

  /** The same lock file over a description adopted from another process, holding `range` there. */
  adopted(file: LockableFile, range: Readonly<ByteRange>): LockFileSlot {
    return new LockFileSlot(this.path, { deletable: this.#deletable, adopted: { file, held: range } });
  }

  get file(): LockableFile {
    return this.#file;
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** The ranges held, as `start:length` keys. */
  get held(): readonly string[] {
    return [...this.#held.keys()];
  }

  async take(mode: LockMode, range: Readonly<ByteRange>, options: TakeOptions): Promise<boolean> {
    if (this.#closed) throw new InvalidStateError(`take: lock file slot '${this.path}' is closed`);
    if (this.#taking) throw new InvalidStateError(`take: a take() on '${this.path}' is already in progress`);
    const deadline = options.timeout === undefined ? undefined : Date.now() + options.timeout;
    this.#taking = true;
    try {
      for (let attempt = 1; attempt <= MAX_TAKE_ATTEMPTS; attempt++) {
        if (this.#file.closed) this.#file = openLockFile(this.path);
        const file = this.#file;
        if (!(await this.#lock(file, mode, range, options, deadline))) return false;
        if (this.#closed) {
          // close() ran while we waited; it closed the file, and the lock with it.
          throw new InvalidStateError(`take: lock file slot '${this.path}' was closed while taking it`);
        }
        let linked: boolean;
        try {
          linked = this.#linked(file);
        } catch (err) {
          this.#undo(file, range);
          throw err;
        }
        if (linked) {
          this.#held.set(rangeKey(range), { start: range.start ?? 0, length: range.length ?? 0 });
          return true;
        }
        if (this.#held.size > 0) {
          // We hold other ranges of this file, and yet its name is gone: only
          // something outside the protocol deletes a file whose locks are held
          // (virtlockd ignores byte 1). What we hold no longer excludes anyone.
          file.unlock(range);
          throw new ResourceAccessError(
            `lock file '${this.path}' was deleted or replaced while this process held a lock on it; the locks it held no longer exclude anyone`,
          );
        }
        // A deleter won the race: we locked a file that no longer has this name.
        file.close();
      }
      throw new ResourceAccessError(
        `gave up taking '${this.path}' after ${MAX_TAKE_ATTEMPTS} attempts: each time, the file was deleted or replaced between opening and locking it`,
      );
    } finally {
      this.#taking = false;
    }
  }

  release(range: Readonly<ByteRange>, options?: { keep?: boolean }): void {
    if (this.#closed || this.#file.closed) return;
    const key = rangeKey(range);
    if (options?.keep === true && this.#held.size === 1 && this.#held.has(key)) {
      // Pinned before the last range goes: while we hold something, no
      // deleter's whole-file lock can succeed, so the pin cannot fail for one.
      if (this.#file.tryLock('shared', PIN_RANGE)) this.#held.set(rangeKey(PIN_RANGE), PIN_RANGE);
    }
    this.#file.unlock(range);
    this.#held.delete(key);
    if (this.#held.size === 0 && !this.#taking) this.#tryDelete();
  }

  close(options?: { keepLocks?: boolean }): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#held.clear();
    const file = this.#file;
    if (file.closed) return;
    // An adoption given up, or a lease left to processes that share the description: what they hold stays theirs.
    if (options?.keepLocks === true) {
      file.close();
      return;
    }
    // A take() still waiting on this fd: closing the file rejects it; deleting
    // under it is not worth the care, and a leftover file is harmless.
    if (!this.#taking) {
      try {
        file.unlock(WHOLE_FILE);
      } catch {
        // Closing below drops the locks anyway.
      }
      this.#tryDelete({ closing: true });
    }
    if (!file.closed) file.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }

  /** Locks once, as the options say. false: busy and not waiting. */
  async #lock(file: LockableFile, mode: LockMode, range: Readonly<ByteRange>, o: TakeOptions, deadline: number | undefined): Promise<boolean> {
    if (o.wait) {
      const timeout = deadline === undefined ? undefined : Math.max(0, deadline - Date.now());
      await file.lock(mode, range, { timeout, signal: o.signal });
      return true;
    }
    if (file.tryLock(mode, range)) return true;
    const conflict = file.getConflict(mode, range);
    if (conflict === null) return file.tryLock(mode, range);
    if (!(conflict.mode === 'exclusive' && conflict.start === 0 && conflict.length === 0)) return false;
    // Only a deleter locks a whole lock file, for the moment of an lstat and
    // an unlink: wait for it rather than report a lease nobody holds as busy.
    try {
      await file.lock(mode, range, { timeout: DELETER_WAIT_MS, signal: o.signal });
      return true;
    } catch (err) {
      if (err instanceof LockTimeoutError) return false;
      throw err;
    }
  }

  /** Whether the name still points at the inode `file` has open. */
  #linked(file: LockableFile): boolean {
    let st: BigIntStats;
    try {
      st = lstatSync(this.path, { bigint: true });
    } catch (err) {
      if (isErrno(err, ENOENT)) return false;
      throw statError(err, this.path, `cannot check lock file '${this.path}'`);
    }
    return st.dev === file.identity.dev && st.ino === file.identity.ino;
  }

  /** Drops the range just taken; closes the file if nothing else is held on it. */
  #undo(file: LockableFile, range: Readonly<ByteRange>): void {
    try {
      if (this.#held.size === 0) file.close();
      else file.unlock(range);
    } catch {
      file.close();
    }
  }

  /**
   * Deletes the file if nobody holds any lock on it: a non-blocking exclusive
   * lock of the whole file (the lease, guard and pin bytes, and virtlockd's
   * locks, which conflict with ours) proves that; then the name must still
   * point at our inode, else it is someone else's file now, and the file must
   * still be in the form lockmgr creates (deletableLockFile). unlink happens
   * under the lock. The probe uses a private open file description, opened for
   * the purpose and closed at once: the slot's own may be shared with a child
   * (keepFds), and a whole-file lock placed on it would stay for as long as
   * the child lives, blocking every later taker of the name's next file...
   * and of this one. Never throws: a failed delete (EACCES, EROFS, ...) leaves
   * a file no one holds, which the next take reuses; ENOENT means someone
   * else deleted it.
   */
  #tryDelete(options: { closing?: boolean } = {}): void {
    if (!this.#deletable) return;
    const file = this.#file;
    let probe: LockableFile | null = null;
    try {
      if (!deletableLockFile(fstatSync(file.fd, { bigint: true }))) return;
      // Our inode, through a new open file description: never the name, which
      // may point elsewhere by now.
      try {
        probe = openLockable(`/proc/self/fd/${file.fd}`, { access: 'readwrite' });
      } catch (err) {
        // Out of fds (ulimit -n reached: a failed multi-disk start rolling
        // back). When closing, our own description can be the probe: close()
        // has just unlocked all of it, so its whole-file lock conflicts with
        // any other holder's lock exactly as a fresh one would; it goes when
        // we close it right after. Otherwise the file would be left behind.
        if (!(options.closing === true && err instanceof ResourceExhaustedError)) throw err;
        if (!file.tryLock('exclusive', WHOLE_FILE)) return;
        if (this.#linked(file) && deletableLockFile(fstatSync(file.fd, { bigint: true }))) unlinkSync(this.path);
        else file.unlock(WHOLE_FILE);
        return;
      }
      if (probe.tryLock('exclusive', WHOLE_FILE) && this.#linked(probe) && deletableLockFile(fstatSync(probe.fd, { bigint: true }))) {
        unlinkSync(this.path);
        // The name is gone: the next take() creates the next file.
        if (!file.closed) file.close();
      }
    } catch {
      // ENOENT: someone else deleted it. Anything else: the file stays (see above).
    } finally {
      probe?.close();
    }
  }
}


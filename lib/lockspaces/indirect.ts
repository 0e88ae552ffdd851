// The indirect lockspace: leases live in lock files in a directory shared by
// every host that must see them, as with libvirt's virtlockd and its
// file_lockspace_dir. docs/lockspaces.md describes the layout and the protocol;
// this file is its implementation.
//
// Lock files are created on first use and deleted at last release, so a name
// may be unlinked and recreated under a process that has just opened it. Every
// take therefore locks, then checks that the name still points at the inode it
// locked (else starts over), and a delete happens only under a non-blocking
// exclusive lock of the whole file, the same check, then unlink, then unlock.
import { createHash } from 'node:crypto';
import { fstatSync, lstatSync, mkdirSync, readFileSync, realpathSync, statSync, unlinkSync, type BigIntStats } from 'node:fs';
import { hostname } from 'node:os';
import { dirname, join, normalize, resolve } from 'node:path';
import {
  InvalidArgumentError,
  InvalidStateError,
  LockTimeoutError,
  ResourceAccessError,
  systemError,
} from '../os/errors.js';
import { deletableLockFile, openLockable, type ByteRange, type LockableFile, type LockMode } from '../os/locks.js';
import {
  canonicalBlockNode,
  openDiskFile,
  type IndirectLockspaceConfig,
  type Lease,
  type LeaseSlot,
  type Lockspace,
  PIN_RANGE,
  type ResourceMode,
  type TakeOptions,
} from './driver.js';
import { major, minor } from '../os/proc-locks.js';
import { checkOneOf, checkOptions, checkPath, describe } from '../os/validate.js';

/** Where a lock file's name comes from. */
export type LockFileSource = 'path' | 'inode' | 'wwid' | 'lvm' | 'serial';

/** One lock file of a lease, as `describeDisk()` and `Lease` users see it. */
export interface LockFileName {
  /** The file name in the lockspace directory: sha256 hex of `identity`. */
  readonly name: string;
  /** The lock file's full path. */
  readonly path: string;
  /** The string that was hashed: a canonical path (virtlockd's name), `inode:...`, `wwid:...`, `lvm:...` or `serial:...`. */
  readonly identity: string;
  readonly source: LockFileSource;
}

/** Which lock files a disk's lease uses, in the order they are locked. */
export interface DiskLockNames {
  /** Lease.key: the name of the first lock file. */
  readonly key: string;
  readonly kind: 'file' | 'block-device';
  readonly files: readonly LockFileName[];
}

/** A named lease, libvirt's `<lease>`: the lock file `<path>/<lockspace>/<key>`. */
export interface LeaseResourceSpec {
  lockspace: string;
  key: string;
  path: string;
}

export interface IndirectLockspace extends Lockspace {
  readonly config: IndirectLockspaceConfig;
  /** Opens a named lease, `<path>/<lockspace>/<key>` (created if missing). */
  openLeaseResource(spec: LeaseResourceSpec, mode: ResourceMode): Lease;
  /** The lock files a disk's lease uses, without creating or locking any (the disk is opened for reading, briefly). */
  describeDisk(path: string): DiskLockNames;
}

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

function sha256(text: string): string {
  return createHash('sha256').update(text, 'utf8').digest('hex');
}

/** A lock file's name for an identity string: its sha256, lowercase hex. For a canonical path this is virtlockd's name. */
export function lockFileName(identity: string): string {
  return sha256(identity);
}

function readTrimmed(path: string): string | null {
  try {
    const text = readFileSync(path, 'utf8').trim();
    return text === '' ? null : text;
  } catch {
    return null;
  }
}

let cachedHostId: string | undefined;

/**
 * This running kernel, for inode lock names: its boot id, else
 * /etc/machine-id, else the host name. Device and inode numbers mean something
 * only within one running kernel, which is what the boot id names: containers
 * with their own machine-id on one kernel still share it, and two hosts'
 * unrelated files never collide.
 */
export function hostId(): string {
  cachedHostId ??= readTrimmed('/proc/sys/kernel/random/boot_id') ?? readTrimmed('/etc/machine-id') ?? hostname();
  return cachedHostId;
}

/** The identity string of a regular file's inode lock: `inode:<host id>:<st_dev>:<st_ino>`. */
export function inodeIdentity(dev: bigint, ino: bigint, host = hostId()): string {
  return `inode:${host}:${dev}:${ino}`;
}

/**
 * A block device's persistent identity, the same on every host that sees the
 * disk, or null for one without (a loop device, most virtio disks without a
 * serial). In order of preference: the WWN (`wwid`), the LVM UUID (`dm/uuid`
 * starting with `LVM-`), the serial number. A partition takes its disk's
 * identity plus `:part<N>`.
 */
export function blockDeviceIdentity(rdev: bigint): { identity: string; source: 'wwid' | 'lvm' | 'serial' } | null {
  let dev: string;
  try {
    dev = realpathSync(`/sys/dev/block/${major(rdev)}:${minor(rdev)}`);
  } catch {
    return null;
  }
  let disk = dev;
  let part = '';
  const partition = readTrimmed(join(dev, 'partition'));
  if (partition !== null) {
    disk = dirname(dev);
    part = `:part${partition}`;
  }
  const wwid = readTrimmed(join(disk, 'wwid')) ?? readTrimmed(join(disk, 'device', 'wwid'));
  if (wwid !== null) return { identity: `wwid:${wwid}${part}`, source: 'wwid' };
  const uuid = readTrimmed(join(disk, 'dm', 'uuid'));
  if (uuid !== null && uuid.startsWith('LVM-')) return { identity: `lvm:${uuid}${part}`, source: 'lvm' };
  const serial = readTrimmed(join(disk, 'serial')) ?? readTrimmed(join(disk, 'device', 'serial'));
  if (serial !== null) return { identity: `serial:${serial}${part}`, source: 'serial' };
  return null;
}

function statError(err: unknown, path: string, message: string): ResourceAccessError {
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

function isErrno(err: unknown, code: string): boolean {
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
export class IndirectSlot implements LeaseSlot {
  readonly path: string;
  readonly key: string;
  #file: LockableFile;
  readonly #held = new Map<string, Readonly<ByteRange>>();
  #taking = false;
  #closed = false;
  readonly #deletable: boolean;

  constructor(path: string, options: { deletable: boolean }) {
    this.path = path;
    this.key = path;
    this.#deletable = options.deletable;
    this.#file = openLockFile(path);
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

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#held.clear();
    const file = this.#file;
    if (file.closed) return;
    // A take() still waiting on this fd: closing the file rejects it; deleting
    // under it is not worth the care, and a leftover file is harmless.
    if (!this.#taking) {
      try {
        file.unlock(WHOLE_FILE);
      } catch {
        // Closing below drops the locks anyway.
      }
      this.#tryDelete();
    }
    file.close();
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
  #tryDelete(): void {
    if (!this.#deletable) return;
    const file = this.#file;
    let probe: LockableFile | null = null;
    try {
      if (!deletableLockFile(fstatSync(file.fd, { bigint: true }))) return;
      // Our inode, through a new open file description: never the name, which
      // may point elsewhere by now.
      probe = openLockable(`/proc/self/fd/${file.fd}`, { access: 'readwrite' });
      if (probe.tryLock('exclusive', WHOLE_FILE) && this.#linked(file) && deletableLockFile(fstatSync(file.fd, { bigint: true }))) {
        unlinkSync(this.path);
        // The name is gone: the next take() creates the next file.
        file.close();
      }
    } catch {
      // ENOENT: someone else deleted it. Anything else: the file stays (see above).
    } finally {
      probe?.close();
    }
  }
}

function checkSameDir(dir: string, expected: BigIntStats, what: string): void {
  const st = checkLockDir(dir, what);
  if (st.dev !== expected.dev || st.ino !== expected.ino) {
    throw new ResourceAccessError(`${what} '${dir}' was replaced by another directory since the lockspace was set up; set it up again`);
  }
}

function leaseOf(key: string, path: string, kind: Lease['kind'], slotPaths: readonly string[], image: LockableFile | null): Lease {
  const slots: IndirectSlot[] = [];
  // A disk's lock files are lockmgr's own, named after the disk; a named lease's file is the caller's.
  const deletable = kind !== 'lease';
  try {
    for (const p of slotPaths) slots.push(new IndirectSlot(p, { deletable }));
  } catch (err) {
    for (const s of slots) s.close();
    image?.close();
    throw err;
  }
  let closed = false;
  return {
    key,
    path,
    kind,
    slots,
    image,
    close() {
      if (closed) return;
      closed = true;
      // Released in the reverse of the locking order.
      for (const s of [...slots].reverse()) s.close();
      image?.close();
    },
  };
}

/** The lock file names of a disk opened as `image` (through `path`). */
function diskNames(dir: string, path: string, image: LockableFile): DiskLockNames {
  const file = (identity: string, source: LockFileSource): LockFileName => {
    const name = lockFileName(identity);
    return { name, path: join(dir, name), identity, source };
  };
  if (image.kind === 'file') {
    const real = realpathSync(path);
    const st = statSync(real, { bigint: true });
    if (st.dev !== image.identity.dev || st.ino !== image.identity.ino) {
      throw new ResourceAccessError(`'${path}' changed while its lease was being opened (it now resolves to '${real}', another file); try again`);
    }
    const files = [file(real, 'path'), file(inodeIdentity(image.identity.dev, image.identity.ino), 'inode')];
    return { key: files[0]!.name, kind: 'file', files };
  }
  const id = blockDeviceIdentity(image.identity.dev);
  const f = id !== null ? file(id.identity, id.source) : file(canonicalBlockNode(image.identity.dev) ?? realpathSync(path), 'path');
  return { key: f.name, kind: 'block-device', files: [f] };
}

function checkMode(mode: unknown): ResourceMode {
  return checkOneOf(mode, ['exclusive', 'shared', 'readonly'] as const, 'mode');
}

/**
 * The indirect lockspace over `config.dir`, checked now (checkLockDir) and
 * again, for being the same directory, at every open.
 */
export function indirectLockspace(config: IndirectLockspaceConfig): IndirectLockspace {
  const c = checkOptions<IndirectLockspaceConfig>(config, ['kind', 'dir'], 'lockspace');
  if (c.kind !== 'indirect') throw new InvalidArgumentError(`lockspace.kind must be 'indirect', got ${describe(c.kind)}`);
  // resolve(): normalized and without a trailing slash, so that '/d/' and '/d' are one lockspace.
  const dir = resolve(checkPath(c.dir, 'lockspace.dir'));
  const dirStat = checkLockDir(dir, 'lockspace dir');
  const frozen: IndirectLockspaceConfig = Object.freeze({ kind: 'indirect', dir });

  const describeOpen = (path: string, image: LockableFile): DiskLockNames => {
    checkSameDir(dir, dirStat, 'lockspace dir');
    return diskNames(dir, path, image);
  };

  return {
    config: frozen,
    openDisk(path: string, mode: ResourceMode): Lease {
      checkPath(path);
      checkMode(mode);
      // QEMU-style locks on the image need only read access: the image may be
      // on a read-only filesystem or not writable by us at all.
      const image = openDiskFile(path, 'read');
      let names: DiskLockNames;
      try {
        names = describeOpen(path, image);
      } catch (err) {
        image.close();
        throw err;
      }
      return leaseOf(names.key, path, names.kind, names.files.map((f) => f.path), image);
    },
    describeDisk(path: string): DiskLockNames {
      checkPath(path);
      const image = openDiskFile(path, 'read');
      try {
        return describeOpen(path, image);
      } finally {
        image.close();
      }
    },
    openLeaseResource,
  };
}

/**
 * A named lease, libvirt's `<lease>`: the lock file `<path>/<lockspace>/<key>`
 * (the lockspace directory is created 0700 if missing). It lives in its own
 * directory, so it is the same in every lockspace.
 */
export function openLeaseResource(spec: LeaseResourceSpec, mode: ResourceMode): Lease {
  const s = checkOptions<LeaseResourceSpec>(spec, ['lockspace', 'key', 'path'], 'lease');
  const lockspace = checkNamePart(s.lockspace, 'lease lockspace');
  const key = checkNamePart(s.key, 'lease key');
  const base = normalize(checkPath(s.path, 'lease path'));
  checkMode(mode);
  checkLockDir(base, 'lease path');
  const sub = join(base, lockspace);
  try {
    mkdirSync(sub, { mode: 0o700 });
  } catch (err) {
    if (!isErrno(err, 'EEXIST')) throw statError(err, sub, `cannot create the lease directory '${sub}'`);
  }
  checkLockDir(sub, 'lease directory');
  const file = join(sub, key);
  return leaseOf(`lease:${file}`, file, 'lease', [file], null);
}

// Typed errors. Every failure lockmgr reports is one of these classes, with a
// stable `code`; a failure that came from a system call carries a Node-style
// system error as its `cause` (errno, code, syscall, path), worded like Node's
// own fs errors. docs/errors.md is the table of every errno and its class.
import { getSystemErrorMap } from 'node:util';
import { constants as osConstants } from 'node:os';

/** A Node-style system error, as fs produces: `EAGAIN: resource temporarily unavailable, fcntl '/path'`. */
export interface SystemError extends Error {
  errno: number;
  code: string;
  syscall: string;
  path?: string;
}

export class LockManagerError extends Error {
  readonly code: string = 'ERR_LOCKMGR';
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** A bad mode, range, path or option. Nothing was opened, locked or spawned. */
export class InvalidArgumentError extends LockManagerError {
  override readonly code = 'ERR_INVALID_ARGUMENT';
}

/** The resource could not be opened: it is missing, not accessible, read-only, ... */
export class ResourceAccessError extends LockManagerError {
  override readonly code = 'ERR_RESOURCE_ACCESS';
}

/** Who holds a conflicting lock, as far as the kernel tells. */
export interface LockHolder {
  mode: 'exclusive' | 'shared';
  start: number;
  length: number;
  /** -1 for an OFD lock: the kernel does not record which process holds it. */
  pid: number;
}

/** A process that has a resource open, with its command line. */
export interface ProcessInfo {
  pid: number;
  /** Its command line, arguments joined by spaces ('' if it could not be read). */
  command: string;
}

/** The kind of a lock as the kernel keeps it: an OFD lock (F_OFD_SETLK), a classic POSIX record lock (F_SETLK, lockf), or a flock(2) lock. */
export type LockKind = 'OFD' | 'POSIX' | 'FLOCK';

/**
 * A process that holds a lock, named by the kernel itself: the lock appears
 * in /proc/PID/fdinfo of one of its descriptors (OFD and flock locks belong to
 * an open file description, so every process that shares it is a holder), or
 * /proc/locks records it as the owner (a POSIX lock).
 */
export interface LockHolderProcess extends ProcessInfo {
  kind: LockKind;
  mode: 'exclusive' | 'shared';
  /** First byte of the locked range. */
  start: number;
  /** Last byte of the locked range, inclusive; null: to the end of the file, however large it grows. */
  end: number | null;
  /** Its descriptors that share the holding open file description; null when its /proc/PID/fd could not be read (a POSIX owner of another user). */
  fds: number[] | null;
  /** `lockmgr status` only: no live lockmgr supervises the lease it holds (an orphan that holds a lease its supervisor left behind). */
  orphan?: boolean;
}

/** A process that has the file open and holds none of the locks asked about: a reader, a waiter. */
export interface FileOpener extends ProcessInfo {
  /** Its descriptors of the file. */
  fds: number[];
  /** One of its threads is blocked waiting for a lock on the file (F_SETLKW, F_OFD_SETLKW, flock); null when that could not be read. */
  waiting: boolean | null;
}

/** A lock the kernel reports whose holder could not be named from here. */
export interface UnreadableHolder {
  kind: LockKind;
  mode: 'exclusive' | 'shared';
  start: number;
  end: number | null;
  /** The pid the kernel records, when it records one: a POSIX lock's owner, the process that took a flock lock (perhaps gone since). null for an OFD lock. */
  pid: number | null;
  command: string;
  /**
   * 'permission': some processes' /proc/PID/fd may not be read by this user (other users' processes);
   * 'namespace': no process visible here holds it (a holder in another pid namespace, or one that holds the file only through a memory mapping or an fd in flight);
   * 'no-fdinfo': this kernel does not list locks in /proc/PID/fdinfo.
   */
  reason: 'permission' | 'namespace' | 'no-fdinfo';
  /** The reason in words. */
  detail: string;
}

/** Who holds the locks on a file, from the kernel's own records (lockHolders() in lib/os/proc-locks.ts). */
export interface LockHolders {
  /** The processes holding the locks asked about (the conflicting ones, for a busy error). */
  holders: LockHolderProcess[];
  /** The other processes that have the file open (waiters, readers), never the asking process itself. */
  openers: FileOpener[];
  /** Locks whose holder could not be named from here, and why. */
  unreadable: UnreadableHolder[];
  /**
   * false when this kernel lists no locks in /proc/PID/fdinfo (before Linux
   * 4.1) or /proc/self/fdinfo cannot be read: then holders lists only POSIX
   * owners, and openers are the candidates.
   */
  fdinfoAvailable: boolean;
}

/** What a busy or timeout error says of who is in the way. */
export interface HoldersOptions {
  /** The path of the resource. */
  resource?: string;
  /** The file whose lock is in the way, when it is not the resource itself (an indirect lockspace's lock file). */
  lockFile?: string;
  /** What `lockFile` is to the resource, for messages: 'lock file' (the default), 'backing file' (a loop device's), 'device node'. */
  lockFileRole?: string;
  holders?: LockHolderProcess[];
  openers?: FileOpener[];
  unreadable?: UnreadableHolder[];
  fdinfoAvailable?: boolean;
  /** @deprecated Processes that have the resource open: now `holders` and `openers`. Default: both, by pid. */
  candidates?: ProcessInfo[];
}

export interface ResourceBusyOptions extends HoldersOptions {
  cause?: unknown;
  holder?: LockHolder | null;
  /** Paths whose locks this call took and released again before failing. */
  rolledBack?: string[];
  /** A migration target holds the handover guard (byte 1). */
  migrationInProgress?: boolean;
}

/** The holders' and openers' processes, once each: what `candidates` always listed. */
function candidatesOf(o: HoldersOptions | undefined): ProcessInfo[] {
  if (o?.candidates !== undefined) return o.candidates;
  const seen = new Map<number, ProcessInfo>();
  for (const p of [...(o?.holders ?? []), ...(o?.openers ?? [])]) if (!seen.has(p.pid)) seen.set(p.pid, { pid: p.pid, command: p.command });
  return [...seen.values()];
}

/**
 * A conflicting lock is held. `holder` is the conflicting lock as F_OFD_GETLK
 * reports it; `holders` the processes that hold it, named from the kernel's
 * records; `openers` the other processes that have the file open.
 */
export class ResourceBusyError extends LockManagerError {
  override readonly code = 'ERR_RESOURCE_BUSY';
  readonly holder: LockHolder | null;
  readonly resource: string | null;
  /** The lock file whose lock is in the way, when the resource's lease lives in one. */
  readonly lockFile: string | null;
  /** What `lockFile` is to the resource: 'lock file', 'backing file' (a loop device's), 'device node'. */
  readonly lockFileRole: string;
  readonly holders: LockHolderProcess[];
  readonly openers: FileOpener[];
  readonly unreadable: UnreadableHolder[];
  readonly fdinfoAvailable: boolean;
  /** @deprecated The processes of `holders` and `openers`, once each (before lockmgr named holders exactly, every process with the file open). */
  readonly candidates: ProcessInfo[];
  readonly rolledBack: string[];
  /** A migration target holds the resource's handover guard: it is being handed to another manager. */
  readonly migrationInProgress: boolean;
  constructor(message: string, options?: ResourceBusyOptions) {
    super(message, options);
    this.holder = options?.holder ?? null;
    this.resource = options?.resource ?? null;
    this.lockFile = options?.lockFile ?? null;
    this.lockFileRole = options?.lockFileRole ?? 'lock file';
    this.holders = options?.holders ?? [];
    this.openers = options?.openers ?? [];
    this.unreadable = options?.unreadable ?? [];
    this.fdinfoAvailable = options?.fdinfoAvailable ?? true;
    this.candidates = candidatesOf(options);
    this.rolledBack = options?.rolledBack ?? [];
    this.migrationInProgress = options?.migrationInProgress ?? false;
  }
}

export interface LockTimeoutOptions extends HoldersOptions {
  timeout: number;
  holder?: LockHolder | null;
  cause?: unknown;
}

/** A wait for a lock ran out of time. The lock is not held. `holders` and `openers` are as at that moment. */
export class LockTimeoutError extends LockManagerError {
  override readonly code = 'ERR_LOCK_TIMEOUT';
  readonly timeout: number;
  /** The conflicting lock at the moment the wait gave up, if one was still there. */
  readonly holder: LockHolder | null;
  readonly resource: string | null;
  readonly lockFile: string | null;
  /** What `lockFile` is to the resource: 'lock file', 'backing file' (a loop device's), 'device node'. */
  readonly lockFileRole: string;
  readonly holders: LockHolderProcess[];
  readonly openers: FileOpener[];
  readonly unreadable: UnreadableHolder[];
  readonly fdinfoAvailable: boolean;
  /** @deprecated The processes of `holders` and `openers`, once each. */
  readonly candidates: ProcessInfo[];
  constructor(message: string, options: LockTimeoutOptions) {
    super(message, options);
    this.timeout = options.timeout;
    this.holder = options.holder ?? null;
    this.resource = options.resource ?? null;
    this.lockFile = options.lockFile ?? null;
    this.lockFileRole = options.lockFileRole ?? 'lock file';
    this.holders = options.holders ?? [];
    this.openers = options.openers ?? [];
    this.unreadable = options.unreadable ?? [];
    this.fdinfoAvailable = options.fdinfoAvailable ?? true;
    this.candidates = candidatesOf(options);
  }
}

/** The holder fields of a busy or timeout error, to carry them into a new one (a rollback, a wrapping message). */
export function holdersOf(err: ResourceBusyError | LockTimeoutError): HoldersOptions {
  return {
    resource: err.resource ?? undefined,
    lockFile: err.lockFile ?? undefined,
    lockFileRole: err.lockFileRole,
    holders: err.holders,
    openers: err.openers,
    unreadable: err.unreadable,
    fdinfoAvailable: err.fdinfoAvailable,
    candidates: err.candidates,
  };
}

/** A wait was aborted through its AbortSignal. `cause` is the signal's reason. The lock is not held. */
export class AbortError extends LockManagerError {
  override readonly code = 'ABORT_ERR';
  constructor(message = 'The operation was aborted', options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'AbortError';
  }
}

/** An exclusive lock on a file opened for reading only. */
export class AccessModeError extends LockManagerError {
  override readonly code = 'ERR_ACCESS_MODE';
}

/** The filesystem, kernel or process cannot do this. */
export class UnsupportedError extends LockManagerError {
  override readonly code = 'ERR_UNSUPPORTED';
}

/** The kernel's lock table is full, or a network lock manager is down (ENOLCK). */
export class NoLocksAvailableError extends LockManagerError {
  override readonly code = 'ERR_NO_LOCKS';
}

/** Out of file descriptors, memory or threads. Nothing was left half-done. */
export class ResourceExhaustedError extends LockManagerError {
  override readonly code = 'ERR_RESOURCE_EXHAUSTED';
}

/** A call at the wrong time: use after close, or a state that does not allow it. */
export class InvalidStateError extends LockManagerError {
  override readonly code = 'ERR_INVALID_STATE';
}

/** The kernel returned something it is documented never to return here. A bug, ours or the kernel's. */
export class InternalError extends LockManagerError {
  override readonly code = 'ERR_INTERNAL';
}

/**
 * A process could not be started: execve failed (`cause.syscall` 'execve',
 * `cause.path` the command, `cause.code` ENOENT, EACCES, ...), or a step before it
 * in the child did (chdir, dup2, setsid, prctl), or the kernel refused the clone.
 * Reported before spawnSupervised() returns; no process is left behind.
 */
export class SpawnError extends LockManagerError {
  override readonly code = 'ERR_SPAWN';
  declare readonly cause: SystemError;
}

export type ErrorClass = new (message: string, options?: { cause?: unknown }) => LockManagerError;

/**
 * Every errno each system call of the native seam can return on Linux, and the
 * class it maps to; '*' is the class of any other errno of that call (else
 * InternalError). EINTR never surfaces: it is retried. The syscall of a failed
 * native call is the one native/ records (constants.syscalls). docs/errors.md
 * shows this table; a test keeps the two equal.
 */
const EXHAUSTED = { EAGAIN: ResourceExhaustedError, ENOMEM: ResourceExhaustedError, EMFILE: ResourceExhaustedError, ENFILE: ResourceExhaustedError } as const;

export const ERRNO_CLASSES = {
  open: {
    ENOENT: ResourceAccessError,
    ENOTDIR: ResourceAccessError,
    EACCES: ResourceAccessError,
    EPERM: ResourceAccessError,
    EROFS: ResourceAccessError,
    EISDIR: ResourceAccessError,
    ELOOP: ResourceAccessError,
    ENXIO: ResourceAccessError,
    ENODEV: ResourceAccessError,
    ENAMETOOLONG: ResourceAccessError,
    ETXTBSY: ResourceAccessError,
    EFBIG: ResourceAccessError,
    EOVERFLOW: ResourceAccessError,
    EINVAL: ResourceAccessError,
    EIO: ResourceAccessError,
    ESTALE: ResourceAccessError,
    EBUSY: ResourceAccessError,
    EOPNOTSUPP: ResourceAccessError,
    EAGAIN: ResourceBusyError,
    EMFILE: ResourceExhaustedError,
    ENFILE: ResourceExhaustedError,
    ENOMEM: ResourceExhaustedError,
    ENOSPC: ResourceExhaustedError,
    EDQUOT: ResourceExhaustedError,
    EFAULT: InternalError,
    EBADF: InternalError,
    EEXIST: InternalError,
  },
  fcntl: {
    EAGAIN: ResourceBusyError,
    EACCES: ResourceBusyError,
    EDEADLK: ResourceBusyError,
    EBADF: AccessModeError,
    EINVAL: UnsupportedError,
    EOPNOTSUPP: UnsupportedError,
    ENOSYS: UnsupportedError,
    ENOLCK: NoLocksAvailableError,
    EOVERFLOW: InvalidArgumentError,
    EIO: ResourceAccessError,
    ESTALE: ResourceAccessError,
    ENOMEM: ResourceExhaustedError,
    EFAULT: InternalError,
  },
  pthread_create: { EAGAIN: ResourceExhaustedError, EPERM: InternalError, EINVAL: InternalError },
  timer_create: { EAGAIN: ResourceExhaustedError, ENOMEM: ResourceExhaustedError, EINVAL: InternalError },
  sigaction: { EBUSY: UnsupportedError, EINVAL: InvalidArgumentError },
  clone3: { ...EXHAUSTED, ENOSPC: ResourceExhaustedError, ENOSYS: UnsupportedError, '*': SpawnError },
  clone: { ...EXHAUSTED, ENOSPC: ResourceExhaustedError, ENOSYS: UnsupportedError, '*': SpawnError },
  mmap: { ...EXHAUSTED, '*': SpawnError },
  pidfd_open: { ...EXHAUSTED, ESRCH: InvalidArgumentError, EINVAL: InvalidArgumentError, ENOSYS: UnsupportedError },
  uv_poll_init: { ...EXHAUSTED },
  pipe2: { ...EXHAUSTED },
  execve: { '*': SpawnError },
  chdir: { '*': SpawnError },
  dup2: { '*': SpawnError },
  setsid: { '*': SpawnError },
  prctl: { '*': SpawnError },
  close_range: { '*': SpawnError },
  pidfd_send_signal: { EPERM: UnsupportedError, EINVAL: InvalidArgumentError },
  pidfd_getfd: { ...EXHAUSTED, EPERM: UnsupportedError, ESRCH: InvalidStateError, EBADF: InvalidStateError, ENOSYS: UnsupportedError },
  // F_DUPFD_CLOEXEC of a caller's fd (openLockable(fd)); EINVAL: no fd number below RLIMIT_NOFILE.
  dup: { EBADF: InvalidArgumentError, EMFILE: ResourceExhaustedError, EINVAL: ResourceExhaustedError },
} as const satisfies Record<string, Readonly<Record<string, ErrorClass>>>;

/** The system calls whose errors lockmgr maps. */
export type Syscall = keyof typeof ERRNO_CLASSES;

const errorMap = getSystemErrorMap();
const errnoNumbers = osConstants.errno as Readonly<Record<string, number>>;

/** Positive errno of a name such as 'EAGAIN'. */
export function errnoOf(name: string): number {
  const n = errnoNumbers[name];
  if (n === undefined) throw new RangeError(`unknown errno name ${name}`);
  return n;
}

/**
 * The name of a positive errno, as Node's fs errors spell it (libuv's name where
 * libuv knows it: 95 is 'ENOTSUP', 11 is 'EAGAIN'), else the platform's.
 */
export function errnoName(errno: number): string {
  const known = errorMap.get(-errno);
  if (known) return known[0];
  for (const [name, n] of Object.entries(errnoNumbers)) if (n === errno) return name;
  return `E${errno}`;
}

function errnoDescription(errno: number): string {
  const known = errorMap.get(-errno);
  if (known) return known[1];
  // Loaded lazily: errors.ts must stay usable when the addon itself failed to load.
  const text = nativeStrerror?.(errno) ?? 'unknown error';
  return text.charAt(0).toLowerCase() + text.slice(1);
}

let nativeStrerror: ((errno: number) => string) | undefined;

/** @internal Set by lib/os/native.ts once the addon has loaded. */
export function setStrerror(fn: (errno: number) => string): void {
  nativeStrerror = fn;
}

/** Builds the Node-style system error for a positive errno. */
export function systemError(errno: number, syscall: string, path?: string): SystemError {
  const name = errnoName(errno);
  const where = path === undefined ? syscall : `${syscall} '${path}'`;
  const err = new Error(`${name}: ${errnoDescription(errno)}, ${where}`) as SystemError;
  err.errno = -errno;
  err.code = name;
  err.syscall = syscall;
  if (path !== undefined) err.path = path;
  return err;
}

// The tables by number, so that aliases (EAGAIN and EWOULDBLOCK, EOPNOTSUPP and
// ENOTSUP, EDEADLK and EDEADLOCK) map alike.
const classesByNumber = new Map<string, { byErrno: Map<number, ErrorClass>; other: ErrorClass }>(
  Object.entries(ERRNO_CLASSES).map(([syscall, table]) => {
    const entries = Object.entries(table as Record<string, ErrorClass>);
    return [
      syscall,
      { byErrno: new Map(entries.filter(([name]) => name !== '*').map(([name, Class]) => [errnoOf(name), Class])), other: (table as Record<string, ErrorClass>)['*'] ?? InternalError },
    ];
  }),
);

/** The class a system call's errno maps to (InternalError for a call or errno the table does not know). */
export function classForErrno(syscall: string, errno: number): ErrorClass {
  const t = classesByNumber.get(syscall);
  return t?.byErrno.get(errno) ?? t?.other ?? InternalError;
}

/**
 * The typed error for a failed system call: `message` says what lockmgr was
 * doing, the cause is the system error; its class comes from ERRNO_CLASSES.
 * The one place an errno becomes a typed error.
 */
export function fromErrno(syscall: string, errno: number, path: string | undefined, message: string): LockManagerError {
  const cause = systemError(errno, syscall === '' ? 'lockmgr' : syscall, path);
  const Class = classForErrno(syscall, errno);
  return new Class(`${message}: ${cause.message}`, { cause });
}


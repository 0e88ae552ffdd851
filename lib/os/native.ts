// Loads the addon: a local build from build/Release or the prebuilt binary
// shipped in prebuilds/linux-x64/, whichever node-gyp-build finds (it prefers
// build/Release; PREBUILDS_ONLY=1 skips it). Every native call is typed here;
// the addon itself knows nothing of modes, identities or error classes.
import { createRequire } from 'node:module';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { UnsupportedError, fromErrno, setStrerror, type LockManagerError } from './errors.js';

/** The addon's own constants: lib/ never retypes a number that native/ defines. */
export interface NativeConstants {
  /** Names of the system calls a failed call can record (failedSyscall()); index 0 is none. */
  readonly syscalls: readonly string[];
  /** Lock types of setlk, getlk, waitLock and lockSync. */
  readonly lock: { readonly SHARED: number; readonly EXCLUSIVE: number; readonly UNLOCK: number };
  /**
   * openPath/statFd: the indices of each fact in `out` (Float64Array of FIELDS)
   * and `ids` (BigUint64Array of ID_FIELDS), and the st_mode file-type bits.
   */
  readonly stat: {
    readonly MODE: number;
    readonly UID: number;
    readonly NLINK: number;
    readonly SIZE: number;
    readonly FS_TYPE: number;
    readonly FIELDS: number;
    readonly DEV: number;
    readonly INO: number;
    readonly RDEV: number;
    readonly ID_FIELDS: number;
    readonly S_IFMT: number;
    readonly S_IFREG: number;
    readonly S_IFBLK: number;
    readonly S_IFCHR: number;
    readonly S_IFDIR: number;
    readonly S_IFIFO: number;
    readonly S_IFSOCK: number;
    readonly S_IFLNK: number;
  };
  /** statusFlags' access bits. */
  readonly open: { readonly O_ACCMODE: number; readonly O_RDONLY: number; readonly O_WRONLY: number; readonly O_RDWR: number; readonly O_PATH: number };
  /** How a watched process ended (initSpawn's onExit kind). */
  readonly exit: { readonly UNKNOWN: number; readonly CODE: number; readonly SIGNAL: number; readonly ERROR: number };
  /** spawn() flags. */
  readonly spawn: { readonly NEW_SESSION: number; readonly FORCE_FALLBACK: number };
  readonly sanlock: {
    /** sanlockCall() operations. */
    readonly ops: Readonly<Record<'ACQUIRE' | 'RELEASE' | 'INQUIRE' | 'WRITE_LOCKSPACE' | 'ADD_LOCKSPACE' | 'REM_LOCKSPACE' | 'INQ_LOCKSPACE' | 'FORMAT_RINDEX' | 'CREATE_RESOURCE' | 'LOOKUP' | 'READ_OWNERS' | 'RELEASE_ALL', number>>;
    /** sanlock's own return codes (sanlock_rv.h) by name; its other codes are -errno. */
    readonly codes: Readonly<Record<string, number>>;
    readonly NAME_LEN: number;
    readonly PATH_LEN: number;
  };
}

/**
 * The native seam, declared in one place. One convention for every call that
 * can fail: it returns a value >= 0 (0, an fd, an id) or -errno, and
 * failedSyscall() then names the system call that failed; nativeError() makes
 * the typed error. Scalars in, numbers out: the addon knows nothing of modes,
 * identities or error classes.
 */
export interface Native {
  readonly constants: NativeConstants;
  /** Index into constants.syscalls of the last failure on this thread. */
  failedSyscall(): number;
  /**
   * O_PATH | O_CLOEXEC (| O_NOFOLLOW) fd: names the inode, opens nothing. Its
   * fstat + fstatfs go into out and ids (constants.stat); a failed one closes
   * the fd again and returns -errno (failedSyscall 'fstat' or 'fstatfs').
   */
  openPath(path: string, nofollow: boolean, out: Float64Array, ids: BigUint64Array): number;
  /** fstat + fstatfs of an open fd into out and ids, as openPath. */
  statFd(fd: number, out: Float64Array, ids: BigUint64Array): number;
  /**
   * A new open file description of the inode an O_PATH fd refers to (through
   * /proc/self/fd), O_CLOEXEC | O_NOCTTY, opened O_NONBLOCK and then cleared.
   * Closes the O_PATH fd, whatever the outcome.
   */
  reopenFd(opath: number, writable: boolean): number;
  /** O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW, mode 0600 (-EEXIST when the name exists). */
  createFile(path: string): number;
  /** F_OFD_SETLK with a constants.lock type. */
  setlk(fd: number, type: number, start: number, length: number): number;
  /** F_OFD_GETLK into out = [type, start, length, pid]; type UNLOCK = no conflict. */
  getlk(fd: number, type: number, start: number, length: number, out: Float64Array): number;
  closeFd(fd: number): number;
  /** F_DUPFD_CLOEXEC: a new fd of the caller's open file description (failedSyscall 'dup'). */
  dupFd(fd: number): number;
  /** F_GETFL: the fd's status flags (constants.open for the access bits). */
  statusFlags(fd: number): number;
  /** Replaces fd with an O_PATH placeholder: its open file description (and its locks) go, the number stays taken. */
  retireFd(fd: number): number;
  /** kcmp(KCMP_FILE): 0 when pid's fd and otherPid's otherFd are one open file description, 1 or 2 when not, or -errno. */
  kcmp(pid: number, fd: number, otherPid: number, otherFd: number): number;
  /** LOOP_GET_STATUS64 into out = [backing dev, backing ino, offset, sizelimit]; -ENXIO unbound, -ENOTTY not a loop device. */
  loopStatus(fd: number, out: BigUint64Array): number;
  /** The C library's description of a positive errno. */
  strerror(errno: number): string;
  /**
   * Starts this environment's waiter pool and installs the wake-up signal
   * (idempotent). onDone(count): results[0 .. 2 * count) holds count [id, errno] pairs.
   */
  initWaiters(onDone: (count: number) => void, wakeSignal: number, results: Float64Array): number;
  /** F_OFD_SETLKW on a waiter thread: the request id (> 0); timeoutMs < 0 for none. */
  waitLock(fd: number, type: number, start: number, length: number, timeoutMs: number): number;
  /**
   * F_OFD_SETLKW on the calling thread, which it blocks: 0 | -errno;
   * -ETIMEDOUT once timeoutMs (< 0: none) has passed. A timeout needs the
   * wake-up signal installed (initWaiters), else -ENOTCONN.
   */
  lockSync(fd: number, type: number, start: number, length: number, timeoutMs: number): number;
  cancelWait(id: number): void;
  waiterThreads(): number;
  /** Starts this environment's process supervision (idempotent). onExit(id, constants.exit kind, value). */
  initSpawn(onExit: (id: number, kind: number, value: number) => void): number;
  /**
   * clone3 (or the fallback) + execve over `paths`. paths, argv and envp are
   * lists of NUL-terminated items in one string. stdio = source fds for 0..2;
   * keep = kept fds, ascending, >= 3; flags from constants.spawn. out = [id, pid].
   */
  spawn(paths: string, argv: string, envp: string, cwd: string | null, stdio: Int32Array, keep: Int32Array, flags: number, pdeathsig: number, out: Float64Array): number;
  /** pidfd_open + watch; out[0] = id. */
  attach(pid: number, out: Float64Array): number;
  /** pidfd_send_signal; -ESRCH once the exit has been seen. */
  sendSignal(id: number, signal: number): number;
  /**
   * pidfd_getfd(2) of the watched process's fd `fd`, through its watch's
   * pidfd: a new fd of ours (FD_CLOEXEC, tracked as lockable) for the same open
   * file description, so the same OFD locks. -ESRCH once the exit has been seen.
   */
  getFd(id: number, fd: number): number;
  /** Stops watching an attached process (no exit is reported; its pidfd is closed). -EINVAL for our own child, -ESRCH when not watched. */
  unwatch(id: number): number;
  setRef(id: number, ref: boolean): void;
  /** pipe2(O_CLOEXEC) into out = [read, write]. */
  makePipe(out: Int32Array): number;
  openDevNull(): number;
  fdIsOpen(fd: number): boolean;
  /** dlopen libsanlock_client.so.1 (once per process): '' or dlerror()'s text. */
  sanlockLoad(): string;
  /** Starts this environment's sanlock workers (idempotent). onDone(id, rv, text, numbers). */
  sanlockInit(onDone: (id: number, rv: number, text: string, out: Float64Array) => void): number;
  /** Queues a sanlock call (constants.sanlock.ops): strings NUL-separated; the id (> 0). */
  sanlockCall(op: number, strings: string, numbers: Float64Array): number;
  /** sanlock_strerror(rv). */
  sanlockStrerror(rv: number): string;
  /** [watched processes of this environment, orphans being reaped, 1 if clone3 is missing, clone3 spawns, fallback spawns]. */
  spawnInfo(): [number, number, number, number, number];
}

const packageRoot = resolve(dirname(fileURLToPath(import.meta.url)), '../..');

/** How to build the addon where no prebuilt binary fits (the package has no install script). */
export const buildFromSourceHint =
  `build it from source: \`cd ${packageRoot} && npm run build:addon\`` +
  " (needs python3, make, a C++17 compiler and Node's headers; offline, set npm_config_nodedir)";

function load(): { addon: Native; path: string } {
  if (process.platform !== 'linux') {
    throw new UnsupportedError(`lockmgr runs on Linux only, not on ${process.platform}`);
  }
  const require = createRequire(import.meta.url);
  try {
    const nodeGypBuild = require('node-gyp-build') as { resolve(dir: string): string };
    const path = nodeGypBuild.resolve(packageRoot);
    return { addon: require(path) as Native, path };
  } catch (cause) {
    throw new UnsupportedError(
      `lockmgr: the native addon could not be loaded for Node ${process.version} on ${process.platform}-${process.arch}` +
        ` (${(cause as Error).message.replace(/\s+/g, ' ').trim()}). The package ships a prebuilt binary for linux-x64 with glibc >= 2.28;` +
        ` elsewhere, ${buildFromSourceHint}.`,
      { cause },
    );
  }
}

const loaded = load();
/** The file the addon was loaded from; the sanlock exec helper sits next to it. */
export const addonPath: string = loaded.path;
export const native: Native = loaded.addon;
setStrerror(native.strerror);

export const constants: NativeConstants = native.constants;

/** The system call the last failed native call of this thread named ('' when it was none). */
export function failedSyscall(): string {
  return constants.syscalls[native.failedSyscall()] ?? '';
}

/**
 * The typed error for a native call that returned rv < 0: its errno and the
 * system call native/ recorded, mapped by ERRNO_CLASSES (lib/os/errors.ts).
 * `message` says what lockmgr was doing.
 */
export function nativeError(rv: number, message: string, path?: string): LockManagerError {
  return fromErrno(failedSyscall(), -rv, path, message);
}

/**
 * Per-environment state of a native part, kept on the addon's exports object
 * (one per environment): two copies of this JavaScript loaded into one
 * environment (an ESM and a CJS load, a reset module cache) share the one
 * thread pool and dispatcher of the one binary instead of the second getting none.
 */
export function nativeState<T extends object>(name: string, create: () => T): T {
  const key = Symbol.for(`lockmgr.${name}`);
  const holder = native as unknown as Record<symbol, T | undefined>;
  let state = holder[key];
  if (state === undefined) {
    state = create();
    Object.defineProperty(native, key, { value: state });
  }
  return state;
}

/** Native calls in flight, by id: each completes once, through its part's dispatcher. */
export class PendingCalls<A extends unknown[]> {
  readonly #calls = new Map<number, (...args: A) => void>();

  add(id: number, done: (...args: A) => void): void {
    this.#calls.set(id, done);
  }

  /** Completes call `id`; false if it was not pending. */
  settle(id: number, ...args: A): boolean {
    const done = this.#calls.get(id);
    if (done === undefined) return false;
    this.#calls.delete(id);
    done(...args);
    return true;
  }

  /** Drops call `id` without completing it. */
  forget(id: number): void {
    this.#calls.delete(id);
  }

  get size(): number {
    return this.#calls.size;
  }
}

// Loads the addon: a prebuilt binary from prebuilds/ or a local build from
// build/Release, whichever node-gyp-build finds. Every native call is typed here;
// the addon itself knows nothing of modes, identities or error classes.
import { createRequire } from 'node:module';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { UnsupportedError, setStrerror } from './errors.js';

export interface Native {
  /** O_PATH | O_CLOEXEC (| O_NOFOLLOW) fd, or -errno: names the inode, opens nothing. */
  openPath(path: string, nofollow: boolean): number;
  /** A new open file description of the inode an fd refers to (through /proc/self/fd), O_CLOEXEC | O_NOCTTY: fd, or -errno. */
  reopenFd(fd: number, writable: boolean): number;
  /** O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW, mode 0600: fd, or -errno (EEXIST when the name exists). */
  createFile(path: string): number;
  /** F_OFD_SETLK; type 0 shared, 1 exclusive, 2 unlock. 0 or errno. */
  setlk(fd: number, type: number, start: number, length: number): number;
  /** F_OFD_GETLK into out = [type, start, length, pid]; type 2 = no conflict. 0 or errno. */
  getlk(fd: number, type: number, start: number, length: number, out: Float64Array): number;
  closeFd(fd: number): number;
  /** Replaces fd with an O_PATH placeholder: its open file description (and its locks) go, the number stays taken. 0 or errno. */
  retireFd(fd: number): number;
  /** The C library's description of a positive errno. */
  strerror(errno: number): string;
  /** Starts this environment's waiter pool. 0 or errno. */
  initWaiters(onDone: (batch: Float64Array) => void, wakeSignal: number): number;
  /** F_OFD_SETLKW on a waiter thread: request id (> 0), -errno (pthread_create) or -(65536 + errno) (timer_create); timeoutMs < 0 for none. */
  waitLock(fd: number, type: number, start: number, length: number, timeoutMs: number): number;
  cancelWait(id: number): void;
  waiterThreads(): number;
  /** Starts this environment's process supervision. onExit(id, kind, value): kind 0 unknown, 1 exit code, 2 signal, 3 errno. 0 or errno. */
  initSpawn(onExit: (id: number, kind: number, value: number) => void): number;
  /**
   * clone3 (or the fallback) + execve over `paths`. paths, argv and envp are
   * lists of NUL-terminated items in one string. stdio = source fds for 0..2;
   * keep = kept fds, ascending, >= 3; flags 1 new session, 2 force the fallback.
   * 0 with out = [id, pid], or errno with out[2] = the failed stage.
   */
  spawn(
    paths: string,
    argv: string,
    envp: string,
    cwd: string | null,
    stdio: Int32Array,
    keep: Int32Array,
    flags: number,
    pdeathsig: number,
    out: Float64Array,
  ): number;
  /** pidfd_open + watch. 0 with out[0] = id, or errno. */
  attach(pid: number, out: Float64Array): number;
  /** pidfd_send_signal. 0 or errno; ESRCH once the exit has been seen. */
  sendSignal(id: number, signal: number): number;
  setRef(id: number, ref: boolean): void;
  /** pipe2(O_CLOEXEC) into out = [read, write]. 0 or errno. */
  makePipe(out: Int32Array): number;
  /** fd or -errno. */
  openDevNull(): number;
  fdIsOpen(fd: number): boolean;
  /** dlopen libsanlock_client.so.1 (once per process): '' or dlerror()'s text. */
  sanlockLoad(): string;
  /** Starts this environment's sanlock workers. onDone(id, rv, text, numbers). 0 or EALREADY. */
  sanlockInit(onDone: (id: number, rv: number, text: string, out: Float64Array) => void): number;
  /** Queues a sanlock call (native/sanlock.cc Op): strings NUL-separated. id > 0 or -errno. */
  sanlockCall(op: number, strings: string, numbers: Float64Array): number;
  /** sanlock_strerror(rv). */
  sanlockStrerror(rv: number): string;
  /** [watched processes of this environment, orphans being reaped, 1 if clone3 is missing, clone3 spawns, fallback spawns]. */
  spawnInfo(): [number, number, number, number, number];
}

const packageRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..');

function load(): Native {
  if (process.platform !== 'linux') {
    throw new UnsupportedError(`lockmgr runs on Linux only, not on ${process.platform}`);
  }
  const require = createRequire(import.meta.url);
  try {
    const nodeGypBuild = require('node-gyp-build') as (dir: string) => unknown;
    return nodeGypBuild(packageRoot) as Native;
  } catch (cause) {
    throw new UnsupportedError(
      `lockmgr: the native addon could not be loaded for Node ${process.version} on ${process.arch}` +
        ` (${(cause as Error).message}). Rebuild it with \`npm rebuild lockmgr --build-from-source\`` +
        ' (needs python3, make and a C++17 compiler), or install a release that ships a prebuilt binary for this platform.',
      { cause },
    );
  }
}

export const native: Native = load();
setStrerror(native.strerror);

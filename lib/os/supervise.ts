// Supervised processes through pidfds: spawnSupervised() and attachProcess().
//
// A SupervisedProcess holds a pidfd, never just a pid, so signal() cannot reach a
// process that inherited the number after ours was reaped. Its exit is seen by a
// uv_poll on the pidfd on this thread's own loop (native/spawn.cc); nothing waits
// on libuv's threadpool, and nothing reaps other children: Node's child_process
// keeps every one of its 'exit' events.
//
// The lead-up to execve is checked here, before anything is created: an invalid
// argument spawns nothing. What only the child can find out (a missing command,
// a cwd that is not a directory) comes back as a SpawnError before
// spawnSupervised() returns; the child never runs as a stand-in that exits 127.
import { Socket } from 'node:net';
import { constants as osConstants } from 'node:os';
import type { Readable, Writable } from 'node:stream';
import { InvalidArgumentError, InvalidStateError, errnoOf, type LockManagerError } from './errors.js';
import { PendingCalls, constants, failedSyscall, native, nativeError, nativeState } from './native.js';
import { checkOptions, checkPath, checkTimeout, describe } from './validate.js';

export type StdioKind = 'inherit' | 'ignore' | 'pipe';
/** One of 0, 1, 2: a kind, or an fd of ours the child gets at that number. */
export type StdioEntry = StdioKind | number;

export interface SpawnOptions {
  /** Working directory of the child. Default: ours. */
  cwd?: string;
  /** The child's whole environment. Default: process.env, as child_process does. PATH is searched in it. */
  env?: Record<string, string | undefined>;
  /** Default 'inherit'. An array gives fds 0, 1 and 2 each their own entry. */
  stdio?: StdioKind | readonly [StdioEntry, StdioEntry, StdioEntry];
  /** Fds (>= 3) the child keeps at the same numbers. Every other fd is closed in the child. */
  keepFds?: readonly number[];
  /** Signal the child gets when the thread that spawned it dies (PR_SET_PDEATHSIG). Default null: none. */
  parentDeathSignal?: NodeJS.Signals | null;
  /** Start the child in a new session (setsid). Default false. */
  newSession?: boolean;
}

export interface ExitStatus {
  /** The exit code, or null when a signal ended it or the status is unknown (attached processes). */
  readonly code: number | null;
  /** The signal that ended it, or null. */
  readonly signal: NodeJS.Signals | null;
}

export interface StopOptions {
  /** Milliseconds between SIGTERM and SIGKILL. Default 10,000; 0 sends SIGKILL at once. */
  graceMs?: number;
}

const SPAWN_OPTIONS = ['cwd', 'env', 'stdio', 'keepFds', 'parentDeathSignal', 'newSession'] as const;
const STDIO_KINDS: readonly StdioKind[] = ['inherit', 'ignore', 'pipe'];
const DEFAULT_GRACE_MS = 10_000;
/** setTimeout's limit; a longer delay would fire after 1 ms. */
const MAX_TIMER_MS = 2 ** 31 - 1;
/** What execvp searches when PATH is not set at all (glibc's default). */
const DEFAULT_PATH = '/bin:/usr/bin';

const ESRCH = errnoOf('ESRCH');

const signalNumbers = osConstants.signals as Readonly<Record<string, number>>;
const signalNames = new Map<number, NodeJS.Signals>();
for (const [name, number] of Object.entries(signalNumbers)) {
  // Aliases (SIGIOT, SIGPOLL) come after the usual name: keep the first.
  if (!signalNames.has(number)) signalNames.set(number, name as NodeJS.Signals);
}

function signalNumber(value: unknown, what: string, min = 1): number {
  if (typeof value === 'string' && Object.hasOwn(signalNumbers, value)) return signalNumbers[value]!;
  if (typeof value === 'number' && Number.isInteger(value) && value >= min && value <= 64) return value;
  throw new InvalidArgumentError(`${what} must be a signal name such as 'SIGTERM' (or a number ${min}-64), got ${describe(value)}`);
}

function checkNoNul(value: string, what: string): string {
  if (value.includes('\0')) throw new InvalidArgumentError(`${what} must not contain a NUL byte: ${describe(value)}`);
  return value;
}

function checkFdNumber(value: unknown, what: string, min: number): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > 0x7fffffff) {
    throw new InvalidArgumentError(`${what} must be an integer fd >= ${min}, got ${describe(value)}`);
  }
  if (!native.fdIsOpen(value)) throw new InvalidArgumentError(`${what} is fd ${value}, which is not open`);
  return value;
}

/**
 * The exit dispatcher of this environment (nativeState): two copies of this
 * module that share one addon share one dispatcher instead of the second
 * silently getting none.
 */
function registry(): PendingCalls<[kind: number, value: number]> {
  return nativeState('supervise', () => {
    const live = new PendingCalls<[kind: number, value: number]>();
    const rv = native.initSpawn((id, kind, value) => live.settle(id, kind, value));
    if (rv < 0) throw nativeError(rv, 'cannot start process supervision');
    return live;
  });
}

const constructing = Symbol('SupervisedProcess');

/** A process watched through a pidfd. Create it with spawnSupervised() or attachProcess(). */
export class SupervisedProcess implements AsyncDisposable {
  readonly pid: number;
  /** Writable end of the child's stdin where stdio[0] is 'pipe', else null. */
  readonly stdin: Writable | null;
  /** Readable end of the child's stdout where stdio[1] is 'pipe', else null. Ends when every writer (the child) is gone. */
  readonly stdout: Readable | null;
  readonly stderr: Readable | null;
  /** Resolves once the process has exited (and, for a child, been reaped). Never rejects. */
  readonly exited: Promise<ExitStatus>;
  readonly #id: number;
  readonly #attached: boolean;
  #status: ExitStatus | null = null;
  #stopping: Promise<ExitStatus> | null = null;
  #killTimer: NodeJS.Timeout | null = null;
  #refed = true;

  /** @internal */
  constructor(token: symbol, id: number, pid: number, attached: boolean, stdio: [Writable | null, Readable | null, Readable | null]) {
    if (token !== constructing) throw new InvalidStateError('use spawnSupervised() or attachProcess()');
    this.#id = id;
    this.pid = pid;
    this.#attached = attached;
    [this.stdin, this.stdout, this.stderr] = stdio;
    this.exited = new Promise<ExitStatus>((resolve) => {
      registry().add(id, (kind, value) => {
        this.#status = this.#toStatus(kind, value);
        if (this.#killTimer !== null) clearTimeout(this.#killTimer);
        this.#killTimer = null;
        resolve(this.#status);
      });
    });
  }

  /** The exit status, or null while the process runs (or its exit has not been seen yet). */
  get exitStatus(): ExitStatus | null {
    return this.#status;
  }

  /**
   * Sends a signal through the pidfd. Returns false once the process has exited:
   * the pidfd is closed then, and a pid is never used instead. Signal 0 sends
   * nothing and only checks that we may signal it (UnsupportedError if not).
   */
  signal(signal: NodeJS.Signals | number = 'SIGTERM'): boolean {
    const number = signalNumber(signal, 'signal', 0);
    if (this.#status !== null) return false;
    const rv = native.sendSignal(this.#id, number);
    if (rv === 0) return true;
    if (rv === -ESRCH) return false;
    // EPERM: UnsupportedError (we may not signal it); EINVAL: InvalidArgumentError.
    throw nativeError(rv, `cannot send ${signalNames.get(number) ?? number} to process ${this.pid}`);
  }

  /**
   * SIGTERM, then SIGKILL if it is still running after graceMs. Resolves with
   * the exit status. Idempotent: every call returns the first call's promise.
   */
  stop(options?: StopOptions): Promise<ExitStatus> {
    const opts = checkOptions<StopOptions>(options, ['graceMs'], 'stop options');
    const grace = checkTimeout(opts.graceMs, 'graceMs') ?? DEFAULT_GRACE_MS;
    if (this.#stopping !== null) return this.#stopping;
    if (this.#status === null) {
      // Signal first: if we may not (EPERM on an attached process), stop()
      // throws and a later call can try again, instead of sharing a promise
      // that might never resolve.
      if (grace === 0) {
        this.signal('SIGKILL');
      } else {
        this.signal('SIGTERM');
        this.#killTimer = setTimeout(() => {
          this.#killTimer = null;
          try {
            this.signal('SIGKILL');
          } catch (err) {
            // From a timer there is no caller to throw to: a process that
            // stopped being ours to signal during the grace (EPERM).
            process.emitWarning(err as Error);
          }
        }, Math.min(grace, MAX_TIMER_MS));
        if (!this.#refed) this.#killTimer.unref();
      }
    }
    this.#stopping = this.exited;
    return this.#stopping;
  }

  /**
   * @internal A descriptor of ours for the open file description behind the
   * process's fd `fd` (pidfd_getfd(2) through this watch's pidfd, so never
   * another process that reused the pid): it holds the same OFD locks. CLOEXEC.
   * InvalidStateError once the process has exited or closed that fd;
   * UnsupportedError where we may not (ptrace access).
   */
  takeFd(fd: number): number {
    if (this.#status !== null) throw new InvalidStateError(`process ${this.pid} has exited: its descriptors are gone`);
    const rv = native.getFd(this.#id, fd);
    if (rv < 0) throw nativeError(rv, `cannot take descriptor ${fd} of process ${this.pid}`);
    return rv;
  }

  /**
   * @internal Stops watching an attached process, which runs on unwatched
   * (an adoption given up): its pidfd is closed and `exited` never settles.
   * Idempotent; InvalidStateError for our own child, which must be reaped.
   */
  unwatch(): void {
    if (!this.#attached) throw new InvalidStateError(`process ${this.pid} is our child: it must be reaped, not unwatched`);
    if (this.#status !== null) return;
    native.unwatch(this.#id);
    registry().forget(this.#id);
  }

  /** Lets the watch keep the event loop alive (the default). */
  ref(): this {
    this.#refed = true;
    native.setRef(this.#id, true);
    this.#killTimer?.ref();
    return this;
  }

  /** Lets the process exit while this one still runs. Its exit is still reported if the loop runs. */
  unref(): this {
    this.#refed = false;
    native.setRef(this.#id, false);
    this.#killTimer?.unref();
    return this;
  }

  /** Stops it now with SIGKILL (no grace) and waits for the exit. */
  async [Symbol.asyncDispose](): Promise<void> {
    if (this.#status === null) this.signal('SIGKILL');
    await this.exited;
  }

  #toStatus(kind: number, value: number): ExitStatus {
    // An attached process is not our child: its status went to its parent. A
    // waitid failure (ECHILD when something else in the process reaped our
    // child with waitpid(-1, __WALL)) leaves the status unknown too, but the
    // process is gone either way, so exited still resolves.
    if (this.#attached) return Object.freeze({ code: null, signal: null });
    if (kind === constants.exit.CODE) return Object.freeze({ code: value, signal: null });
    if (kind === constants.exit.SIGNAL) return Object.freeze({ code: null, signal: signalNames.get(value) ?? null });
    return Object.freeze({ code: null, signal: null });
  }
}

function parseStdio(value: unknown): [StdioEntry, StdioEntry, StdioEntry] {
  if (value === undefined) return ['inherit', 'inherit', 'inherit'];
  if (typeof value === 'string') {
    const kind = STDIO_KINDS.find((k) => k === value);
    if (kind === undefined) throw new InvalidArgumentError(`stdio must be 'inherit', 'ignore', 'pipe' or an array of three, got ${describe(value)}`);
    return [kind, kind, kind];
  }
  if (!Array.isArray(value) || value.length !== 3) {
    throw new InvalidArgumentError(`stdio must be 'inherit', 'ignore', 'pipe' or an array of three entries (use keepFds for more), got ${describe(value)}`);
  }
  // Indexed, not map(): a hole in the array must be rejected, not skipped.
  const entries: StdioEntry[] = [];
  for (let i = 0; i < 3; i++) {
    const entry: unknown = value[i];
    if (typeof entry === 'string' && (STDIO_KINDS as readonly string[]).includes(entry)) entries.push(entry as StdioKind);
    else if (typeof entry === 'number') entries.push(checkFdNumber(entry, `stdio[${i}]`, 0));
    else throw new InvalidArgumentError(`stdio[${i}] must be 'inherit', 'ignore', 'pipe' or an fd number, got ${describe(entry)}`);
  }
  return entries as [StdioEntry, StdioEntry, StdioEntry];
}

function parseKeepFds(value: unknown): Int32Array {
  if (value === undefined) return new Int32Array(0);
  if (!Array.isArray(value)) throw new InvalidArgumentError(`keepFds must be an array of fd numbers, got ${describe(value)}`);
  const fds = new Set<number>();
  for (let i = 0; i < value.length; i++) fds.add(checkFdNumber(value[i], `keepFds[${i}]`, 3));
  return Int32Array.from([...fds].sort((a, b) => a - b));
}

function parseEnv(value: unknown): { envp: string[]; path: string } {
  if (value !== undefined && (value === null || typeof value !== 'object' || Array.isArray(value))) {
    throw new InvalidArgumentError(`env must be an object of strings, got ${describe(value)}`);
  }
  const env = (value ?? process.env) as Record<string, unknown>;
  const envp: string[] = [];
  let path = DEFAULT_PATH;
  for (const key of Object.keys(env)) {
    const raw = env[key];
    if (raw === undefined) continue;  // as child_process: an unset variable
    if (key === '' || key.includes('=')) throw new InvalidArgumentError(`env has an invalid variable name ${describe(key)}`);
    checkNoNul(key, 'an env variable name');
    const text = checkNoNul(String(raw), `env.${key}`);
    if (key === 'PATH') path = text;
    envp.push(`${key}=${text}`);
  }
  return { envp, path };
}

/** execvp's candidates: the command itself if it has a slash, else each PATH entry (empty = current directory). */
function candidates(command: string, path: string): string[] {
  if (command.includes('/')) return [command];
  return path.split(':').map((dir) => (dir === '' ? command : `${dir.replace(/\/+$/, '')}/${command}`));
}

/** The env var that forces the fallback (clone + pidfd_open) even where clone3 works. Tests use it. */
function forceFallback(): boolean {
  const v = process.env.LOCKMGR_SPAWN_FALLBACK;
  return v !== undefined && v !== '' && v !== '0';
}

/** The error of a failed native.spawn: the step that failed (in the child or in the parent) is the syscall; its class comes from ERRNO_CLASSES. */
function spawnFailure(rv: number, command: string, cwd: string | undefined): LockManagerError {
  const syscall = failedSyscall();
  const path = syscall === 'execve' ? command : syscall === 'chdir' ? cwd : undefined;
  return nativeError(rv, `cannot spawn '${command}'`, path);
}

/** A list as native.spawn takes it: every item NUL-terminated, in one string (items were checked to have no NUL). */
function nulList(items: readonly string[]): string {
  return items.length === 0 ? '' : `${items.join('\0')}\0`;
}

function closeAll(fds: Iterable<number | null>): void {
  for (const fd of fds) if (fd !== null) native.closeFd(fd);
}

/**
 * Starts `command` with `args` and supervises it through a pidfd. The command is
 * searched in the child env's PATH when it has no slash, as execvp does
 * (including running a text file without #! with /bin/sh).
 *
 * Throws InvalidArgumentError (nothing spawned) for bad arguments, SpawnError
 * when the command could not be executed, ResourceExhaustedError when out of
 * processes, fds or memory.
 */
interface SpawnRequest {
  argv: string[];
  cwd: string | undefined;
  envp: string[];
  path: string;
  stdio: [StdioEntry, StdioEntry, StdioEntry];
  keep: Int32Array;
  pdeathsig: number;
  flags: number;
}

/** spawnSupervised()'s arguments, checked: every InvalidArgumentError it throws comes from here, before anything is created. */
function spawnRequest(command: unknown, args: unknown, options: unknown): SpawnRequest {
  if (typeof command !== 'string') throw new InvalidArgumentError(`command must be a string, got ${describe(command)}`);
  if (command === '') throw new InvalidArgumentError('command must not be empty');
  checkNoNul(command, 'command');
  if (args !== undefined && !Array.isArray(args)) throw new InvalidArgumentError(`args must be an array of strings, got ${describe(args)}`);
  const argv = [command];
  const list: readonly unknown[] = args ?? [];
  for (let i = 0; i < list.length; i++) {
    const arg = list[i];
    if (typeof arg !== 'string') throw new InvalidArgumentError(`args[${i}] must be a string, got ${describe(arg)}`);
    argv.push(checkNoNul(arg, `args[${i}]`));
  }
  const opts = checkOptions<SpawnOptions>(options, SPAWN_OPTIONS, 'spawnSupervised options');
  let cwd: string | undefined;
  if (opts.cwd !== undefined) {
    if (typeof opts.cwd !== 'string') throw new InvalidArgumentError(`cwd must be a string, got ${describe(opts.cwd)}`);
    // Not normalised: chdir must follow 'link/..' through the symlink, as it
    // does for child_process; a relative cwd is relative to ours.
    const given = checkNoNul(opts.cwd, 'cwd');
    cwd = checkPath(given.startsWith('/') ? given : `${process.cwd()}/${given}`, 'cwd');
  }
  const { envp, path } = parseEnv(opts.env);
  const stdio = parseStdio(opts.stdio);
  const keep = parseKeepFds(opts.keepFds);
  const pdeathsig = opts.parentDeathSignal == null ? 0 : signalNumber(opts.parentDeathSignal, 'parentDeathSignal');
  if (opts.newSession !== undefined && typeof opts.newSession !== 'boolean') {
    throw new InvalidArgumentError(`newSession must be a boolean, got ${describe(opts.newSession)}`);
  }
  const flags = (opts.newSession ? constants.spawn.NEW_SESSION : 0) | (forceFallback() ? constants.spawn.FORCE_FALLBACK : 0);
  return { argv, cwd, envp, path, stdio, keep, pdeathsig, flags };
}

/**
 * Throws the InvalidArgumentError that spawnSupervised(command, args, options)
 * would, and spawns nothing: a caller that takes locks before it spawns checks
 * first, so bad arguments never cost a lock (or lose to a busy one).
 */
export function checkSpawn(command: unknown, args: unknown, options: unknown): void {
  spawnRequest(command, args, options);
}

export function spawnSupervised(command: string, args?: readonly string[], options?: SpawnOptions): SupervisedProcess {
  const { argv, cwd, envp, path, stdio, keep, pdeathsig, flags } = spawnRequest(command, args, options);
  registry();

  // Everything is valid: now create the child's stdio. The child's ends (and
  // /dev/null) are closed here once the child has its copies; ours are closed
  // too if the spawn fails.
  const sources = new Int32Array(3);
  const parentEnds: [number | null, number | null, number | null] = [null, null, null];
  const childEnds: number[] = [];
  let failure: LockManagerError | null = null;
  const out = new Float64Array(2);
  try {
    let devNull = -1;
    for (let i = 0; i < 3; i++) {
      const entry = stdio[i]!;
      if (typeof entry === 'number') {
        sources[i] = entry;
      } else if (entry === 'inherit') {
        sources[i] = i;
      } else if (entry === 'ignore') {
        if (devNull < 0) {
          devNull = native.openDevNull();
          if (devNull < 0) {
            failure = nativeError(devNull, `cannot create stdio for '${command}'`, '/dev/null');
            break;
          }
          childEnds.push(devNull);
        }
        sources[i] = devNull;
      } else {
        const pair = new Int32Array(2);
        const rv = native.makePipe(pair);
        if (rv < 0) {
          failure = nativeError(rv, `cannot create stdio for '${command}'`);
          break;
        }
        // stdin: the child reads, we write. stdout/stderr: the other way round.
        const [childEnd, parentEnd] = i === 0 ? [pair[0]!, pair[1]!] : [pair[1]!, pair[0]!];
        childEnds.push(childEnd);
        parentEnds[i] = parentEnd;
        sources[i] = childEnd;
      }
    }
    if (failure === null) {
      const rv = native.spawn(nulList(candidates(command, path)), nulList(argv), nulList(envp), cwd ?? null, sources, keep, flags, pdeathsig, out);
      if (rv < 0) failure = spawnFailure(rv, command, cwd);
    }
  } finally {
    closeAll(childEnds);
    if (failure !== null) closeAll(parentEnds);
  }
  if (failure !== null) throw failure;
  const stream = (i: number): Socket | null => {
    const fd = parentEnds[i];
    return fd === null ? null : new Socket({ fd, readable: i !== 0, writable: i === 0 });
  };
  return new SupervisedProcess(constructing, out[0]!, out[1]!, false, [stream(0), stream(1), stream(2)]);
}

/**
 * Watches a process that is not our child, through pidfd_open. Its exit is seen
 * when it happens, but its exit status went to its own parent: exitStatus and
 * exited give code null and signal null. It is never reaped from here, so
 * attaching to a child of child_process does not steal its 'exit' event.
 */
export function attachProcess(pid: number): SupervisedProcess {
  if (typeof pid !== 'number' || !Number.isInteger(pid) || pid <= 0 || pid > 0x7fffffff) {
    throw new InvalidArgumentError(`pid must be a positive integer, got ${describe(pid)}`);
  }
  registry();
  const out = new Float64Array(1);
  const rv = native.attach(pid, out);
  // pidfd_open ESRCH or EINVAL: InvalidArgumentError (no such process); out of fds: ResourceExhaustedError.
  if (rv < 0) throw nativeError(rv, `cannot attach to process ${pid}`);
  return new SupervisedProcess(constructing, out[0]!, pid, true, [null, null, null]);
}

/**
 * @internal For leak checks and tests: processes watched by this thread, orphans
 * being reaped (children of ended workers), whether clone3 was found missing, and
 * how many children each path has started in this process.
 */
export function supervisionInfo(): { watched: number; orphans: number; clone3Missing: boolean; clone3Spawns: number; fallbackSpawns: number } {
  const [watched, orphans, missing, clone3Spawns, fallbackSpawns] = native.spawnInfo();
  return { watched, orphans, clone3Missing: missing === 1, clone3Spawns, fallbackSpawns };
}

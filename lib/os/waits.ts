// The JavaScript half of native/waiters.cc: starting a blocking wait, routing
// each result back to its caller, and cancelling.
//
// The registry of pending waits is per environment (nativeState): two copies of
// this JavaScript in one environment share the one waiter pool of the binary.
import { InvalidArgumentError, errnoOf } from './errors.js';
import { PendingCalls, failedSyscall, native, nativeError, nativeState } from './native.js';
import { describe } from './validate.js';

interface Registry {
  ready: boolean;
  waits: PendingCalls<[errno: number]>;
  /** Where native/ puts the [id, errno] pairs of a delivery (initWaiters). */
  results: Float64Array;
}

/** Pairs per delivery call: a release that wakes more waiters takes a few calls. */
const RESULT_PAIRS = 512;

// Looked up once per copy of this module: the state object itself is per
// environment, and so is this module, so the reference never goes stale.
let cached: Registry | undefined;
const registry = (): Registry =>
  (cached ??= nativeState('waits', () => ({ ready: false, waits: new PendingCalls<[errno: number]>(), results: new Float64Array(2 * RESULT_PAIRS) })));

// Called by native/ with `count` pairs in results. The first copy of this
// module to start the pool owns the callback; the registry is shared.
function deliver(count: number): void {
  const { waits, results } = registry();
  for (let i = 0; i < 2 * count; i += 2) waits.settle(results[i]!, results[i + 1]!);
}

/** LOCKMGR_WAKE_SIGNAL, or -1 for the default (SIGRTMIN+6). */
function wakeSignal(): number {
  const text = process.env.LOCKMGR_WAKE_SIGNAL;
  if (text === undefined || text === '') return -1;
  const n = Number(text);
  if (!Number.isInteger(n)) {
    throw new InvalidArgumentError(`LOCKMGR_WAKE_SIGNAL must be a real-time signal number, got ${describe(text)}`);
  }
  return n;
}

function ensurePool(r: Registry): void {
  if (r.ready) return;
  const signal = wakeSignal();
  const rv = native.initWaiters(deliver, signal, r.results);
  if (rv < 0) {
    // EBUSY: the signal has someone else's handler; EINVAL: not a real-time signal (ERRNO_CLASSES, sigaction).
    const name = signal < 0 ? 'SIGRTMIN+6' : String(signal);
    const why =
      failedSyscall() === 'sigaction' && rv === -EBUSY
        ? `the wake-up signal ${name} already has a handler in this process (or another environment uses another one), so blocking lock waits cannot be interrupted; set LOCKMGR_WAKE_SIGNAL to a free real-time signal number`
        : `LOCKMGR_WAKE_SIGNAL must be a real-time signal number (SIGRTMIN..SIGRTMAX), got ${name}`;
    throw nativeError(rv, why);
  }
  r.ready = true;
}

const EBUSY = errnoOf('EBUSY');

/** Installs the wake-up signal (and this environment's waiter pool): what lockSync needs before a wait with a timeout. */
export function ensureWakeSignal(): void {
  ensurePool(registry());
}

/**
 * Parks F_OFD_SETLKW on a waiter thread. `done` gets 0 (granted), ECANCELED,
 * ETIMEDOUT or the fcntl errno. Returns the id for cancelWait().
 */
export function startWait(fd: number, type: number, start: number, length: number, timeout: number | undefined, done: (errno: number) => void, path: string): number {
  const r = registry();
  ensurePool(r);
  const id = native.waitLock(fd, type, start, length, timeout ?? -1);
  // pthread_create or timer_create failed (ResourceExhaustedError for EAGAIN).
  if (id < 0) throw nativeError(id, `cannot start a thread to wait for a lock on '${path}'`);
  r.waits.add(id, done);
  return id;
}

export function cancelWait(id: number): void {
  native.cancelWait(id);
}

// One 'abort' listener per signal, however many waits share it: a signal
// shared by hundreds of waits would otherwise trip Node's listener-leak warning.
const abortWatchers = new WeakMap<AbortSignal, Set<() => void>>();

function fireAbort(this: AbortSignal): void {
  const set = abortWatchers.get(this);
  abortWatchers.delete(this);
  if (set) for (const fn of set) fn();
}

/** Calls `fn` when `signal` aborts; returns the function that stops watching. */
export function watchAbort(signal: AbortSignal, fn: () => void): () => void {
  let set = abortWatchers.get(signal);
  if (set === undefined) {
    set = new Set();
    abortWatchers.set(signal, set);
    signal.addEventListener('abort', fireAbort, { once: true });
  }
  set.add(fn);
  return () => {
    const s = abortWatchers.get(signal);
    if (s === undefined) return;
    s.delete(fn);
    if (s.size === 0) {
      abortWatchers.delete(signal);
      signal.removeEventListener('abort', fireAbort);
    }
  };
}

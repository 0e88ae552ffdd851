// The JavaScript half of native/waiters.cc: starting a blocking wait, routing
// each result back to its caller, and cancelling.
//
// The registry of pending waits hangs off the native module object itself, so
// two copies of this JavaScript loaded into one environment (a CJS and an ESM
// load, a reset module cache) share the one waiter pool of the one binary.
import { InvalidArgumentError, ResourceExhaustedError, UnsupportedError, errnoOf, systemError } from './errors.js';
import { native } from './native.js';
import { describe } from './validate.js';

interface Registry {
  ready: boolean;
  waits: Map<number, (errno: number) => void>;
}

const REGISTRY = Symbol.for('lockmgr.waits');
const EBUSY = errnoOf('EBUSY');
const EINVAL = errnoOf('EINVAL');
const EALREADY = errnoOf('EALREADY');
/** native.waitLock adds this to timer_create's errno (native/waiters.cc kTimerErrorBase). */
const TIMER_ERROR_BASE = 1 << 16;

function registry(): Registry {
  const holder = native as unknown as Record<symbol, Registry | undefined>;
  let r = holder[REGISTRY];
  if (r === undefined) {
    r = { ready: false, waits: new Map() };
    Object.defineProperty(native, REGISTRY, { value: r });
  }
  return r;
}

function deliver(batch: Float64Array): void {
  const { waits } = registry();
  for (let i = 0; i < batch.length; i += 2) {
    const done = waits.get(batch[i]!);
    if (done === undefined) continue;
    waits.delete(batch[i]!);
    done(batch[i + 1]!);
  }
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
  const e = native.initWaiters(deliver, signal);
  if (e === EBUSY) {
    throw new UnsupportedError(
      `the wake-up signal ${signal < 0 ? 'SIGRTMIN+6' : signal} already has a handler in this process (or another environment` +
        ' uses another one), so blocking lock waits cannot be interrupted; set LOCKMGR_WAKE_SIGNAL to a free real-time signal number',
      { cause: systemError(e, 'sigaction') },
    );
  }
  if (e === EINVAL) {
    throw new InvalidArgumentError(`LOCKMGR_WAKE_SIGNAL must be a real-time signal number (SIGRTMIN..SIGRTMAX), got ${signal}`);
  }
  if (e !== 0 && e !== EALREADY) throw new UnsupportedError('blocking lock waits are unavailable', { cause: systemError(e, 'sigaction') });
  r.ready = true;
}

/**
 * Parks F_OFD_SETLKW on a waiter thread. `done` gets 0 (granted), ECANCELED,
 * ETIMEDOUT or the fcntl errno. Returns the id for cancelWait().
 */
export function startWait(fd: number, type: number, start: number, length: number, timeout: number | undefined, done: (errno: number) => void, path: string): number {
  const r = registry();
  ensurePool(r);
  const id = native.waitLock(fd, type, start, length, timeout ?? -1);
  if (id < 0) {
    const timer = -id >= TIMER_ERROR_BASE;
    const cause = systemError(timer ? -id - TIMER_ERROR_BASE : -id, timer ? 'timer_create' : 'pthread_create');
    throw new ResourceExhaustedError(`cannot start a thread to wait for a lock on '${path}': ${cause.message}`, { cause });
  }
  r.waits.set(id, done);
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

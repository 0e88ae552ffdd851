// What every lockspace says alike: the one global order, deadlines, and the
// error that tells what an all-or-nothing acquire released again.
import { AbortError, LockTimeoutError, ResourceBusyError, holdersOf } from '../os/errors.js';
import { checkOneOf } from '../os/validate.js';
import type { ResourceMode } from './driver.js';

export const checkMode = (mode: unknown): ResourceMode => checkOneOf(mode, ['exclusive', 'shared', 'readonly'] as const, 'mode');

export const byKey = (a: string, b: string): number => (a < b ? -1 : a > b ? 1 : 0);

/** Milliseconds left until a Date.now() deadline (never negative), or undefined for none. */
export const remaining = (deadline: number | undefined): number | undefined => (deadline === undefined ? undefined : Math.max(0, deadline - Date.now()));

export const deadlineOf = (timeout: number | undefined): number | undefined => (timeout === undefined ? undefined : Date.now() + timeout);

/** A timer pause that an abort ends early, with AbortError saying `what` was aborted. */
export function pauseFor(ms: number, signal: AbortSignal | undefined, what = 'the wait'): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(new AbortError(`${what} was aborted`, { cause: signal.reason }));
    const onAbort = () => {
      clearTimeout(timer);
      reject(new AbortError(`${what} was aborted`, { cause: signal!.reason }));
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/**
 * The same busy or timeout error, saying which resources an all-or-nothing
 * acquire released again (`back`: their paths, without the one that failed).
 */
export function withRollback(err: unknown, back: readonly string[]): unknown {
  if (back.length === 0) return err;
  const suffix = `; released again: ${back.join(', ')}`;
  if (err instanceof ResourceBusyError) {
    return new ResourceBusyError(`${err.message}${suffix}`, {
      ...holdersOf(err),
      holder: err.holder,
      rolledBack: [...back],
      migrationInProgress: err.migrationInProgress,
      cause: err.cause,
    });
  }
  if (err instanceof LockTimeoutError) {
    return new LockTimeoutError(`${err.message}${suffix}`, { ...holdersOf(err), timeout: err.timeout, holder: err.holder, cause: err });
  }
  return err;
}

/** withRollback() for the paths of `touched` other than the resource the error names. */
export function rolledBack(err: unknown, touched: Iterable<{ path: string }>): unknown {
  const failed = err instanceof ResourceBusyError ? err.resource : null;
  return withRollback(err, [...new Set([...touched].map((r) => r.path))].filter((p) => p !== failed));
}

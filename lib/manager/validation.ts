// The manager's argument checks: each failure an InvalidArgumentError that
// names the argument as the API calls it (the CLI words its own).
import { normalize } from 'node:path';
import { InvalidArgumentError, UnsupportedError, systemError } from '../os/errors.js';
import { checkOneOf, checkOptions, checkPath, checkTimeout, describe } from '../os/validate.js';
import type { ResourceMode } from '../lockspaces/driver.js';
import type { TokenResource } from './token.js';
import type { DiskSpec, LeaseSpec, LockFailureAction, LockLifetime, LockManagerOptions, ManagerParams } from './types.js';

/** The largest pid_t. */
const MAX_PID = 0x7fffffff;
/** The longest delay setTimeout/setInterval honour. */
export const MAX_TIMER_MS = 2 ** 31 - 1;

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
export const PARAM_KEYS = ['id', 'uuid', 'name', 'uri'] as const;
export const MODES = ['exclusive', 'shared', 'readonly'] as const;
export const MANAGER_OPTIONS = ['params', 'lockspace', 'lockLifetime', 'onLockFailure', 'attach', 'flags', 'verifyInterval'] as const;

/** A checked resource spec; mode is missing in a ResourceRef. */
export type CheckedSpec = (Omit<DiskSpec, 'mode'> | Omit<LeaseSpec, 'mode'>) & { mode?: ResourceMode; qemuCompatible?: boolean };

export function checkParam(key: unknown, value: unknown): [keyof ManagerParams, ManagerParams[keyof ManagerParams]] {
  const k = checkOneOf(key, PARAM_KEYS, 'parameter key');
  switch (k) {
    case 'id':
      if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0) {
        throw new InvalidArgumentError(`params.id must be an integer >= 0, got ${describe(value)}`);
      }
      return [k, value];
    case 'uuid':
      if (typeof value !== 'string' || !UUID.test(value)) {
        throw new InvalidArgumentError(`params.uuid must be a UUID in RFC 4122 text form (8-4-4-4-12 hex digits), got ${describe(value)}`);
      }
      return [k, value.toLowerCase()];
    case 'name':
    case 'uri':
      if (typeof value !== 'string' || value === '' || value.includes('\0')) {
        throw new InvalidArgumentError(`params.${k} must be a non-empty string without NUL bytes, got ${describe(value)}`);
      }
      return [k, value];
  }
}

export function checkParams(value: unknown): ManagerParams {
  const params: ManagerParams = {};
  for (const [k, v] of Object.entries(checkOptions<ManagerParams>(value, PARAM_KEYS, 'params'))) {
    if (v === undefined) continue;
    const [key, checked] = checkParam(k, v);
    (params as Record<string, unknown>)[key] = checked;
  }
  return params;
}

export function requireMode(mode: ResourceMode | undefined, what = 'resource.mode'): ResourceMode {
  if (mode === undefined) throw new InvalidArgumentError(`${what} must be one of ${MODES.map((m) => `'${m}'`).join(', ')}`);
  return mode;
}

export function checkResource(value: unknown, what: string): CheckedSpec {
  if (value === undefined) throw new InvalidArgumentError(`${what} is required`);
  const type = checkOneOf(checkOptions<{ type?: unknown }>(value, ['type', 'path', 'mode', 'qemuCompatible', 'lockspace', 'key'], what).type, ['disk', 'lease'] as const, `${what}.type`);
  if (type === 'lease') {
    const spec = checkOptions<LeaseSpec>(value, ['type', 'path', 'mode', 'lockspace', 'key'], what);
    const path = checkPath(spec.path, `${what}.path`);
    for (const k of ['lockspace', 'key'] as const) {
      if (typeof spec[k] !== 'string') throw new InvalidArgumentError(`${what}.${k} must be a string, got ${describe(spec[k])}`);
    }
    const mode = spec.mode === undefined ? undefined : checkOneOf(spec.mode, MODES, `${what}.mode`);
    return { type, path: normalize(path), lockspace: spec.lockspace as string, key: spec.key as string, mode };
  }
  const spec = checkOptions<DiskSpec>(value, ['type', 'path', 'mode', 'qemuCompatible'], what);
  const path = checkPath(spec.path, `${what}.path`);
  if (spec.qemuCompatible !== undefined && typeof spec.qemuCompatible !== 'boolean') {
    throw new InvalidArgumentError(`${what}.qemuCompatible must be a boolean, got ${describe(spec.qemuCompatible)}`);
  }
  const mode = spec.mode === undefined ? undefined : checkOneOf(spec.mode, MODES, `${what}.mode`);
  return { type, path, mode, qemuCompatible: spec.qemuCompatible === true };
}

export function checkFlag(value: unknown, what: string): boolean {
  if (value !== undefined && typeof value !== 'boolean') throw new InvalidArgumentError(`${what} must be a boolean, got ${describe(value)}`);
  return value === true;
}

/** A URI naming the other side of a migration: informational, and checked to be the same across one migration's calls. */
export function checkUri(value: unknown, what: string): string {
  if (typeof value !== 'string' || value === '' || value.includes('\0')) {
    throw new InvalidArgumentError(`${what} must be a non-empty string without NUL bytes, got ${describe(value)}`);
  }
  return value;
}

/** kill(pid, 0): UnsupportedError (EPERM) when we may not signal the process, InvalidArgumentError when it does not exist. */
export function checkSignallable(pid: number): void {
  try {
    process.kill(pid, 0);
  } catch (err) {
    const errno = -((err as NodeJS.ErrnoException).errno ?? 0);
    const cause = systemError(errno, 'kill');
    if ((err as NodeJS.ErrnoException).code === 'EPERM') {
      throw new UnsupportedError(`cannot attach to process ${pid}: this process may not signal it, so it could never stop or kill it (${cause.message})`, { cause });
    }
    const why = (err as NodeJS.ErrnoException).code === 'ESRCH' ? 'there is no such process' : cause.message;
    throw new InvalidArgumentError(`cannot attach to process ${pid}: ${why}`, { cause });
  }
}

/** The manager's options, checked; the lockspace is checked by the lockspaces (lib/lockspaces/index.ts). */
export interface CheckedOptions {
  params: ManagerParams;
  lockLifetime: LockLifetime;
  onLockFailure: LockFailureAction;
  attach: number | undefined;
  migrate: boolean;
  verifyInterval: number | undefined;
}

export function checkManagerOptions(o: Partial<LockManagerOptions>): CheckedOptions {
  const params = checkParams(o.params);
  // An attached process cannot be handed the lock fds: its lifetime is the supervisor's.
  const lockLifetime = o.lockLifetime === undefined ? (o.attach === undefined ? 'child' : 'supervisor') : checkOneOf(o.lockLifetime, ['child', 'supervisor'] as const, 'lockLifetime');
  const onLockFailure = o.onLockFailure === undefined ? 'poweroff' : checkOneOf(o.onLockFailure, ['poweroff', 'pause', 'ignore'] as const, 'onLockFailure');
  let attach: number | undefined;
  if (o.attach !== undefined) {
    // pid_t is 32 bits: a larger number is no process, and would reach kill() as a type error.
    if (typeof o.attach !== 'number' || !Number.isInteger(o.attach) || o.attach <= 0 || o.attach > MAX_PID) {
      throw new InvalidArgumentError(`attach must be a process id (an integer > 0), got ${describe(o.attach)}`);
    }
    if (o.lockLifetime === 'child') {
      throw new InvalidArgumentError("lockLifetime 'child' cannot be used with attach: a running process cannot be handed the lock fds");
    }
    attach = o.attach;
  }
  const flags = checkOptions<{ migrate?: boolean }>(o.flags, ['migrate'], 'flags');
  const migrate = checkFlag(flags.migrate, 'flags.migrate');
  if (migrate && attach !== undefined) {
    throw new InvalidArgumentError('flags.migrate cannot be used with attach: a migration target spawns the incoming process');
  }
  const verifyInterval = checkTimeout(o.verifyInterval, 'verifyInterval');
  if (verifyInterval === 0) throw new InvalidArgumentError('verifyInterval must be > 0 milliseconds');
  // setInterval() turns a longer delay into 1 ms: a check meant for once a month would run a thousand times a second.
  if (verifyInterval !== undefined && verifyInterval > MAX_TIMER_MS) {
    throw new InvalidArgumentError(`verifyInterval must be at most ${MAX_TIMER_MS} ms, got ${verifyInterval}`);
  }
  return { params, lockLifetime, onLockFailure, attach, migrate, verifyInterval };
}

function specText(r: TokenResource | CheckedSpec): string {
  const what = r.type === 'lease' ? `lease ${r.lockspace}/${r.key} in ${r.path}` : `disk ${r.path}`;
  return `${what} (${r.mode ?? 'no mode'}${r.type === 'disk' && r.qemuCompatible ? ', QEMU-compatible' : ''})`;
}

const specKey = (r: TokenResource | CheckedSpec): string =>
  r.type === 'lease' ? JSON.stringify(['lease', normalize(r.path), r.lockspace, r.key]) : JSON.stringify(['disk', normalize(r.path)]);

/**
 * Why a migration token's resources differ from the target's own, or null:
 * the same resources (by type and path, a lease also by lockspace and key),
 * each in the same mode and with the same QEMU-compatibility.
 */
export function tokenMismatch(token: readonly TokenResource[], mine: readonly CheckedSpec[]): string | null {
  const theirs = new Map(token.map((r) => [specKey(r), r]));
  const ours = new Map(mine.map((r) => [specKey(r), r]));
  for (const [key, r] of theirs) {
    const m = ours.get(key);
    if (m === undefined) return `the token names ${specText(r)}, which this target did not register`;
    if (m.mode !== r.mode || (r.type === 'disk' && r.qemuCompatible !== (m.qemuCompatible === true))) {
      return `the token has ${specText(r)}, and this target ${specText(m)}`;
    }
  }
  for (const [key, m] of ours) if (!theirs.has(key)) return `this target registered ${specText(m)}, which the source does not hold`;
  return null;
}

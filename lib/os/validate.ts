// Argument checks shared by every public entry point. Each failure is an
// InvalidArgumentError that names the argument and what was wrong with it.
import { InvalidArgumentError } from './errors.js';

/** Linux's PATH_MAX, including the terminating NUL. */
const PATH_MAX = 4096;

export function describe(value: unknown): string {
  if (typeof value === 'string') return JSON.stringify(value.length > 60 ? `${value.slice(0, 57)}...` : value);
  if (typeof value === 'bigint') return `${value}n`;
  if (value === null || typeof value !== 'object') return String(value);
  return Array.isArray(value) ? 'an array' : 'an object';
}

/** An options bag: undefined, or a plain object whose keys are all in `allowed`. */
export function checkOptions<T extends object>(value: unknown, allowed: readonly string[], what: string): Partial<T> {
  if (value === undefined) return {};
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    throw new InvalidArgumentError(`${what} must be an object, got ${describe(value)}`);
  }
  for (const key of Object.keys(value)) {
    if (!allowed.includes(key)) {
      throw new InvalidArgumentError(`${what} has an unknown option '${key}' (allowed: ${allowed.join(', ')})`);
    }
  }
  return value as Partial<T>;
}

export function checkOneOf<T extends string>(value: unknown, allowed: readonly T[], what: string): T {
  if (typeof value !== 'string' || !(allowed as readonly string[]).includes(value)) {
    throw new InvalidArgumentError(`${what} must be one of ${allowed.map((a) => `'${a}'`).join(', ')}, got ${describe(value)}`);
  }
  return value as T;
}

/** An absolute path without NUL bytes that fits in PATH_MAX. */
export function checkPath(value: unknown, what = 'path'): string {
  if (typeof value !== 'string') throw new InvalidArgumentError(`${what} must be a string, got ${describe(value)}`);
  if (value === '') throw new InvalidArgumentError(`${what} must not be empty`);
  if (value.includes('\0')) throw new InvalidArgumentError(`${what} must not contain a NUL byte: ${describe(value)}`);
  if (!value.startsWith('/')) throw new InvalidArgumentError(`${what} must be absolute, got ${describe(value)}`);
  if (Buffer.byteLength(value) >= PATH_MAX) {
    throw new InvalidArgumentError(`${what} is ${Buffer.byteLength(value)} bytes long; Linux allows at most ${PATH_MAX - 1}`);
  }
  return value;
}

/** A non-negative safe integer (a byte offset or length). */
export function checkOffset(value: unknown, what: string): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0) {
    throw new InvalidArgumentError(`${what} must be a non-negative safe integer, got ${describe(value)}`);
  }
  return value;
}

/** A timeout in milliseconds: a finite number >= 0, or undefined for none. */
export function checkTimeout(value: unknown, what = 'timeout'): number | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== 'number' || !Number.isFinite(value) || value < 0) {
    throw new InvalidArgumentError(`${what} must be a finite number of milliseconds >= 0, got ${describe(value)}`);
  }
  return value;
}

export function checkSignal(value: unknown, what = 'signal'): AbortSignal | undefined {
  if (value === undefined) return undefined;
  if (!(value instanceof AbortSignal)) throw new InvalidArgumentError(`${what} must be an AbortSignal, got ${describe(value)}`);
  return value;
}

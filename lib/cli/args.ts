// What every lockmgr subcommand shares: exit codes, the Output seam, usage
// errors and argument parsing.
import { parseArgs, type ParseArgsConfig } from 'node:util';
import {
  AbortError,
  InvalidArgumentError,
  LockTimeoutError,
  NoLocksAvailableError,
  ResourceAccessError,
  ResourceBusyError,
  ResourceExhaustedError,
  SpawnError,
  UnsupportedError,
} from '../os/errors.js';

type ParseArgsOptionsConfig = NonNullable<ParseArgsConfig['options']>;
type ParsedResults<C extends ParseArgsConfig> = ReturnType<typeof parseArgs<C>>;

export const EXIT = {
  ok: 0,
  usage: 64,
  noResource: 66,
  unsupported: 69,
  internal: 70,
  busy: 75,
  cannotExecute: 126,
  notFound: 127,
} as const;


/** The exit code for a failure of lockmgr itself. */
export function exitCodeFor(err: unknown): number {
  if (err instanceof SpawnError) {
    const code = (err.cause as { code?: string } | undefined)?.code;
    if (code === 'ENOENT' || code === 'ENOTDIR') return EXIT.notFound;
    if (code === 'EACCES' || code === 'ENOEXEC' || code === 'EPERM' || code === 'EISDIR') return EXIT.cannotExecute;
    return EXIT.unsupported;
  }
  if (err instanceof InvalidArgumentError) return EXIT.usage;
  if (err instanceof ResourceAccessError) return EXIT.noResource;
  if (err instanceof UnsupportedError) return EXIT.unsupported;
  if (err instanceof ResourceBusyError || err instanceof LockTimeoutError || err instanceof AbortError) return EXIT.busy;
  if (err instanceof NoLocksAvailableError || err instanceof ResourceExhaustedError) return EXIT.busy;
  return EXIT.internal;
}

export function fail(err: unknown, out: Output): number {
  const message = err instanceof Error ? err.message : String(err);
  out.err(`lockmgr: ${message}\n`);
  return exitCodeFor(err);
}

export interface Output {
  out(text: string): void;
  err(text: string): void;
}

export const stdio: Output = {
  out: (t) => process.stdout.write(t),
  err: (t) => process.stderr.write(t),
};

/** A usage error: exit 64, and a pointer to --help. */
export function usage(message: string): InvalidArgumentError {
  return new InvalidArgumentError(`${message} (see lockmgr --help)`);
}

/** parseArgs, strict, with positionals; its errors are usage errors. */
export function parse<T extends ParseArgsOptionsConfig>(args: readonly string[], options: T): ParsedResults<{ args: string[]; options: T; allowPositionals: true; strict: true }> {
  try {
    return parseArgs({ args: [...args], options, allowPositionals: true, strict: true });
  } catch (err) {
    throw usage((err as Error).message);
  }
}


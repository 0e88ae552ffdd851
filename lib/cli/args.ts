// What every lockmgr subcommand shares: exit codes, the Output seam, usage
// errors and argument parsing.
import { readFileSync } from 'node:fs';
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
  limit: 71,
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
  // A limit (ulimit -n, processes, threads, a full disk) does not clear by
  // itself while the run is the same: not "try again later" (75).
  if (err instanceof ResourceExhaustedError) return EXIT.limit;
  if (err instanceof NoLocksAvailableError) return EXIT.busy;
  return EXIT.internal;
}

export function fail(err: unknown, out: Output): number {
  const message = err instanceof Error ? err.message : String(err);
  out.err(`lockmgr: ${message}${err instanceof ResourceExhaustedError ? `\nlockmgr: ${limitHint(err)}` : ''}\n`);
  return exitCodeFor(err);
}

/** What to do about a resource limit, in the caller's terms. */
function limitHint(err: ResourceExhaustedError): string {
  const code = (err.cause as { code?: string } | undefined)?.code;
  if (code === 'EMFILE') {
    let limit = '';
    try {
      const m = /^Max open files\s+(\d+|unlimited)/m.exec(readFileSync('/proc/self/limits', 'utf8'));
      if (m) limit = ` is ${m[1]}`;
    } catch {
      // The hint goes without the number.
    }
    return `this process may not open more files (ulimit -n${limit}); each disk needs up to three descriptors (the image and, in a lock directory, two lock files): raise 'ulimit -n' or give fewer disks. Nothing was left held or created`;
  }
  if (code === 'ENFILE') return 'the system-wide limit of open files is reached (fs.file-max); nothing was left held or created';
  if (code === 'ENOSPC' || code === 'EDQUOT') return 'the filesystem of the lock directory is full or over quota; nothing was left held or created';
  return 'a system limit was reached (processes, threads or memory: see ulimit -a); nothing was left held or created';
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


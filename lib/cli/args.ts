// What every lockmgr subcommand shares: exit codes, the Output seam, usage
// errors and argument parsing. Nothing here loads the native addon: `lockmgr
// --help`, `--version` and usage errors work without it.
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
import { escapeControl, safeText } from './text.js';

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

/** A resource is held by someone else, or a wait for it ran out: the failures `--conflict-exit-code` renumbers. */
export function isConflict(err: unknown): err is ResourceBusyError | LockTimeoutError {
  return err instanceof ResourceBusyError || err instanceof LockTimeoutError;
}

/** The exit code for a failure of lockmgr itself. */
export function exitCodeFor(err: unknown): number {
  if (err instanceof UsageError) return EXIT.usage;
  if (err instanceof SpawnError) {
    const code = (err.cause as { code?: string } | undefined)?.code;
    if (code === 'ENOENT' || code === 'ENOTDIR') return EXIT.notFound;
    if (code === 'EACCES' || code === 'ENOEXEC' || code === 'EPERM' || code === 'EISDIR') return EXIT.cannotExecute;
    return EXIT.unsupported;
  }
  if (err instanceof InvalidArgumentError) return EXIT.usage;
  if (err instanceof ResourceAccessError) return EXIT.noResource;
  if (err instanceof UnsupportedError) return EXIT.unsupported;
  if (isConflict(err) || err instanceof AbortError) return EXIT.busy;
  // A limit (ulimit -n, processes, threads, a full disk) does not clear by
  // itself while the run is the same: not "try again later" (75).
  if (err instanceof ResourceExhaustedError) return EXIT.limit;
  if (err instanceof NoLocksAvailableError) return EXIT.busy;
  return EXIT.internal;
}

/** Prints `lockmgr: MESSAGE` (escaped) and returns the exit code. */
export function fail(err: unknown, out: Output): number {
  const message = err instanceof Error ? err.message : String(err);
  // Some messages (the addon's load failure) already say who speaks.
  out.err(`lockmgr: ${escapeControl(message.replace(/^lockmgr: /, ''))}${err instanceof ResourceExhaustedError ? `\nlockmgr: ${escapeControl(limitHint(err))}` : ''}\n`);
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
    return `this process may not open more files (ulimit -n${limit}); each disk needs a descriptor for its image, and two for its lock files with --lockspace DIR; --qemu-compatible adds one, a loop device its backing file's (and their lock files): raise 'ulimit -n' or give fewer disks. Nothing was left held or created`;
  }
  if (code === 'ENFILE') return 'the system-wide limit of open files is reached (fs.file-max); nothing was left held or created';
  if (code === 'ENOSPC' || code === 'EDQUOT') return 'the filesystem of the lock directory is full or over quota; nothing was left held or created';
  return 'a system limit was reached (processes, threads or memory: see ulimit -a); nothing was left held or created';
}

export interface Output {
  out(text: string): void;
  err(text: string): void;
  /** Whether stdout or stderr is a terminal, and how wide: null when it is not (a pipe, a file). */
  terminal?: (stream: 'out' | 'err') => { columns: number } | null;
}

export const stdio: Output = {
  out: (t) => process.stdout.write(t),
  err: (t) => process.stderr.write(t),
  terminal: (stream) => {
    const s = stream === 'out' ? process.stdout : process.stderr;
    return s.isTTY ? { columns: s.columns || 80 } : null;
  },
};

/** An Output for a tool that writes its own multi-line text: each line escaped. */
export function escapedWriter(out: Output): (text: string) => void {
  return (text) => out.out(safeText(text));
}

/** A mistake in the command line: one line, a pointer to the command's --help, exit 64. */
export class UsageError extends InvalidArgumentError {
  constructor(message: string, command?: string) {
    super(`${message} (see 'lockmgr ${command === undefined ? '' : `${command} `}--help')`);
  }
}

export function usage(message: string, command?: string): UsageError {
  return new UsageError(message, command);
}

/** parseArgs's own words for a mistake, said shortly and in the user's terms. */
function parseError(err: NodeJS.ErrnoException): string {
  const m = err.message;
  if (err.code === 'ERR_PARSE_ARGS_UNKNOWN_OPTION') return `unknown option '${/^Unknown option '([^']*)'/.exec(m)?.[1] ?? m}'`;
  if (err.code === 'ERR_PARSE_ARGS_INVALID_OPTION_VALUE') {
    const name = /^Option '(-[^', ]+)/.exec(m)?.[1] ?? 'an option';
    if (/argument missing/.test(m)) return `${name} needs a value`;
    if (/does not take an argument/.test(m)) return `${name} takes no value`;
    // `--id -3`: parseArgs will not take a value that looks like an option.
    if (/argument is ambiguous/.test(m)) return `${name} needs a value; one that starts with '-' is written ${name}=VALUE`;
  }
  return m;
}

/** parseArgs, strict, with positionals; its errors are usage errors of `command`. */
export function parse<T extends ParseArgsOptionsConfig>(
  args: readonly string[],
  options: T,
  command: string,
): ParsedResults<{ args: string[]; options: T; allowPositionals: true; strict: true }> {
  try {
    return parseArgs({ args: [...args], options, allowPositionals: true, strict: true });
  } catch (err) {
    throw usage(parseError(err as NodeJS.ErrnoException), command);
  }
}

/** Whether the arguments (before any `--`) ask for help. */
export function wantsHelp(args: readonly string[]): boolean {
  const end = args.indexOf('--');
  return (end < 0 ? args : args.slice(0, end)).some((a) => a === '--help' || a === '-h');
}

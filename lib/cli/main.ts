// The lockmgr command line: `run` holds leases around a command, `status` says
// who holds what. docs/cli.md documents the flags, exit codes and --json.
import { readFileSync } from 'node:fs';
import { constants as osConstants } from 'node:os';
import { resolve } from 'node:path';
import { parseArgs } from 'node:util';
import {
  AbortError,
  InvalidArgumentError,
  LockManagerError,
  LockTimeoutError,
  NoLocksAvailableError,
  ResourceAccessError,
  ResourceBusyError,
  ResourceExhaustedError,
  SpawnError,
  UnsupportedError,
  type LockHolder,
  type ProcessInfo,
} from '../os/errors.js';
import { openDiskFile } from '../lockspaces/driver.js';
import { indirectLockspace, type IndirectLockspace, type LockFileSource } from '../lockspaces/indirect.js';
import { openLockable, type LockableFile } from '../os/locks.js';
import { LockManager, type ExitStatus, type LockLifetime, type ManagerParams, type ResourceMode } from '../manager/manager.js';
import { describeProcess, locksOn, processesWithOpen, type ProcLock } from '../os/proc-locks.js';
import { qemuLockState, type QemuPermission } from '../os/qemu.js';

/** sysexits(3)-style exit codes for lockmgr's own failures; `run` otherwise exits with the command's status. */
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

const VERSION = '0.1.0';

export const HELP = `usage:
  lockmgr run [--exclusive PATH]... [--shared PATH]... [--readonly PATH]...
              [--lockspace DIR] [--wait SECONDS] [--lifetime child|supervisor] [--qemu-compatible]
              [--name NAME] [--uuid UUID] [--id ID] [--uri URI] -- COMMAND [ARG...]
  lockmgr status [--json] [--lockspace DIR] PATH...
  lockmgr sanlock init|join|leave|joined|add-disk ...   (lockmgr sanlock --help)
  lockmgr --help | --version

run     Acquires every resource (all or nothing, in one canonical order), runs
        COMMAND holding the leases, forwards SIGTERM, SIGINT and SIGHUP to it
        (SIGINT and SIGHUP only when they did not come from the terminal),
        releases the leases after it has been reaped, and exits with its exit
        status (128 + the signal number if a signal killed it).
        --wait SECONDS       wait for busy resources (default: fail at once)
        --lifetime child     the command keeps its leases if lockmgr dies (default)
        --lifetime supervisor the command is killed if lockmgr dies
        --qemu-compatible    also take QEMU's permission locks, so qemu-img and
                             qemu-io refuse to write or resize the images
status  For each PATH: the lease (byte 0), the migration guard (byte 1), QEMU's
        permission locks (bytes 100-299), the locks in /proc/locks, and the
        processes that have the file open. --json prints one JSON document.

exit status:
  0    success (run: the command's own exit status)
  64   usage error: unknown flag, bad value, missing command
  66   a resource cannot be opened: missing, not permitted, a directory
  69   unsupported: the filesystem or kernel cannot lock, or a feature is absent
  70   internal error
  75   busy: a resource is held by someone else (or the wait ran out); try again
  126  the command exists but cannot be executed
  127  the command was not found
`;

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

function fail(err: unknown, out: Output): number {
  const message = err instanceof Error ? err.message : String(err);
  out.err(`lockmgr: ${message}\n`);
  return exitCodeFor(err);
}

export interface Output {
  out(text: string): void;
  err(text: string): void;
}

const stdio: Output = {
  out: (t) => process.stdout.write(t),
  err: (t) => process.stderr.write(t),
};

/** Runs the CLI with `argv` (without node and the script); resolves the exit code. */
export async function main(argv: readonly string[], out: Output = stdio): Promise<number> {
  const [command, ...rest] = argv;
  try {
    switch (command) {
      case 'run':
        return await run(rest, out);
      case 'status':
        return status(rest, out);
      case 'sanlock':
        return await (await import('./sanlock.js')).sanlockCommand(rest, (t) => out.out(t));
      case '--help':
      case '-h':
      case 'help':
        out.out(HELP);
        return EXIT.ok;
      case '--version':
        out.out(`lockmgr ${VERSION}\n`);
        return EXIT.ok;
      default:
        out.err(`lockmgr: ${command === undefined ? 'a command is needed' : `unknown command '${command}'`}\n\n${HELP}`);
        return EXIT.usage;
    }
  } catch (err) {
    return fail(err, out);
  }
}

function usage(message: string): InvalidArgumentError {
  return new InvalidArgumentError(`${message} (see lockmgr --help)`);
}

function parse<T extends Record<string, { type: 'string' | 'boolean'; multiple?: boolean }>>(args: readonly string[], options: T) {
  try {
    return parseArgs({ args: [...args], options, allowPositionals: true, strict: true });
  } catch (err) {
    throw usage((err as Error).message);
  }
}

const FORWARDED = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;

async function run(argv: readonly string[], out: Output): Promise<number> {
  const dash = argv.indexOf('--');
  if (dash < 0) throw usage("run needs '--' before the command");
  const [command, ...args] = argv.slice(dash + 1);
  if (command === undefined) throw usage("run needs a command after '--'");
  const { values, positionals } = parse(argv.slice(0, dash), {
    exclusive: { type: 'string', multiple: true },
    shared: { type: 'string', multiple: true },
    readonly: { type: 'string', multiple: true },
    lockspace: { type: 'string' },
    wait: { type: 'string' },
    lifetime: { type: 'string' },
    'qemu-compatible': { type: 'boolean' },
    name: { type: 'string' },
    uuid: { type: 'string' },
    id: { type: 'string' },
    uri: { type: 'string' },
  });
  if (positionals.length > 0) throw usage(`unexpected argument '${positionals[0]}' before '--'`);
  let timeout: number | undefined;
  if (values.wait !== undefined) {
    const seconds = Number(values.wait);
    if (values.wait.trim() === '' || !Number.isFinite(seconds) || seconds < 0) throw usage(`--wait needs a number of seconds >= 0, got '${values.wait}'`);
    timeout = seconds * 1000;
  }
  const params: ManagerParams = {};
  if (values.name !== undefined) params.name = values.name;
  if (values.uuid !== undefined) params.uuid = values.uuid;
  if (values.uri !== undefined) params.uri = values.uri;
  if (values.id !== undefined) {
    if (!/^\d+$/.test(values.id)) throw usage(`--id needs an integer >= 0, got '${values.id}'`);
    params.id = Number(values.id);
  }
  const mgr = new LockManager({
    params,
    lockLifetime: values.lifetime as LockLifetime | undefined,
    lockspace: values.lockspace === undefined ? undefined : { kind: 'indirect', dir: resolve(values.lockspace) },
  });
  let warned = false;
  try {
    const qemuCompatible = values['qemu-compatible'] === true;
    for (const mode of ['exclusive', 'shared', 'readonly'] as const satisfies readonly ResourceMode[]) {
      for (const path of values[mode] ?? []) mgr.registerResource({ type: 'disk', path, mode, qemuCompatible });
    }
    const exited = new Promise<ExitStatus>((resolve) => mgr.once('exit', resolve));
    mgr.on('warning', (w) => {
      warned = true;
      out.err(`lockmgr: warning: ${w.message}\n`);
    });
    // Installed before start(): a signal that arrives while the leases are
    // being acquired, or just as the command is spawned, must not kill lockmgr
    // with its default action and leave a fresh child behind. It stops the
    // run instead: free() aborts a waiting start and kills a spawned child.
    let early: NodeJS.Signals | undefined;
    const forward = (signal: NodeJS.Signals) => {
      if (mgr.state === 'running' || mgr.state === 'stopping') {
        // The terminal sends SIGINT (Ctrl-C) and SIGHUP to its whole foreground
        // process group, the command included: forwarding would deliver twice.
        if (signal !== 'SIGTERM' && inForegroundGroup()) return;
        mgr.signal(signal);
      } else if (mgr.state === 'new' || mgr.state === 'starting') {
        early ??= signal;
        void mgr.free();
      }
      // stopped or freed: the command has exited; its status stands.
    };
    for (const s of FORWARDED) process.on(s, forward);
    const bySignal = (signal: NodeJS.Signals) => 128 + (osConstants.signals[signal] ?? 0);
    try {
      try {
        await mgr.start(command, args, { stdio: 'inherit' }, timeout === undefined ? undefined : { timeout });
      } catch (err) {
        if (early !== undefined) return bySignal(early);
        throw err;
      }
      const status = await exited;
      if (early !== undefined) return bySignal(early);
      const code = status.code ?? bySignal(status.signal!);
      // A failure after the command ended (a release that failed) must not pass for success.
      return warned && code === 0 ? EXIT.internal : code;
    } finally {
      await mgr.free();
      for (const s of FORWARDED) process.off(s, forward);
    }
  } catch (err) {
    return fail(err, out);
  } finally {
    await mgr.free();
  }
}

/** Whether this process is in its controlling terminal's foreground process group (/proc/self/stat: pgrp, tpgid). */
function inForegroundGroup(): boolean {
  try {
    const stat = readFileSync('/proc/self/stat', 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const pgrp = Number(fields[2]);
    const tpgid = Number(fields[5]);
    return tpgid > 0 && tpgid === pgrp;
  } catch {
    return false;
  }
}

type ByteState = 'free' | 'exclusive' | 'shared';

/** The --json schema, one entry per PATH (docs/cli.md). */
export interface StatusEntry {
  path: string;
  kind?: 'file' | 'block-device';
  identity?: string;
  lease?: { byte: 0; state: ByteState; holder: LockHolder | null };
  migrationGuard?: { byte: 1; state: ByteState };
  /** With --lockspace DIR: the lock files that carry this disk's lease there (docs/lockspaces.md). */
  lockFiles?: Array<{ path: string; source: LockFileSource; identity: string; exists: boolean; lease: { byte: 0; state: ByteState; holder: LockHolder | null }; migrationGuard: { byte: 1; state: ByteState } }>;
  qemu?: { held: QemuPermission[]; unshared: QemuPermission[] };
  locks?: Array<Omit<ProcLock, 'ino'> & { ino: string }>;
  openBy?: ProcessInfo[];
  error?: { code: string; message: string };
}

function byteState(file: LockableFile, start: number): { state: ByteState; holder: LockHolder | null } {
  const holder = file.getConflict('exclusive', { start, length: 1 });
  return { state: holder === null ? 'free' : holder.mode, holder };
}

/** The lock files of `path` in an indirect lockspace, read without creating any. */
function lockFilesOf(space: IndirectLockspace, path: string): NonNullable<StatusEntry['lockFiles']> {
  return space.describeDisk(path).files.map((f) => {
    let file: LockableFile;
    try {
      file = openLockable(f.path, { access: 'read' });
    } catch {
      // Not there: nobody holds it (a lock file exists while someone uses it).
      return { path: f.path, source: f.source, identity: f.identity, exists: false, lease: { byte: 0, state: 'free', holder: null }, migrationGuard: { byte: 1, state: 'free' } };
    }
    try {
      return { path: f.path, source: f.source, identity: f.identity, exists: true, lease: { byte: 0, ...byteState(file, 0) }, migrationGuard: { byte: 1, state: byteState(file, 1).state } };
    } finally {
      file.close();
    }
  });
}

function inspect(path: string, space: IndirectLockspace | undefined): StatusEntry {
  const file = openDiskFile(path, 'read');
  try {
    const byte = (start: number) => byteState(file, start);
    const lease = byte(0);
    // QEMU locks the node it opened; for a block device that is the canonical
    // node whenever QEMU was given any path udev made (symlinks to it).
    const qemu = qemuLockState(file.path);
    return {
      path,
      kind: file.kind,
      identity: file.identity.key,
      lease: { byte: 0, ...lease },
      migrationGuard: { byte: 1, state: byte(1).state },
      ...(space === undefined ? {} : { lockFiles: lockFilesOf(space, path) }),
      qemu: { held: qemu.held, unshared: qemu.unshared },
      locks: [...locksOn(file.path), ...(file.path === path ? [] : locksOn(path))].map((l) => ({ ...l, ino: String(l.ino) })),
      openBy: processesWithOpen(path, { excludeSelf: true }),
    };
  } finally {
    file.close();
  }
}

function status(argv: readonly string[], out: Output): number {
  const { values, positionals } = parse(argv, { json: { type: 'boolean' }, lockspace: { type: 'string' } });
  if (positionals.length === 0) throw usage('status needs at least one PATH');
  const space = values.lockspace === undefined ? undefined : indirectLockspace({ kind: 'indirect', dir: resolve(values.lockspace) });
  let code: number = EXIT.ok;
  const entries: StatusEntry[] = positionals.map((path) => {
    try {
      return inspect(path, space);
    } catch (err) {
      // Whatever the reason (missing, a FIFO, no permission), the PATH could not be inspected.
      code = EXIT.noResource;
      const e = err as LockManagerError;
      return { path, error: { code: e.code ?? 'ERR_INTERNAL', message: e.message } };
    }
  });
  if (values.json) out.out(`${JSON.stringify({ version: 1, entries }, null, 2)}\n`);
  else out.out(entries.map(table).join('\n'));
  return code;
}

function table(e: StatusEntry): string {
  if (e.error) return `${e.path}\n  error               ${e.error.message}\n`;
  const rows: Array<[string, string]> = [
    ['kind', `${e.kind} (${e.identity})`],
    // With --lockspace the lease is in the lock files below; the image's own bytes are the direct lockspace's.
    [e.lockFiles ? 'image byte 0 (direct)' : 'lease (byte 0)', e.lease!.state === 'free' ? 'free' : `held ${e.lease!.state}`],
    [e.lockFiles ? 'image byte 1 (direct)' : 'migration guard', e.migrationGuard!.state === 'free' ? 'free' : `held ${e.migrationGuard!.state}`],
    ...(e.lockFiles ?? []).map((f): [string, string] => [
      `lock file (${f.source})`,
      `${f.path}: ${f.exists ? `lease ${f.lease.state === 'free' ? 'free' : `held ${f.lease.state}`}, guard ${f.migrationGuard.state === 'free' ? 'free' : `held ${f.migrationGuard.state}`}` : 'absent (free)'}`,
    ]),
    ['QEMU holds', e.qemu!.held.join(', ') || '-'],
    ['QEMU does not share', e.qemu!.unshared.join(', ') || '-'],
    ['open by', e.openBy!.map(describeProcess).join('\n                      ') || '-'],
    [
      'locks',
      e.locks!.map((l) => `${l.kind} ${l.type} ${l.start}-${l.end ?? 'EOF'}${l.pid > 0 ? ` pid ${l.pid}` : ''}${l.blocked ? ' (waiting)' : ''}`).join('\n                      ') ||
        '-',
    ],
  ];
  return `${e.path}\n${rows.map(([k, v]) => `  ${k.padEnd(20)}${v}`).join('\n')}\n`;
}

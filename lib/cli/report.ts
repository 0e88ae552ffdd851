// Who is in the way, for people: a busy or timed-out run, the line printed
// when a wait begins, and the holders in `status`. Built from the errors'
// structured fields (holders, openers, unreadable), never from their messages;
// escaped on output (text.ts).
import { LockManagerError, type FileOpener, type LockHolderProcess, type LockHolders, type LockTimeoutError, type ResourceBusyError, type UnreadableHolder } from '../os/errors.js';
import { abbreviate, holdersWords, lockWords } from '../os/proc-locks.js';
import { QEMU_PERMISSIONS, QEMU_PERM_BASE, QEMU_SHARED_BASE } from '../os/qemu.js';

/**
 * The same error in the command line's words where the API's would show:
 * its name for a resource's path becomes the flag the user typed (`flag`),
 * advice only an API caller can follow becomes what the user can do.
 */
export function inCliWords(err: unknown, flag?: string): unknown {
  if (!(err instanceof LockManagerError)) return err;
  const words: Array<[RegExp, string]> = [
    // The same disk twice, by two paths (the same spelling twice is a usage error before this).
    [/ is already (?:registered|held) (exclusive|shared|readonly), not (exclusive|shared|readonly); release it first/, ' is already given as --$1, not --$2: name each disk once, in one mode'],
    // "(anApiCall(), or lockmgr COMMAND)": the user has only the command.
    [/ \(\w+\(\), or (lockmgr [^)]+)\)/, ' ($1)'],
  ];
  if (flag !== undefined) words.unshift([/\bresource\.path\b/g, `${flag} PATH`]);
  const message = words.reduce((m, [re, to]) => m.replace(re, to), err.message);
  if (message === err.message) return err;
  const Class = err.constructor as new (m: string, o: { cause: unknown }) => LockManagerError;
  return new Class(message, { cause: err });
}

type Lock = Pick<LockHolderProcess, 'kind' | 'mode' | 'start' | 'end'>;

/** What QEMU means by a lock on bytes 100-104 or 200-204, or ''. */
function qemuMeaning(l: Lock): string {
  if (l.kind !== 'OFD' || l.end === null) return '';
  for (const [base, words] of [
    [QEMU_PERM_BASE, 'QEMU holds'],
    [QEMU_SHARED_BASE, 'QEMU does not share'],
  ] as const) {
    if (l.start >= base && l.end < base + QEMU_PERMISSIONS.length) {
      const names = QEMU_PERMISSIONS.slice(l.start - base, l.end - base + 1).map((p) => `"${p}"`);
      return ` (${words} ${names.join(', ')})`;
    }
  }
  return '';
}

/** "an exclusive OFD lock on byte 0", "a shared OFD lock on bytes 100-101 (QEMU holds "consistent-read", "write")". */
export function lockText(l: Lock): string {
  return `${lockWords(l)}${qemuMeaning(l)}`;
}

/** How wide a command may be on a line that starts `indent` characters in. */
export function commandWidth(columns: number | undefined, indent: number): number {
  return columns === undefined ? 200 : Math.max(40, columns - indent - 1);
}

function byPid<T extends { pid: number }>(items: readonly T[]): T[][] {
  const groups = new Map<number, T[]>();
  for (const x of items) groups.set(x.pid, [...(groups.get(x.pid) ?? []), x]);
  return [...groups.values()];
}

const unique = (xs: string[]): string[] => [...new Set(xs)];

/** "pid 4242" padded, so that the commands of a list line up. */
function pidColumn(pids: readonly number[]): (pid: number) => string {
  const w = Math.max(...pids.map((p) => String(p).length), 1);
  return (pid) => `pid ${String(pid).padEnd(w)}`;
}

function unreadableLine(u: UnreadableHolder, path: string, width: number): string {
  const who = u.pid === null ? 'a process lockmgr cannot name' : `pid ${u.pid}${u.command === '' ? '' : `  ${abbreviate(u.command, width, path)}`}`;
  return `${who}: ${lockText(u)}; ${u.detail}`;
}

function openerNote(o: FileOpener): string {
  return o.waiting === true ? '  (waiting for a lock)' : '';
}

/**
 * The lines that say who holds `path` and who else has it open, indented by
 * two: holders (with their lock when they differ), unnamed locks, openers.
 */
function whoLines(h: LockHolders, path: string, columns: number | undefined): string[] {
  const lines: string[] = [];
  const all = [...h.holders.map((x) => x.pid), ...h.openers.map((o) => o.pid)];
  const col = pidColumn(all);
  const width = commandWidth(columns, 2 + col(0).length + 2);
  const locks = unique(h.holders.map(lockText));
  for (const group of byPid(h.holders)) {
    const own = unique(group.map(lockText));
    lines.push(`  ${col(group[0]!.pid)}  ${abbreviate(group[0]!.command, width, path)}${locks.length > 1 ? `  [${own.join('; ')}]` : ''}`);
  }
  for (const u of h.unreadable) lines.push(`  ${unreadableLine(u, path, width)}`);
  if (h.openers.length > 0) {
    lines.push(h.fdinfoAvailable ? 'also open in:' : 'one of these holds it (this kernel does not list locks in /proc/PID/fdinfo, so it cannot say which):');
    for (const o of h.openers) lines.push(`  ${col(o.pid)}  ${abbreviate(o.command, width, path)}${openerNote(o)}`);
  }
  return lines;
}

/**
 * A busy run or a wait that ran out, for people: what is in the way, each
 * process that holds it on a line of its own (pid and command line), then the
 * others that have it open. null when the error names no process (a lease of
 * a lock service, a lock range lockmgr does not attribute): print its message.
 */
export function conflictLines(err: ResourceBusyError | LockTimeoutError, options: { waited?: string; columns?: number } = {}): string[] | null {
  const path = err.resource ?? '';
  if (path === '' || (err.holders.length === 0 && err.unreadable.length === 0 && err.openers.length === 0)) return null;
  const where = err.lockFile === null ? '' : ` (its ${err.lockFileRole} ${err.lockFile})`;
  const locks = unique([...err.holders, ...err.unreadable].map(lockText));
  const what = locks.length === 1 ? `${locks[0]} is` : locks.length === 0 ? 'a lock is' : 'conflicting locks are';
  const head =
    options.waited === undefined
      ? `${path}${where} is busy: ${what} held by`
      : `gave up after ${options.waited} waiting for ${path}${where}: ${what} still held by`;
  const lines = [`lockmgr: ${head}${err.holders.length + err.unreadable.length === 0 ? ' one of the processes below' : ''}`, ...whoLines(err, err.lockFile ?? path, options.columns)];
  const busy = err as Partial<ResourceBusyError>;
  if (busy.migrationInProgress === true) lines.push('a migration is in progress: a migration target holds the handover guard (byte 1)');
  if (busy.rolledBack !== undefined && busy.rolledBack.length > 0) lines.push(`released again: ${busy.rolledBack.join(', ')}`);
  return lines;
}

/** The one line printed when a wait begins: what, for how long, held by whom. */
export function waitingLine(busy: ResourceBusyError, seconds: string): string {
  const path = busy.resource ?? '';
  const where = busy.lockFile === null ? '' : ` (its ${busy.lockFileRole} ${busy.lockFile})`;
  if (path === '' || busy.holders.length + busy.unreadable.length === 0) return `lockmgr: waiting up to ${seconds}: ${busy.message}`;
  const { by } = holdersWords({ ...busy, openers: [] }, busy.lockFile ?? path);
  return `lockmgr: waiting up to ${seconds} for ${path}${where}, held by ${by}`;
}

/**
 * status --lockspace: under a lease's location (a lock file, a lease file),
 * the processes holding it, one line each, and those not named.
 */
export function leaseHolderLines(h: LockHolders, path: string, columns: number | undefined, indent: number): string[] {
  const col = pidColumn([...h.holders.map((x) => x.pid), ...h.unreadable.flatMap((u) => (u.pid === null ? [] : [u.pid]))]);
  const width = commandWidth(columns, indent + 2 + col(0).length + 2);
  return [
    ...byPid(h.holders).map((group) => `  ${col(group[0]!.pid)}  ${abbreviate(group[0]!.command, width, path)}${group[0]!.orphan === true ? '  (orphan: no lockmgr supervises it)' : ''}`),
    ...h.unreadable.map((u) => `  ${unreadableLine(u, path, width)}`),
  ];
}

/** status: one line per holding process, its locks on the next; unnamed locks; openers. */
export function statusWhoRows(h: LockHolders, path: string, columns: number | undefined, indent: number): Array<[string, string[]]> {
  const rows: Array<[string, string[]]> = [];
  const all = [...h.holders.map((x) => x.pid), ...h.openers.map((o) => o.pid), ...h.unreadable.flatMap((u) => (u.pid === null ? [] : [u.pid]))];
  const col = pidColumn(all);
  const pad = ' '.repeat(col(0).length + 2);
  const width = commandWidth(columns, indent + pad.length);
  const held: string[] = [];
  for (const group of byPid(h.holders)) {
    held.push(`${col(group[0]!.pid)}  ${abbreviate(group[0]!.command, width, path)}${group[0]!.orphan === true ? '  (orphan: no lockmgr supervises it)' : ''}`);
    // Each lock on a line of its own, with the descriptors that hold it.
    held.push(...unique(group.map((x) => `${pad}${lockText(x)}${x.fds !== null && x.fds.length > 0 ? ` (fd ${x.fds.join(', ')})` : ''}`)));
  }
  rows.push(['held by', held]);
  if (h.unreadable.length > 0) rows.push(['not named', h.unreadable.map((u) => unreadableLine(u, path, width))]);
  const label = h.fdinfoAvailable ? 'also open in' : 'open by';
  rows.push([label, h.openers.map((o) => `${col(o.pid)}  ${abbreviate(o.command, width, path)}${openerNote(o)}`)]);
  if (!h.fdinfoAvailable) rows.push(['note', ['this kernel lists no locks in /proc/PID/fdinfo: OFD and flock locks are held by some of the processes that have the file open']]);
  return rows;
}

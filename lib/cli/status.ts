// `lockmgr status`: who holds what on each PATH (docs/cli.md).
import type { ByteStatus, LeaseStatus, LockspaceDriver } from '../lockspaces/driver.js';
import { LAST_LEASE_BYTE, openLockspace, parseLockspaceSpec } from '../lockspaces/index.js';
import { LockManagerError, type FileOpener, type LockHolder, type LockHolderProcess, type LockHolders, type ProcessInfo, type UnreadableHolder } from '../os/errors.js';
import { loopBacking, openDiskFile } from '../os/disks.js';
import type { LockableFile } from '../os/locks.js';
import { lockHolders, lockmgrWatchers, locksOn, runsLockmgr, sameDescription, supervisedByLockmgr, type ProcLock } from '../os/proc-locks.js';
import { qemuLockState, type QemuPermission } from '../os/qemu.js';
import { EXIT, fail, type Output } from './args.js';
import type { StatusArgs } from './parse.js';
import { leaseHolderLines, statusWhoRows } from './report.js';
import { linesText, safeJson } from './text.js';

type ByteState = 'free' | 'exclusive' | 'shared';

/**
 * The --json schema's version. Within a version fields are only ever added;
 * removing or changing one needs the next version (docs/architecture.md,
 * "Formats that outlive a process").
 */
export const STATUS_JSON_VERSION = 1;

/** The --json schema, one entry per PATH (docs/cli.md). Version 1: fields are only ever added. */
export interface StatusEntry {
  /** The PATH as given, made absolute. */
  path: string;
  kind?: 'file' | 'block-device';
  identity?: string;
  lease?: { byte: 0; state: ByteState; holder: LockHolder | null };
  migrationGuard?: { byte: 1; state: ByteState };
  /** With --lockspace SPEC: where this disk's lease lives in that lockspace, and who holds it (docs/lockspaces.md). */
  lockspace?: LeaseStatus;
  /** With --lockspace SPEC where the lease is lock files: the same, in the shape this field had before `lockspace` existed. */
  lockFiles?: Array<{ path: string; source: string; identity: string; exists: boolean; lease: { byte: 0; state: ByteState; holder: LockHolder | null }; migrationGuard: { byte: 1; state: ByteState } }>;
  qemu?: { held: QemuPermission[]; unshared: QemuPermission[] };
  locks?: Array<Omit<ProcLock, 'ino'> & { ino: string }>;
  /**
   * Every process that holds a lock on the file, one entry per lock (from
   * /proc/PID/fdinfo and /proc/locks); `orphan`, on holders of a lease lock
   * only: no live lockmgr supervises the lease it holds (markOrphans;
   * docs/contract.md, "Orphans").
   */
  holders?: LockHolderProcess[];
  /** The other processes that have it open, those waiting for a lock marked. */
  openers?: FileOpener[];
  /**
   * A loop device: its backing file, whose lease is the device's too (a run on
   * either takes both): its byte 0 and who holds it, marked `orphan` as above.
   */
  backingFile?: { path: string; lease: { byte: 0; state: ByteState; holder: LockHolder | null }; holders: LockHolderProcess[] };
  /** Locks whose holder could not be named from here, and why. */
  unreadable?: UnreadableHolder[];
  /** false: this kernel lists no locks in fdinfo; OFD and flock holders are among `openers`. */
  fdinfoAvailable?: boolean;
  /** Every process that has the file open, holders included (this status process never). */
  openBy?: ProcessInfo[];
  error?: { code: string; message: string };
}

function byteState(file: LockableFile, start: number): { state: ByteState; holder: LockHolder | null } {
  const holder = file.getConflict('exclusive', { start, length: 1 });
  return { state: holder === null ? 'free' : holder.mode, holder };
}

const plain = (b: ByteStatus): ByteState => (b.state === 'held' ? 'exclusive' : b.state);

/** The lock files of an OFD lockspace's answer, in the shape `lockFiles` always had. */
function lockFilesOf(status: LeaseStatus): StatusEntry['lockFiles'] {
  if (status.locations.some((l) => l.guard === null || l.detail?.source === undefined)) return undefined;
  return status.locations.map((l) => ({
    path: l.path,
    source: String(l.detail!.source),
    identity: String(l.detail!.identity),
    exists: l.exists,
    lease: { byte: 0, state: plain(l.lease), holder: l.lease.holder },
    migrationGuard: { byte: 1, state: plain(l.guard!) },
  }));
}

/**
 * Each holder of a lease lock (an OFD lock on the lease's bytes, which only
 * lockmgr takes) marked `orphan` when no live lockmgr supervises the lease it
 * holds (docs/contract.md, "Orphans"): it neither runs lockmgr nor descends
 * from a process that does (a command, QEMU's own locks), its lock's open file
 * description is shared with no process that runs lockmgr (a command's
 * daemon while its `run` lives; an adopted VM), and no lockmgr watches it
 * through a pidfd (an adopted VM whose leases the lock service keeps). Other
 * holders (QEMU's own bytes, a flock or POSIX lock) hold no lease: no mark.
 */
function markOrphans(h: LockHolders): LockHolders {
  const managers = h.holders.filter((x) => x.fds !== null && runsLockmgr(x.pid));
  const shared = (x: LockHolderProcess): boolean =>
    (x.fds ?? []).some((fd) => managers.some((m) => m.pid !== x.pid && m.fds!.some((mfd) => sameDescription(x.pid, fd, m.pid, mfd))));
  const supervised = new Map<number, boolean>();
  const supervisedPid = (pid: number): boolean => supervised.get(pid) ?? supervised.set(pid, supervisedByLockmgr(pid) || lockmgrWatchers(pid).length > 0).get(pid)!;
  const leaseLock = (x: LockHolderProcess): boolean => x.kind === 'OFD' && x.start <= LAST_LEASE_BYTE;
  return { ...h, holders: h.holders.map((x) => (leaseLock(x) ? { ...x, orphan: !(shared(x) || supervisedPid(x.pid)) } : x)) };
}

/** A loop device's backing file, its byte 0 and its holders; undefined for anything else. */
function backingLease(device: LockableFile): StatusEntry['backingFile'] {
  let bound: ReturnType<typeof loopBacking>;
  let file: LockableFile;
  try {
    bound = loopBacking(device);
    if (bound === null) return undefined;
    file = openDiskFile(bound.path, 'read');
  } catch (err) {
    // A backing file deleted or replaced (run refuses the device), or one we may not open:
    // the device itself, and who holds it, is still worth showing.
    if (err instanceof LockManagerError) return undefined;
    throw err;
  }
  try {
    const lease = byteState(file, 0);
    const who = lockHolders(file.fd, 'exclusive', { start: 0, length: 1 }, { conflict: lease.holder });
    return { path: file.path, lease: { byte: 0, ...lease }, holders: markOrphans(who).holders };
  } finally {
    file.close();
  }
}

/** The holders and openers, as everyone but this status process sees them: processes once each. */
function openByOf(h: LockHolders): ProcessInfo[] {
  const seen = new Map<number, ProcessInfo>();
  for (const p of [...h.holders, ...h.openers]) if (p.pid !== process.pid && !seen.has(p.pid)) seen.set(p.pid, { pid: p.pid, command: p.command });
  return [...seen.values()].sort((a, b) => a.pid - b.pid);
}

async function inspect(path: string, space: LockspaceDriver | undefined): Promise<StatusEntry> {
  // A block device through the kernel's own device node, as every lockspace locks it.
  const file = openDiskFile(path, 'read');
  const inspected = space === undefined ? undefined : await space.inspect({ type: 'disk', path });
  // Each lock file's holders marked too: an orphan holds the lease wherever the lockspace keeps it.
  const lockspace = inspected === undefined ? undefined : { ...inspected, locations: inspected.locations.map((l) => (l.holders === undefined ? l : { ...l, holders: markOrphans(l.holders) })) };
  try {
    const byte = (start: number) => byteState(file, start);
    const lease = byte(0);
    // QEMU locks the node it opened; for a block device that is the canonical
    // node whenever QEMU was given any path udev made (symlinks to it).
    const qemu = qemuLockState(file.path);
    // Every lock on the file and who holds it; this process's probe is left out.
    const who = lockHolders(file.fd, null, undefined, { conflict: lease.holder });
    const backingFile = backingLease(file);
    return {
      path,
      kind: file.kind,
      identity: file.identity.key,
      lease: { byte: 0, ...lease },
      migrationGuard: { byte: 1, state: byte(1).state },
      ...(lockspace === undefined ? {} : { lockspace, ...(lockFilesOf(lockspace) ? { lockFiles: lockFilesOf(lockspace) } : {}) }),
      qemu: { held: qemu.held, unshared: qemu.unshared },
      locks: [...locksOn(file.path), ...(file.path === path ? [] : locksOn(path))].map((l) => ({ ...l, ino: String(l.ino) })),
      holders: markOrphans(who).holders,
      openers: who.openers,
      ...(backingFile === undefined ? {} : { backingFile }),
      unreadable: who.unreadable,
      fdinfoAvailable: who.fdinfoAvailable,
      openBy: openByOf(who),
    };
  } finally {
    file.close();
  }
}

/** Prints the status of a checked command line (parseStatus in parse.ts). */
export async function status(values: StatusArgs, out: Output): Promise<number> {
  let space: LockspaceDriver | undefined;
  try {
    space = values.lockspace === undefined ? undefined : openLockspace(parseLockspaceSpec(values.lockspace, process.cwd()));
  } catch (err) {
    return fail(err, out);
  }
  let code: number = EXIT.ok;
  const entries: StatusEntry[] = [];
  for (const path of values.paths) {
    try {
      entries.push(await inspect(path, space));
    } catch (err) {
      // Whatever the reason (missing, a FIFO, no permission), the PATH could not be inspected.
      code = EXIT.noResource;
      const e = err as LockManagerError;
      entries.push({ path, error: { code: e.code ?? 'ERR_INTERNAL', message: e.message } });
    }
  }
  if (values.json) out.out(`${safeJson({ version: STATUS_JSON_VERSION, entries })}\n`);
  else out.out(entries.map((e) => linesText(table(e, out.terminal?.('out')?.columns))).join('\n'));
  return code;
}

const heldText = (b: ByteStatus | { state: string; host?: string }): string =>
  b.state === 'free' ? 'free' : `held ${b.state === 'held' ? '' : b.state}${'host' in b && b.host !== undefined ? ` by ${b.host}` : ''}`.replace('held  by', 'held by').trimEnd();

/** The pids whose locks cover `byte` (OFD and POSIX: the ones that can hold a lease). */
function pidsOn(e: StatusEntry, byte: number): number[] {
  return [...new Set((e.holders ?? []).filter((h) => h.kind !== 'FLOCK' && h.start <= byte && (h.end === null || h.end >= byte)).map((h) => h.pid))];
}

/** The lines of one entry's table (unescaped: the caller escapes each). */
function table(e: StatusEntry, columns: number | undefined): string[] {
  if (e.error) return [e.path, `  error  ${e.error.message}`];
  const leasePids = pidsOn(e, 0);
  const leaseUnnamed = (e.unreadable ?? []).some((u) => u.kind !== 'FLOCK' && u.start === 0);
  let leaseText = `${heldText(e.lease!)}${leasePids.length > 0 ? ` by pid ${leasePids.join(', ')}` : leaseUnnamed ? ' (by a process not named here: see below)' : ''}`;
  // A loop device's lease is held where its backing file's is.
  const behind = e.backingFile;
  if (behind !== undefined && e.lease!.state === 'free' && behind.lease.state !== 'free') {
    const pids = [...new Set(behind.holders.map((h) => h.pid))];
    leaseText = `${heldText(behind.lease)}${pids.length > 0 ? ` by pid ${pids.join(', ')}` : ''}, through its backing file ${behind.path}`;
  }
  const rows: Array<[string, string[]]> = [
    ['kind', [`${e.kind} (${e.identity})`]],
    // With --lockspace the lease is where that lockspace keeps it (below); the image's own bytes are still shown.
    [e.lockspace ? 'image byte 0' : 'lease (byte 0)', [e.lockspace ? heldText(e.lease!) : leaseText]],
    [e.lockspace ? 'image byte 1' : 'migration guard', [heldText(e.migrationGuard!)]],
    ...(e.lockspace?.locations ?? []).map((l): [string, string[]] => {
      const pids = [...new Set(l.holders?.holders.map((h) => h.pid) ?? [])];
      const lease = `lease ${heldText(l.lease)}${pids.length > 0 ? ` (pid ${pids.join(', ')})` : ''}`;
      return [
        l.what,
        [
          `${l.path}: ${l.exists ? `${lease}${l.guard === null ? '' : `, guard ${heldText(l.guard)}`}` : 'absent (free)'}`,
          // Who holds it, named from the lock's file (pid and command line).
          ...(l.holders === undefined ? [] : leaseHolderLines(l.holders, l.path, columns, 22)),
        ],
      ];
    }),
    ...(behind === undefined
      ? []
      : [['backing file', [`${behind.path}: lease ${heldText(behind.lease)}`, ...leaseHolderLines({ holders: behind.holders, openers: [], unreadable: [], fdinfoAvailable: true }, behind.path, columns, 22)]] as [string, string[]]]),
    ['QEMU holds', [e.qemu!.held.join(', ')]],
    ['QEMU does not share', [e.qemu!.unshared.join(', ')]],
  ];
  rows.push(...statusWhoRows({ holders: e.holders!, openers: e.openers!, unreadable: e.unreadable!, fdinfoAvailable: e.fdinfoAvailable! }, e.path, columns, 22));
  rows.push(['locks', e.locks!.map((l) => `${l.kind} ${l.type} ${l.start}-${l.end ?? 'EOF'}${l.pid > 0 ? ` pid ${l.pid}` : ''}${l.blocked ? ' (waiting)' : ''}`)]);
  const width = Math.max(...rows.map(([k]) => k.length)) + 1;
  const lines = [e.path];
  for (const [k, vs] of rows) {
    const values = vs.length === 0 || vs.every((v) => v === '') ? ['-'] : vs;
    lines.push(`  ${k.padEnd(width)}${values[0]}`, ...values.slice(1).map((v) => `${' '.repeat(width + 2)}${v}`));
  }
  return lines;
}

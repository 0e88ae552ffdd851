// `lockmgr status`: who holds what on each PATH (docs/cli.md).
import type { ByteStatus, LeaseStatus, LockspaceDriver } from '../lockspaces/driver.js';
import { openLockspace, parseLockspaceSpec } from '../lockspaces/index.js';
import type { LockHolder, LockManagerError, ProcessInfo } from '../os/errors.js';
import { openDiskFile } from '../os/disks.js';
import type { LockableFile } from '../os/locks.js';
import { describeProcess, locksOn, ofdLockHolders, processesWithOpen, type LockHolderProcess, type ProcLock } from '../os/proc-locks.js';
import { qemuLockState, type QemuPermission } from '../os/qemu.js';
import { EXIT, parse, usage, type Output } from './args.js';

type ByteState = 'free' | 'exclusive' | 'shared';

/**
 * The --json schema's version. Within a version fields are only ever added;
 * removing or changing one needs the next version (docs/architecture.md,
 * "Formats that outlive a process").
 */
export const STATUS_JSON_VERSION = 1;

/** The --json schema, one entry per PATH (docs/cli.md). Version 1: fields are only ever added. */
export interface StatusEntry {
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
  openBy?: ProcessInfo[];
  /**
   * The processes that hold the lease (an OFD lock on byte 0 of the image or,
   * with --lockspace, of its lock files), from /proc/PID/fdinfo; `orphan`:
   * no lockmgr supervises it (docs/contract.md, "Orphans").
   */
  holders?: Array<LockHolderProcess & { file: string }>;
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

async function inspect(path: string, space: LockspaceDriver | undefined): Promise<StatusEntry> {
  // A block device through the kernel's own device node, as every lockspace locks it.
  const file = openDiskFile(path, 'read');
  const lockspace = space === undefined ? undefined : await space.inspect({ type: 'disk', path });
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
      ...(lockspace === undefined ? {} : { lockspace, ...(lockFilesOf(lockspace) ? { lockFiles: lockFilesOf(lockspace) } : {}) }),
      qemu: { held: qemu.held, unshared: qemu.unshared },
      locks: [...locksOn(file.path), ...(file.path === path ? [] : locksOn(path))].map((l) => ({ ...l, ino: String(l.ino) })),
      openBy: processesWithOpen(path, { excludeSelf: true }),
      holders: holdersOf([file.path, ...(lockspace?.locations ?? []).filter((l) => l.exists && l.guard !== null).map((l) => l.path)]),
    };
  } finally {
    file.close();
  }
}

/** Who holds byte 0 of each file, each process once (the first file it holds). */
function holdersOf(files: string[]): Array<LockHolderProcess & { file: string }> {
  const found = new Map<number, LockHolderProcess & { file: string }>();
  for (const file of new Set(files)) for (const h of ofdLockHolders(file, 0)) if (!found.has(h.pid)) found.set(h.pid, { ...h, file });
  return [...found.values()];
}

export async function status(argv: readonly string[], out: Output): Promise<number> {
  const { values, positionals } = parse(argv, { json: { type: 'boolean' }, lockspace: { type: 'string' } });
  if (positionals.length === 0) throw usage('status needs at least one PATH');
  const space = values.lockspace === undefined ? undefined : openLockspace(parseLockspaceSpec(values.lockspace, process.cwd()));
  let code: number = EXIT.ok;
  const entries: StatusEntry[] = [];
  for (const path of positionals) {
    try {
      entries.push(await inspect(path, space));
    } catch (err) {
      // Whatever the reason (missing, a FIFO, no permission), the PATH could not be inspected.
      code = EXIT.noResource;
      const e = err as LockManagerError;
      entries.push({ path, error: { code: e.code ?? 'ERR_INTERNAL', message: e.message } });
    }
  }
  if (values.json) out.out(`${JSON.stringify({ version: STATUS_JSON_VERSION, entries }, null, 2)}\n`);
  else out.out(entries.map(table).join('\n'));
  return code;
}

const heldText = (b: ByteStatus | { state: string; host?: string }): string =>
  b.state === 'free' ? 'free' : `held ${b.state === 'held' ? '' : b.state}${'host' in b && b.host !== undefined ? ` by ${b.host}` : ''}`.replace('held  by', 'held by').trimEnd();

function table(e: StatusEntry): string {
  if (e.error) return `${e.path}\n  error  ${e.error.message}\n`;
  const indent = (lines: string[]): string => lines.join(`\n${' '.repeat(width + 2)}`);
  const rows: Array<[string, string]> = [
    ['kind', `${e.kind} (${e.identity})`],
    // With --lockspace the lease is where that lockspace keeps it (below); the image's own bytes are still shown.
    [e.lockspace ? 'image byte 0' : 'lease (byte 0)', heldText(e.lease!)],
    [e.lockspace ? 'image byte 1' : 'migration guard', heldText(e.migrationGuard!)],
    ...(e.lockspace?.locations ?? []).map((l): [string, string] => [
      l.what,
      `${l.path}: ${l.exists ? `lease ${heldText(l.lease)}${l.guard === null ? '' : `, guard ${heldText(l.guard)}`}` : 'absent (free)'}`,
    ]),
    ['QEMU holds', e.qemu!.held.join(', ') || '-'],
    ['QEMU does not share', e.qemu!.unshared.join(', ') || '-'],
    ['held by', '\0holders'],
    ['open by', '\0open'],
    ['locks', '\0locks'],
  ];
  const width = Math.max(...rows.map(([k]) => k.length)) + 1;
  const value = (v: string): string => {
    if (v === '\0holders') {
      return indent(e.holders!.map((h) => `${describeProcess(h)} ${h.type === 'WRITE' ? 'exclusive' : 'shared'}${h.orphan ? ', orphan: no lockmgr supervises it' : ''}`)) || '-';
    }
    if (v === '\0open') return indent(e.openBy!.map(describeProcess)) || '-';
    if (v === '\0locks') return indent(e.locks!.map((l) => `${l.kind} ${l.type} ${l.start}-${l.end ?? 'EOF'}${l.pid > 0 ? ` pid ${l.pid}` : ''}${l.blocked ? ' (waiting)' : ''}`)) || '-';
    return v;
  };
  return `${e.path}\n${rows.map(([k, v]) => `  ${k.padEnd(width)}${value(v)}`).join('\n')}\n`;
}

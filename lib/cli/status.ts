// `lockmgr status`: who holds what on each PATH (docs/cli.md).
import { resolve } from 'node:path';
import type { LockHolder, LockManagerError, ProcessInfo } from '../os/errors.js';
import { openDiskFile } from '../lockspaces/driver.js';
import { indirectLockspace, type IndirectLockspace, type LockFileSource } from '../lockspaces/indirect.js';
import { openLockable, type LockableFile } from '../os/locks.js';
import { describeProcess, locksOn, processesWithOpen, type ProcLock } from '../os/proc-locks.js';
import { qemuLockState, type QemuPermission } from '../os/qemu.js';
import { EXIT, parse, usage, type Output } from './args.js';

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

export function status(argv: readonly string[], out: Output): number {
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

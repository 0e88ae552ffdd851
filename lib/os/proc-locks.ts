// Who holds what: /proc/locks, and the processes that have a file open.
//
// OFD locks record no owner: F_OFD_GETLK reports pid -1 and so does /proc/locks.
// Messages name the processes that have the file open, as candidates, with
// their command lines. Classic POSIX locks do carry a pid, and we report it.
// /proc/PID/fdinfo does list the OFD locks of each fd's open file description
// (fdsOf): adopting a running VM reads it to find the descriptions it holds.
//
// These read procfs synchronously: it is memory, not disk, and they run on
// error paths and in `status`, never on the lock fast path.
import { readdirSync, readFileSync, readlinkSync, statSync, type Stats } from 'node:fs';
import type { ProcessInfo } from './errors.js';
import { native } from './native.js';

export type ProcLockKind = 'OFDLCK' | 'POSIX' | 'FLOCK' | 'LEASE' | 'DELEG' | 'UNKNOWN';

export interface ProcLock {
  kind: ProcLockKind;
  /** 'READ' or 'WRITE' for byte-range locks; leases may show 'UNLCK' or 'BREAKING'. */
  type: string;
  /** -1 for OFD locks. */
  pid: number;
  major: number;
  minor: number;
  ino: bigint;
  start: number;
  /** Inclusive end offset; null means to the end of the file (EOF). */
  end: number | null;
  /** A waiter blocked on this lock (the "->" lines), not a holder. */
  blocked: boolean;
}

/** A process with the file open; `command` is '' if unreadable (a kernel thread, or gone). */
export type OpenBy = ProcessInfo;

const LINE = /^\d+:\s+(->\s+)?(\S+)\s+(?:ADVISORY|MANDATORY)\s+(\S+)\s+(-?\d+)\s+([0-9a-f]+):([0-9a-f]+):(\d+)\s+(\d+)\s+(\d+|EOF)\s*$/;
const KINDS = new Set(['OFDLCK', 'POSIX', 'FLOCK', 'LEASE', 'DELEG']);

export function parseProcLocks(text: string): ProcLock[] {
  const locks: ProcLock[] = [];
  for (const line of text.split('\n')) {
    const m = LINE.exec(line);
    if (!m) continue;
    locks.push({
      kind: (KINDS.has(m[2]!) ? m[2] : 'UNKNOWN') as ProcLockKind,
      type: m[3]!,
      pid: Number(m[4]),
      major: Number.parseInt(m[5]!, 16),
      minor: Number.parseInt(m[6]!, 16),
      ino: BigInt(m[7]!),
      start: Number(m[8]),
      end: m[9] === 'EOF' ? null : Number(m[9]),
      blocked: m[1] !== undefined,
    });
  }
  return locks;
}

/** Linux's encoding of dev_t (see <sys/sysmacros.h>). */
export function major(dev: bigint | number): number {
  const d = BigInt(dev);
  return Number(((d >> 8n) & 0xfffn) | ((d >> 32n) & ~0xfffn));
}

export function minor(dev: bigint | number): number {
  const d = BigInt(dev);
  return Number((d & 0xffn) | ((d >> 12n) & ~0xffn));
}

/**
 * The locks on the inode at `path` (held and blocked), from /proc/locks. For a
 * block device these are the locks on that device node's inode.
 */
export function locksOn(path: string): ProcLock[] {
  const st = statSync(path, { bigint: true });
  const maj = major(st.dev);
  const min = minor(st.dev);
  return parseProcLocks(readFileSync('/proc/locks', 'utf8')).filter((l) => l.ino === st.ino && l.major === maj && l.minor === min);
}

function sameFile(a: Stats, b: Stats): boolean {
  if (a.isBlockDevice() && b.isBlockDevice()) return a.rdev === b.rdev;
  return a.dev === b.dev && a.ino === b.ino;
}

export function commandLine(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').replace(/\0+$/, '').replaceAll('\0', ' ');
  } catch {
    return '';
  }
}

/**
 * The processes that have `path` open (any fd to the same inode; for a block
 * device, to any node of the same device). Processes we may not inspect (other
 * users' when not root) are silently missing: the answer is a lower bound.
 */
export function processesWithOpen(path: string, options: { excludeSelf?: boolean } = {}): OpenBy[] {
  let target: Stats;
  try {
    target = statSync(path);
  } catch {
    return [];
  }
  const found: OpenBy[] = [];
  for (const entry of readdirSync('/proc')) {
    const pid = Number(entry);
    if (!Number.isInteger(pid) || (options.excludeSelf && pid === process.pid)) continue;
    let fds: string[];
    try {
      fds = readdirSync(`/proc/${pid}/fd`);
    } catch {
      continue;
    }
    for (const fd of fds) {
      let st: Stats;
      try {
        st = statSync(`/proc/${pid}/fd/${fd}`);
      } catch {
        continue;
      }
      if (sameFile(st, target)) {
        found.push({ pid, command: commandLine(pid) });
        break;
      }
    }
  }
  return found;
}

/** "4242 (qemu-system-x86_64 -name vm1 ...)", the command cut at 80 characters. */
export function describeProcess(p: OpenBy): string {
  const cmd = p.command.length > 80 ? `${p.command.slice(0, 77)}...` : p.command;
  return cmd === '' ? `${p.pid}` : `${p.pid} (${cmd})`;
}

/** One open descriptor of a process, as /proc/PID/fd and /proc/PID/fdinfo show it. */
export interface ProcFd {
  fd: number;
  /** What the descriptor refers to (stat through /proc/PID/fd/N). */
  dev: bigint;
  ino: bigint;
  rdev: bigint;
  block: boolean;
  /** The open file description's access mode (fdinfo flags & O_ACCMODE). */
  access: 'read' | 'write' | 'readwrite';
  /** The OFD locks this description holds (fdinfo "lock:" lines of kind OFDLCK): every fd sharing it shows the same. */
  locks: ProcLock[];
}

/**
 * The open fds of a process that refer to the file `target` identifies (dev
 * and ino; a block device by rdev, whatever its node), with the OFD locks
 * each one's open file description holds. /proc/PID/fdinfo lists them exactly
 * (Linux 5.x and later; checked on 6.18): unlike /proc/locks (pid -1), it says
 * which description holds a lock. Empty when the process is gone or we may not
 * look (another user's, unless root).
 */
export function fdsOf(pid: number, target: { dev: bigint; ino: bigint; block: boolean }): ProcFd[] {
  let names: string[];
  try {
    names = readdirSync(`/proc/${pid}/fd`);
  } catch {
    return [];
  }
  const found: ProcFd[] = [];
  for (const name of names) {
    const fd = Number(name);
    let st;
    let info: string;
    try {
      st = statSync(`/proc/${pid}/fd/${fd}`, { bigint: true });
      info = readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8');
    } catch {
      continue;
    }
    const block = st.isBlockDevice();
    if (block !== target.block) continue;
    if (block ? st.rdev !== target.dev : st.dev !== target.dev || st.ino !== target.ino) continue;
    found.push({ fd, dev: st.dev, ino: st.ino, rdev: st.rdev, block, access: accessOf(info), locks: fdinfoLocks(info) });
  }
  return found;
}

/** The OFD locks an fdinfo text lists ("lock:\t1: OFDLCK ADVISORY  WRITE -1 fe:00:2146410 0 0"). */
export function fdinfoLocks(info: string): ProcLock[] {
  const lines = info
    .split('\n')
    .filter((l) => l.startsWith('lock:'))
    .map((l) => l.slice('lock:'.length).trim());
  return parseProcLocks(lines.join('\n')).filter((l) => l.kind === 'OFDLCK' && !l.blocked);
}

function accessOf(info: string): ProcFd['access'] {
  const m = /^flags:\s+([0-7]+)$/m.exec(info);
  const acc = m === null ? 0 : Number.parseInt(m[1]!, 8) & 3;
  return acc === 2 ? 'readwrite' : acc === 1 ? 'write' : 'read';
}

function parentOf(pid: number): number | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
  } catch {
    return null;
  }
}

/**
 * The processes other than `pid` and its descendants (a VM's own helpers
 * inherit its fds) that have `pid`'s open file description `fd` of the file
 * `target` open too, and so hold its OFD locks: kcmp(2), which needs ptrace
 * read access (processes it may not compare are not listed). This process is
 * included.
 */
export function processesSharing(pid: number, fd: number, target: { dev: bigint; ino: bigint; block: boolean }): ProcessInfo[] {
  const found: ProcessInfo[] = [];
  for (const entry of readdirSync('/proc')) {
    const other = Number(entry);
    if (!Number.isInteger(other) || other === pid) continue;
    let descendant = false;
    for (let p: number | null = parentOf(other), hops = 0; p !== null && p > 1 && hops < 64; p = parentOf(p), hops++) {
      if (p === pid) {
        descendant = true;
        break;
      }
    }
    if (descendant) continue;
    for (const f of fdsOf(other, target)) {
      if (f.locks.length > 0 && native.kcmp(pid, fd, other, f.fd) === 0) {
        found.push({ pid: other, command: commandLine(other) });
        break;
      }
    }
  }
  return found;
}

/**
 * The parent of `pid` when it watches `pid` through a pidfd, as a lockmgr
 * supervisor does its VM from spawn to exit (/proc/PPID/fdinfo of a pidfd
 * names its "Pid:"); null otherwise: the parent is init or a subreaper that
 * inherited an orphan, or we may not look. A supervisor that is alive is
 * always its VM's parent: a child is reparented only when its parent dies.
 */
export function watchingParent(pid: number): ProcessInfo | null {
  const ppid = parentOf(pid);
  if (ppid === null || ppid <= 1) return null;
  let fds: string[];
  try {
    fds = readdirSync(`/proc/${ppid}/fd`);
  } catch {
    return null;
  }
  for (const fd of fds) {
    try {
      if (readlinkSync(`/proc/${ppid}/fd/${fd}`) !== 'anon_inode:[pidfd]') continue;
      const m = /^Pid:\s+(-?\d+)$/m.exec(readFileSync(`/proc/${ppid}/fdinfo/${fd}`, 'utf8'));
      if (m !== null && Number(m[1]) === pid) return { pid: ppid, command: commandLine(ppid) };
    } catch {
      // Closed meanwhile.
    }
  }
  return null;
}

/** When a process started, in clock ticks since boot (/proc/PID/stat field 22), or null if it is gone. */
export function processStartTime(pid: number): bigint | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return BigInt(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19]!);
  } catch {
    return null;
  }
}

/**
 * For each of our `fds`, the other processes that share its open file
 * description (so its OFD locks are theirs as well), in one pass over /proc:
 * each fd of another process on the same file is compared with ours by
 * kcmp(KCMP_FILE). A process that merely has the file open through its own
 * description is not one. `bornSince`: only processes started at or after
 * that time (processStartTime) are looked at, those that can have inherited
 * the fds from a child started then (a pass over every fd of every process
 * costs tens of ms on a loaded host). Processes we may not inspect are missing
 * (not root: other users'), as in processesWithOpen().
 */
export function sharersOf(fds: readonly number[], options: { bornSince?: bigint } = {}): Map<number, OpenBy[]> {
  const found = new Map<number, OpenBy[]>(fds.map((fd) => [fd, []]));
  const targets: Array<{ fd: number; st: Stats }> = [];
  for (const fd of fds) {
    try {
      targets.push({ fd, st: statSync(`/proc/self/fd/${fd}`) });
    } catch {
      // Not open: shared by nobody.
    }
  }
  if (targets.length === 0) return found;
  for (const entry of readdirSync('/proc')) {
    const pid = Number(entry);
    if (!Number.isInteger(pid) || pid === process.pid) continue;
    if (options.bornSince !== undefined && (processStartTime(pid) ?? -1n) < options.bornSince) continue;
    let theirFds: string[];
    try {
      theirFds = readdirSync(`/proc/${pid}/fd`);
    } catch {
      continue;
    }
    const named = new Set<number>();
    for (const theirs of theirFds) {
      let st: Stats;
      try {
        st = statSync(`/proc/${pid}/fd/${theirs}`);
      } catch {
        continue;
      }
      for (const t of targets) {
        // kcmp: ESRCH (gone since), EBADF (closed since), EPERM: not a sharer we can name.
        if (named.has(t.fd) || !sameFile(st, t.st) || native.kcmp(process.pid, t.fd, pid, Number(theirs)) !== 0) continue;
        named.add(t.fd);
        found.get(t.fd)!.push({ pid, command: commandLine(pid) });
      }
    }
  }
  return found;
}

/** A process that holds an OFD lock on a file, from its /proc/PID/fdinfo lock lines. */
export interface LockHolderProcess extends OpenBy {
  type: string;
  /**
   * No ancestor of it (nor itself) has lockmgr loaded: whoever supervised the
   * lease is gone, or it was left to this process (docs/contract.md, "Orphans").
   */
  orphan: boolean;
}

/**
 * The processes whose fds carry an OFD lock on byte `start` of the file at
 * `path`: each fd's /proc/PID/fdinfo lists the locks its open file
 * description owns, which names the holders exactly (where /proc/locks says
 * pid -1). Lower bound, as processesWithOpen().
 */
export function ofdLockHolders(path: string, start: number): LockHolderProcess[] {
  let target: Stats;
  try {
    target = statSync(path);
  } catch {
    return [];
  }
  const found: LockHolderProcess[] = [];
  for (const entry of readdirSync('/proc')) {
    const pid = Number(entry);
    if (!Number.isInteger(pid) || pid === process.pid) continue;
    let fds: string[];
    try {
      fds = readdirSync(`/proc/${pid}/fd`);
    } catch {
      continue;
    }
    for (const fd of fds) {
      let lock: ProcLock | undefined;
      try {
        if (!sameFile(statSync(`/proc/${pid}/fd/${fd}`), target)) continue;
        lock = fdinfoLocks(readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8')).find((l) => l.start <= start && (l.end === null || l.end >= start));
      } catch {
        continue;
      }
      if (lock !== undefined) {
        found.push({ pid, command: commandLine(pid), type: lock.type, orphan: !underLockmgr(pid) });
        break;
      }
    }
  }
  return found;
}

/** Whether pid or one of its ancestors has lockmgr's addon mapped (a supervisor). */
function underLockmgr(pid: number): boolean {
  for (let p: number | null = pid, hops = 0; p !== null && p > 1 && hops < 64; p = parentOf(p), hops++) {
    try {
      // build/Release/lockmgr.node or a prebuild (prebuilds/linux-x64/lockmgr.*.node).
      if (/\/lockmgr[^/\n]*\.node$/m.test(readFileSync(`/proc/${p}/maps`, 'utf8'))) return true;
    } catch {
      return false;
    }
  }
  return false;
}

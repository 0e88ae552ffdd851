// Who holds what: /proc/locks, /proc/PID/fdinfo, and the processes that have
// a file open.
//
// OFD locks record no owner: F_OFD_GETLK reports pid -1 and so does
// /proc/locks. But /proc/PID/fdinfo/FD of every descriptor that shares the
// holding open file description carries the lock (`lock:\t1: OFDLCK ADVISORY
// WRITE -1 fe:00:2146410 0 0`, Linux >= 4.1), and so for flock locks, which
// also belong to an open file description; a POSIX lock carries its owner's
// pid in /proc/locks. lockHolders() puts these together: it names the exact
// holders, tells them from processes that merely have the file open or wait
// for it, and says which locks it could not attribute and why.
//
// These read procfs synchronously: it is memory, not disk, and they run on
// error paths and in `status`, never on the lock fast path. The scan is
// bounded by the processes that have the file open: only their fdinfo and
// threads are read.
import { closeSync, fstatSync, openSync, readdirSync, readFileSync, readlinkSync, statSync, unlinkSync, type BigIntStats } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { FileOpener, LockHolderProcess, LockHolders, LockKind, ProcessInfo, UnreadableHolder } from './errors.js';
import { constants, native } from './native.js';

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

function sameFile(a: BigIntStats, b: BigIntStats): boolean {
  if (a.isBlockDevice() && b.isBlockDevice()) return a.rdev === b.rdev;
  return a.dev === b.dev && a.ino === b.ino;
}

/** A process's command line, arguments joined by spaces; `[comm]` for a kernel thread; '' if unreadable or gone. */
export function commandLine(pid: number): string {
  try {
    const cmd = readFileSync(`/proc/${pid}/cmdline`, 'utf8').replace(/\0+$/, '').replaceAll('\0', ' ');
    if (cmd !== '') return cmd;
    return `[${readFileSync(`/proc/${pid}/comm`, 'utf8').trim()}]`;
  } catch {
    return '';
  }
}

/**
 * The processes that have `path` open (any fd to the same inode; for a block
 * device, to any node of the same device). Processes we may not inspect (other
 * users' when not root) are silently missing: the answer is a lower bound.
 * lockHolders() says who holds the locks, and which processes it could not inspect.
 */
export function processesWithOpen(path: string, options: { excludeSelf?: boolean } = {}): ProcessInfo[] {
  let target: BigIntStats;
  try {
    target = statSync(path, { bigint: true });
  } catch {
    return [];
  }
  return scanOpeners(target, options.excludeSelf === true ? process.pid : -1).found.map((p) => ({ pid: p.pid, command: commandLine(p.pid) }));
}

interface Scanned {
  pid: number;
  /** Its fds of the file. */
  fds: number[];
}

/** Every process with an fd of `target` (sameFile), and how many processes' fds could not be read. */
function scanOpeners(target: BigIntStats, skipPid: number): { found: Scanned[]; uninspectable: number } {
  const found: Scanned[] = [];
  let uninspectable = 0;
  let entries: string[];
  try {
    entries = readdirSync('/proc');
  } catch {
    return { found, uninspectable };
  }
  for (const entry of entries) {
    const pid = Number(entry);
    if (!Number.isInteger(pid) || pid <= 0 || pid === skipPid) continue;
    let fds: string[];
    try {
      fds = readdirSync(`/proc/${pid}/fd`);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EACCES') uninspectable++;
      continue;
    }
    const mine: number[] = [];
    for (const fd of fds) {
      try {
        if (sameFile(statSync(`/proc/${pid}/fd/${fd}`, { bigint: true }), target)) mine.push(Number(fd));
      } catch {
        // Closed meanwhile, or an fd we may not follow.
      }
    }
    if (mine.length > 0) found.push({ pid, fds: mine });
  }
  return { found, uninspectable };
}

/** "4242 (qemu-system-x86_64 -name vm1 ...)", the command cut at 80 characters. */
export function describeProcess(p: ProcessInfo): string {
  const cmd = abbreviate(p.command, 80);
  return cmd === '' ? `${p.pid}` : `${p.pid} (${cmd})`;
}

/**
 * A command line cut to about `max` characters, keeping what tells it apart:
 * the program's name and the end of its arguments (a script, an image), and,
 * when it names `keep` (the file in question), that.
 */
export function abbreviate(command: string, max: number, keep?: string): string {
  if (command.length <= max) return command;
  const space = command.indexOf(' ');
  const argv0 = space < 0 ? command : command.slice(0, space);
  const name = argv0.startsWith('/') ? argv0.slice(argv0.lastIndexOf('/') + 1) : argv0;
  const rest = space < 0 ? '' : command.slice(space);
  const short = `${name}${rest}`;
  if (short.length <= max) return short;
  const at = keep === undefined || keep === '' ? -1 : short.indexOf(keep);
  if (at >= 0 && at + keep!.length <= max - 3) return `${short.slice(0, max - 3)}...`;
  if (at >= 0) {
    // As much of the start as fits (cut at a word), then the path and a little after it.
    const tail = short.slice(at, at + keep!.length + 12);
    const room = max - 5 - tail.length;
    const cut = short.lastIndexOf(' ', room);
    const head = room > name.length && cut >= name.length ? short.slice(0, cut) : name;
    return `${head} ... ${tail}${at + tail.length < short.length ? '...' : ''}`;
  }
  // The program and the end of its arguments, cut at a word.
  const room = Math.max(10, max - name.length - 5);
  const end = short.slice(short.length - room);
  const word = end.indexOf(' ');
  return `${name} ... ${word >= 0 && word < end.length - 1 ? end.slice(word + 1) : end}`;
}

const KIND_OF: Partial<Record<ProcLockKind, LockKind>> = { OFDLCK: 'OFD', POSIX: 'POSIX', FLOCK: 'FLOCK' };

/** "byte 0", "bytes 100-101", "bytes 4096 to the end", "the whole file". */
export function rangeWords(start: number, end: number | null): string {
  if (end === null) return start === 0 ? 'the whole file' : `bytes ${start} to the end`;
  return end === start ? `byte ${start}` : `bytes ${start}-${end}`;
}

/** "an exclusive OFD lock on byte 0". */
export function lockWords(l: { kind: LockKind; mode: 'exclusive' | 'shared'; start: number; end: number | null }): string {
  const kind = l.kind === 'FLOCK' ? 'flock' : l.kind;
  return `${l.mode === 'exclusive' ? 'an exclusive' : 'a shared'} ${kind} lock on ${l.kind === 'FLOCK' ? 'the whole file' : rangeWords(l.start, l.end)}`;
}

// The system calls a thread waits for a lock in, by architecture, and their
// blocking commands: fcntl F_SETLKW (7; F_SETLKW64 14 on 32-bit ABIs) and
// F_OFD_SETLKW (38), flock without LOCK_NB (4).
const WAIT_SYSCALLS: Partial<Record<string, { fcntl: number; flock: number }>> = {
  x64: { fcntl: 72, flock: 73 },
  arm64: { fcntl: 25, flock: 32 },
  riscv64: { fcntl: 25, flock: 32 },
  loong64: { fcntl: 25, flock: 32 },
  ppc64: { fcntl: 55, flock: 143 },
  s390x: { fcntl: 55, flock: 143 },
};
const F_SETLKW = 7;
const F_SETLKW64 = 14;
const F_OFD_SETLKW = 38;
const LOCK_NB = 4;

/** Whether a thread of `pid` is blocked waiting for a lock through one of `fds` (/proc/PID/task/TID/syscall); null if that cannot be read. */
function waitingOn(pid: number, fds: readonly number[]): boolean | null {
  const calls = WAIT_SYSCALLS[process.arch];
  if (calls === undefined) return null;
  let tids: string[];
  try {
    tids = readdirSync(`/proc/${pid}/task`);
  } catch {
    return null;
  }
  let unknown = false;
  for (const tid of tids) {
    let text: string;
    try {
      text = readFileSync(`/proc/${pid}/task/${tid}/syscall`, 'utf8');
    } catch {
      unknown = true;
      continue;
    }
    const [nr, a0, a1] = text.trim().split(' ');
    if (a1 === undefined || !fds.includes(Number.parseInt(a0!, 16))) continue;
    const cmd = Number.parseInt(a1, 16);
    if (Number(nr) === calls.fcntl && (cmd === F_SETLKW || cmd === F_OFD_SETLKW || cmd === F_SETLKW64)) return true;
    if (Number(nr) === calls.flock && (cmd & LOCK_NB) === 0) return true;
  }
  return unknown ? null : false;
}

/** The locks /proc/PID/fdinfo/FD lists (`lock:` lines), or null if it cannot be read. */
function fdinfoLocks(pid: number, fd: number): ProcLock[] | null {
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8');
  } catch {
    return null;
  }
  return locksInFdinfo(text);
}

/** Every lock an fdinfo text lists, one "lock:" line each, as /proc/locks would show it. */
function locksInFdinfo(text: string): ProcLock[] {
  return parseProcLocks(
    text
      .split('\n')
      .filter((l) => l.startsWith('lock:'))
      .map((l) => l.replace(/^lock:\s*/, ''))
      .join('\n'),
  );
}

let fdinfoWorks: boolean | undefined;

/**
 * Whether this kernel lists locks in /proc/PID/fdinfo (Linux >= 4.1), found
 * once per process: an OFD lock on a fresh unlinked temporary file, and its
 * own fdinfo read back.
 */
export function fdinfoShowsLocks(): boolean {
  if (fdinfoWorks !== undefined) return fdinfoWorks;
  for (const dir of [tmpdir(), '/dev/shm', '/tmp']) {
    const path = join(dir, `.lockmgr-fdinfo-${process.pid}-${Math.random().toString(36).slice(2)}`);
    let fd: number;
    try {
      fd = openSync(path, 'wx+', 0o600);
    } catch {
      continue;
    }
    try {
      unlinkSync(path);
      if (native.setlk(fd, constants.lock.SHARED, 0, 1) !== 0) continue;
      const locks = fdinfoLocks(process.pid, fd);
      fdinfoWorks = locks !== null && locks.some((l) => l.kind === 'OFDLCK');
      return fdinfoWorks;
    } finally {
      closeSync(fd);
    }
  }
  // Nowhere to make a file: trust fdinfo if it can be read at all.
  try {
    readdirSync('/proc/self/fdinfo');
    return (fdinfoWorks = true);
  } catch {
    return (fdinfoWorks = false);
  }
}

export interface LockHoldersOptions {
  /**
   * The conflicting lock as F_OFD_GETLK reported it: if no process visible
   * here explains it (a POSIX owner outside this pid namespace is not even in
   * /proc/locks), it is reported in `unreadable`.
   */
  conflict?: { mode: 'exclusive' | 'shared'; start: number; length: number; pid: number } | null;
  /** This process's own descriptors to leave out: the one asking (a description never conflicts with itself). */
  ignoreFds?: readonly number[];
  /** @internal false: behave as on a kernel without locks in fdinfo (tests). */
  fdinfo?: boolean;
}

/**
 * Who holds the locks on a file, named from the kernel's own records.
 *
 * `target` is a path, or a descriptor of this process (which is then left
 * out, as the asker). With `mode` (and `range`, default the whole file), only
 * the locks that conflict with such a byte-range lock are asked about: OFD
 * and POSIX locks that overlap the range (any, for 'exclusive'; write locks,
 * for 'shared'); flock locks never conflict with byte-range locks on a local
 * filesystem. Without `mode`, every OFD, POSIX and flock lock on the file.
 *
 * - holders: each process holding one of those locks: an OFD or flock lock
 *   as the `lock:` line in /proc/PID/fdinfo of its descriptors (so every
 *   process sharing the open file description, e.g. a supervisor and the
 *   child that inherited the fd), a POSIX lock as its owner in /proc/locks.
 * - openers: the other processes that have the file open, each marked
 *   `waiting` when one of its threads is blocked for a lock on it. Never this
 *   process.
 * - unreadable: locks the kernel lists that no process visible here explains,
 *   with the reason (another user's processes, another pid namespace).
 * - fdinfoAvailable: false on a kernel without locks in fdinfo; then OFD and
 *   flock locks are in `unreadable` and the openers are the candidates.
 *
 * A snapshot: a lock may come or go while it is read.
 */
export function lockHolders(target: string | number, mode?: 'exclusive' | 'shared' | null, range?: { start?: number; length?: number }, options: LockHoldersOptions = {}): LockHolders {
  const st = typeof target === 'number' ? fstatSync(target, { bigint: true }) : statSync(target, { bigint: true });
  const maj = major(st.dev);
  const min = minor(st.dev);
  const onFile = (l: ProcLock): boolean => l.ino === st.ino && l.major === maj && l.minor === min;
  const ignore = new Set(typeof target === 'number' ? [target, ...(options.ignoreFds ?? [])] : (options.ignoreFds ?? []));
  const fdinfo = options.fdinfo ?? fdinfoShowsLocks();

  const start = range?.start ?? 0;
  const last = range?.length === undefined || range.length === 0 ? Infinity : start + range.length - 1;
  const asked = (l: ProcLock): boolean => {
    const kind = KIND_OF[l.kind];
    if (kind === undefined || l.blocked) return false;
    if (mode === undefined || mode === null) return true;
    if (kind === 'FLOCK') return false;
    return l.start <= last && (l.end ?? Infinity) >= start && (mode === 'exclusive' || l.type === 'WRITE');
  };

  let all: ProcLock[] = [];
  try {
    all = parseProcLocks(readFileSync('/proc/locks', 'utf8')).filter(onFile);
  } catch {
    // No /proc/locks: fdinfo alone.
  }
  const locks = all.filter(asked);

  // Every process with the file open, this one included (another of its
  // descriptors may hold a lock that conflicts with the asking one).
  const scan = scanOpeners(st, -1);
  const holders: LockHolderProcess[] = [];
  const openers: FileOpener[] = [];
  const isHolder = new Set<number>();
  const seenKeys = new Map<string, Set<number>>();
  const key = (l: ProcLock): string => `${l.kind} ${l.type} ${l.pid} ${l.start} ${l.end}`;
  const commands = new Map<number, string>();
  const command = (pid: number): string => {
    if (!commands.has(pid)) commands.set(pid, commandLine(pid));
    return commands.get(pid)!;
  };

  if (fdinfo) {
    for (const p of scan.found) {
      const byLock = new Map<string, { lock: ProcLock; fds: number[] }>();
      for (const fd of p.fds) {
        const lines = fdinfoLocks(p.pid, fd);
        for (const l of lines ?? []) {
          if (!onFile(l) || !asked(l)) continue;
          const k = key(l);
          // Our own asking descriptor: it explains its lock, and holds nothing in its own way.
          if (p.pid === process.pid && ignore.has(fd) && l.kind !== 'POSIX') {
            (seenKeys.get(k) ?? seenKeys.set(k, new Set()).get(k)!).add(-1);
            continue;
          }
          if (l.kind === 'POSIX' && l.pid !== p.pid) continue;
          const entry = byLock.get(k) ?? byLock.set(k, { lock: l, fds: [] }).get(k)!;
          entry.fds.push(fd);
        }
      }
      for (const [k, { lock, fds }] of byLock) {
        (seenKeys.get(k) ?? seenKeys.set(k, new Set()).get(k)!).add(p.pid);
        holders.push(holderOf(p.pid, command(p.pid), lock, fds));
        isHolder.add(p.pid);
      }
    }
  }

  // POSIX locks carry their owner: holders even when fdinfo is missing or unreadable.
  for (const l of locks.filter((x) => x.kind === 'POSIX')) {
    if (seenKeys.get(key(l))?.has(l.pid)) continue;
    (seenKeys.get(key(l)) ?? seenKeys.set(key(l), new Set()).get(key(l))!).add(l.pid);
    holders.push(holderOf(l.pid, command(l.pid), l, null));
    isHolder.add(l.pid);
  }

  // Locks the kernel lists that nobody visible explains.
  const unreadable: UnreadableHolder[] = [];
  const counts = new Map<string, { lock: ProcLock; n: number }>();
  for (const l of locks) {
    const c = counts.get(key(l)) ?? counts.set(key(l), { lock: l, n: 0 }).get(key(l))!;
    c.n++;
  }
  for (const [k, { lock, n }] of counts) {
    const missing = n - (seenKeys.get(k)?.size ?? 0);
    for (let i = 0; i < missing; i++) unreadable.push(unreadableOf(lock, fdinfo, scan.uninspectable, command));
  }
  // F_OFD_GETLK saw a conflict that /proc/locks does not show (a POSIX owner outside this pid namespace).
  const c = options.conflict;
  if (c !== undefined && c !== null && holders.length === 0 && unreadable.length === 0) {
    const lock: ProcLock = {
      kind: c.pid === -1 ? 'OFDLCK' : 'POSIX',
      type: c.mode === 'exclusive' ? 'WRITE' : 'READ',
      pid: c.pid,
      major: maj,
      minor: min,
      ino: st.ino,
      start: c.start,
      end: c.length === 0 ? null : c.start + c.length - 1,
      blocked: false,
    };
    unreadable.push(unreadableOf(lock, fdinfo, scan.uninspectable, command));
  }

  const waiters = new Set(all.filter((l) => l.blocked && l.kind === 'POSIX').map((l) => l.pid));
  for (const p of scan.found) {
    if (p.pid === process.pid || isHolder.has(p.pid)) continue;
    const waiting = waiters.has(p.pid) ? true : waitingOn(p.pid, p.fds);
    openers.push({ pid: p.pid, command: command(p.pid), fds: p.fds, waiting });
  }
  holders.sort((a, b) => a.pid - b.pid || a.start - b.start);
  return { holders, openers, unreadable, fdinfoAvailable: fdinfo };
}

function holderOf(pid: number, command: string, l: ProcLock, fds: number[] | null): LockHolderProcess {
  return { pid, command, kind: KIND_OF[l.kind]!, mode: l.type === 'WRITE' ? 'exclusive' : 'shared', start: l.start, end: l.end, fds };
}

function unreadableOf(l: ProcLock, fdinfo: boolean, uninspectable: number, command: (pid: number) => string): UnreadableHolder {
  const kind = KIND_OF[l.kind]!;
  const pid = l.pid > 0 ? l.pid : null;
  let reason: UnreadableHolder['reason'];
  let detail: string;
  if (!fdinfo) {
    reason = 'no-fdinfo';
    detail = 'this kernel lists no locks in /proc/PID/fdinfo (Linux < 4.1): any process that has the file open may hold it';
  } else if (uninspectable > 0) {
    reason = 'permission';
    detail = `held by a process this user may not inspect: /proc/PID/fd of ${uninspectable} ${uninspectable === 1 ? 'process' : 'processes'} of other users could not be read (root can)`;
  } else {
    reason = 'namespace';
    detail = 'no process visible here holds it: its holder is in another pid namespace (a container), or keeps the file only through a memory mapping';
  }
  if (kind === 'FLOCK' && pid !== null) detail += `; the kernel records that pid ${pid} took it (it may have passed the descriptor on, or be gone)`;
  return { kind, mode: l.type === 'WRITE' ? 'exclusive' : 'shared', start: l.start, end: l.end, pid, command: pid === null ? '' : command(pid), reason, detail };
}

/** A process in a message: "pid 4242 (qemu-io -c ... /images/vm1.img)", or "this process (pid 4242)". */
function processWords(p: ProcessInfo, keep: string | undefined, max: number, note?: string): string {
  if (p.pid === process.pid) return `this process (pid ${p.pid}${note === undefined ? '' : `, ${note}`})`;
  const inside = [abbreviate(p.command, max, keep), note].filter((x) => x !== undefined && x !== '');
  return inside.length === 0 ? `pid ${p.pid}` : `pid ${p.pid} (${inside.join(', ')})`;
}

const listWords = (items: string[], limit: number): string => {
  const shown = items.length > limit ? [...items.slice(0, limit - 1), `${items.length - limit + 1} more`] : items;
  return shown.length <= 1 ? (shown[0] ?? '') : `${shown.slice(0, -1).join(', ')} and ${shown.at(-1)}`;
};

/**
 * Who holds it and who else has it open, in one line for an error message:
 * `by` ("pid 4242 (qemu-io ...) with an exclusive OFD lock on byte 0") and
 * `also` ("; also open in pid 4300 (python3 w.py), waiting for a lock", or '').
 * Commands are cut to about 60 characters, never hiding `path`.
 */
export function holdersWords(h: LockHolders, path?: string): { by: string; also: string } {
  const byPid = new Map<number, LockHolderProcess[]>();
  for (const x of h.holders) byPid.set(x.pid, [...(byPid.get(x.pid) ?? []), x]);
  const locks = new Set(h.holders.map(lockWords));
  const one = locks.size === 1;
  const parts = [...byPid.values()].map((ls) => `${processWords(ls[0]!, path, 60)}${one ? '' : ` with ${listWords([...new Set(ls.map(lockWords))], 3)}`}`);
  for (const u of h.unreadable) parts.push(`${u.pid === null ? 'a process it cannot name' : processWords({ pid: u.pid, command: u.command }, path, 60)} with ${lockWords(u)} (${u.detail})`);
  let by = listWords(parts, 4);
  if (one && h.holders.length > 0) by += ` with ${[...locks][0]}`;
  if (!h.fdinfoAvailable && h.openers.length > 0) {
    by = `${by === '' ? '' : `${by}, or `}one of ${listWords(h.openers.map((o) => processWords(o, path, 60)), 4)} (this kernel does not say which: these have it open)`;
  }
  if (by === '') by = 'nobody lockmgr could find (it was released meanwhile, or is held by another open file description of this process)';
  const others = h.fdinfoAvailable ? h.openers : [];
  const also = others.length === 0 ? '' : `; also open in ${listWords(others.map((o) => processWords(o, path, 40, o.waiting ? 'waiting for a lock' : undefined)), 3)}`;
  return { by, also };
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
    found.push({ fd, dev: st.dev, ino: st.ino, rdev: st.rdev, block, access: accessOf(info), locks: parseFdinfoLocks(info) });
  }
  return found;
}

/** The OFD locks an fdinfo text lists ("lock:\t1: OFDLCK ADVISORY  WRITE -1 fe:00:2146410 0 0"). */
export function parseFdinfoLocks(info: string): ProcLock[] {
  return locksInFdinfo(info).filter((l) => l.kind === 'OFDLCK' && !l.blocked);
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

/** The processes `watcher` holds a pidfd of (/proc/WATCHER/fdinfo of a pidfd names its "Pid:"); empty if we may not look. */
export function watchedBy(watcher: number): number[] {
  let fds: string[];
  try {
    fds = readdirSync(`/proc/${watcher}/fd`);
  } catch {
    return [];
  }
  const pids: number[] = [];
  for (const fd of fds) {
    try {
      if (readlinkSync(`/proc/${watcher}/fd/${fd}`) !== 'anon_inode:[pidfd]') continue;
      const m = /^Pid:\s+(-?\d+)$/m.exec(readFileSync(`/proc/${watcher}/fdinfo/${fd}`, 'utf8'));
      if (m !== null && Number(m[1]) > 0) pids.push(Number(m[1]));
    } catch {
      // Closed meanwhile.
    }
  }
  return pids;
}

/**
 * The parent of `pid` when it watches `pid` through a pidfd, as a lockmgr
 * supervisor does its VM from spawn to exit; null otherwise: the parent is
 * init or a subreaper that inherited an orphan, or we may not look. A
 * supervisor that is alive is always its VM's parent: a child is reparented
 * only when its parent dies.
 */
export function watchingParent(pid: number): ProcessInfo | null {
  const ppid = parentOf(pid);
  if (ppid === null || ppid <= 1 || !watchedBy(ppid).includes(pid)) return null;
  return { pid: ppid, command: commandLine(ppid) };
}

/**
 * The processes with lockmgr loaded that watch `pid` through a pidfd: its
 * supervisor, or one that adopted it (its parent is then init). One pass over
 * every process's fds: for `status` and error paths only.
 */
export function lockmgrWatchers(pid: number): ProcessInfo[] {
  const found: ProcessInfo[] = [];
  for (const entry of readdirSync('/proc')) {
    const other = Number(entry);
    if (!Number.isInteger(other) || other === pid || other <= 1) continue;
    if (watchedBy(other).includes(pid) && runsLockmgr(other)) found.push({ pid: other, command: commandLine(other) });
  }
  return found;
}

/** Whether fd `fd` of `pid` and fd `otherFd` of `other` are one open file description (kcmp; false when it cannot tell). */
export function sameDescription(pid: number, fd: number, other: number, otherFd: number): boolean {
  return native.kcmp(pid, fd, other, otherFd) === 0;
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
  const targets: Array<{ fd: number; st: BigIntStats }> = [];
  for (const fd of fds) {
    try {
      targets.push({ fd, st: statSync(`/proc/self/fd/${fd}`, { bigint: true }) });
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
      let st: BigIntStats;
      try {
        st = statSync(`/proc/${pid}/fd/${theirs}`, { bigint: true });
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

/** Whether the process has lockmgr's addon mapped: a lockmgr supervisor, or a program managing leases through the API. */
export function runsLockmgr(pid: number): boolean {
  try {
    // build/Release/lockmgr.node or a prebuild (prebuilds/linux-x64/lockmgr.*.node).
    return /\/lockmgr[^/\n]*\.node$/m.test(readFileSync(`/proc/${pid}/maps`, 'utf8'));
  } catch {
    return false;
  }
}

/** Whether pid or one of its ancestors has lockmgr's addon mapped (a supervisor). */
export function supervisedByLockmgr(pid: number): boolean {
  for (let p: number | null = pid, hops = 0; p !== null && p > 1 && hops < 64; p = parentOf(p), hops++) {
    if (runsLockmgr(p)) return true;
  }
  return false;
}

// What the kernel says about processes and this process's resources, for tests
// that must prove nothing leaked. Everything is read from /proc.
import { readFileSync, readdirSync, readlinkSync } from 'node:fs';
import type { Readable } from 'node:stream';

/** The state letter of /proc/PID/stat (R, S, Z, ...), or null when there is no such process. */
export function procState(pid: number): string | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[0] ?? null;
  } catch {
    return null;
  }
}

/** Fields of /proc/PID/stat after the command: [state, ppid, pgrp, session, ...]. */
export function procStat(pid: number): string[] {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  return stat.slice(stat.lastIndexOf(')') + 2).split(' ');
}

/** Pids whose parent is `parent`, found by scanning /proc (every process, whatever created it). */
export function childrenOf(parent = process.pid): number[] {
  const out: number[] = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      if (Number(procStat(Number(name))[1]) === parent) out.push(Number(name));
    } catch {
      // gone while we looked
    }
  }
  return out;
}

export function zombieChildren(parent = process.pid): number[] {
  return childrenOf(parent).filter((pid) => procState(pid) === 'Z');
}

export function fdCount(): number {
  return openFds().length;
}

/** This process's open fds, without the one readdir itself used. */
export function openFds(): number[] {
  const dirFd = readdirSync('/proc/self/fd').map(Number);
  // The directory fd is the one that no longer exists once readdir has returned.
  return dirFd.filter((fd) => {
    try {
      readlinkSync(`/proc/self/fd/${fd}`);
      return true;
    } catch {
      return false;
    }
  });
}

export function threadCount(): number {
  return Number(/^Threads:\s*(\d+)/m.exec(readFileSync('/proc/self/status', 'utf8'))![1]);
}

/** SigIgn / SigBlk / ... of /proc/PID/status (or of a status text) as bigints. */
export function signalMasks(statusText: string): Record<string, bigint> {
  const out: Record<string, bigint> = {};
  for (const m of statusText.matchAll(/^(Sig\w+):\s*([0-9a-f]+)$/gm)) out[m[1]!] = BigInt(`0x${m[2]}`);
  return out;
}

/** Collects a stream until it ends. */
export function collect(stream: Readable): Promise<string> {
  return new Promise((resolve, reject) => {
    let text = '';
    stream.setEncoding('utf8');
    stream.on('data', (d: string) => (text += d));
    stream.on('end', () => resolve(text));
    stream.on('error', reject);
  });
}

/** The first line a stream prints, parsed as JSON. */
export function firstJsonLine<T>(stream: Readable): Promise<T> {
  return new Promise((resolve, reject) => {
    let text = '';
    stream.setEncoding('utf8');
    const onData = (d: string): void => {
      text += d;
      const nl = text.indexOf('\n');
      if (nl < 0) return;
      stream.off('data', onData);
      try {
        resolve(JSON.parse(text.slice(0, nl)) as T);
      } catch (err) {
        reject(err as Error);
      }
    };
    stream.on('data', onData);
    stream.on('end', () => reject(new Error(`stream ended before a line: ${JSON.stringify(text)}`)));
  });
}

/**
 * Rejects if `promise` has not settled after `ms`. Only a guard against hanging
 * forever with a useless message: no pass condition depends on it.
 */
export function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const guard = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`still waiting after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, guard]).finally(() => clearTimeout(timer));
}

/** Polls `check` every 5 ms until it is true; rejects after `ms` (a hang guard, as within()). */
export async function eventually(check: () => boolean, ms: number, what: string): Promise<void> {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`never became true within ${ms} ms: ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

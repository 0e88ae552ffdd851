// Process helpers for the supervise tests: what /proc says about processes and
// this process's fds, and reading a child's output. Counters shared with the
// other suites (threads, polling) live in ./helpers.ts.
import { readFileSync, readdirSync, readlinkSync } from 'node:fs';
import type { ChildProcess } from 'node:child_process';
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

/**
 * This process's open fds, without the one readdir itself used (it no longer
 * exists once readdir has returned). A list, not a count, so a test can tell a
 * new fd from one an earlier test closed meanwhile.
 */
export function openFds(): number[] {
  return readdirSync('/proc/self/fd').map(Number).filter((fd) => {
    try {
      readlinkSync(`/proc/self/fd/${fd}`);
      return true;
    } catch {
      return false;
    }
  });
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

/**
 * Ends each child's whole process group (it was spawned detached: flock(1),
 * for one, does not pass SIGTERM on to its command), SIGKILL after 5 s, waits
 * for the child's exit, then SIGKILLs whatever of the group is left. Empties
 * the list.
 */
export async function endGroups(children: ChildProcess[]): Promise<void> {
  for (const c of children.splice(0)) {
    if (c.exitCode !== null || c.signalCode !== null) continue;
    const gone = new Promise((r) => c.once('exit', r));
    const kill = (signal: NodeJS.Signals) => {
      try {
        process.kill(-c.pid!, signal);
      } catch {
        // Gone already.
      }
    };
    kill('SIGTERM');
    const timer = setTimeout(() => kill('SIGKILL'), 5000);
    await gone;
    clearTimeout(timer);
    kill('SIGKILL');
  }
}

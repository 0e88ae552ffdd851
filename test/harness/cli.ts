// The real lockmgr binary, run as a user would: in subprocesses, bounded in
// time, with what it printed and its exit status.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as hooks from 'vitest';
import { processExists, waitUntil } from '../helpers.js';

export const BIN = fileURLToPath(new URL('../../bin/lockmgr.js', import.meta.url));

export interface Ran {
  code: number | null;
  stdout: string;
  stderr: string;
  signal: NodeJS.Signals | null;
}

/** Runs `lockmgr ARGS` to its end (at most 60 s: a lockmgr that never exits fails the test, not the runner). */
export function lockmgr(args: readonly string[], options: { cwd?: string; env?: NodeJS.ProcessEnv } = {}): Ran {
  const r = spawnSync(process.execPath, [BIN, ...args], {
    encoding: 'utf8',
    timeout: 60_000,
    killSignal: 'SIGKILL',
    cwd: options.cwd,
    env: options.env === undefined ? process.env : { ...process.env, ...options.env },
  });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr, signal: r.signal };
}

/**
 * Ends each lockmgr still running: SIGTERM, which `run` forwards to its
 * command (a SIGKILLed lockmgr would leave its command running: lifetime
 * 'child' keeps it alive on purpose), SIGKILL after 5 s; waits for each exit.
 * Empties the list.
 */
export async function endRuns(children: ChildProcess[]): Promise<void> {
  for (const c of children.splice(0)) {
    if (c.exitCode !== null || c.signalCode !== null) continue;
    const gone = new Promise((r) => c.once('exit', r));
    c.kill('SIGTERM');
    const timer = setTimeout(() => c.kill('SIGKILL'), 5000);
    await gone;
    clearTimeout(timer);
  }
}

/** SIGKILLs each pid (a process a test left outside any supervision: an orphan, a SIGKILLed run's command) and waits until it is gone. Empties the list. */
export async function killPids(pids: number[]): Promise<void> {
  for (const pid of pids.splice(0)) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // Gone already.
    }
    await waitUntil(() => !processExists(pid), 10_000, `pid ${pid} to go`);
  }
}

/**
 * Background lockmgr processes of a test, ended after it: SIGTERM (which
 * `run` forwards to its command), SIGKILL after 5 s.
 */
export function backgroundRuns(): {
  start(args: readonly string[], options?: { ready?: string }): Promise<{ child: ChildProcess; exit: Promise<number | null>; stderr: () => string }>;
  children: ChildProcess[];
} {
  const children: ChildProcess[] = [];
  hooks.afterEach(() => endRuns(children));
  return {
    children,
    /** Starts `lockmgr ARGS`; with `ready` (a file the command touches), resolves once it exists. */
    async start(args, options = {}) {
      const child = spawn(process.execPath, [BIN, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
      children.push(child);
      let stderr = '';
      child.stderr!.on('data', (d: Buffer) => (stderr += d));
      child.stdout!.resume();
      const exit = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
      if (options.ready !== undefined) {
        const ready = options.ready;
        await Promise.race([
          waitUntil(() => existsSync(ready), 20_000, 'the command to start'),
          exit.then((code) => {
            throw new Error(`lockmgr exited early with ${code}: ${stderr}`);
          }),
        ]);
      }
      return { child, exit, stderr: () => stderr };
    },
  };
}

/** `sh -c 'touch READY; exec COMMAND'`: a command that says when it runs. */
export function touchThen(dir: string, command: string, name = 'ready'): { argv: string[]; ready: string } {
  const ready = join(dir, name);
  return { argv: ['sh', '-c', `touch '${ready}'; exec ${command}`], ready };
}

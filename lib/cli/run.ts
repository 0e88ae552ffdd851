// `lockmgr run`: holds leases around a command (docs/cli.md).
import { readFileSync } from 'node:fs';
import { constants as osConstants } from 'node:os';
import { openLockspace, parseLockspaceSpec } from '../lockspaces/index.js';
import { LockManager, type ExitStatus, type LockFailure, type LockspaceOptions, type Orphans, type ResourceSpec } from '../manager/manager.js';
import { LockTimeoutError, ResourceExhaustedError, type ResourceBusyError } from '../os/errors.js';
import { commandLine, describeProcess } from '../os/proc-locks.js';
import { EXIT, exitCodeFor, fail, isConflict, type Output } from './args.js';
import type { RunArgs } from './parse.js';
import { conflictLines, inCliWords, waitingLine } from './report.js';
import { escapeControl, linesText, secondsText } from './text.js';

const FORWARDED = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;

/**
 * How often `run` checks its leases where the lockspace declares that they
 * can be lost outside the protocol (capability `losable`: a deleted lock
 * file, a lease the lock service could not renew), unless --verify-interval
 * says otherwise. A check is a few syscalls per lease file.
 */
export const DEFAULT_VERIFY_SECONDS = 10;

/** The lockspace and the lease checks of a run or an adoption: on by default where the lockspace says its leases can be lost (a capability, never its kind). */
function watchOptions(r: RunArgs): { lockspace: LockspaceOptions | undefined; verifyInterval: number | undefined; onLockFailure: RunArgs['onLockFailure'] } {
  const lockspace = r.lockspace === undefined ? undefined : parseLockspaceSpec(r.lockspace, process.cwd());
  // --on-lock-failure asks for the checks: without --verify-interval they run at the default interval.
  const seconds = r.verifySeconds ?? (r.onLockFailure !== undefined || openLockspace(lockspace).capabilities.losable ? DEFAULT_VERIFY_SECONDS : 0);
  return { lockspace, verifyInterval: seconds === 0 ? undefined : Math.max(1, Math.round(seconds * 1000)), onLockFailure: r.onLockFailure };
}

/**
 * `--wait`: one line when a wait begins (what, held by whom), and on a
 * terminal a second line with the seconds waited so far, rewritten each
 * second and cleared when the wait ends.
 */
class WaitDisplay {
  #started = 0;
  #timer: NodeJS.Timeout | null = null;
  readonly #out: Output;
  readonly #seconds: string;

  constructor(out: Output, seconds: string) {
    this.#out = out;
    this.#seconds = seconds;
  }

  begin(busy: ResourceBusyError): void {
    this.end();
    this.#out.err(linesText([waitingLine(busy, this.#seconds)]));
    if ((this.#out.terminal?.('err') ?? null) === null) return;
    this.#started = Date.now();
    const tick = () => this.#out.err(`\r\x1b[K  waited ${Math.floor((Date.now() - this.#started) / 1000)} s`);
    tick();
    this.#timer = setInterval(tick, 1000);
    this.#timer.unref();
  }

  end(): void {
    if (this.#timer === null) return;
    clearInterval(this.#timer);
    this.#timer = null;
    this.#out.err('\r\x1b[K');
  }
}

/** The notice that a command exited but processes it started keep a lease ('orphans', docs/contract.md). */
function orphansNotice(who: string, out: Output): (o: Orphans) => void {
  return (o) => {
    // A process that kept only the QEMU descriptor holds QEMU's locks on the disk, not the lease.
    const lease = o.through.includes('lease');
    const qemu = o.through.includes('qemu');
    const what = lease && qemu ? "the lease and QEMU's locks on" : lease ? 'the lease on' : "QEMU's locks on";
    const open = lease && qemu ? 'the lease and the QEMU descriptor (LOCKMGR_QEMU_FD)' : lease ? 'the lease' : 'the QEMU descriptor (LOCKMGR_QEMU_FD)';
    const one = lease && !qemu;
    out.err(
      `lockmgr: ${who} exited, but ${what} ${escapeControl(o.resource)} stay${one ? 's' : ''} held by ${escapeControl(o.processes.map(describeProcess).join(', '))}, ` +
        `which it started and which still has ${open} open; ${one ? 'it ends' : 'they end'} when they exit or close it (see lockmgr status ${escapeControl(o.resource)})\n`,
    );
  };
}

/**
 * The notice of a lost lease and what was done to `who`, once per lease: the
 * checks find it lost again each interval (--on-lock-failure ignore).
 */
function lockLostNotice(who: string, out: Output): (f: LockFailure) => void {
  const told = new Set<string>();
  return (f) => {
    if (told.has(f.resource)) return;
    told.add(f.resource);
    const what = f.action === 'poweroff' ? `killing ${who} (SIGKILL)` : f.action === 'pause' ? `stopping ${who} (SIGSTOP)` : `${who} runs on`;
    out.err(`lockmgr: ${escapeControl(`lock lost: ${f.reason}; --on-lock-failure ${f.action}: ${what}`)}\n`);
  };
}

/** Prints a failure; a busy resource or a wait that ran out names the processes in the way. */
function report(err: unknown, out: Output, run: RunArgs | undefined): number {
  if (run === undefined || !isConflict(err)) return fail(inCliWords(err), out);
  const waited = err instanceof LockTimeoutError ? secondsText(run.timeout ?? err.timeout) : undefined;
  const lines = conflictLines(err, { waited, columns: out.terminal?.('err')?.columns });
  if (lines === null) {
    out.err(`lockmgr: ${escapeControl(waited === undefined ? err.message : `gave up after ${waited}: ${err.message}`)}\n`);
  } else {
    out.err(linesText(lines));
  }
  return run.conflictExit;
}

/** Runs a checked command line (parseRun in parse.ts, which main.ts calls before loading this file). */
export async function run(r: RunArgs, out: Output): Promise<number> {
  if (r.adopt !== undefined) return adopt(r, out);
  let mgr: LockManager;
  try {
    mgr = new LockManager({ params: r.params, lockLifetime: r.lifetime, ...watchOptions(r) });
  } catch (err) {
    return fail(err, out);
  }
  let warned = false;
  let limited = false;
  const display = new WaitDisplay(out, r.timeout === undefined ? '' : secondsText(r.timeout));
  try {
    for (const res of r.resources) {
      try {
        mgr.registerResource({ type: 'disk', path: res.path, mode: res.mode, qemuCompatible: r.qemuCompatible });
      } catch (err) {
        // Whatever is wrong with a PATH (missing, a FIFO, not permitted), it is
        // the same mistake as in `status`, with the same exit status.
        // (The same file named twice in two modes, by two paths, or one disk by two names, stays a usage error.)
        const e = inCliWords(err, res.flag);
        const code = exitCodeFor(e);
        fail(e, out);
        return code === EXIT.usage && !/is already (registered|held)|are the same disk/.test((err as Error).message) ? EXIT.noResource : code;
      }
    }
    const exited = new Promise<ExitStatus>((res) => mgr.once('exit', res));
    mgr.on('warning', (w) => {
      warned = true;
      if (w instanceof ResourceExhaustedError) limited = true;
      out.err(`lockmgr: warning: ${escapeControl(w.message)}\n`);
    });
    mgr.on('orphans', orphansNotice(escapeControl(r.command), out));
    mgr.on('lock-failure', lockLostNotice(r.command, out));
    mgr.on('wait', (busy) => display.begin(busy));
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
        await mgr.start(r.command, r.args, { stdio: 'inherit' }, r.timeout === undefined ? undefined : { timeout: r.timeout });
      } catch (err) {
        if (early !== undefined) return bySignal(early);
        throw err;
      } finally {
        display.end();
      }
      const status = await exited;
      if (early !== undefined) return bySignal(early);
      const code = status.code ?? bySignal(status.signal!);
      // A failure after the command ended (a release that failed) must not pass for success.
      return warned && code === 0 ? (limited ? EXIT.limit : EXIT.internal) : code;
    } finally {
      await mgr.free();
      for (const s of FORWARDED) process.off(s, forward);
    }
  } catch (err) {
    return report(err, out, r);
  } finally {
    display.end();
    await mgr.free();
  }
}

/**
 * `lockmgr run --adopt PID`: a new supervisor for a process whose lockmgr is
 * gone (LockManager.adopt). It takes over the leases the process holds,
 * forwards SIGTERM, SIGINT and SIGHUP to it, and exits 0 once it has exited:
 * the process is not lockmgr's child, so its exit status went to its parent.
 */
async function adopt(r: RunArgs, out: Output): Promise<number> {
  const resources: ResourceSpec[] = r.resources.map((res) => ({ type: 'disk', path: res.path, mode: res.mode, qemuCompatible: r.qemuCompatible }));
  let mgr: LockManager;
  try {
    mgr = await LockManager.adopt(r.adopt!, { resources, ...watchOptions(r) });
  } catch (err) {
    return report(err, out, r);
  }
  const pid = r.adopt!;
  let warned = false;
  mgr.on('warning', (w) => {
    warned = true;
    out.err(`lockmgr: warning: ${escapeControl(w.message)}\n`);
  });
  mgr.on('orphans', orphansNotice(`process ${pid}`, out));
  mgr.on('lock-failure', lockLostNotice(`process ${pid}`, out));
  const exited = new Promise<ExitStatus>((resolve) => mgr.once('exit', resolve));
  // Not in our process group: whatever signal reaches lockmgr is meant for the process too.
  const forward = (signal: NodeJS.Signals) => {
    if (mgr.state === 'running' || mgr.state === 'stopping') mgr.signal(signal);
  };
  for (const s of FORWARDED) process.on(s, forward);
  // Says it took over: a script waiting for that may go on, and signal lockmgr.
  out.err(`lockmgr: took over process ${escapeControl(describeProcess({ pid, command: commandLine(pid) }))} and its leases on ${escapeControl(r.resources.map((x) => x.path).join(', '))}\n`);
  try {
    await exited;
    return warned ? EXIT.internal : EXIT.ok;
  } finally {
    for (const s of FORWARDED) process.off(s, forward);
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

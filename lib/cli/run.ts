// `lockmgr run`: holds leases around a command (docs/cli.md).
import { readFileSync } from 'node:fs';
import { constants as osConstants } from 'node:os';
import { openLockspace, parseLockspaceSpec } from '../lockspaces/index.js';
import { LockManager, type ExitStatus, type LockFailureAction, type LockLifetime, type LockspaceOptions, type ManagerParams, type ResourceMode, type ResourceSpec } from '../manager/manager.js';
import { ResourceExhaustedError } from '../os/errors.js';
import { describeProcess } from '../os/proc-locks.js';
import { EXIT, fail, parse, usage, type Output } from './args.js';

const FORWARDED = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;

/**
 * How often `run` checks its leases where the lockspace declares that they
 * can be lost outside the protocol (capability `losable`: a deleted lock
 * file, a lease the lock service could not renew), unless --verify-interval
 * says otherwise. A check is a few syscalls per lease file.
 */
export const DEFAULT_VERIFY_SECONDS = 10;
const ACTIONS = ['poweroff', 'pause', 'ignore'] as const satisfies readonly LockFailureAction[];

function seconds(value: string, flag: string, min: 'zero' | 'positive'): number {
  const n = Number(value);
  if (value.trim() === '' || !Number.isFinite(n) || n < 0 || (min === 'positive' && n === 0)) {
    throw usage(`${flag} needs a number of seconds ${min === 'zero' ? '>= 0' : '> 0'}, got '${value}'`);
  }
  return n;
}

type RunValues = {
  adopt?: string;
  exclusive?: string[];
  shared?: string[];
  readonly?: string[];
  lockspace?: string;
  wait?: string;
  lifetime?: string;
  'verify-interval'?: string;
  'on-lock-failure'?: string;
  'qemu-compatible'?: boolean;
  name?: string;
  uuid?: string;
  id?: string;
  uri?: string;
};

/** --lockspace, --verify-interval and --on-lock-failure, for a run and an adoption alike. */
function watchOptions(values: RunValues): { lockspace: LockspaceOptions | undefined; verifyInterval: number | undefined; onLockFailure: LockFailureAction | undefined } {
  const action = values['on-lock-failure'];
  if (action !== undefined && !(ACTIONS as readonly string[]).includes(action)) {
    throw usage(`--on-lock-failure needs one of ${ACTIONS.join(', ')}, got '${action}'`);
  }
  const lockspace = values.lockspace === undefined ? undefined : parseLockspaceSpec(values.lockspace, process.cwd());
  // On by default where the lockspace says its leases can be lost (a
  // capability, never its kind); --verify-interval 0 turns it off.
  let verifySeconds = values['verify-interval'] === undefined ? undefined : seconds(values['verify-interval'], '--verify-interval', 'zero');
  verifySeconds ??= openLockspace(lockspace).capabilities.losable ? DEFAULT_VERIFY_SECONDS : 0;
  const verifyInterval = verifySeconds === 0 ? undefined : Math.max(1, Math.round(verifySeconds * 1000));
  return { lockspace, verifyInterval, onLockFailure: action as LockFailureAction | undefined };
}

export async function run(argv: readonly string[], out: Output): Promise<number> {
  const dash = argv.indexOf('--');
  const { values, positionals } = parse(dash < 0 ? argv : argv.slice(0, dash), {
    adopt: { type: 'string' },
    exclusive: { type: 'string', multiple: true },
    shared: { type: 'string', multiple: true },
    readonly: { type: 'string', multiple: true },
    lockspace: { type: 'string' },
    wait: { type: 'string' },
    lifetime: { type: 'string' },
    'verify-interval': { type: 'string' },
    'on-lock-failure': { type: 'string' },
    'qemu-compatible': { type: 'boolean' },
    name: { type: 'string' },
    uuid: { type: 'string' },
    id: { type: 'string' },
    uri: { type: 'string' },
  });
  if (values.adopt === undefined && dash < 0) throw usage("run needs '--' before the command");
  if (positionals.length > 0) throw usage(`unexpected argument '${positionals[0]}'${dash < 0 ? '' : " before '--'"}`);
  if (values.adopt !== undefined) return adopt(values, dash >= 0, out);
  const [command, ...args] = argv.slice(dash + 1);
  if (command === undefined) throw usage("run needs a command after '--'");
  const timeout = values.wait === undefined ? undefined : seconds(values.wait, '--wait', 'zero') * 1000;
  const { lockspace, verifyInterval, onLockFailure } = watchOptions(values);
  const params: ManagerParams = {};
  if (values.name !== undefined) params.name = values.name;
  if (values.uuid !== undefined) params.uuid = values.uuid;
  if (values.uri !== undefined) params.uri = values.uri;
  if (values.id !== undefined) {
    if (!/^\d+$/.test(values.id)) throw usage(`--id needs an integer >= 0, got '${values.id}'`);
    params.id = Number(values.id);
  }
  const mgr = new LockManager({
    params,
    lockLifetime: values.lifetime as LockLifetime | undefined,
    lockspace,
    verifyInterval,
    onLockFailure,
  });
  let warned = false;
  let limited = false;
  try {
    const qemuCompatible = values['qemu-compatible'] === true;
    for (const mode of ['exclusive', 'shared', 'readonly'] as const satisfies readonly ResourceMode[]) {
      for (const path of values[mode] ?? []) mgr.registerResource({ type: 'disk', path, mode, qemuCompatible });
    }
    const exited = new Promise<ExitStatus>((resolve) => mgr.once('exit', resolve));
    mgr.on('orphans', (o) => {
      out.err(
        `lockmgr: ${command} exited, but the lease on ${o.resource} stays held by ${o.processes.map(describeProcess).join(', ')}, ` +
          `which it started and which still has the lease open; it ends when they exit or close it (see lockmgr status ${o.resource})\n`,
      );
    });
    mgr.on('lock-failure', (f) => {
      const what = f.action === 'poweroff' ? `killing ${command} (SIGKILL)` : f.action === 'pause' ? `stopping ${command} (SIGSTOP)` : `${command} runs on`;
      out.err(`lockmgr: lock lost: ${f.reason}; --on-lock-failure ${f.action}: ${what}\n`);
    });
    mgr.on('warning', (w) => {
      warned = true;
      if (w instanceof ResourceExhaustedError) limited = true;
      out.err(`lockmgr: warning: ${w.message}\n`);
    });
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
        await mgr.start(command, args, { stdio: 'inherit' }, timeout === undefined ? undefined : { timeout });
      } catch (err) {
        if (early !== undefined) return bySignal(early);
        throw err;
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
    return fail(err, out);
  } finally {
    await mgr.free();
  }
}

/**
 * `lockmgr run --adopt PID`: a new supervisor for a VM whose supervisor is
 * gone (LockManager.adopt). It takes over the leases the VM holds, forwards
 * SIGTERM, SIGINT and SIGHUP to it, and exits 0 once it has exited: the VM is
 * not lockmgr's child, so its exit status went to its parent.
 */
async function adopt(values: RunValues, command: boolean, out: Output): Promise<number> {
  if (command) throw usage("--adopt takes no command: the process runs already (drop '-- COMMAND')");
  if (!/^\d+$/.test(values.adopt!) || Number(values.adopt) < 1) throw usage(`--adopt needs a process id (an integer > 0), got '${values.adopt}'`);
  for (const flag of ['wait', 'lifetime', 'name', 'uuid', 'id', 'uri'] as const) {
    if (values[flag] !== undefined) throw usage(`--${flag} cannot be used with --adopt: the process runs already, under the lifetime 'child'`);
  }
  const resources: ResourceSpec[] = [];
  for (const mode of ['exclusive', 'shared', 'readonly'] as const satisfies readonly ResourceMode[]) {
    for (const path of values[mode] ?? []) resources.push({ type: 'disk', path, mode, qemuCompatible: values['qemu-compatible'] === true });
  }
  if (resources.length === 0) throw usage('--adopt needs every resource the process holds, each with its mode (--exclusive, --shared, --readonly PATH)');
  let mgr: LockManager;
  try {
    mgr = await LockManager.adopt(Number(values.adopt), { resources, ...watchOptions(values) });
  } catch (err) {
    return fail(err, out);
  }
  let warned = false;
  mgr.on('warning', (w) => {
    warned = true;
    out.err(`lockmgr: warning: ${w.message}\n`);
  });
  const exited = new Promise<ExitStatus>((resolve) => mgr.once('exit', resolve));
  // Not in our process group: whatever signal reaches lockmgr is meant for the VM too.
  const forward = (signal: NodeJS.Signals) => {
    if (mgr.state === 'running' || mgr.state === 'stopping') mgr.signal(signal);
  };
  for (const s of FORWARDED) process.on(s, forward);
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


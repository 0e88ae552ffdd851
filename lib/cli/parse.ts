// The command lines of run and status, checked before anything heavy is
// loaded: a usage error never needs the native addon. Every mistake is a
// usage error in the user's terms (the flag they typed, never an API name).
/**
 * A PATH as the user gave it, made absolute without normalising it: a peer
 * that names a lock file after the path as written (virtlockd) must meet the
 * same string ('/a//b' stays '/a//b').
 */
function absolute(p: string): string {
  return p === '' || p.startsWith('/') ? p : `${process.cwd().replace(/\/$/, '')}/${p}`;
}
import type { LockFailureAction, LockLifetime, ManagerParams, ResourceMode } from '../manager/types.js';
import { checkParam, MAX_TIMER_MS } from '../manager/validation.js';
import { EXIT, parse, usage } from './args.js';

const MODES = ['exclusive', 'shared', 'readonly'] as const satisfies readonly ResourceMode[];
const LIFETIMES = ['child', 'supervisor'] as const satisfies readonly LockLifetime[];
const ACTIONS = ['poweroff', 'pause', 'ignore'] as const satisfies readonly LockFailureAction[];

function seconds(value: string, flag: string): number {
  const n = Number(value);
  if (value.trim() === '' || !Number.isFinite(n) || n < 0) throw usage(`${flag} needs a number of seconds >= 0, got '${value}'`, 'run');
  return n;
}

/** The command line of a run, checked: every mistake here is a usage error naming the flag. */
export interface RunArgs {
  resources: Array<{ mode: ResourceMode; path: string; flag: string }>;
  command: string;
  args: string[];
  timeout: number | undefined;
  conflictExit: number;
  lifetime: LockLifetime | undefined;
  lockspace: string | undefined;
  qemuCompatible: boolean;
  params: ManagerParams;
  /** --verify-interval in seconds (0: never); undefined: the lockspace's default (run.ts). */
  verifySeconds: number | undefined;
  onLockFailure: LockFailureAction | undefined;
  /** --adopt PID: take over a running process instead of running a command (command is then ''). */
  adopt: number | undefined;
}

export function parseRun(argv: readonly string[]): RunArgs {
  const dash = argv.indexOf('--');
  const { values, positionals } = parse(dash < 0 ? argv : argv.slice(0, dash), {
    exclusive: { type: 'string', multiple: true },
    shared: { type: 'string', multiple: true },
    readonly: { type: 'string', multiple: true },
    lockspace: { type: 'string' },
    wait: { type: 'string' },
    'conflict-exit-code': { type: 'string', short: 'E' },
    'verify-interval': { type: 'string' },
    'on-lock-failure': { type: 'string' },
    adopt: { type: 'string' },
    lifetime: { type: 'string' },
    'qemu-compatible': { type: 'boolean' },
    name: { type: 'string' },
    uuid: { type: 'string' },
    id: { type: 'string' },
    uri: { type: 'string' },
  }, 'run');
  if (positionals.length > 0) throw usage(`unexpected argument '${positionals[0]}': the command goes after '--' (lockmgr run --exclusive PATH -- COMMAND)`, 'run');
  const resources = MODES.flatMap((mode) => (values[mode] ?? []).map((p) => ({ mode, flag: `--${mode}`, path: absolute(p) })));
  for (const r of resources) if (r.path === '') throw usage(`${r.flag} needs a PATH, got ''`, 'run');
  if (resources.length === 0) throw usage('nothing to lock: name at least one resource with --exclusive, --shared or --readonly PATH', 'run');
  for (const [i, r] of resources.entries()) {
    const other = resources.slice(0, i).find((x) => x.path === r.path && x.mode !== r.mode);
    if (other !== undefined) throw usage(`${r.path} is given as both ${other.flag} and ${r.flag}`, 'run');
  }
  let adopt: number | undefined;
  if (values.adopt !== undefined) {
    // Beyond a pid_t the API's own check would speak, in its words.
    if (!/^\d+$/.test(values.adopt) || Number(values.adopt) < 1 || Number(values.adopt) > 0x7fffffff) throw usage(`--adopt needs a process id (an integer from 1 to 2147483647), got '${values.adopt}'`, 'run');
    if (dash >= 0) throw usage("--adopt takes no command: the process runs already (drop '-- COMMAND')", 'run');
    for (const flag of ['wait', 'lifetime', 'name', 'uuid', 'id', 'uri'] as const) {
      if (values[flag] !== undefined) throw usage(`--${flag} cannot be used with --adopt: the process runs already, under the lifetime 'child'`, 'run');
    }
    if (values['qemu-compatible'] === true) throw usage("--qemu-compatible cannot be used with --adopt: QEMU's own locks cannot be taken over (yet)", 'run');
    adopt = Number(values.adopt);
  } else if (dash < 0) throw usage("the command is missing: put it after '--' (lockmgr run --exclusive PATH -- COMMAND)", 'run');
  const [command = '', ...args] = adopt === undefined ? argv.slice(dash + 1) : [];
  if (adopt === undefined && command === '') throw usage("the command is missing after '--'", 'run');
  const timeout = values.wait === undefined ? undefined : seconds(values.wait, '--wait') * 1000;
  const verifySeconds = values['verify-interval'] === undefined ? undefined : seconds(values['verify-interval'], '--verify-interval');
  if (verifySeconds !== undefined && Math.round(verifySeconds * 1000) > MAX_TIMER_MS) {
    throw usage(`--verify-interval must be at most ${Math.floor(MAX_TIMER_MS / 1000)} seconds (24 days), got '${values['verify-interval']}'`, 'run');
  }
  const action = values['on-lock-failure'];
  if (action !== undefined && !(ACTIONS as readonly string[]).includes(action)) throw usage(`--on-lock-failure needs one of ${ACTIONS.join(', ')}, got '${action}'`, 'run');
  if (action !== undefined && verifySeconds === 0) throw usage('--on-lock-failure needs the lease checks that --verify-interval 0 turns off: drop one of them', 'run');
  let conflictExit: number = EXIT.busy;
  const e = values['conflict-exit-code'];
  if (e !== undefined) {
    if (!/^\d+$/.test(e) || Number(e) > 255) throw usage(`--conflict-exit-code needs an exit status 0-255, got '${e}'`, 'run');
    conflictExit = Number(e);
  }
  if (values.lifetime !== undefined && !(LIFETIMES as readonly string[]).includes(values.lifetime)) {
    throw usage(`--lifetime must be 'child' or 'supervisor', got '${values.lifetime}'`, 'run');
  }
  const params: ManagerParams = {};
  if (values.id !== undefined) {
    if (!/^\d+$/.test(values.id) || !Number.isSafeInteger(Number(values.id))) throw usage(`--id needs an integer >= 0, got '${values.id}'`, 'run');
    params.id = Number(values.id);
  }
  for (const key of ['name', 'uuid', 'uri'] as const) {
    const v = values[key];
    if (v === undefined) continue;
    try {
      params[key] = checkParam(key, v)[1] as string;
    } catch {
      throw usage(key === 'uuid' ? `--uuid needs a UUID (8-4-4-4-12 hex digits, as 6f1b8c1e-3d2a-4c5b-9e7f-0a1b2c3d4e5f), got '${v}'` : `--${key} needs a non-empty value`, 'run');
    }
  }
  return {
    resources,
    command,
    args,
    timeout,
    conflictExit,
    lifetime: values.lifetime as LockLifetime | undefined,
    lockspace: values.lockspace,
    qemuCompatible: values['qemu-compatible'] === true,
    params,
    verifySeconds,
    onLockFailure: action as LockFailureAction | undefined,
    adopt,
  };
}

/** `lockmgr status`'s command line: PATHs made absolute. */
export interface StatusArgs {
  paths: string[];
  json: boolean;
  lockspace: string | undefined;
}

export function parseStatus(argv: readonly string[]): StatusArgs {
  const { values, positionals } = parse(argv, { json: { type: 'boolean' }, lockspace: { type: 'string' } }, 'status');
  if (positionals.length === 0) throw usage('a PATH is needed: lockmgr status PATH...', 'status');
  return { paths: positionals.map(absolute), json: values.json === true, lockspace: values.lockspace };
}

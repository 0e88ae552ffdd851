// The lockspaces by name: the one place that knows them all. Everything above
// (the manager, the CLI) asks for a lockspace by its configuration and then
// only ever talks to the driver contract (driver.ts).
import { resolve } from 'node:path';
import { InvalidArgumentError } from '../os/errors.js';
import { checkOneOf, checkOptions, describe } from '../os/validate.js';
import { directLockspace, type DirectLockspaceConfig } from './direct.js';
import type { LockspaceDriver } from './driver.js';
import { indirectLockspace, type IndirectLockspaceConfig } from './indirect.js';
import { checkSanlockConfig, sanlockLockspace, type SanlockLockspaceConfig } from './sanlock.js';

export type { DirectLockspaceConfig, IndirectLockspaceConfig, SanlockLockspaceConfig };
/** Where a manager's leases live (docs/lockspaces.md). */
export type LockspaceOptions = DirectLockspaceConfig | IndirectLockspaceConfig | SanlockLockspaceConfig;

const LOCKSPACES = {
  direct: directLockspace,
  indirect: indirectLockspace,
  sanlock: sanlockLockspace,
} as const satisfies Record<string, (config: unknown) => LockspaceDriver>;

export const LOCKSPACE_KINDS = Object.keys(LOCKSPACES) as Array<keyof typeof LOCKSPACES>;

/** The lockspace a configuration names (default: direct). InvalidArgumentError for a bad one; UnsupportedError where it cannot work here. */
export function openLockspace(config: unknown): LockspaceDriver {
  if (config === undefined) return directLockspace({ kind: 'direct' });
  const kind = checkOptions<{ kind?: unknown }>(config, ['kind', 'dir', 'lockspace', 'path', 'hostId'], 'lockspace').kind;
  return LOCKSPACES[kind === undefined ? 'direct' : checkOneOf(kind, LOCKSPACE_KINDS, 'lockspace.kind')](config);
}

/**
 * A lockspace as `lockmgr run|status --lockspace SPEC` names it, the inverse
 * of LockspaceDriver.cliSpec(): `direct`; `sanlock:NAME:PATH:HOSTID`; or a
 * directory (an indirect lockspace), relative to `cwd`. `flag` names the
 * option in errors, in the user's own words.
 */
export function parseLockspaceSpec(spec: string, cwd: string, flag = '--lockspace'): LockspaceOptions {
  if (spec === 'direct') return { kind: 'direct' };
  if (spec.startsWith('sanlock:')) {
    const m = /^sanlock:([^:]+):([^:]+):(\d+)$/.exec(spec);
    if (m === null) throw new InvalidArgumentError(`${flag} sanlock:NAME:PATH:HOSTID (the lockspace's name, its shared storage and this host's id), got ${describe(spec)}`);
    const config = { kind: 'sanlock' as const, lockspace: m[1]!, path: m[2]!, hostId: Number(m[3]) };
    try {
      checkSanlockConfig(config);
    } catch (err) {
      // In the spec's words (NAME, PATH, HOSTID), not the API's lockspace.* fields.
      const part: Record<string, string> = { lockspace: 'NAME', path: 'PATH', hostId: 'HOSTID' };
      throw new InvalidArgumentError(`${flag} sanlock:NAME:PATH:HOSTID: ${(err as Error).message.replace(/^lockspace\.(\w+)/, (w, f: string) => part[f] ?? w)}`);
    }
    return config;
  }
  if (spec === '') throw new InvalidArgumentError(`${flag} needs 'direct', a directory, or sanlock:NAME:PATH:HOSTID`);
  return { kind: 'indirect', dir: resolve(cwd, spec) };
}

export { LAST_LEASE_BYTE } from './ofd.js';
export { LOCKSPACE_SPEC_HELP, LOCKSPACE_TOOLS, type LockspaceTool } from './tools.js';

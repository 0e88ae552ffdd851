// LockManager.supervisorArgs(): a manager's configuration as `lockmgr run`
// flags, for running the same leases in a separate supervisor process.
import { InvalidStateError } from '../os/errors.js';
import type { Resource } from './resources.js';
import type { LockLifetime, ManagerParams } from './types.js';

export interface SupervisorConfig {
  attach: number | undefined;
  incoming: boolean;
  /** The lockspace as `--lockspace` names it (LockspaceDriver.cliSpec()). */
  lockspace: string;
  resources: readonly Resource[];
  lifetime: LockLifetime;
  params: ManagerParams;
  command: readonly string[];
}

/**
 * argv for bin/lockmgr.js: `run`, the lockspace, the resources, lifetime and
 * params, `--`, and the command. InvalidStateError when the CLI cannot express
 * the manager: an attached process, a migration target, named leases, or
 * QEMU-compatible locks on some resources but not all (the CLI's flag applies
 * to all).
 */
export function supervisorArgs(c: SupervisorConfig): string[] {
  if (c.attach !== undefined) throw new InvalidStateError('supervisorArgs(): lockmgr run cannot attach to a running process');
  if (c.incoming) throw new InvalidStateError('supervisorArgs(): lockmgr run cannot be a migration target');
  if (c.resources.some((r) => r.lease.kind === 'lease')) throw new InvalidStateError('supervisorArgs(): lockmgr run takes disks only, not leases');
  const qemu = c.resources.filter((r) => r.qemu !== undefined).length;
  if (qemu > 0 && qemu < c.resources.length) {
    throw new InvalidStateError('supervisorArgs(): lockmgr run applies --qemu-compatible to every resource, and only some of these are QEMU-compatible');
  }
  const argv = ['run'];
  argv.push('--lockspace', c.lockspace);
  for (const r of c.resources) argv.push(`--${r.mode}`, r.path);
  if (qemu > 0) argv.push('--qemu-compatible');
  argv.push('--lifetime', c.lifetime);
  for (const key of ['name', 'uuid', 'id', 'uri'] as const) {
    if (c.params[key] !== undefined) argv.push(`--${key}`, String(c.params[key]));
  }
  argv.push('--', ...c.command);
  return argv;
}

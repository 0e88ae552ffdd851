// Placeholder until the indirect lockspace lands (helper branch 'indirect').
import { UnsupportedError } from './errors.js';
import type { IndirectLockspaceConfig, Lease, Lockspace, ResourceMode } from './lockspace.js';

export function indirectLockspace(config: IndirectLockspaceConfig): Lockspace {
  throw new UnsupportedError(`indirect lockspaces are not available yet (${config.dir})`);
}

export function openLeaseResource(spec: { lockspace: string; key: string; path: string }, mode: ResourceMode): Lease {
  throw new UnsupportedError(`leases are not available yet (${spec.path} ${mode})`);
}

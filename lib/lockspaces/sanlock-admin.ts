// `lockmgr sanlock ...`: preparing shared storage for the sanlock lockspace
// (docs/sanlock.md). Every step is a call into this host's sanlock daemon.
import { parseArgs } from 'node:util';
import { InvalidArgumentError } from '../os/errors.js';
import { createDiskLease, createNamedLease, initStorage, joinLockspace, leaveLockspace, lockspaceState } from './sanlock-client.js';

export const SANLOCK_HELP = `usage:
  lockmgr sanlock init     --lockspace NAME --path DEVICE [--io-timeout SECONDS] [--max-hosts N]
  lockmgr sanlock join     --lockspace NAME --path DEVICE --host-id N [--io-timeout SECONDS]
  lockmgr sanlock leave    --lockspace NAME --path DEVICE --host-id N
  lockmgr sanlock joined   --lockspace NAME --path DEVICE --host-id N
  lockmgr sanlock add-disk --lockspace NAME --path DEVICE DISK...
  lockmgr sanlock add-lease --lockspace NAME --path DEVICE LEASE...

init      writes a new lockspace (offset 0) and an empty lease index (8 MiB) on
          DEVICE, destroying any leases there: once, before any host joins
join      joins this host's sanlock daemon as host N (1..2000, unique per host)
leave     leaves; sanlock kills this host's processes holding leases in it
joined    exit 0 if joined, 1 if not (also while a join is in progress:
          it then prints 'joining')
add-disk  creates the lease of each DISK (by its path, which must be the same
          on every host) and its two class leases (readonly, shared);
          existing leases are kept, missing class leases are added
add-lease creates each named lease (libvirt's <lease>), given as its file's
          path PATH/LOCKSPACE/KEY (the lease { path, lockspace, key } of the API)
`;

function int(value: string | undefined, what: string): number | undefined {
  if (value === undefined) return undefined;
  if (!/^\d+$/.test(value)) throw new InvalidArgumentError(`${what} needs an integer, got '${value}' (see lockmgr sanlock --help)`);
  return Number(value);
}

/** Runs `lockmgr sanlock ARGS`; resolves the exit code. Errors propagate to the CLI's mapping. */
export async function sanlockCommand(args: readonly string[], out: (text: string) => void): Promise<number> {
  const [action, ...rest] = args;
  if (action === undefined || action === '--help' || action === 'help') {
    out(SANLOCK_HELP);
    return 0;
  }
  let parsed;
  try {
    parsed = parseArgs({
      args: rest,
      options: { lockspace: { type: 'string' }, path: { type: 'string' }, 'host-id': { type: 'string' }, 'io-timeout': { type: 'string' }, 'max-hosts': { type: 'string' } },
      allowPositionals: action === 'add-disk' || action === 'add-lease',
      strict: true,
    });
  } catch (err) {
    throw new InvalidArgumentError(`${(err as Error).message} (see lockmgr sanlock --help)`);
  }
  const v = parsed.values;
  const base = { lockspace: v.lockspace as string, path: v.path as string };
  const hostId = int(v['host-id'], '--host-id') as number;
  const ioTimeout = int(v['io-timeout'], '--io-timeout');
  switch (action) {
    case 'init':
      await initStorage({ ...base, ioTimeout, maxHosts: int(v['max-hosts'], '--max-hosts') });
      out(`initialized lockspace ${base.lockspace} and its lease index on ${base.path}\n`);
      return 0;
    case 'join': {
      const t0 = Date.now();
      const r = await joinLockspace({ ...base, hostId, ioTimeout });
      out(r.wasJoined ? `already joined ${base.lockspace} as host ${hostId}\n` : `joined ${base.lockspace} as host ${hostId} in ${((Date.now() - t0) / 1000).toFixed(1)} s\n`);
      return 0;
    }
    case 'leave': {
      const r = await leaveLockspace({ ...base, hostId });
      out(r.wasJoined ? `left ${base.lockspace}\n` : `not joined to ${base.lockspace}\n`);
      return 0;
    }
    case 'joined': {
      const state = await lockspaceState({ ...base, hostId });
      if (state === 'joining') out(`joining ${base.lockspace} as host ${hostId}: not joined yet\n`);
      return state === 'joined' ? 0 : 1;
    }
    case 'add-disk':
    case 'add-lease': {
      const what = action === 'add-disk' ? 'DISK' : 'LEASE';
      if (parsed.positionals.length === 0) throw new InvalidArgumentError(`${action} needs at least one ${what} (see lockmgr sanlock --help)`);
      for (const name of parsed.positionals) {
        const r = action === 'add-disk' ? await createDiskLease({ ...base, disk: name }) : await createNamedLease({ ...base, lease: name });
        const c = r.classes;
        out(`${name}: lease ${r.created ? 'created' : 'exists'} at offset ${r.offset}; class leases ${c.created ? 'created' : 'exist'} at offsets ${c.readonly} (readonly), ${c.shared} (shared)\n`);
      }
      return 0;
    }
    default:
      throw new InvalidArgumentError(`unknown sanlock action '${action}' (see lockmgr sanlock --help)`);
  }
}

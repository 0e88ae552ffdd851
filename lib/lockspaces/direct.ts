// The direct lockspace: the lease is an OFD lock on the image or block device
// itself (byte 0), as virtlockd's direct mode locks it. Nothing else is needed:
// every process that opens the image sees the lease.
import { InvalidArgumentError } from '../os/errors.js';
import { checkOptions, describe } from '../os/validate.js';
import type { Capabilities, LeaseStatus, LockspaceConfig, ResourceMode, ResourceName } from './driver.js';
import { byteStatus, fixedSlot, leaseHolders, OFD_CAPABILITIES, OfdLease, OfdLockspace, openDiskFile, openLoopBacking } from './ofd.js';
import { inspectNamedLease, openNamedLease } from './named-lease.js';

export interface DirectLockspaceConfig {
  kind: 'direct';
}

export class DirectLockspace extends OfdLockspace {
  readonly kind = 'direct';
  readonly config: DirectLockspaceConfig = Object.freeze({ kind: 'direct' });
  readonly capabilities: Capabilities = Object.freeze({
    ...OFD_CAPABILITIES,
    // The image is the lease: nothing outside the protocol can take it away short of replacing the image.
    losable: false,
    // As shared as the filesystem's locks are (one kernel, or NFSv4's lock manager).
    multiHost: false,
  });

  protected openLease(name: ResourceName, mode: ResourceMode): OfdLease {
    // A named lease is a lock file of its own, the same in every OFD lockspace.
    if (name.type === 'lease') return openNamedLease(name, mode);
    // A shared or readonly lease is a read lock, which needs only read
    // access: a disk on a read-only filesystem, or a base image the VM may
    // not write, can still be leased shared.
    const access = mode === 'exclusive' ? 'readwrite' : 'read';
    const file = openDiskFile(name.path, access);
    let backing;
    try {
      // A loop device's lease is also its backing file's, all or nothing (the slots are taken in the one global order).
      backing = openLoopBacking(file, access);
    } catch (err) {
      file.close();
      throw err;
    }
    const slots = backing === null ? [fixedSlot(file)] : [fixedSlot(file), fixedSlot(backing)];
    return new OfdLease(file.identity.key, name.path, file.kind, mode, slots, file);
  }

  sameAs(config: LockspaceConfig): boolean {
    return config.kind === 'direct';
  }

  describe(): string {
    return 'direct';
  }

  cliSpec(): string {
    return 'direct';
  }

  async inspect(name: ResourceName): Promise<LeaseStatus> {
    if (name.type === 'lease') return inspectNamedLease(name);
    const file = openDiskFile(name.path, 'read');
    try {
      return { lockspace: 'direct', locations: [{ what: 'image', path: file.path, exists: true, lease: byteStatus(file, 0), guard: byteStatus(file, 1), holders: leaseHolders(file) }] };
    } finally {
      file.close();
    }
  }
}

export function directLockspace(config: unknown): DirectLockspace {
  const c = checkOptions<{ kind?: unknown; dir?: unknown }>(config, ['kind', 'dir'], 'lockspace');
  if (c.dir !== undefined) throw new InvalidArgumentError("lockspace.dir is for kind 'indirect'; a direct lockspace locks the images themselves");
  if (c.kind !== undefined && c.kind !== 'direct') throw new InvalidArgumentError(`lockspace.kind must be 'direct', got ${describe(c.kind)}`);
  return new DirectLockspace();
}

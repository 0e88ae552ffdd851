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
    const slots = backing === null ? [fixedSlot(file, file.kind === 'block-device' ? 'device node' : undefined)] : [fixedSlot(file, 'device node'), fixedSlot(backing, 'backing file')];
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
    let backing = null;
    try {
      backing = openLoopBacking(file, 'read');
      const at = (f: typeof file, what: string) => ({ what, path: f.path, exists: true, lease: byteStatus(f, 0), guard: byteStatus(f, 1), holders: leaseHolders(f) });
      // A loop device's lease is its backing file's too.
      return { lockspace: 'direct', locations: backing === null ? [at(file, 'image')] : [at(file, 'image'), at(backing, 'backing file')] };
    } finally {
      backing?.close();
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

// The indirect lockspace: leases live in lock files in a directory shared by
// every host that must see them, as with libvirt's virtlockd and its
// file_lockspace_dir. docs/lockspaces.md describes the layout; the lock-file
// protocol is lib/lockspaces/lock-files.ts.
import { createHash } from 'node:crypto';
import { readFileSync, realpathSync, statSync, type BigIntStats } from 'node:fs';
import { hostname } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { InvalidArgumentError, ResourceAccessError } from '../os/errors.js';
import { openLockable, type LockableFile } from '../os/locks.js';
import { major, minor } from '../os/proc-locks.js';
import { checkOptions, checkPath, describe } from '../os/validate.js';
import type { Capabilities, LeaseStatus, LockspaceConfig, ResourceMode, ResourceName } from './driver.js';
import { checkLockDir, LockFileSlot } from './lock-files.js';
import { inspectNamedLease, openNamedLease } from './named-lease.js';
import { byteStatus, canonicalBlockNode, leaseHolders, OFD_CAPABILITIES, OfdLease, OfdLockspace, openDiskFile, openLoopBacking } from './ofd.js';

export interface IndirectLockspaceConfig {
  kind: 'indirect';
  /** The directory of lock files, shared by every host that must see the leases. */
  dir: string;
}

/**
 * The version of the lock-file naming scheme: which names a disk's lease
 * takes in the directory (see diskNames). Lock files are shared by every host
 * and every release of lockmgr (and virtlockd) on the same storage: changing
 * the scheme needs a new version and a test that the previous version and the
 * new one still exclude each other in both directions (docs/architecture.md).
 * 1: a regular file's realpath and inode names. 2: also the path as given,
 * when it differs from the realpath (virtlockd hashes the path as written in
 * the domain XML, symlinks and all); a superset of 1, so the two exclude each
 * other through the realpath and inode files.
 */
export const LOCK_FILE_NAMES_VERSION = 2;

/** Where a lock file's name comes from: `given` is the path exactly as the caller wrote it, when that is not the realpath. */
export type LockFileSource = 'path' | 'given' | 'inode' | 'wwid' | 'lvm' | 'serial';

/** One lock file of a lease, as `describeDisk()` and `Lease` users see it. */
export interface LockFileName {
  /** The file name in the lockspace directory: sha256 hex of `identity`. */
  readonly name: string;
  /** The lock file's full path. */
  readonly path: string;
  /** The string that was hashed: a canonical path or the path as given (virtlockd's names), `inode:...`, `wwid:...`, `lvm:...` or `serial:...`. */
  readonly identity: string;
  readonly source: LockFileSource;
}

/** Which lock files a disk's lease uses, in the order they are locked. */
export interface DiskLockNames {
  /** Lease.key: the name of the first lock file. */
  readonly key: string;
  readonly kind: 'file' | 'block-device';
  readonly files: readonly LockFileName[];
}

function sha256(text: string): string {
  return createHash('sha256').update(text, 'utf8').digest('hex');
}

/** A lock file's name for an identity string: its sha256, lowercase hex. For a canonical path this is virtlockd's name. */
export function lockFileName(identity: string): string {
  return sha256(identity);
}

function readTrimmed(path: string): string | null {
  try {
    const text = readFileSync(path, 'utf8').trim();
    return text === '' ? null : text;
  } catch {
    return null;
  }
}

let cachedHostId: string | undefined;

/**
 * This running kernel, for inode lock names: its boot id, else
 * /etc/machine-id, else the host name. Device and inode numbers mean something
 * only within one running kernel, which is what the boot id names: containers
 * with their own machine-id on one kernel still share it, and two hosts'
 * unrelated files never collide.
 */
export function hostId(): string {
  cachedHostId ??= readTrimmed('/proc/sys/kernel/random/boot_id') ?? readTrimmed('/etc/machine-id') ?? hostname();
  return cachedHostId;
}

/** The identity string of a regular file's inode lock: `inode:<host id>:<st_dev>:<st_ino>`. */
export function inodeIdentity(dev: bigint, ino: bigint, host = hostId()): string {
  return `inode:${host}:${dev}:${ino}`;
}

/**
 * A block device's persistent identity, the same on every host that sees the
 * disk, or null for one without (a loop device, most virtio disks without a
 * serial). In order of preference: the WWN (`wwid`), the LVM UUID (`dm/uuid`
 * starting with `LVM-`), the serial number. A partition takes its disk's
 * identity plus `:part<N>`.
 */
export function blockDeviceIdentity(rdev: bigint): { identity: string; source: 'wwid' | 'lvm' | 'serial' } | null {
  let dev: string;
  try {
    dev = realpathSync(`/sys/dev/block/${major(rdev)}:${minor(rdev)}`);
  } catch {
    return null;
  }
  let disk = dev;
  let part = '';
  const partition = readTrimmed(join(dev, 'partition'));
  if (partition !== null) {
    disk = dirname(dev);
    part = `:part${partition}`;
  }
  const wwid = readTrimmed(join(disk, 'wwid')) ?? readTrimmed(join(disk, 'device', 'wwid'));
  if (wwid !== null) return { identity: `wwid:${wwid}${part}`, source: 'wwid' };
  const uuid = readTrimmed(join(disk, 'dm', 'uuid'));
  if (uuid !== null && uuid.startsWith('LVM-')) return { identity: `lvm:${uuid}${part}`, source: 'lvm' };
  const serial = readTrimmed(join(disk, 'serial')) ?? readTrimmed(join(disk, 'device', 'serial'));
  if (serial !== null) return { identity: `serial:${serial}${part}`, source: 'serial' };
  return null;
}

function checkSameDir(dir: string, expected: BigIntStats, what: string): void {
  const st = checkLockDir(dir, what);
  if (st.dev !== expected.dev || st.ino !== expected.ino) {
    throw new ResourceAccessError(`${what} '${dir}' was replaced by another directory since the lockspace was set up; set it up again`);
  }
}

/** The lock file names of a disk opened as `image` (through `path`). */
function diskNames(dir: string, path: string, image: LockableFile): DiskLockNames {
  const file = (identity: string, source: LockFileSource): LockFileName => {
    const name = lockFileName(identity);
    return { name, path: join(dir, name), identity, source };
  };
  if (image.kind === 'file') {
    const real = realpathSync(path);
    const st = statSync(real, { bigint: true });
    if (st.dev !== image.identity.dev || st.ino !== image.identity.ino) {
      throw new ResourceAccessError(`'${path}' changed while its lease was being opened (it now resolves to '${real}', another file); try again`);
    }
    // Every name a peer could know the disk by: virtlockd hashes whichever
    // spelling its domain XML has, byte for byte (a symlink, '//', '/./'
    // included). The path we were given opened this very inode (image).
    const files = [file(real, 'path')];
    if (path !== real) files.push(file(path, 'given'));
    files.push(file(inodeIdentity(image.identity.dev, image.identity.ino), 'inode'));
    return { key: files[0]!.name, kind: 'file', files };
  }
  const id = blockDeviceIdentity(image.identity.dev);
  const f = id !== null ? file(id.identity, id.source) : file(canonicalBlockNode(image.identity.dev) ?? realpathSync(path), 'path');
  return { key: f.name, kind: 'block-device', files: [f] };
}

/** The indirect lockspace over `config.dir`, checked now (checkLockDir) and again, for being the same directory, at every open. */
export class IndirectLockspace extends OfdLockspace {
  readonly kind = 'indirect';
  readonly config: IndirectLockspaceConfig;
  readonly capabilities: Capabilities = Object.freeze({
    ...OFD_CAPABILITIES,
    // A tmp cleaner or an operator can delete a lock file under its holder.
    losable: true,
    // As shared as the directory: an NFS or cluster filesystem with working locks.
    multiHost: true,
  });
  readonly #dirStat: BigIntStats;

  constructor(config: unknown) {
    super();
    const c = checkOptions<IndirectLockspaceConfig>(config, ['kind', 'dir'], 'lockspace');
    if (c.kind !== 'indirect') throw new InvalidArgumentError(`lockspace.kind must be 'indirect', got ${describe(c.kind)}`);
    // resolve(): normalized and without a trailing slash, so that '/d/' and '/d' are one lockspace.
    const dir = resolve(checkPath(c.dir, 'lockspace.dir'));
    this.#dirStat = checkLockDir(dir, 'lockspace dir');
    this.config = Object.freeze({ kind: 'indirect', dir });
  }

  get dir(): string {
    return this.config.dir;
  }

  protected openLease(name: ResourceName, mode: ResourceMode): OfdLease {
    if (name.type === 'lease') return openNamedLease(name, mode);
    checkPath(name.path);
    // The image is opened for its identity only, so read access will do: it
    // may be on a read-only filesystem or not writable by us at all.
    const image = openDiskFile(name.path, 'read');
    const slots: LockFileSlot[] = [];
    try {
      const names = this.#describeOpen(name.path, image);
      // A disk's lock files are lockmgr's own, named after the disk.
      for (const f of names.files) slots.push(new LockFileSlot(f.path, { deletable: true }));
      return new OfdLease(names.key, name.path, names.kind, mode, slots, image);
    } catch (err) {
      for (const s of slots) s.close();
      image.close();
      throw err;
    }
  }

  /** The lock files a disk's lease uses, without creating or locking any (the disk is opened for reading, briefly). */
  describeDisk(path: string): DiskLockNames {
    checkPath(path);
    const image = openDiskFile(path, 'read');
    try {
      return this.#describeOpen(path, image);
    } finally {
      image.close();
    }
  }

  /**
   * The same directory, whatever path reaches it: one host may name it through
   * a symlinked parent (/var/run/lockmgr and /run/lockmgr). Real paths are
   * compared; a dir that cannot be resolved here is not this one.
   */
  sameAs(config: LockspaceConfig): boolean {
    const dir = (config as Partial<IndirectLockspaceConfig>).dir;
    if (config.kind !== 'indirect' || typeof dir !== 'string') return false;
    if (dir === this.config.dir) return true;
    try {
      return realpathSync(dir) === realpathSync(this.config.dir);
    } catch {
      return false;
    }
  }

  describe(): string {
    return `indirect (dir ${this.config.dir})`;
  }

  cliSpec(): string {
    return this.config.dir;
  }

  async inspect(name: ResourceName): Promise<LeaseStatus> {
    if (name.type === 'lease') return inspectNamedLease(name);
    return {
      lockspace: this.describe(),
      locations: this.describeDisk(name.path).files.map((f) => {
        let file: LockableFile;
        try {
          file = openLockable(f.path, { access: 'read' });
        } catch {
          // Not there: nobody holds it (a lock file exists while someone uses it).
          return { what: `lock file (${f.source})`, path: f.path, exists: false, lease: { state: 'free', holder: null }, guard: { state: 'free', holder: null }, detail: { source: f.source, identity: f.identity } };
        }
        try {
          return { what: `lock file (${f.source})`, path: f.path, exists: true, lease: byteStatus(file, 0), guard: byteStatus(file, 1), holders: leaseHolders(file), detail: { source: f.source, identity: f.identity } };
        } finally {
          file.close();
        }
      }),
    };
  }

  #describeOpen(path: string, image: LockableFile): DiskLockNames {
    checkSameDir(this.config.dir, this.#dirStat, 'lockspace dir');
    const names = diskNames(this.config.dir, path, image);
    // A loop device's lease is also its backing file's: the backing file's own lock files, all or nothing.
    const backing = openLoopBacking(image, 'read');
    if (backing === null) return names;
    try {
      const more = diskNames(this.config.dir, backing.path, backing).files.filter((f) => !names.files.some((n) => n.name === f.name));
      return { ...names, files: [...names.files, ...more] };
    } finally {
      backing.close();
    }
  }
}

export function indirectLockspace(config: unknown): IndirectLockspace {
  return new IndirectLockspace(config);
}

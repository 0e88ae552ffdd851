// The sanlock lockspace: leases on shared storage that exclude across hosts
// (docs/sanlock.md).
//
// How a lease is tied to the VM: sanlock leases belong to a *registered
// process*. The daemon records the pid that connected in sanlock_register
// (SO_PEERCRED), SIGKILLs that pid when the lease can no longer be renewed,
// and releases its leases when the registration connection closes, that is
// when the process exits. So the VM itself must be the registered process.
// spawnGated() runs the command through native/sanlock-exec.c with the VM's
// own pid: the helper registers and waits; the supervisor acquires every lease
// for that pid (sanlock_acquire(-1, pid)) from its own connection; only then
// does the helper exec the command. If the acquire fails, the helper exits
// without exec'ing: the VM never runs without its leases. The leases then
// live exactly as long as the VM, whatever happens to the supervisor (as
// lockLifetime 'child' does with OFD locks), and a lease lost on the storage
// kills the VM, not the supervisor.
import { writeSync } from 'node:fs';
import { Socket } from 'node:net';
import { AbortError, InvalidArgumentError, LockTimeoutError, ResourceAccessError, ResourceBusyError, SpawnError, UnsupportedError, systemError, type ProcessInfo } from '../os/errors.js';
import type { LockableFile } from '../os/locks.js';
import { native, nativeError } from '../os/native.js';
import { checkOptions } from '../os/validate.js';
import { byKey, checkMode, deadlineOf, pauseFor, rolledBack } from './common.js';
import type { Capabilities, Lease, LeaseStatus, LockspaceConfig, LockspaceDriver, ResourceMode, ResourceName, StartLimits, StartPlan, TakeOptions } from './driver.js';
import { leaseFilePath } from './named-lease.js';
import { openDiskFile } from './ofd.js';
import {
  acquireFor,
  classResourceName,
  diskResourceName,
  leaseResourceName,
  lookupLease,
  errorFor,
  execHelperPath,
  hostName,
  inquireRaw,
  leaseOwners,
  lockspaceJoined,
  lockspaceJoinedSettled,
  releaseAllFor,
  releaseFor,
  requireLibrary,
  RV,
  sanlockCause,
  type LeaseAddress,
  type LeaseClass,
} from './sanlock-client.js';
import { spawnSupervised, type ExitStatus, type SpawnOptions, type SupervisedProcess } from '../os/supervise.js';
import { describe } from '../os/validate.js';

/** How long the helper may take to register, and to exec. */
const HELPER_TIMEOUT_MS = 10_000;
/** Between two acquire attempts while another host holds the lease: sanlock never waits by itself. */
const RETRY_MIN_MS = 50;
const RETRY_MAX_MS = 1000;

/**
 * A paxos round lost to another host taking the same lease at the same moment
 * (OWNED, OTHER: "acquired by another host in other ballot / in local
 * commit"; SHRETRY), or a release or round still on the storage (EAGAIN):
 * seen when two hosts take a shared lease at once. Worth a few quick retries
 * even without a wait.
 */
const TRANSIENT = new Set<number>([RV.EAGAIN, RV.SANLK_ACQUIRE_OWNED, RV.SANLK_ACQUIRE_OTHER, RV.SANLK_ACQUIRE_SHRETRY]);
const BUSY = new Set<number>([RV.SANLK_ACQUIRE_IDLIVE, RV.EEXIST, ...TRANSIENT]);
/** How long exitFailure() waits for the daemon to drop an exited owner's leases. */
const EXIT_RELEASE_MS = 5000;
/** How often a fail-fast acquire retries EAGAIN, RETRY_MIN_MS apart. */
const TRANSIENT_RETRIES = 4;
/**
 * A daemon that has not answered this long after start()'s deadline is taken
 * for hung: the gate gives up on it (SIGKILLs the helper) instead of waiting.
 * The grace lets an answering daemon's own LockTimeoutError (naming the
 * holder) come first.
 */
const HUNG_GRACE_MS = 2000;
/** After free(), an abort or a hung daemon: how long the gate still waits for the daemon to forget the helper. */
const INTERRUPTED_FORGET_MS = 1000;

/** The sanlock waits' pause: AbortError says the wait for a sanlock lease was aborted. */
const sleep = (ms: number, signal: AbortSignal | undefined): Promise<void> => pauseFor(ms, signal, 'The wait for a sanlock lease');

/** p, or 'late' after ms (the daemon call goes on: a native thread cannot be interrupted). */
function within<T>(p: Promise<T>, ms: number): Promise<T | 'late'> {
  let t: NodeJS.Timeout | undefined;
  const late = new Promise<'late'>((resolve) => (t = setTimeout(() => resolve('late'), Math.max(0, ms))));
  return Promise.race([p, late]).finally(() => clearTimeout(t));
}

/**
 * Resolves true once this host's daemon no longer knows an exited process: it
 * releases a dead client's leases asynchronously (its status shows them as
 * "REM" for a few ms, longer under load). False after ms (EXIT_RELEASE_MS),
 * also when the daemon does not answer: a child of the process may have
 * inherited its registration, or the daemon hangs.
 */
async function forgotten(pid: number, ms = EXIT_RELEASE_MS): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    const r = await within(inquireRaw(pid).catch(() => null), end - Date.now());
    if (r === 'late') return false;
    if (r === null || r.rv === RV.ESRCH || r.rv === RV.ENOENT || r.rv === RV.ECONNREFUSED) return true;
    await sleep(10, undefined);
  }
  return false;
}

/**
 * The read end of the exec helper's status pipe, read on the event loop
 * (non-blocking, through a libuv pipe handle): no native worker waits on it,
 * so a start never queues behind a lockspace join. Owns the fd.
 */
class StatusPipe {
  #buf = '';
  #eof = false;
  #error: Error | null = null;
  #wake: (() => void) | null = null;
  readonly #socket: Socket;

  constructor(fd: number) {
    this.#socket = new Socket({ fd, readable: true, writable: false, allowHalfOpen: true });
    this.#socket.setEncoding('utf8');
    this.#socket.on('data', (d: string) => {
      this.#buf += d;
      this.#wake?.();
    });
    this.#socket.on('end', () => {
      this.#eof = true;
      this.#wake?.();
    });
    this.#socket.on('error', (err) => {
      this.#error = err;
      this.#eof = true;
      this.#wake?.();
    });
  }

  /** The next line (without \n); '' at EOF; rv ETIMEDOUT after ms, or -errno on a read error. */
  async line(ms: number): Promise<{ rv: number; line: string }> {
    const end = Date.now() + ms;
    for (;;) {
      const nl = this.#buf.indexOf('\n');
      if (nl >= 0) {
        const line = this.#buf.slice(0, nl);
        this.#buf = this.#buf.slice(nl + 1);
        return { rv: 0, line };
      }
      if (this.#eof) {
        const line = this.#buf;
        this.#buf = '';
        return { rv: this.#error !== null ? ((this.#error as NodeJS.ErrnoException).errno ?? RV.EIO) : 0, line };
      }
      const left = end - Date.now();
      if (left <= 0) return { rv: RV.ETIMEDOUT, line: '' };
      let t: NodeJS.Timeout | undefined;
      await new Promise<void>((resolve) => {
        this.#wake = resolve;
        t = setTimeout(resolve, left);
      });
      clearTimeout(t);
      this.#wake = null;
    }
  }

  close(): void {
    this.#socket.destroy();
  }
}

function pipe(): [number, number] {
  const out = new Int32Array(2);
  const rv = native.makePipe(out);
  if (rv < 0) throw nativeError(rv, "sanlock: cannot make the exec helper's pipes");
  return [out[0]!, out[1]!];
}

export interface SanlockLockspaceConfig {
  kind: 'sanlock';
  /** The sanlock lockspace's name, the same on every host (docs/sanlock.md). */
  lockspace: string;
  /** The shared device or file holding the lockspace and the lease index; the same storage on every host. */
  path: string;
  /** This host's id in the lockspace, as joined (for lease-loss diagnosis and messages). */
  hostId: number;
}

export function checkSanlockConfig(config: unknown): SanlockLockspaceConfig {
  const { lockspace, path, hostId } = checkOptions<Record<string, unknown>>(config, ['kind', 'lockspace', 'path', 'hostId'], 'lockspace');
  if (typeof lockspace !== 'string' || lockspace === '' || Buffer.byteLength(lockspace) > 48 || /[\0:\s]/.test(lockspace)) {
    throw new InvalidArgumentError(`lockspace.lockspace must be a sanlock lockspace name (1 to 48 bytes, no ':' or white space), got ${describe(lockspace)}`);
  }
  if (typeof path !== 'string' || !path.startsWith('/') || path.includes(':') || path.includes('\0')) {
    throw new InvalidArgumentError(`lockspace.path must be the absolute path of the shared lease storage, without ':', got ${describe(path)}`);
  }
  if (typeof hostId !== 'number' || !Number.isInteger(hostId) || hostId < 1 || hostId > 2000) {
    throw new InvalidArgumentError(`lockspace.hostId must be this host's id in the lockspace (1 to 2000), got ${describe(hostId)}`);
  }
  return { kind: 'sanlock', lockspace, path, hostId };
}

type Owner = { hostId: number; generation: number };

/** A readonly or shared lease's class resources (version 2 of the names): its own and the other class's, with their offsets once known. */
interface ClassLeases {
  mode: LeaseClass;
  theirMode: LeaseClass;
  mine: LeaseAddress;
  theirs: LeaseAddress;
  offsets: { mine: number; theirs: number };
}

/** How to create a lease: the API call, or the command ('(apiCall(), or lockmgr COMMAND)', which the CLI shortens to the command). */
function createAdvice(resource: string): string {
  return resource.startsWith('lml') ? 'createNamedLease(), or lockmgr sanlock add-lease' : 'createDiskLease(), or lockmgr sanlock add-disk';
}

/** A lease whose class resources are not in the index: created by a release of lockmgr before class leases (names version 1). */
function missingClass(disk: string, cls: ClassLeases): ResourceAccessError {
  return new ResourceAccessError(
    `${disk} has no ${cls.mode} class lease (${cls.mine.resource}) in sanlock lockspace ${cls.mine.lockspace}: its lease was created by a lockmgr before sanlock names version 2, which cannot keep readonly and shared leases apart; create its leases again (${createAdvice(cls.mine.resource)})`,
  );
}

/** One sanlock lease, and the image (QEMU's locks, identity) of a disk. */
interface OwnedLease {
  take(o: TakeOptions): Promise<void>;
  /** Marks the lease held by the owner already (adopt()): at `offset` in the lease index, with its class resource at `classOffset` (readonly, shared). */
  adopted(offset: number, classOffset?: number): void;
  release(): void;
  stillHeld(): Promise<boolean>;
}

class SanlockLease implements Lease {
  constructor(
    readonly key: string,
    readonly path: string,
    readonly kind: Lease['kind'],
    readonly mode: ResourceMode,
    readonly image: LockableFile | null,
    readonly locations: readonly string[],
    readonly owned: OwnedLease,
  ) {}

  get fds(): number[] {
    // A read-only descriptor of the VM's own image; QEMU's locks no longer
    // live on it (the manager has its own descriptor for them), but no harm.
    return this.image === null || this.image.closed ? [] : [this.image.fd];
  }

  close(): void {
    this.image?.close();
  }
}

export class SanlockLockspace implements LockspaceDriver {
  readonly kind = 'sanlock';
  readonly config: SanlockLockspaceConfig;
  readonly capabilities: Capabilities = Object.freeze({
    // Leases belong to a process that registered with the daemon before it ran.
    attach: false,
    // The daemon says which leases a registered pid holds (inquire), and acquires and releases for it.
    adopt: true,
    // A sanlock lease has no second byte; a migration target acquires with the source's lease versions instead (migrationState).
    handoverGuard: false,
    // A lease the daemon cannot renew on the storage is lost, and the daemon kills its holder.
    losable: true,
    // Taken for the registered process's pid: the VM's own, whenever taken.
    hotplugHeldByChild: true,
    migrationState: true,
    multiHost: true,
    // A sanlock lease has only shared and exclusive: readonly and shared take
    // a class resource each beside the main lease, take-then-check (#takeClass).
    readersExcludeWriters: true,
  });
  onWarning: (err: unknown) => void = () => undefined;
  /** The registered process the leases are acquired for; null when there is none (yet, or any more). */
  #owner: number | null = null;
  /** The owner that has just exited, until exitFailure() has seen the daemon let go of it. */
  #exited: number | null = null;
  /** The last sanlock_inquire state of the owner: "ls:res:path:offset:lver ...". */
  #state: string | undefined;
  /** lver by resource name, from the source's state: a migration target acquires with it. */
  #incoming = new Map<string, number>();
  /** The resource names of the leases held now (take()n and not released). */
  readonly #held = new Set<string>();
  /** Releases queued and not yet answered. */
  readonly #releases = new Set<Promise<void>>();
  /**
   * Leases acquired for the owner and not yet seen released on the storage,
   * by resource name. A release the daemon answers is written already; the
   * leases of an owner that exits are released by the daemon's resource
   * thread after it has forgotten the pid (sanlock's resources_rem, "REM" in
   * its status), and until that write other hosts find them held.
   */
  readonly #onStorage = new Map<string, { disk: string; address: LeaseAddress; offset: number; shared: boolean }>();

  constructor(config: unknown) {
    this.config = Object.freeze(checkSanlockConfig(config));
    requireLibrary();
  }

  /**
   * A disk's lease is the sanlock resource named after its path (the same path
   * on every host); a named lease's is named after <path>/<lockspace>/<key>.
   * Both live in this lockspace's lease index (created once, from any host:
   * `lockmgr sanlock add-disk` / `add-lease`). A disk is also opened, for
   * reading, like in every lockspace: for its identity.
   */
  open(name: ResourceName, mode: ResourceMode): SanlockLease {
    checkMode(mode);
    const resource = name.type === 'lease' ? leaseResourceName(leaseFilePath(name)) : diskResourceName(name.path);
    const address: LeaseAddress = { lockspace: this.config.lockspace, resource, path: this.config.path };
    const image = name.type === 'disk' ? openDiskFile(name.path, 'read') : null;
    const path = name.type === 'lease' ? leaseFilePath(name) : name.path;
    const kind = image?.kind ?? 'lease';
    const where = `sanlock ${address.lockspace}:${address.resource}`;
    return new SanlockLease(`sanlock:${address.lockspace}:${address.resource}`, path, kind, mode, image, [where], this.#owned(path, address, mode));
  }

  async acquire(leases: readonly Lease[], options: TakeOptions): Promise<void> {
    const deadline = deadlineOf(options.timeout);
    const taken: SanlockLease[] = [];
    try {
      for (const lease of [...(leases as readonly SanlockLease[])].sort((a, b) => byKey(a.key, b.key))) {
        await lease.owned.take({ wait: options.wait, timeout: deadline === undefined ? undefined : Math.max(0, deadline - Date.now()), signal: options.signal, onBusy: options.onBusy });
        taken.push(lease);
      }
    } catch (err) {
      for (const l of taken.reverse()) l.owned.release();
      throw rolledBack(err, taken);
    }
  }

  release(lease: Lease): void {
    (lease as SanlockLease).owned.release();
  }

  /** A sanlock lease is the daemon's, tied to the registered pid: nothing is shared through a file description. */
  sharers(leases: readonly Lease[]): Map<Lease, ProcessInfo[]> {
    return new Map(leases.map((l) => [l, []]));
  }

  abandon(lease: Lease): void {
    this.release(lease);
  }

  /** No handover guard here (capabilities.handoverGuard): the manager never asks for one. */
  async guard(): Promise<void> {}

  releaseGuard(): void {}

  /**
   * Takes over the lease a running process holds: the daemon is asked which
   * leases that pid holds (sanlock_inquire(-1, pid)), and the named one must
   * be among them, in this mode; from then on this lockspace acquires and
   * releases for that pid, as if it had started it. A process registered
   * with another host's daemon, or with none, holds nothing here.
   */
  async adopt(name: ResourceName, mode: ResourceMode, holder: SupervisedProcess): Promise<Lease> {
    if (this.#owner !== null && this.#owner !== holder.pid) {
      throw new InvalidArgumentError(`this lockspace acquires for process ${this.#owner} already; it cannot adopt process ${holder.pid} too`);
    }
    const lease = this.open(name, mode);
    try {
      const r = await inquireRaw(holder.pid);
      if (r.rv === RV.ESRCH) {
        throw new InvalidArgumentError(`process ${holder.pid} does not hold ${mode === 'exclusive' ? 'an' : 'a'} ${mode} lease on ${lease.path}: it is not registered with the sanlock daemon of this host (${this.config.hostId})`);
      }
      if (r.rv < 0) throw errorFor(r.rv, 'sanlock_inquire', `${lease.path}: asking the sanlock daemon which leases process ${holder.pid} holds`);
      const resource = lease.key.slice(`sanlock:${this.config.lockspace}:`.length);
      // "lockspace:resource:path:offset:lver", ":SH" appended for a shared lease (sanlock_res_to_str).
      const entries = r.text.split(/\s+/).map((e) => e.replace(/^"|"$/g, ''));
      const find = (res: string) => entries.find((e) => e.startsWith(`${this.config.lockspace}:${res}:`));
      const offsetOf = (entry: string) => {
        const at = Number(entry.split(':')[3]);
        if (!Number.isSafeInteger(at) || at < 0) throw new ResourceAccessError(`sanlock reported an unreadable lease for process ${holder.pid}: ${entry}`);
        return at;
      };
      const a = mode === 'exclusive' ? 'an' : 'a';
      const entry = find(resource);
      if (entry === undefined) throw new InvalidArgumentError(`process ${holder.pid} does not hold ${a} ${mode} lease on ${lease.path}: sanlock lists no lease ${this.config.lockspace}:${resource} for it`);
      const shared = entry.endsWith(':SH');
      // Which of readonly and shared: the class resource it holds beside the main lease.
      const held: ResourceMode | null = !shared
        ? 'exclusive'
        : find(classResourceName(resource, 'readonly')) !== undefined
          ? 'readonly'
          : find(classResourceName(resource, 'shared')) !== undefined
            ? 'shared'
            : null;
      if (held === null) {
        throw new InvalidArgumentError(
          `process ${holder.pid} does not hold ${a} ${mode} lease on ${lease.path} as this lockmgr takes one: it holds the sanlock lease shared without a class lease (taken by a lockmgr before sanlock names version 2)`,
        );
      }
      if (held !== mode) {
        throw new InvalidArgumentError(`process ${holder.pid} does not hold ${a} ${mode} lease on ${lease.path}: it holds it ${held === 'exclusive' ? 'exclusively' : held}, not ${mode}`);
      }
      const classEntry = mode === 'exclusive' ? undefined : find(classResourceName(resource, mode));
      const offset = offsetOf(entry);
      const classOffset = classEntry === undefined ? undefined : offsetOf(classEntry);
      if (this.#owner === null) {
        this.#owner = holder.pid;
        void holder.exited.then(() => {
          if (this.#owner === holder.pid) this.#owner = null;
          this.#exited = holder.pid;
        });
      }
      this.#state = r.text;
      lease.owned.adopted(offset, classOffset);
      return lease;
    } catch (err) {
      lease.close();
      throw err;
    }
  }

  verify(lease: Lease): Promise<boolean> {
    return (lease as SanlockLease).owned.stillHeld();
  }

  sameAs(config: LockspaceConfig): boolean {
    // A sanlock lockspace is one by its name across hosts; its storage path and host id are per host.
    return config.kind === 'sanlock' && (config as Partial<SanlockLockspaceConfig>).lockspace === this.config.lockspace;
  }

  describe(): string {
    return `sanlock (lockspace ${this.config.lockspace})`;
  }

  cliSpec(): string {
    return `sanlock:${this.config.lockspace}:${this.config.path}:${this.config.hostId}`;
  }

  /** The main lease and its two class resources (version 2 of the names), each with the hosts the storage lists as owners. */
  async inspect(name: ResourceName): Promise<LeaseStatus> {
    const resource = name.type === 'lease' ? leaseResourceName(leaseFilePath(name)) : diskResourceName(name.path);
    const address: LeaseAddress = { lockspace: this.config.lockspace, resource, path: this.config.path };
    const one = async (what: string, res: string, onlyShared: boolean): Promise<LeaseStatus['locations'][number]> => {
      const path = `${address.lockspace}:${res} on ${address.path}`;
      const offset = await lookupLease(address.lockspace, address.path, res);
      if (offset === null) return { what, path, exists: false, lease: { state: 'free', holder: null }, guard: null };
      const owners = await leaseOwners({ ...address, resource: res }, offset);
      const hosts = await this.#hostNames(owners);
      // A class resource is only ever held shared; the main lease by one owner may be either.
      const state = owners.length === 0 ? 'free' : owners.length > 1 || onlyShared ? 'shared' : 'held';
      return { what, path, exists: true, lease: { state, holder: null, ...(hosts.length > 0 ? { host: hosts.join(', ') } : {}) }, guard: null, detail: { offset, owners } };
    };
    return {
      lockspace: this.describe(),
      locations: [
        await one('sanlock lease', resource, false),
        await one('sanlock readonly class', classResourceName(resource, 'readonly'), true),
        await one('sanlock shared class', classResourceName(resource, 'shared'), true),
      ],
    };
  }

  #owned(disk: string, address: LeaseAddress, mode: ResourceMode): OwnedLease {
    let offset = -1;
    let heldBy: number | null = null;
    const shared = mode !== 'exclusive';
    const cls = mode === 'exclusive' ? null : this.#classes(address, mode);
    let classHeld = false;
    /** Queues the release of one resource for pid; the daemon answers once it is written. */
    const queueRelease = (pid: number, at: LeaseAddress, atOffset: number) => {
      const entry = this.#onStorage.get(at.resource);
      const p = releaseFor(pid, at, atOffset).then(
        (r) => {
          // Answered: the daemon has written the release (a take-back since then has an entry of its own).
          if (r.rv === 0 && this.#onStorage.get(at.resource) === entry) this.#onStorage.delete(at.resource);
          // -3: the process exited meanwhile, and the daemon released with it.
          if (r.rv < 0 && r.rv !== RV.ESRCH) this.onWarning?.(errorFor(r.rv, 'sanlock_release', `${disk}: releasing its sanlock lease`));
        },
        (err: unknown) => this.onWarning?.(err),
      );
      const tracked = p.finally(() => this.#releases.delete(tracked));
      this.#releases.add(tracked);
    };
    const release = () => {
      const pid = heldBy;
      const withClass = classHeld;
      heldBy = null;
      classHeld = false;
      this.#held.delete(address.resource);
      if (cls !== null) this.#held.delete(cls.mine.resource);
      // The owner has exited: its connection closed and the daemon released
      // the lease already. (A release by pid now could reach a stranger that
      // reused the number.)
      if (pid === null || pid !== this.#owner || offset < 0) return;
      // The class first, as the OFD lockspaces release their class byte before byte 0.
      if (withClass && cls !== null) queueRelease(pid, cls.mine, cls.offsets.mine);
      queueRelease(pid, address, offset);
    };
    return {
      adopted: (at: number, classAt?: number) => {
        offset = at;
        heldBy = this.#owner;
        this.#held.add(address.resource);
        this.#onStorage.set(address.resource, { disk, address, offset, shared });
        if (cls !== null && classAt !== undefined) {
          cls.offsets.mine = classAt;
          classHeld = true;
          this.#held.add(cls.mine.resource);
          this.#onStorage.set(cls.mine.resource, { disk, address: cls.mine, offset: classAt, shared: true });
        }
      },
      take: async (o: TakeOptions) => {
        const pid = this.#owner;
        if (pid === null) throw new UnsupportedError(`${disk}: a sanlock lease is taken for the supervised process, and there is none`);
        const deadline = o.timeout === undefined ? undefined : Date.now() + o.timeout;
        let delay = RETRY_MIN_MS;
        let transient = 0;
        let announced = false;
        for (;;) {
          const lver = this.#incoming.get(address.resource) ?? -1;
          const r = await acquireFor(pid, address, offset, shared, lver);
          if (r.out.length > 0 && r.out[0]! >= 0) offset = r.out[0]!;
          if (r.rv === 0) {
            heldBy = pid;
            this.#held.add(address.resource);
            this.#onStorage.set(address.resource, { disk, address, offset, shared });
            this.#incoming.delete(address.resource);
            if (r.text !== '') this.#state = r.text;
            // Aborted (free(), the caller's signal, a hung-daemon gate) while
            // the daemon was acquiring: nobody waits for this lease any more.
            if (o.signal?.aborted) {
              release();
              throw new AbortError('The wait for a sanlock lease was aborted; the lease acquired meanwhile was released', { cause: o.signal.reason });
            }
            break;
          }
          if (r.rv === RV.ENOENT && offset < 0) {
            // The daemon looks leases up only in a lockspace it has joined.
            if (!(await lockspaceJoined({ lockspace: this.config.lockspace, path: this.config.path, hostId: this.config.hostId }))) {
              throw errorFor(RV.SANLK_ACQUIRE_LOCKSPACE, 'sanlock_lookup_rindex', `${disk}: looking up its sanlock lease in lockspace ${address.lockspace}`);
            }
            throw new ResourceAccessError(
              `${disk} has no sanlock lease in lockspace ${address.lockspace} on ${address.path}: create it once (${createAdvice(address.resource)})`,
              { cause: sanlockCause(r.rv, 'sanlock_lookup_rindex') },
            );
          }
          if (r.rv === RV.SANLK_ACQUIRE_LVER) {
            throw new ResourceBusyError(
              `${disk}: its sanlock lease changed hands after the source's inquire() (lease version ${lver} expected): another host acquired it during the migration`,
              { resource: disk, cause: sanlockCause(r.rv, 'sanlock_acquire') },
            );
          }
          if (!BUSY.has(r.rv)) throw errorFor(r.rv, 'sanlock_acquire', `${disk}: acquiring its sanlock lease for pid ${pid}`);
          // Even a fail-fast acquire retries these briefly (TRANSIENT); a shared one also
          // IDLIVE: another host's shared acquire owns the leader for the moment of its round.
          if ((TRANSIENT.has(r.rv) || (shared && r.rv === RV.SANLK_ACQUIRE_IDLIVE)) && !o.wait && transient++ < TRANSIENT_RETRIES) {
            await sleep(this.#retryPause(transient), o.signal);
            continue;
          }
          if (!o.wait || (deadline !== undefined && Date.now() >= deadline)) {
            const busy = await this.#busy(disk, address, offset, r.rv, shared);
            if (!o.wait) throw busy;
            throw new LockTimeoutError(`${disk}: the sanlock lease was not free within ${o.timeout} ms: ${busy.message}`, { timeout: o.timeout!, resource: disk, cause: busy });
          }
          if (!announced && o.onBusy !== undefined) {
            announced = true;
            o.onBusy(await this.#busy(disk, address, offset, r.rv, shared));
          }
          const left = deadline === undefined ? delay : Math.min(delay, Math.max(0, deadline - Date.now()));
          await sleep(left, o.signal);
          delay = Math.min(delay * 2, RETRY_MAX_MS);
        }
        if (cls === null) return;
        try {
          await this.#takeClass(pid, disk, cls, o, deadline, (held) => {
            classHeld = held;
          });
        } catch (err) {
          release();
          throw err;
        }
      },
      release,
      stillHeld: async () => {
        const pid = heldBy;
        // Released, or the owner has exited (its 'exit' reports that): nothing to check.
        if (pid === null || pid !== this.#owner) return true;
        const r = await inquireRaw(pid);
        // ESRCH while the VM runs: it closed its registration (the daemon dropped every lease with it).
        if (r.rv === RV.ESRCH) return pid !== this.#owner;
        if (r.rv < 0) throw errorFor(r.rv, 'sanlock_inquire', `${disk}: checking its sanlock lease for pid ${pid}`);
        const entries = r.text.split(/\s+/).map((e) => e.replace(/^"/, ''));
        const wanted = [address.resource, ...(classHeld && cls !== null ? [cls.mine.resource] : [])];
        return wanted.every((res) => entries.some((e) => e.startsWith(`${address.lockspace}:${res}:`)));
      },
    };
  }

  /** The class resources of a readonly or shared lease: its own, and the other class's (docs/sanlock.md, "readonly and shared"). */
  #classes(address: LeaseAddress, mode: LeaseClass): ClassLeases {
    const other: LeaseClass = mode === 'readonly' ? 'shared' : 'readonly';
    return {
      mode,
      theirMode: other,
      mine: { ...address, resource: classResourceName(address.resource, mode) },
      theirs: { ...address, resource: classResourceName(address.resource, other) },
      offsets: { mine: -1, theirs: -1 },
    };
  }

  /**
   * After the main lease (sanlock-shared): the lease's own class resource,
   * sanlock-shared, then the other class's must have no owner on the storage
   * (take, then check, as the OFD lockspaces do with bytes 3 and 4: of two
   * racers both may back off, never both hold). Held by the other class: the
   * own class is released again, and a wait looks again on a timer.
   * `onHeld` tells release() whether the class is held.
   */
  async #takeClass(pid: number, disk: string, cls: ClassLeases, o: TakeOptions, deadline: number | undefined, onHeld: (held: boolean) => void): Promise<void> {
    let pause = RETRY_MIN_MS;
    let told = o.onBusy === undefined;
    let transient = 0;
    for (;;) {
      const r = await acquireFor(pid, cls.mine, cls.offsets.mine, true, -1);
      if (r.out.length > 0 && r.out[0]! >= 0) cls.offsets.mine = r.out[0]!;
      let owners: Owner[] | null = null;
      if (r.rv === 0) {
        onHeld(true);
        this.#held.add(cls.mine.resource);
        this.#onStorage.set(cls.mine.resource, { disk, address: cls.mine, offset: cls.offsets.mine, shared: true });
        if (r.text !== '') this.#state = r.text;
        if (o.signal?.aborted) throw new AbortError('The wait for a sanlock lease was aborted; the lease acquired meanwhile was released', { cause: o.signal.reason });
        owners = await this.#classOwners(pid, disk, cls);
        if (owners.length === 0) return;
        onHeld(false);
        await this.#dropClass(pid, disk, cls);
      } else if (r.rv === RV.ENOENT) {
        throw missingClass(disk, cls);
      } else if (!BUSY.has(r.rv)) {
        throw errorFor(r.rv, 'sanlock_acquire', `${disk}: acquiring its ${cls.mode} class lease for pid ${pid}`);
      }
      if (owners === null) {
        // Busy on the own class: the other class's holder probes it (#classOwners), or a paxos
        // round of another taker of the own class is on the storage (transient, as EAGAIN on the main lease).
        owners = await this.#ownersOf(cls.theirs, disk, cls, 'theirs');
        if (owners.length === 0 && !o.wait && transient++ < TRANSIENT_RETRIES) {
          await sleep(this.#retryPause(transient), o.signal);
          continue;
        }
      }
      const busy = await this.#classBusy(disk, cls, owners);
      if (!o.wait) throw busy;
      if (deadline !== undefined && Date.now() >= deadline) {
        throw new LockTimeoutError(`${disk}: still held ${cls.theirMode} when the timeout ran out: ${busy.message}`, { timeout: o.timeout!, resource: disk, cause: busy });
      }
      if (!told) {
        // A wait begins: who is in the way, as for the main lease.
        told = true;
        o.onBusy!(busy);
      }
      await sleep(deadline === undefined ? pause : Math.min(pause, Math.max(0, deadline - Date.now())), o.signal);
      pause = Math.min(pause * 2, RETRY_MAX_MS);
    }
  }

  /**
   * The pause before the nth quick retry of a transient failure: growing, and
   * offset by the host id, so that two hosts that collided do not collide
   * again in step (deterministic, unlike jitter).
   */
  #retryPause(n: number): number {
    return RETRY_MIN_MS * n + 10 * (this.config.hostId % 5);
  }

  /** The owners of one class resource on the storage; its offset looked up once. */
  async #ownersOf(at: LeaseAddress, disk: string, cls: ClassLeases, which: 'mine' | 'theirs'): Promise<Owner[]> {
    if (cls.offsets[which] < 0) {
      const found = await lookupLease(at.lockspace, at.path, at.resource);
      if (found === null) throw missingClass(disk, cls);
      cls.offsets[which] = found;
    }
    return leaseOwners(at, cls.offsets[which], true);
  }

  /**
   * Who holds the other class now. The storage lists every host with a
   * shared hold, and also a dead host's, until someone takes the resource
   * exclusively (sanlock then clears a dead host's hold). So a listed owner
   * is confirmed with a momentary exclusive acquire: if that succeeds, nobody
   * live holds the class (and from now on it is free, since this lease holds
   * its own class).
   */
  async #classOwners(pid: number, disk: string, cls: ClassLeases): Promise<Owner[]> {
    const owners = await this.#ownersOf(cls.theirs, disk, cls, 'theirs');
    if (owners.length === 0) return owners;
    const probe = await acquireFor(pid, cls.theirs, cls.offsets.theirs, false, -1);
    if (probe.rv !== 0) return owners;
    const r = await releaseFor(pid, cls.theirs, cls.offsets.theirs);
    if (r.rv < 0 && r.rv !== RV.ESRCH) throw errorFor(r.rv, 'sanlock_release', `${disk}: releasing its ${cls.theirMode} class lease after checking it is free`);
    return [];
  }

  /** Releases the own class again (the other class is in the way), and waits for the daemon's answer: a retry must not find it still held. */
  async #dropClass(pid: number, disk: string, cls: ClassLeases): Promise<void> {
    this.#held.delete(cls.mine.resource);
    const r = await releaseFor(pid, cls.mine, cls.offsets.mine);
    if (r.rv === 0 || r.rv === RV.ESRCH) this.#onStorage.delete(cls.mine.resource);
    else throw errorFor(r.rv, 'sanlock_release', `${disk}: releasing its ${cls.mode} class lease again`);
  }

  /** The busy error of a readonly lease beside shared ones, or the other way round, naming the hosts that hold the other class. */
  async #classBusy(disk: string, cls: ClassLeases, owners: Owner[]): Promise<ResourceBusyError> {
    const by = owners.length > 0 ? `by ${(await this.#hostNames(owners)).join(', ')}` : 'by another host';
    return new ResourceBusyError(`${disk} is held ${cls.theirMode} ${by} in sanlock lockspace ${cls.mine.lockspace}: a ${cls.mode} lease and a ${cls.theirMode} one exclude each other`, { resource: disk });
  }

  /** 'host 2 (host2)' for each owner: the name its daemon joined with, where the storage has it. */
  async #hostNames(owners: Owner[]): Promise<string[]> {
    return Promise.all(
      owners.map(async (o) => {
        const name = await hostName(this.config.path, o.hostId);
        return name === null ? `host ${o.hostId}` : `host ${o.hostId} (${name})`;
      }),
    );
  }

  /** The busy error for a lease someone else holds, naming the host(s) sanlock reports as owners. */
  async #busy(disk: string, address: LeaseAddress, offset: number, rv: number, shared: boolean): Promise<ResourceBusyError> {
    const cause = sanlockCause(rv, 'sanlock_acquire');
    if (rv === RV.EEXIST) {
      return new ResourceBusyError(`${disk} is held by another process on this host (${this.config.hostId}) through sanlock lockspace ${address.lockspace}`, { resource: disk, cause });
    }
    const owners = offset < 0 ? [] : (await leaseOwners(address, offset)).filter((o) => o.hostId !== this.config.hostId);
    const names = await this.#hostNames(owners);
    const by = names.length > 0 ? `by ${names.join(', ')}` : 'by another host';
    return new ResourceBusyError(`${disk} is held ${by} in sanlock lockspace ${address.lockspace}${shared ? ' (this acquire: shared)' : ''}`, { resource: disk, cause });
  }

  /**
   * Spawns the command through the exec helper with the VM's own pid: the
   * helper registers and waits; plan.take() acquires every lease for that pid
   * (sanlock_acquire(-1, pid)); only then does the helper exec the command.
   */
  async start(plan: StartPlan): Promise<SupervisedProcess> {
    if (plan.attach !== undefined) {
      throw new UnsupportedError(`lockspace ${this.describe()} cannot attach to a running process (capability 'attach'): its leases belong to a process that registered with the lock service before it started`);
    }
    const keepFds = [...(plan.spawnOptions.keepFds ?? []), ...plan.leases.flatMap((l) => l.fds)];
    return this.#spawnGated(plan.command!, plan.args, { ...plan.spawnOptions, keepFds }, (_pid, signal) => plan.take(signal), plan.limits);
  }

  async #spawnGated(
    command: string,
    args: readonly string[],
    options: SpawnOptions,
    beforeExec: (pid: number, signal: AbortSignal) => Promise<void>,
    limits: StartLimits = {},
  ): Promise<SupervisedProcess> {
    const helper = execHelperPath();
    const status = pipe();
    let go: [number, number];
    try {
      go = pipe();
    } catch (err) {
      native.closeFd(status[0]);
      native.closeFd(status[1]);
      throw err;
    }
    let child: SupervisedProcess;
    try {
      child = spawnSupervised(helper, [String(status[1]), String(go[0]), command, ...args], { ...options, keepFds: [...(options.keepFds ?? []), status[1], go[0]] });
    } catch (err) {
      native.closeFd(status[0]);
      native.closeFd(go[1]);
      throw err;
    } finally {
      // The child's copies are its own now; ours would hide its EOFs.
      native.closeFd(status[1]);
      native.closeFd(go[0]);
    }
    const reader = new StatusPipe(status[0]);
    let goOpen = true;
    const closeGo = () => {
      if (goOpen) native.closeFd(go[1]);
      goOpen = false;
    };
    // free(), the caller's signal, or a daemon hung past the deadline stop the
    // gate at once: every await below races them, since a daemon call on a
    // native thread cannot be interrupted.
    const gate = new AbortController();
    const signal = limits.signal === undefined ? gate.signal : AbortSignal.any([limits.signal, gate.signal]);
    let stopped: Error | null = null;
    let interrupt!: (err: Error) => void;
    const interrupted = new Promise<never>((_, reject) => (interrupt = reject));
    interrupted.catch(() => undefined);
    const stop = (err: Error) => {
      if (stopped !== null) return;
      stopped = err;
      gate.abort(err);
      interrupt(err);
    };
    const onAbort = () => stop(new AbortError('start() was aborted while the sanlock gate was closed: the command was not run', { cause: limits.signal?.reason }));
    if (limits.signal?.aborted) onAbort();
    else limits.signal?.addEventListener('abort', onAbort, { once: true });
    const hung =
      limits.deadline === undefined
        ? undefined
        : setTimeout(
            () => stop(new LockTimeoutError(`the sanlock daemon did not answer within ${limits.timeout} ms (+${HUNG_GRACE_MS} ms): the command was not run`, { timeout: limits.timeout ?? 0 })),
            Math.max(0, limits.deadline - Date.now()) + HUNG_GRACE_MS,
          );
    const guarded = <T>(p: Promise<T>): Promise<T> => Promise.race([p, interrupted]);
    try {
      const reg = await guarded(reader.line(HELPER_TIMEOUT_MS));
      if (!reg.line.startsWith('R ')) {
        const m = /^E (-?\d+) ?(.*)$/.exec(reg.line);
        if (m !== null && Number(m[1]) === RV.ENOENT && m[2]!.includes('.so')) throw new UnsupportedError(`sanlock: the exec helper cannot load the client library: ${m[2]}`);
        if (m !== null) throw errorFor(Number(m[1]), 'sanlock_register', `registering the supervised process with the sanlock daemon`);
        throw new UnsupportedError(`sanlock: the exec helper ${helper} ended before it registered (${reg.rv < 0 ? systemError(-reg.rv, 'read').message : 'EOF'})`);
      }
      this.#owner = child.pid;
      void child.exited.then(() => {
        if (this.#owner === child.pid) this.#owner = null;
        this.#exited = child.pid;
      });
      await guarded(beforeExec(child.pid, signal));
      // The last look before the command runs: the gate opens only for a
      // start() that still waits for it, within its deadline.
      if (stopped !== null) throw stopped;
      if (signal.aborted) throw new AbortError('start() was aborted while the sanlock gate was closed: the command was not run', { cause: signal.reason });
      if (limits.deadline !== undefined && limits.timeout !== 0 && Date.now() > limits.deadline) {
        throw new LockTimeoutError(`the sanlock leases were acquired ${Date.now() - limits.deadline} ms after the deadline of ${limits.timeout} ms: released, the command was not run`, { timeout: limits.timeout ?? 0 });
      }
      writeSync(go[1], 'G');
      closeGo();
      const exec = await reader.line(HELPER_TIMEOUT_MS);
      const x = /^X (\d+)$/.exec(exec.line);
      if (x !== null) {
        const cause = systemError(Number(x[1]), 'execve', command);
        throw new SpawnError(`cannot run ${command}: ${cause.message}`, { cause });
      }
    } catch (err) {
      // The helper sees EOF on its gate and exits without exec'ing; its
      // registration (and any lease taken for it) goes with it. Stopped: it
      // may be stuck in sanlock_register() on a hung daemon, so kill it.
      closeGo();
      if (stopped !== null) {
        try {
          child.signal('SIGKILL');
        } catch (e) {
          this.onWarning?.(e);
        }
      }
      await child.exited;
      // start() rejecting means nothing is held: not even for a few ms in the
      // daemon. Stopped: the daemon may not answer; wait a bounded time only.
      const until = Date.now() + (stopped !== null ? INTERRUPTED_FORGET_MS : EXIT_RELEASE_MS);
      if (await forgotten(child.pid, until - Date.now())) await this.#releasedOnStorage(until);
      this.#onStorage.clear();
      throw err;
    } finally {
      closeGo();
      reader.close();
      clearTimeout(hung);
      limits.signal?.removeEventListener('abort', onAbort);
    }
    return child;
  }

  async settled(): Promise<void> {
    while (this.#releases.size > 0) await Promise.all(this.#releases);
  }

  /**
   * Resolves once the storage no longer names this host as an owner of the
   * leases the exited owner held (what other hosts see), or at `until`
   * (Date.now() based). A shared lease that another process on this host
   * still holds keeps this host an owner: that one is waited for until
   * `until`, and is no failure. An exclusive one still named then is a
   * 'warning'.
   */
  async #releasedOnStorage(until: number): Promise<void> {
    while (this.#onStorage.size > 0) {
      for (const [resource, e] of [...this.#onStorage]) {
        const owners = await within(leaseOwners(e.address, e.offset).catch(() => null), until - Date.now());
        if (owners !== 'late' && owners !== null && !owners.some((o) => o.hostId === this.config.hostId)) this.#onStorage.delete(resource);
      }
      if (this.#onStorage.size === 0) return;
      if (Date.now() >= until) break;
      await sleep(10, undefined);
    }
    for (const e of this.#onStorage.values()) {
      if (!e.shared) {
        this.onWarning?.(
          new ResourceBusyError(`sanlock: ${e.disk}: its exclusive lease is still held by this host (${this.config.hostId}) on the storage after its process exited; other hosts cannot take it yet`, {
            resource: e.disk,
          }),
        );
      }
    }
    this.#onStorage.clear();
  }

  /** The lease state of the leases held now: a lease released since (hot-unplugged) is not in it. */
  exportState(): string | undefined {
    if (this.#state === undefined) return undefined;
    const now = this.#state
      .split(/\s+/)
      .filter((e) => e !== '' && this.#held.has(e.replace(/^"/, '').split(':')[1] ?? ''));
    return now.length > 0 ? now.join(' ') : undefined;
  }

  /** The source's "ls:res:path:offset:lver" entries: the target acquires each with its lver, so it fails if anyone took the lease in between. */
  importState(state: string | undefined): void {
    this.#incoming.clear();
    if (state === undefined) return;
    for (const entry of state.split(/\s+/)) {
      const parts = entry.replace(/^"|"$/g, '').split(':');
      if (parts.length < 5 || parts[0] !== this.config.lockspace) continue;
      const lver = Number(parts[4]);
      if (Number.isSafeInteger(lver) && lver > 0) this.#incoming.set(parts[1]!, lver);
    }
  }

  /** sanlock SIGKILLs a registered process whose lease it cannot renew; if the lockspace is gone from this host, that is what happened. */
  async exitFailure(status: ExitStatus): Promise<string | null> {
    // 'exit' means the leases are free for other hosts: wait for the daemon.
    const pid = this.#exited;
    this.#exited = null;
    const until = Date.now() + EXIT_RELEASE_MS;
    const gone = pid !== null && (await forgotten(pid));
    if (pid !== null && !gone) {
      // The registration outlived the VM: a process that inherited its fd (a
      // child of the VM's) keeps it open, and with it the leases. Release them.
      const r = await within(releaseAllFor(pid).catch((err: unknown) => err as Error), EXIT_RELEASE_MS);
      if (r === 'late' || r instanceof Error || (r.rv < 0 && r.rv !== RV.ESRCH)) {
        const why = r === 'late' ? 'the daemon did not answer' : r instanceof Error ? r.message : errorFor(r.rv, 'sanlock_release', 'release').message;
        this.onWarning?.(
          new ResourceBusyError(
            `sanlock: process ${pid} exited, but the daemon still holds its leases (a child of it inherited the registration fd and still runs?) and releasing them failed: ${why}; other hosts cannot take its disks until that process exits`,
            { cause: r instanceof Error ? r : undefined },
          ),
        );
      }
    }
    let lost: string | null = null;
    if (status.signal === 'SIGKILL') {
      const joined = await lockspaceJoinedSettled({ lockspace: this.config.lockspace, path: this.config.path, hostId: this.config.hostId }).catch(() => false);
      if (!joined) {
        lost = `sanlock lockspace ${this.config.lockspace} is no longer held by this host (host id ${this.config.hostId}): its delta lease could not be renewed or the lockspace was removed, and sanlock killed the process (SIGKILL)`;
      }
    }
    // The daemon forgetting the pid is not enough: it writes the release of
    // a dead process's leases afterwards, and until then other hosts find
    // them held. (A lost lockspace writes nothing: other hosts take the
    // leases once this host's delta lease has expired.)
    if (lost === null && pid !== null) await this.#releasedOnStorage(gone ? until : Date.now() + EXIT_RELEASE_MS);
    this.#onStorage.clear();
    return lost;
  }
}

export function sanlockLockspace(config: unknown): SanlockLockspace {
  return new SanlockLockspace(config);
}

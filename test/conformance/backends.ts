// The backends the conformance suite (suite.ts) runs against: for each
// lockspace, how to make "host A" and "host B", a pool of disks and a named
// lease with their leases, how to see from outside who holds a lease, and how
// to lose a held lease behind its holder's back.
//
// Host A is the test process; host B is a manager peer process started with
// env('B'). For direct and indirect both are the same kernel (host B is a
// second process with the same options); for sanlock they are two simulated
// hosts, two daemons sharing one lockspace on a loop device.
import { spawnSync } from 'node:child_process';
import { mkdirSync, rmSync, unlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type LockManager, type LockspaceOptions, type ResourceMode, type ResourceRef, type ResourceSpec } from '../../lib/index.js';
import type { Capabilities } from '../../lib/lockspaces/driver.js';
import { indirectLockspace } from '../../lib/lockspaces/indirect.js';
import { diskResourceName, leaseOwners, leaseResourceName } from '../../lib/lockspaces/sanlock-client.js';
import { SanlockCluster, sanlockUnavailable } from '../harness/sanlock.js';
import { lockAt, uniqueName, waitUntil } from '../helpers.js';

export type Host = 'A' | 'B';
export type Seen = 'exclusive' | 'shared' | 'free';

/** A disk or the named lease of the pool: the same files (and sanlock leases) for every test. */
export interface PoolResource {
  /** What the manager reports for it (resources[].path, errors, lock-failure events). */
  readonly path: string;
  readonly type: 'disk' | 'lease';
  spec(mode: ResourceMode, extra?: { qemuCompatible?: boolean }): ResourceSpec;
  /** Its reference for releaseResource(). */
  ref(): ResourceRef;
}

export interface Backend {
  readonly name: string;
  /** What this lockspace declares (docs/contract.md, "Capabilities by lockspace"). */
  readonly capabilities: Capabilities;
  /** Why it cannot run on this machine, or null. Only what is truly absent. */
  unavailable(): string | null;
  setup(): Promise<void>;
  teardown(): Promise<void>;
  lockspace(host: Host): LockspaceOptions | undefined;
  env(host: Host): NodeJS.ProcessEnv;
  /** Where a test may write files (markers). */
  readonly scratch: string;
  readonly disks: readonly PoolResource[];
  readonly lease: PoolResource;
  /** A lockspace of another kind, whose token this one's target must refuse. */
  otherLockspace(): LockspaceOptions;
  /** Lockspace options that are wrong for this kind. */
  badLockspaces(): unknown[];
  /**
   * What a third party sees of the lease of `r` now. sanlock: what the
   * daemons hold; a lease a daemon is still releasing ('REM') counts as held
   * while the storage still names an owner (what other hosts see).
   */
  observe(r: PoolResource): Promise<Seen>;
  /** What a third party sees of the handover guard of `r` (only lockspaces with the capability handoverGuard have one). */
  observeGuard(r: PoolResource): Seen;
  /** How a busy error names a holder on host B: its supervisor or VM pid (OFD), its host (sanlock). */
  holderNamed(holder: { supervisor: number; vm: number }): RegExp;
  /**
   * Takes a held lease away from `m`'s child behind the manager's back, as
   * something outside the protocol would (capability losable); null where
   * nothing can.
   */
  readonly lose: ((m: LockManager, r: PoolResource) => Promise<void>) | null;
  /** Resolves once nothing in the pool is held by anyone (polls). */
  settle(): Promise<void>;
}

const LEASE_LOCKSPACE = 'conf';
const LEASE_KEY = 'l0';

/** The pool's files: 4 disks and the directory of the named lease. */
class Pool {
  readonly root: string;
  readonly disks: PoolResource[];
  readonly lease: PoolResource;
  readonly leaseDir: string;

  constructor(prefix: string) {
    this.root = join(tmpdir(), uniqueName(prefix));
    this.leaseDir = join(this.root, 'leases');
    this.disks = [0, 1, 2, 3].map((i) => diskResource(join(this.root, 'disks', `d${i}.img`)));
    const base = { type: 'lease' as const, lockspace: LEASE_LOCKSPACE, key: LEASE_KEY, path: this.leaseDir };
    this.lease = {
      path: join(this.leaseDir, LEASE_LOCKSPACE, LEASE_KEY),
      type: 'lease',
      spec: (mode) => ({ ...base, mode }),
      ref: () => base,
    };
  }

  create(): void {
    mkdirSync(join(this.root, 'disks'), { recursive: true });
    mkdirSync(join(this.root, 'scratch'));
    mkdirSync(this.leaseDir, { mode: 0o755 });
    for (const d of this.disks) writeFileSync(d.path, 'x'.repeat(4096));
  }

  remove(): void {
    rmSync(this.root, { recursive: true, force: true });
  }
}

function diskResource(path: string): PoolResource {
  return {
    path,
    type: 'disk',
    spec: (mode, extra) => ({ type: 'disk', path, mode, ...(extra?.qemuCompatible ? { qemuCompatible: true } : {}) }),
    ref: () => ({ type: 'disk', path }),
  };
}

/** The strongest of what several lock files show. */
function strongest(seen: Seen[]): Seen {
  return seen.includes('exclusive') ? 'exclusive' : seen.includes('shared') ? 'shared' : 'free';
}

const OFD_HOLDER = (h: { supervisor: number; vm: number }): RegExp => new RegExp(`\\b(${h.supervisor}|${h.vm})\\b`);

abstract class OfdBackend implements Backend {
  abstract readonly name: string;
  abstract readonly capabilities: Capabilities;
  protected readonly pool: Pool;

  constructor(prefix: string) {
    this.pool = new Pool(prefix);
  }

  get scratch(): string {
    return join(this.pool.root, 'scratch');
  }

  get disks(): readonly PoolResource[] {
    return this.pool.disks;
  }

  get lease(): PoolResource {
    return this.pool.lease;
  }

  unavailable(): string | null {
    return null;
  }

  async setup(): Promise<void> {
    this.pool.create();
  }

  async teardown(): Promise<void> {
    this.pool.remove();
  }

  abstract lockspace(host: Host): LockspaceOptions | undefined;

  env(_host: Host): NodeJS.ProcessEnv {
    return process.env;
  }

  abstract otherLockspace(): LockspaceOptions;
  abstract badLockspaces(): unknown[];

  /** The files that carry the lease of a pool resource. */
  protected abstract files(r: PoolResource): string[];

  async observe(r: PoolResource): Promise<Seen> {
    return this.#seen(r);
  }

  #seen(r: PoolResource): Seen {
    return strongest(this.files(r).map((f) => lockAt(f, 0)));
  }

  observeGuard(r: PoolResource): Seen {
    return strongest(this.files(r).map((f) => lockAt(f, 1)));
  }

  holderNamed(h: { supervisor: number; vm: number }): RegExp {
    return OFD_HOLDER(h);
  }

  abstract readonly lose: Backend['lose'];

  async settle(): Promise<void> {
    const all = [...this.pool.disks, this.pool.lease];
    await waitUntil(() => all.every((r) => this.#seen(r) === 'free' && this.observeGuard(r) === 'free'), 10_000, `every lease and guard of the ${this.name} pool to be free`);
  }
}

/** The direct lockspace: the lease is byte 0 of the image itself. */
export class DirectBackend extends OfdBackend {
  readonly name = 'direct';
  readonly capabilities: Capabilities = { attach: true, adopt: true, handoverGuard: true, losable: false, hotplugHeldByChild: false, migrationState: false, multiHost: false, readersExcludeWriters: true };

  constructor() {
    super('lockmgr-conf-direct');
  }

  lockspace(): LockspaceOptions {
    return { kind: 'direct' };
  }

  otherLockspace(): LockspaceOptions {
    return { kind: 'indirect', dir: this.pool.root };
  }

  badLockspaces(): unknown[] {
    return [{ kind: 'direct', dir: this.pool.root }, { kind: 'direct', colour: 'red' }];
  }

  protected files(r: PoolResource): string[] {
    return [r.path];
  }

  // The image is the lease: nothing outside the protocol takes it away.
  readonly lose = null;
}

/** The indirect lockspace: lock files in a directory shared by the hosts. */
export class IndirectBackend extends OfdBackend {
  readonly name = 'indirect';
  readonly capabilities: Capabilities = { attach: true, adopt: true, handoverGuard: true, losable: true, hotplugHeldByChild: false, migrationState: false, multiHost: true, readersExcludeWriters: true };

  constructor() {
    super('lockmgr-conf-indirect');
  }

  get dir(): string {
    return join(this.pool.root, 'locks');
  }

  override async setup(): Promise<void> {
    await super.setup();
    mkdirSync(this.dir, { mode: 0o755 });
  }

  lockspace(): LockspaceOptions {
    return { kind: 'indirect', dir: this.dir };
  }

  otherLockspace(): LockspaceOptions {
    return { kind: 'direct' };
  }

  badLockspaces(): unknown[] {
    return [{ kind: 'indirect' }, { kind: 'indirect', dir: 'relative/locks' }, { kind: 'indirect', dir: this.dir, colour: 'red' }];
  }

  protected files(r: PoolResource): string[] {
    if (r.type === 'lease') return [r.path];
    return indirectLockspace({ kind: 'indirect', dir: this.dir })
      .describeDisk(r.path)
      .files.map((f) => f.path);
  }

  /** A tmp cleaner: the lock files go while the lease is held. */
  readonly lose = async (m: LockManager, r: PoolResource): Promise<void> => {
    const files = m.resources.find((x) => x.path === r.path)!.lockFiles;
    for (const f of files) unlinkSync(f);
  };
}

/** The sanlock lockspace: two simulated hosts (test/harness/sanlock.ts). */
export class SanlockBackend implements Backend {
  readonly name = 'sanlock';
  readonly capabilities: Capabilities = { attach: false, adopt: true, handoverGuard: false, losable: true, hotplugHeldByChild: true, migrationState: true, multiHost: true, readersExcludeWriters: true };
  readonly cluster: SanlockCluster;
  readonly #pool: Pool;
  /** Each pool lease's offset on the storage. */
  readonly #offsets = new Map<string, number>();

  constructor() {
    // Host 1 (A) is this process: SANLOCK_RUN_DIR is set now, before any sanlock call.
    this.cluster = new SanlockCluster({ lockspace: 'lmconf', prefix: 'lockmgr-conf-sanlock' });
    this.#pool = new Pool('lockmgr-conf-sanlock-pool');
  }

  get scratch(): string {
    return join(this.#pool.root, 'scratch');
  }

  get disks(): readonly PoolResource[] {
    return this.#pool.disks;
  }

  get lease(): PoolResource {
    return this.#pool.lease;
  }

  unavailable(): string | null {
    return sanlockUnavailable();
  }

  async setup(): Promise<void> {
    this.#pool.create();
    await this.cluster.setup();
    // The leases in the index, once, from host 1.
    for (const d of this.#pool.disks) this.#offsets.set(d.path, (await this.cluster.createDiskLease(d.path)).offset);
    this.#offsets.set(this.#pool.lease.path, (await this.cluster.createNamedLease(this.#pool.lease.path)).offset);
  }

  async teardown(): Promise<void> {
    await this.cluster.teardown();
    this.#pool.remove();
  }

  lockspace(host: Host): LockspaceOptions {
    return this.cluster.config(host === 'A' ? 1 : 2);
  }

  env(host: Host): NodeJS.ProcessEnv {
    return this.cluster.env(host === 'A' ? 1 : 2);
  }

  otherLockspace(): LockspaceOptions {
    return { kind: 'direct' };
  }

  badLockspaces(): unknown[] {
    const ok = this.cluster.config(1);
    return [
      { ...ok, hostId: 0 },
      { ...ok, hostId: 2001 },
      { ...ok, lockspace: '' },
      { ...ok, lockspace: 'a:b' },
      { ...ok, path: 'relative' },
      { ...ok, dir: '/tmp' },
    ];
  }

  #resourceName(r: PoolResource): string {
    return r.type === 'lease' ? leaseResourceName(r.path) : diskResourceName(r.path);
  }

  async observe(r: PoolResource): Promise<Seen> {
    const lines = this.cluster.held().filter((l) => l.includes(`:${this.#resourceName(r)}:`));
    const live = lines.filter((l) => !l.endsWith(' REM'));
    if (live.length > 0) return live.every((l) => /:SH p /.test(l)) ? 'shared' : 'exclusive';
    // Nothing held, or only being released: the storage says whether other hosts still find an owner.
    const owners = await leaseOwners({ lockspace: this.cluster.lockspace, resource: this.#resourceName(r), path: this.cluster.loop }, this.#offsets.get(r.path)!);
    return owners.length > 0 ? 'exclusive' : 'free';
  }

  observeGuard(): Seen {
    // A sanlock lease has no guard (capability handoverGuard).
    return 'free';
  }

  holderNamed(): RegExp {
    return /host 2 \(host2\)/;
  }

  /** The daemon releases the VM's lease for its pid, as an operator's `sanlock client release` would; the VM runs on without it. */
  readonly lose = async (m: LockManager, r: PoolResource): Promise<void> => {
    const pid = m.getChild().pid;
    const line = this.cluster.heldOn(1).find((l) => l.includes(`:${this.#resourceName(r)}:`) && l.endsWith(` p ${pid}`));
    if (line === undefined) throw new Error(`host 1 holds no lease of ${r.path} for pid ${pid}`);
    // "r LS:RES:PATH:OFFSET:LVER p PID" -> LS:RES:PATH:OFFSET
    const res = line.slice(2, line.indexOf(' p ')).split(':').slice(0, 4).join(':');
    const out = spawnSync('sanlock', ['client', 'release', '-r', res, '-p', String(pid)], { env: this.cluster.env(1), encoding: 'utf8' });
    if (out.status !== 0 || !/release done 0/.test(out.stdout)) throw new Error(`sanlock client release failed: ${out.stdout}${out.stderr}`);
  };

  async settle(): Promise<void> {
    await waitUntil(() => this.cluster.held().length === 0, 15_000, 'both sanlock daemons to hold nothing');
  }
}

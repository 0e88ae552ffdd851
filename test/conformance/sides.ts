// A manager on host A (in this process) or on host B (a manager peer process,
// test/fixtures/manager-peer.mjs), driven through one interface, so that a row
// of the conformance suite can put either side on either host.
import { LockManager, type LockManagerOptions, type FromInquireOptions } from '../../lib/index.js';
import { Peer, managerPeerScript, type PeerError } from '../helpers.js';

/** What a failed call leaves to look at, the same from both sides. */
export interface Failure {
  name: string;
  code: string;
  message: string;
  rolledBack?: string[];
  migrationInProgress?: boolean;
}

export interface Side {
  readonly host: 'A' | 'B';
  /** The supervisor's pid: this process, or the peer's. */
  readonly pid: number;
  /** The operations of manager-peer.mjs: create, fromInquire, register, start (resolves the child's pid), acquire, release, state, shutdown, free, verify, inquire, prepareMigrate, completeMigrateOut, completeMigrateIn, events, resources. */
  call<T = unknown>(op: string, ...args: unknown[]): Promise<T>;
  /** The error the call failed with; a test failure if it succeeded. */
  fail(op: string, ...args: unknown[]): Promise<Failure>;
}

/** Host A: a LockManager in this process, answering the peer's operations. */
export class LocalSide implements Side {
  readonly host = 'A' as const;
  readonly pid = process.pid;
  mgr!: LockManager;
  readonly events: Array<[string, unknown]> = [];
  readonly #track: (m: LockManager) => void;

  constructor(track: (m: LockManager) => void) {
    this.#track = track;
  }

  #watch(m: LockManager): void {
    this.mgr = m;
    this.#track(m);
    m.on('state', (s) => this.events.push(['state', s]));
    m.on('exit', (status) => this.events.push(['exit', status]));
    m.on('lock-failure', (f) => this.events.push(['lock-failure', f]));
    m.on('warning', (w) => this.events.push(['warning', w.code]));
  }

  readonly #ops: Record<string, (...args: never[]) => unknown> = {
    create: (options: LockManagerOptions) => this.#watch(new LockManager(options)),
    fromInquire: (token: string, options: FromInquireOptions) => this.#watch(LockManager.fromInquire(token, options)),
    inquire: () => this.mgr.inquire(),
    prepareMigrate: (uri: string) => this.mgr.prepareMigrate(uri),
    completeMigrateOut: (uri: string, o: never) => this.mgr.completeMigrateOut(uri, o),
    completeMigrateIn: (uri: string, o: never) => this.mgr.completeMigrateIn(uri, o),
    verify: () => this.mgr.verify(),
    resources: () => this.mgr.resources,
    register: (spec: never) => this.mgr.registerResource(spec),
    start: async (command: string, args: string[], spawnOptions: never, wait: never) => {
      await this.mgr.start(command, args, spawnOptions ?? {}, wait);
      return this.mgr.getChild().pid;
    },
    acquire: (spec: never, o: never) => this.mgr.acquireResource(spec, o),
    release: (ref: never) => this.mgr.releaseResource(ref),
    state: () => this.mgr.state,
    shutdown: (o: never) => this.mgr.shutdown(o),
    free: () => this.mgr.free(),
    events: () => this.events,
    pid: () => process.pid,
  };

  async call<T = unknown>(op: string, ...args: unknown[]): Promise<T> {
    const fn = this.#ops[op];
    if (fn === undefined) throw new Error(`no operation ${op}`);
    return (await (fn as (...a: unknown[]) => unknown)(...args)) as T;
  }

  async fail(op: string, ...args: unknown[]): Promise<Failure> {
    try {
      await this.call(op, ...args);
    } catch (err) {
      return err as Failure;
    }
    throw new Error(`${op} succeeded on host A; expected it to fail`);
  }
}

/** Host B: a manager peer process with host B's environment. */
export class RemoteSide implements Side {
  readonly host = 'B' as const;
  readonly peer: Peer;

  constructor(peer: Peer) {
    this.peer = peer;
  }

  static async start(env: NodeJS.ProcessEnv): Promise<RemoteSide> {
    return new RemoteSide(await Peer.start(env, managerPeerScript));
  }

  get pid(): number {
    return this.peer.child.pid!;
  }

  call<T = unknown>(op: string, ...args: unknown[]): Promise<T> {
    return this.peer.call<T>(op, ...args);
  }

  async fail(op: string, ...args: unknown[]): Promise<Failure> {
    try {
      await this.peer.call(op, ...args);
    } catch (err) {
      return err as PeerError as Failure;
    }
    throw new Error(`${op} succeeded on host B; expected it to fail`);
  }
}

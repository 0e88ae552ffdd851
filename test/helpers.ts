// Test helpers: temp files, a peer process for cross-process locking, and
// counters of this process's fds, threads and children for leak checks.
import { execFileSync, fork, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as hooks from 'vitest';
import { LockManager, openLockable, type LockableFile, type LockManagerOptions } from '../lib/index.js';

export const isRoot = process.getuid?.() === 0;

/** A fresh directory removed by the returned cleanup. */
export function tempDir(): { dir: string; cleanup: () => void } {
  const dir = mkdtempSync(join(tmpdir(), 'lockmgr-test-'));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/** A file with some content in `dir`. */
export function makeFile(dir: string, name = 'disk.img', content = 'x'.repeat(4096)): string {
  const path = join(dir, name);
  writeFileSync(path, content);
  return path;
}

export function fdCount(): number {
  return readdirSync('/proc/self/fd').length;
}

export function threadCount(): number {
  const m = /^Threads:\s+(\d+)$/m.exec(readFileSync('/proc/self/status', 'utf8'));
  return Number(m![1]);
}

/** Polls until `check` returns true, or throws after `ms`. */
export async function waitUntil(check: () => boolean, ms = 10_000, what = 'condition'): Promise<void> {
  const end = Date.now() + ms;
  while (!check()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

export interface PeerError {
  name: string;
  code: string;
  message: string;
}

const peerScript = fileURLToPath(new URL('./fixtures/peer.mjs', import.meta.url));
/** A process running one LockManager, driven like a peer: see fixtures/manager-peer.mjs. */
export const managerPeerScript = fileURLToPath(new URL('./fixtures/manager-peer.mjs', import.meta.url));

/** Another Node process holding its own lockable files, driven over IPC. */
export class Peer {
  readonly child: ChildProcess;
  readonly #pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: unknown) => void }>();
  #next = 1;
  readonly ready: Promise<void>;

  constructor(env: NodeJS.ProcessEnv = process.env, script = peerScript) {
    this.child = fork(script, [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'], env });
    this.ready = new Promise((resolve, reject) => {
      this.child.once('error', reject);
      this.child.once('exit', (code) => reject(new Error(`peer exited early with ${code}`)));
      this.child.on('message', (msg: { ready?: boolean; id?: number; ok?: boolean; value?: unknown; error?: PeerError }) => {
        if (msg.ready) return resolve();
        const p = this.#pending.get(msg.id!);
        if (!p) return;
        this.#pending.delete(msg.id!);
        if (msg.ok) p.resolve(msg.value);
        else p.reject(Object.assign(new Error(msg.error!.message), msg.error));
      });
    });
  }

  /** A peer running test/fixtures/peer.mjs (lockable files), or another fixture script. */
  static async start(env?: NodeJS.ProcessEnv, script?: string): Promise<Peer> {
    const peer = new Peer(env, script);
    await peer.ready;
    return peer;
  }

  call<T = unknown>(op: string, ...args: unknown[]): Promise<T> {
    const id = this.#next++;
    return new Promise<T>((resolve, reject) => {
      this.#pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.child.send({ id, op, args });
    });
  }

  /** The error a call rejected with, or a failure if it resolved. */
  async callError(op: string, ...args: unknown[]): Promise<PeerError> {
    try {
      await this.call(op, ...args);
    } catch (err) {
      return err as PeerError;
    }
    throw new Error(`peer ${op} resolved; expected it to fail`);
  }

  async kill(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    const exited = new Promise((r) => this.child.once('exit', r));
    this.child.kill(signal);
    await exited;
  }
}

/**
 * The common setup of lock tests, as vitest hooks: a fresh temp dir with one
 * 4 KiB file per test, a peer process per file (when asked), and lockable
 * files opened through `open()` closed after each test.
 */
export interface LockFixture {
  peer: Peer;
  tmp: ReturnType<typeof tempDir>;
  path: string;
  opened: LockableFile[];
  open(p?: string, access?: 'read' | 'readwrite'): LockableFile;
}

export function lockFixture(options: { peer?: boolean } = {}): LockFixture {
  const { afterAll, afterEach, beforeAll, beforeEach } = hooks;
  const state: LockFixture = {
    peer: undefined as unknown as Peer,
    tmp: undefined as unknown as ReturnType<typeof tempDir>,
    path: '',
    opened: [] as LockableFile[],
    /** openLockable(), closed after the test. */
    open(p = state.path, access = 'readwrite') {
      const f = openLockable(p, { access });
      state.opened.push(f);
      return f;
    },
  };
  if (options.peer) {
    beforeAll(async () => {
      state.peer = await Peer.start();
    });
    afterAll(() => state.peer.kill());
  }
  beforeEach(() => {
    state.tmp = tempDir();
    state.path = makeFile(state.tmp.dir);
  });
  afterEach(() => {
    for (const f of state.opened.splice(0)) f.close();
    state.tmp.cleanup();
  });
  return state;
}

/** Compiles test/fixtures/NAME.c into a shared object in `dir` (for LD_PRELOAD); returns its path. */
export function compileShim(name: string, dir: string): string {
  const out = join(dir, `${name}.so`);
  execFileSync('cc', ['-shared', '-fPIC', '-O2', '-o', out, fileURLToPath(new URL(`./fixtures/${name}.c`, import.meta.url))]);
  return out;
}

/**
 * LD_PRELOAD value for a shim, after whatever is preloaded already: under
 * `npm run test:asan` the sanitizer runtimes are preloaded and must stay first.
 */
export function preload(shim: string): string {
  return [process.env.LD_PRELOAD, shim].filter(Boolean).join(':');
}

/** Runs an ES module script with plain node; returns its stdout parsed as JSON (stderr must be empty). */
export function runScript(source: string, env: NodeJS.ProcessEnv = {}): unknown {
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', source], { encoding: 'utf8', env: { ...process.env, ...env } });
  if (r.stderr !== '') throw new Error(`script wrote to stderr: ${r.stderr}`);
  return JSON.parse(r.stdout);
}

/** The URL of the built package entry, for scripts run by plain node. */
export const distUrl = new URL('../dist/index.js', import.meta.url).href;

/**
 * LockManagers and manager peer processes (fixtures/manager-peer.mjs) made by
 * a test, freed after it, as a vitest hook. Managers first: under lockLifetime
 * 'child' a killed supervisor's child lives on, and free() kills it.
 */
export function managerHarness(): { managers: LockManager[]; peers: Peer[]; manager(options?: LockManagerOptions): LockManager; managerPeer(): Promise<Peer> } {
  const harness = {
    managers: [] as LockManager[],
    peers: [] as Peer[],
    manager(options?: LockManagerOptions): LockManager {
      const m = new LockManager(options);
      harness.managers.push(m);
      return m;
    },
    async managerPeer(): Promise<Peer> {
      const p = await Peer.start(process.env, managerPeerScript);
      harness.peers.push(p);
      return p;
    },
  };
  hooks.afterEach(async () => {
    for (const m of harness.managers.splice(0)) await m.free();
    for (const p of harness.peers.splice(0)) {
      if (p.child.exitCode === null && p.child.signalCode === null) await p.call('free').catch(() => undefined);
      await p.kill();
    }
  });
  return harness;
}

/** Whether a process exists (kill(pid, 0)); a zombie still does. */
export function processExists(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/**
 * Runs node with `args` (a script: ['--input-type=module', '-e', source])
 * under strace and returns the open(2)-family, unlink and rename calls whose
 * path is one of `paths`, as strace printed them (O_PATH opens included);
 * null when strace is not installed. The run may fail (a CLI exiting 64).
 */
export function syscallsOnPaths(args: readonly string[], paths: readonly string[]): string[] | null {
  if (spawnSync('strace', ['-V']).status !== 0) return null;
  const { dir, cleanup } = tempDir();
  try {
    const log = join(dir, 'strace.log');
    const r = spawnSync('strace', ['-f', '-qq', '-e', 'trace=open,openat,openat2,creat,unlink,unlinkat,rename,renameat,renameat2', '-o', log, process.execPath, ...args], {
      encoding: 'utf8',
    });
    if (r.error) throw r.error;
    return readFileSync(log, 'utf8')
      .split('\n')
      .filter((line) => paths.some((p) => line.includes(JSON.stringify(p))));
  } finally {
    cleanup();
  }
}

/** syscallsOnPaths() of an ES module script. */
export function opensUnderStrace(source: string, paths: readonly string[]): string[] | null {
  return syscallsOnPaths(['--input-type=module', '-e', source], paths);
}

/** The lock a third party finds on one byte of `file` (F_OFD_GETLK for a write lock): its mode, or 'free' (also when the file does not exist). */
export function lockAt(file: string, byte: number): 'exclusive' | 'shared' | 'free' {
  let f;
  try {
    f = openLockable(file, { access: 'read' });
  } catch {
    return 'free';
  }
  try {
    return f.getConflict('exclusive', { start: byte, length: 1 })?.mode ?? 'free';
  } finally {
    f.close();
  }
}

let nameSeq = 0;
/**
 * A name no other call gets: the pid tells concurrent processes apart, the
 * clock a later test file in a reused worker process, the counter calls in one
 * millisecond. No randomness, so nothing a failure would need to replay.
 */
export function uniqueName(prefix: string): string {
  return `${prefix}-${process.pid}-${Date.now().toString(36)}-${++nameSeq}`;
}

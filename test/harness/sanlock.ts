// Simulated sanlock hosts on this machine (docs/sanlock.md, "Tests"): one
// daemon per host, each with its own SANLOCK_RUN_DIR and host name,
// unprivileged (SANLOCK_PRIVILEGED=0) and without a watchdog (-w 0), sharing
// one lockspace with io_timeout 1 on a loop device. The sanlock client library
// reads SANLOCK_RUN_DIR once per process, so one host is one process: the test
// process is host 1 (the constructor points SANLOCK_RUN_DIR at it, before any
// call into the library), and host 2 and up are manager peer processes started
// with env(h).
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { SanlockLockspaceConfig } from '../../lib/lockspaces/index.js';
import { createDiskLease, createNamedLease, initStorage, joinLockspace, sanlockLibraryError } from '../../lib/lockspaces/sanlock-client.js';
import { isRoot, uniqueName, waitUntil } from '../helpers.js';

/** Why sanlock tests cannot run here, or null: only what is truly absent (not root, no daemon, no client library, no losetup). */
export function sanlockUnavailable(): string | null {
  if (!isRoot) return 'not root (loop devices and the sanlock daemon need root)';
  if (spawnSync('sanlock', ['version']).error !== undefined) return 'the sanlock daemon is not installed (Debian: apt-get install sanlock libsanlock-client1)';
  if (spawnSync('losetup', ['--version']).error !== undefined) return 'losetup is missing';
  const lib = sanlockLibraryError();
  if (lib !== null) return `libsanlock_client.so.1 cannot be loaded: ${lib}`;
  return null;
}

export class SanlockCluster {
  /** Everything of the cluster: the lease storage's backing file, the run dirs; removed at teardown. */
  readonly root: string;
  readonly lockspace: string;
  readonly hosts: number;
  readonly daemons: ChildProcess[] = [];
  /** The shared lease storage (a loop device), once set up. */
  loop = '';
  /** How long the joins took (ms). */
  joinMs = 0;

  /** Points this process's SANLOCK_RUN_DIR at host 1: construct it before any sanlock call. Creates nothing yet. */
  constructor(options: { lockspace: string; hosts?: number; prefix?: string }) {
    this.lockspace = options.lockspace;
    this.hosts = options.hosts ?? 2;
    this.root = join(tmpdir(), uniqueName(options.prefix ?? 'lockmgr-sanlock'));
    process.env.SANLOCK_RUN_DIR = this.runDir(1);
  }

  runDir(h: number): string {
    return join(this.root, `h${h}`);
  }

  /** The environment of a process that is host h. */
  env(h: number): NodeJS.ProcessEnv {
    return { ...process.env, SANLOCK_RUN_DIR: this.runDir(h) };
  }

  /** The lockspace options of a manager on host h. */
  config(h: number): SanlockLockspaceConfig {
    return { kind: 'sanlock', lockspace: this.lockspace, path: this.loop, hostId: h };
  }

  /**
   * A loop device of `sizeMiB`, a daemon per host, the lockspace written with
   * io_timeout 1 and joined by every host at once (host 1 through lockmgr,
   * the others through the sanlock CLI): about 3 s.
   */
  async setup(sizeMiB = 64): Promise<void> {
    mkdirSync(this.root, { recursive: true, mode: 0o700 });
    const lun = join(this.root, 'lun.img');
    execFileSync('truncate', ['-s', `${sizeMiB}M`, lun]);
    this.loop = execFileSync('losetup', ['-f', '--show', lun], { encoding: 'utf8' }).trim();
    for (let h = 1; h <= this.hosts; h++) this.#startDaemon(h);
    await waitUntil(() => [...Array(this.hosts).keys()].every((i) => existsSync(join(this.runDir(i + 1), 'sanlock.sock'))), 10_000, 'the sanlock daemons');
    await initStorage({ lockspace: this.lockspace, path: this.loop, ioTimeout: 1 });
    const t0 = Date.now();
    const others = [...Array(this.hosts - 1).keys()].map(
      (i) =>
        new Promise<void>((resolve, reject) => {
          const h = i + 2;
          const c = spawn('sanlock', ['client', 'add_lockspace', '-o', '1', '-s', `${this.lockspace}:${h}:${this.loop}:0`], { env: this.env(h), stdio: 'ignore' });
          c.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`add_lockspace for host ${h} exited ${code}`))));
        }),
    );
    const joined = await joinLockspace({ lockspace: this.lockspace, path: this.loop, hostId: 1, ioTimeout: 1 });
    if (joined.wasJoined) throw new Error('host 1 had joined already');
    this.joinMs = Date.now() - t0;
    await Promise.all(others);
  }

  /** Starts host h's daemon again after it died, and joins it to the lockspace again (a host that rebooted). */
  async revive(h: number): Promise<void> {
    if (this.daemonAlive(h)) throw new Error(`host ${h}'s daemon still runs`);
    rmSync(join(this.runDir(h), 'sanlock.sock'), { force: true });
    this.#startDaemon(h, h - 1);
    await waitUntil(() => existsSync(join(this.runDir(h), 'sanlock.sock')), 10_000, `host ${h}'s daemon`);
    this.client(h, 'add_lockspace', '-o', '1', '-s', `${this.lockspace}:${h}:${this.loop}:0`);
  }

  #startDaemon(h: number, slot = this.daemons.length): void {
    mkdirSync(this.runDir(h), { recursive: true });
    const d = spawn('sanlock', ['daemon', '-D', '-w', '0', '-e', `host${h}`, '-U', '0', '-G', '0'], {
      env: { ...this.env(h), SANLOCK_PRIVILEGED: '0' },
      stdio: 'ignore',
    });
    this.daemons[slot] = d;
  }

  async createDiskLease(disk: string): Promise<{ offset: number; created: boolean }> {
    return createDiskLease({ lockspace: this.lockspace, path: this.loop, disk });
  }

  /** A named lease's sanlock resource, by its file path `<path>/<lockspace>/<key>`. */
  async createNamedLease(file: string): Promise<{ offset: number; created: boolean }> {
    return createNamedLease({ lockspace: this.lockspace, path: this.loop, lease: file });
  }

  /** `sanlock client ARGS` as host h. */
  client(h: number, ...args: string[]): string {
    return execFileSync('sanlock', ['client', ...args], { env: this.env(h), encoding: 'utf8' });
  }

  daemonAlive(h: number): boolean {
    const d = this.daemons[h - 1];
    return d !== undefined && d.exitCode === null && d.signalCode === null;
  }

  /**
   * The leases host h's daemon holds or is still releasing, as
   * "r LS:RES:PATH:OFFSET:LVER p PID" lines (":SH" instead of the version
   * for a shared one; "REM" appended while the daemon writes the release).
   * A daemon that is gone holds nothing and answers nothing.
   */
  heldOn(h: number): string[] {
    if (!this.daemonAlive(h)) return [];
    return this.client(h, 'status')
      .split('\n')
      .filter((l) => l.startsWith('r '));
  }

  /** Every host's lease lines. */
  held(): string[] {
    return [...Array(this.hosts).keys()].flatMap((i) => this.heldOn(i + 1));
  }

  /** Stops every daemon (a clean shutdown also ends its helper process), detaches the loop device, removes root. */
  async teardown(): Promise<void> {
    for (const [i, d] of this.daemons.entries()) {
      if (d.exitCode !== null || d.signalCode !== null) continue;
      const gone = new Promise((r) => d.once('exit', r));
      spawnSync('sanlock', ['client', 'shutdown', '-f', '1'], { env: this.env(i + 1), stdio: 'ignore' });
      const timer = setTimeout(() => d.kill('SIGKILL'), 5000);
      await gone;
      clearTimeout(timer);
    }
    if (this.loop !== '') spawnSync('losetup', ['-d', this.loop]);
    rmSync(this.root, { recursive: true, force: true });
  }
}

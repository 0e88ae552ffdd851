// The crash matrix (issue 8): SIGKILL the supervising Node process at every
// step of start, hotplug, migration (both sides) and shutdown, under both lock
// lifetimes, in the direct and the indirect lockspace, and at random moments
// of scripted sequences. The victim is test/fixtures/crash-peer.mjs, a real
// process running a LockManager that reports each step synchronously and
// freezes at the chosen one (a 'state' event, or a hook on the native spawn
// and lock-wait calls), so the kill lands there: no sleeps decide a step.
//
// After each kill an observer (this process, a third party) checks:
//   - a live child of the killed supervisor holds the lease bytes it should
//     hold (F_OFD_GETLK from here), through an fd on the very inode the lease
//     file's name points at (/proc/PID/fd; for an indirect lockspace this is
//     "the lock files it has open are the ones the names point at");
//   - under lockLifetime 'supervisor' the child dies, and is never seen alive
//     without its leases while it does;
//   - nothing is held that only the dead supervisor held (a hot-plugged lease,
//     a half-finished acquire, a take-back in progress);
//   - once the child is killed too: nothing at all is locked on the trial's
//     files (/proc/locks and F_OFD_GETLK), no zombie is left (children of this
//     process at once; the orphans, which init reaps, at the end), and the
//     indirect lock directory holds only unlocked lock files, which the next
//     user of the lockspace deletes (crashes leave lock files behind by design:
//     docs/lockspaces.md, "Known holes").
// Every trial records its step and outcome; the test asserts 0 violations and
// prints the counts. Sizes: LOCKMGR_CRASH_ROUNDS (default 2 rounds of the
// deterministic matrix: 17 steps x 2 lifetimes x 2 lockspaces each) and
// LOCKMGR_CRASH_RANDOM (random-moment trials per script, lifetime and
// lockspace; default 9).
import { execFileSync, fork, type ChildProcess } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, realpathSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Readable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LockManager, locksOn, openLockable, type LockManagerOptions, type LockspaceOptions as LockspaceConfig } from '../lib/index.js';
import { inodeIdentity, lockFileName } from '../lib/lockspaces/indirect.js';
import { procStat, within, zombieChildren } from './process-helpers.js';

const ROUNDS = Number(process.env.LOCKMGR_CRASH_ROUNDS ?? 2);
const RANDOM = Number(process.env.LOCKMGR_CRASH_RANDOM ?? 9);
/** Runs only the steps whose name contains this (for debugging). */
const ONLY = process.env.LOCKMGR_CRASH_ONLY;
const PARALLEL = Number(process.env.LOCKMGR_CRASH_PARALLEL ?? 3);
/** Hang guards only: no pass condition depends on them. */
const GUARD_MS = 30_000;
const peerScript = fileURLToPath(new URL('./fixtures/crash-peer.mjs', import.meta.url));
const TARGET_URI = 'qemu+ssh://target.example/system';
const SOURCE_URI = 'qemu+ssh://source.example/system';

type Lifetime = 'child' | 'supervisor';
type Space = 'direct' | 'indirect';
type Res = 'A' | 'B' | 'C';
type Mode = 'exclusive' | 'shared';
/** A lock the child must hold: byte 0 the lease, 1 the guard, 2 the pin (indirect lock files only). */
interface Want {
  res: Res;
  byte: 0 | 1 | 2;
  mode: Mode;
}

// Registered: A exclusive, C shared. B is hot-plugged exclusive.
const LEASES: Want[] = [
  { res: 'A', byte: 0, mode: 'exclusive' },
  { res: 'C', byte: 0, mode: 'shared' },
];
const GUARDS: Want[] = [
  { res: 'A', byte: 1, mode: 'exclusive' },
  { res: 'C', byte: 1, mode: 'shared' },
];
const PINS: Want[] = [
  { res: 'A', byte: 2, mode: 'shared' },
  { res: 'C', byte: 2, mode: 'shared' },
];

let childBinary = '';
let binDir = '';
let trialSeq = 0;

// ---------------------------------------------------------------- the trial's world

class Trial {
  readonly dir: string;
  readonly lockDir: string;
  readonly paths: Record<Res, string>;
  readonly tag: string;
  readonly partners: LockManager[] = [];
  readonly notes: string[] = [];
  victim: Victim | null = null;
  env: NodeJS.ProcessEnv = process.env;

  constructor(
    readonly step: string,
    readonly lifetime: Lifetime,
    readonly space: Space,
    readonly variant: 'ignore-term' | 'plain',
  ) {
    this.dir = mkdtempSync(join(tmpdir(), 'lockmgr-crash-'));
    this.lockDir = join(this.dir, 'locks');
    mkdirSync(this.lockDir, { mode: 0o700 });
    this.paths = { A: this.#file('a.img'), B: this.#file('b.img'), C: this.#file('c.img') };
    this.tag = `crash-trial-${process.pid}-${++trialSeq}`;
  }

  #file(name: string): string {
    const p = join(this.dir, name);
    writeFileSync(p, 'x'.repeat(4096));
    return p;
  }

  get lockspace(): LockspaceConfig {
    return this.space === 'direct' ? { kind: 'direct' } : { kind: 'indirect', dir: this.lockDir };
  }

  get options(): LockManagerOptions {
    return { lockspace: this.lockspace, lockLifetime: this.lifetime };
  }

  get command(): [string, string[], object] {
    return [childBinary, [this.variant, this.tag], { stdio: 'ignore' }];
  }

  disk(res: Res, mode: Mode = res === 'C' ? 'shared' : 'exclusive'): { type: 'disk'; path: string; mode: Mode } {
    return { type: 'disk', path: this.paths[res], mode };
  }

  /** The resources every source of a trial holds when it migrates (B is hot-plugged and released before): a target's own configuration. */
  registered(): Array<{ type: 'disk'; path: string; mode: Mode }> {
    return [this.disk('A'), this.disk('C')];
  }

  /** The files that carry res's lease: the image (direct), or its lock files (indirect: path file, inode file). */
  leaseFiles(res: Res): string[] {
    const image = this.paths[res];
    if (this.space === 'direct') return [image];
    const st = statSync(image, { bigint: true });
    return [join(this.lockDir, lockFileName(realpathSync(image))), join(this.lockDir, lockFileName(inodeIdentity(st.dev, st.ino)))];
  }

  /** A LockManager in this process (a source, a target or a blocker), freed before the observer looks. */
  async partner(register: Res[], start = true): Promise<LockManager> {
    const m = new LockManager({ lockspace: this.lockspace });
    this.partners.push(m);
    for (const r of register) m.registerResource(this.disk(r));
    if (start) await m.start(childBinary, ['plain', `${this.tag}-partner`], { stdio: 'ignore' });
    return m;
  }

  async partnerTarget(token: string): Promise<LockManager> {
    const m = LockManager.fromInquire(token, { lockspace: this.lockspace, resources: this.registered() });
    this.partners.push(m);
    await m.start(childBinary, ['plain', `${this.tag}-partner`], { stdio: 'ignore' });
    return m;
  }

  /** A victim set up with A and C registered, as a fresh manager or a migration target. */
  async victimWith(token?: string): Promise<Victim> {
    const v = await Victim.start({ ...this.env, CRASH_TRIAL: this.tag });
    this.victim = v;
    if (token === undefined) {
      await v.call('create', this.options);
      await v.call('register', this.disk('A'));
      await v.call('register', this.disk('C'));
    } else {
      await v.call('fromInquire', token, { ...this.options, resources: this.registered() });
    }
    return v;
  }

  async running(): Promise<Victim> {
    const v = await this.victimWith();
    const pid = await v.call<number>('start', ...this.command);
    // The child ignores SIGTERM once its main() has run: a shutdown before that would kill it.
    if (this.variant === 'ignore-term') await within(untilIgnoresTerm(pid), GUARD_MS, `child ${pid} to ignore SIGTERM`);
    return v;
  }

  cleanup(): void {
    rmSync(this.dir, { recursive: true, force: true });
  }
}

async function untilIgnoresTerm(pid: number): Promise<void> {
  for (;;) {
    const m = /^SigIgn:\s*([0-9a-f]+)$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    if (m !== null && (BigInt(`0x${m[1]}`) & (1n << 14n)) !== 0n) return;
    await new Promise((r) => setTimeout(r, 2));
  }
}

/** The crash-peer process: IPC calls, and the progress records it writes on fd 4. */
class Victim {
  readonly child: ChildProcess;
  readonly records: Array<Record<string, unknown>> = [];
  readonly exited: Promise<void>;
  readonly ended: Promise<void>;
  readonly #pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: unknown) => void }>();
  readonly #watchers: Array<() => void> = [];
  #next = 1;

  private constructor(env: NodeJS.ProcessEnv) {
    this.child = fork(peerScript, [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc', 'pipe'], env });
    this.exited = new Promise((resolve) => this.child.once('exit', () => resolve()));
    const progress = this.child.stdio[4] as Readable;
    let buf = '';
    progress.setEncoding('utf8');
    progress.on('data', (d: string) => {
      buf += d;
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        this.records.push(JSON.parse(buf.slice(0, nl)) as Record<string, unknown>);
        buf = buf.slice(nl + 1);
      }
      for (const w of this.#watchers) w();
    });
    this.ended = new Promise((resolve) => progress.once('close', () => resolve()));
    this.child.on('message', (msg: { ready?: boolean; id?: number; ok?: boolean; value?: unknown; error?: { code: string; message: string } }) => {
      if (msg.ready) {
        for (const w of this.#watchers) w();
        return;
      }
      const p = this.#pending.get(msg.id!);
      if (!p) return;
      this.#pending.delete(msg.id!);
      if (msg.ok) p.resolve(msg.value);
      else p.reject(Object.assign(new Error(msg.error!.message), msg.error));
    });
  }

  /** CRASH_PEER_BREAK in env breaks the victim on purpose (the observer's own test). */
  static async start(env: NodeJS.ProcessEnv = process.env): Promise<Victim> {
    const v = new Victim(env);
    await within(
      new Promise<void>((resolve, reject) => {
        v.child.once('message', (m: { ready?: boolean }) => (m.ready ? resolve() : undefined));
        v.child.once('exit', (code) => reject(new Error(`crash-peer exited early with ${code}`)));
      }),
      GUARD_MS,
      'crash-peer to start',
    );
    return v;
  }

  call<T = unknown>(op: string, ...args: unknown[]): Promise<T> {
    const id = this.#next++;
    return new Promise<T>((resolve, reject) => {
      this.#pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.child.send({ id, op, args });
    });
  }

  /** A call that is expected to freeze (or to be cut short by the kill): its reply is never awaited. */
  fire(op: string, ...args: unknown[]): void {
    this.call(op, ...args).catch(() => undefined);
  }

  /** Resolves with the first record that matches; rejects if the process ends first. */
  until(match: (r: Record<string, unknown>) => boolean, what: string): Promise<Record<string, unknown>> {
    return within(
      new Promise((resolve, reject) => {
        const check = (): void => {
          const hit = this.records.find(match);
          if (hit !== undefined) resolve(hit);
          else if (this.child.exitCode !== null || this.child.signalCode !== null) reject(new Error(`crash-peer exited before ${what}: ${JSON.stringify(this.records)}`));
        };
        this.#watchers.push(check);
        this.child.once('exit', check);
        check();
      }),
      GUARD_MS,
      what,
    );
  }

  frozen(at: string): Promise<Record<string, unknown>> {
    return this.until((r) => r.frozen === at, `freeze at ${at}`);
  }

  /** SIGKILL, then wait for the exit and for every progress record written before it. */
  async kill(): Promise<void> {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGKILL');
    await within(Promise.all([this.exited, this.ended]), GUARD_MS, 'the killed supervisor to be reaped');
  }
}

// ---------------------------------------------------------------- what the observer sees

/** The lock a third party finds on one byte of `file`: its mode, or 'free' (also when the file does not exist). */
function lockAt(file: string, byte: number): Mode | 'free' {
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

/** Whether process `pid` has an fd on the inode that `file`'s name points at now. */
function hasFdOn(pid: number, file: string): boolean {
  let target;
  try {
    target = statSync(file, { bigint: true });
  } catch {
    return false;
  }
  let fds: string[];
  try {
    fds = readdirSync(`/proc/${pid}/fd`);
  } catch {
    return false;
  }
  return fds.some((fd) => {
    try {
      const st = statSync(`/proc/${pid}/fd/${fd}`, { bigint: true });
      return st.dev === target.dev && st.ino === target.ino;
    } catch {
      return false;
    }
  });
}

/** /proc/PID/stat's start time, or null when there is no such process. */
function startTime(pid: number): string | null {
  try {
    return procStat(pid)[19] ?? null;
  } catch {
    return null;
  }
}

interface Proc {
  pid: number;
  start: string;
}

/**
 * The trial's processes: those whose environment has CRASH_TRIAL=tag. The
 * victim runs with it and its children inherit it; a child caught between
 * clone and exec (its supervisor killed in the middle of a spawn) still shows
 * its parent's memory, environment included. Zombies show none: they no
 * longer run.
 */
function tagged(tag: string): Proc[] {
  const out: Proc[] = [];
  const needle = `CRASH_TRIAL=${tag}`;
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      if (!readFileSync(`/proc/${name}/environ`, 'utf8').split('\0').includes(needle)) continue;
      const start = startTime(Number(name));
      if (start !== null) out.push({ pid: Number(name), start });
    } catch {
      // gone while we looked
    }
  }
  return out;
}

/** Every process running our child binary, zombies included (their comm stays). */
function childBinaryProcesses(): number[] {
  const out: number[] = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      if (readFileSync(`/proc/${name}/comm`, 'utf8').trim() === 'crash-child') out.push(Number(name));
    } catch {
      // gone
    }
  }
  return out;
}

/** PF_EXITING in /proc/PID/stat's flags: do_exit() has begun; it runs no more user code. */
const PF_EXITING = 0x4;

/** Alive: exists (the same process: same start time), not a zombie, not exiting. */
function isAlive(p: Proc): boolean {
  try {
    const stat = procStat(p.pid);
    return stat[19] === p.start && stat[0] !== 'Z' && (Number(stat[6]) & PF_EXITING) === 0;
  } catch {
    return false;
  }
}

/** The images and lock files of a trial. */
function trialFiles(t: Trial): string[] {
  return [...Object.values(t.paths), ...readdirSync(t.lockDir).map((n) => join(t.lockDir, n))];
}

/** Processes other than this one with an fd on any of `files` (by device and inode). */
function openers(files: string[]): Proc[] {
  const inodes = new Set<string>();
  for (const f of files) {
    try {
      const st = statSync(f, { bigint: true });
      inodes.add(`${st.dev}:${st.ino}`);
    } catch {
      // deleted meanwhile
    }
  }
  const out: Proc[] = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name) || Number(name) === process.pid) continue;
    let fds: string[];
    try {
      fds = readdirSync(`/proc/${name}/fd`);
    } catch {
      continue;
    }
    const hit = fds.some((fd) => {
      try {
        const st = statSync(`/proc/${name}/fd/${fd}`, { bigint: true });
        return inodes.has(`${st.dev}:${st.ino}`);
      } catch {
        return false;
      }
    });
    const start = hit ? startTime(Number(name)) : null;
    if (start !== null) out.push({ pid: Number(name), start });
  }
  return out;
}

function isGoneOrZombie(p: Proc): boolean {
  try {
    const stat = procStat(p.pid);
    return stat[19] !== p.start || stat[0] === 'Z';
  } catch {
    return true;
  }
}

/** What the child must hold now; [] when fine, else the violations. */
type Rule = (trial: Trial, child: Proc) => string[];

function holds(wants: Want[], options: { anyOf?: boolean } = {}): Rule {
  return (trial, child) => {
    const missing: string[] = [];
    for (const w of wants) {
      for (const file of trial.leaseFiles(w.res)) {
        const seen = lockAt(file, w.byte);
        if (seen !== w.mode) missing.push(`${w.res} byte ${w.byte} of ${file}: want ${w.mode}, see ${seen}`);
        else if (!hasFdOn(child.pid, file)) missing.push(`${w.res} byte ${w.byte}: ${file} is locked, but the child ${child.pid} has no fd on the inode its name points at`);
      }
    }
    if (options.anyOf) return missing.length < wants.length * (trial.space === 'direct' ? 1 : 2) ? [] : missing;
    return missing;
  };
}

/** Each resource's lease or its guard (a target between 'incoming' and 'running'). */
function leaseOrGuard(): Rule {
  return (trial, child) => {
    const out: string[] = [];
    for (const [lease, guard] of [
      [LEASES[0]!, GUARDS[0]!],
      [LEASES[1]!, GUARDS[1]!],
    ] as const) {
      const a = holds([lease])(trial, child);
      const b = holds([guard])(trial, child);
      if (a.length > 0 && b.length > 0) out.push(`${lease.res}: neither the lease nor the guard is held by the live child (${[...a, ...b].join('; ')})`);
    }
    return out;
  };
}

/** Bytes nobody may hold once the supervisor is dead and the partners are freed. */
function free(wants: Array<Pick<Want, 'res' | 'byte'>>): (trial: Trial) => string[] {
  return (trial) =>
    wants.flatMap((w) =>
      trial.leaseFiles(w.res).flatMap((file) => {
        const seen = lockAt(file, w.byte);
        return seen === 'free' ? [] : [`${w.res} byte ${w.byte} of ${file} is held (${seen}) with its only holder dead`];
      }),
    );
}

interface Plan {
  /** What a live child must hold; null: no child may exist at this step. */
  rule: Rule | null;
  /** Bytes that must be free right after the kill (before the child is killed too). */
  free?: (trial: Trial) => string[];
  /** Under 'child' lifetime the child must survive the supervisor (false where it was sent SIGTERM). */
  survives?: boolean;
}

// ---------------------------------------------------------------- the steps

type Step = (t: Trial) => Promise<Plan>;

const STEPS: Record<string, Step> = {
  // start
  async 'start: before acquiring'(t) {
    const v = await t.victimWith();
    await v.call('freeze', { at: 'state:starting' });
    v.fire('start', ...t.command);
    await v.frozen('state:starting');
    return { rule: null };
  },
  async 'start: while acquiring'(t) {
    await t.partner(['A']);
    const v = await t.victimWith();
    await v.call('freeze', { at: 'wait' });
    v.fire('start', ...t.command, { timeout: 600_000 });
    await v.frozen('wait');
    return { rule: null };
  },
  async 'start: acquired, before spawn'(t) {
    const v = await t.victimWith();
    await v.call('freeze', { at: 'spawn-before' });
    v.fire('start', ...t.command);
    await v.frozen('spawn-before');
    return { rule: null };
  },
  async 'start: right after spawn'(t) {
    const v = await t.victimWith();
    await v.call('freeze', { at: 'spawn-after' });
    v.fire('start', ...t.command);
    await v.frozen('spawn-after');
    return { rule: holds(LEASES) };
  },
  async 'start: running'(t) {
    const v = await t.victimWith();
    await v.call('freeze', { at: 'state:running' });
    v.fire('start', ...t.command);
    await v.frozen('state:running');
    return { rule: holds(LEASES) };
  },
  // hotplug
  async 'hotplug: while waiting'(t) {
    await t.partner(['B']);
    const v = await t.running();
    await v.call('freeze', { at: 'wait' });
    v.fire('acquire', t.disk('B'), { timeout: 600_000 });
    await v.frozen('wait');
    return { rule: holds(LEASES), free: free([{ res: 'B', byte: 0 }]) };
  },
  async 'hotplug: right after acquire'(t) {
    const v = await t.running();
    await v.call('freeze', { at: 'acquired' });
    v.fire('acquireThenHook', t.disk('B'));
    await v.frozen('acquired');
    // Hot-plugged leases are the supervisor's (docs/contract.md): gone with it.
    return { rule: holds(LEASES), free: free([{ res: 'B', byte: 0 }]) };
  },
  // migration target
  async 'target: during guard take'(t) {
    const token = (await t.partner(['A', 'C'], false)).inquire();
    await t.partnerTarget(token);
    const v = await t.victimWith(token);
    await v.call('freeze', { at: 'wait' });
    v.fire('start', ...t.command, { timeout: 600_000 });
    await v.frozen('wait');
    return { rule: null };
  },
  async 'target: incoming'(t) {
    const src = await t.partner(['A', 'C']);
    const v = await t.victimWith(src.inquire());
    await v.call('freeze', { at: 'state:incoming' });
    v.fire('start', ...t.command);
    await v.frozen('state:incoming');
    return { rule: holds(GUARDS), free: free([{ res: 'A', byte: 0 }]) };
  },
  async 'target: waiting in completeMigrateIn'(t) {
    const src = await t.partner(['A', 'C']);
    const v = await t.victimWith(src.inquire());
    await v.call('start', ...t.command);
    await v.call('freeze', { at: 'wait' });
    v.fire('completeMigrateIn', SOURCE_URI);
    await v.frozen('wait');
    return { rule: holds(GUARDS), free: free([{ res: 'A', byte: 0 }]) };
  },
  async 'target: right after completeMigrateIn'(t) {
    const src = await t.partner(['A', 'C']);
    const v = await t.victimWith(src.inquire());
    await v.call('start', ...t.command);
    await src.prepareMigrate(TARGET_URI);
    await src.completeMigrateOut(TARGET_URI);
    await v.call('freeze', { at: 'state:running' });
    v.fire('completeMigrateIn', SOURCE_URI);
    await v.frozen('state:running');
    return { rule: holds(LEASES), free: free([{ res: 'A', byte: 1 }]) };
  },
  // migration source
  async 'source: migrating'(t) {
    const v = await t.running();
    await t.partnerTarget(await v.call<string>('inquire'));
    await v.call('freeze', { at: 'state:migrating' });
    v.fire('prepareMigrate', TARGET_URI);
    await v.frozen('state:migrating');
    return { rule: holds(LEASES) };
  },
  async 'source: right after completeMigrateOut'(t) {
    const v = await t.running();
    await t.partnerTarget(await v.call<string>('inquire'));
    await v.call('prepareMigrate', TARGET_URI);
    await v.call('freeze', { at: 'state:migrated' });
    v.fire('completeMigrateOut', TARGET_URI);
    await v.frozen('state:migrated');
    // Released for the target; an indirect lock file stays pinned by the child.
    return { rule: t.space === 'indirect' ? holds(PINS) : () => [], free: free([{ res: 'A', byte: 0 }]) };
  },
  async 'source: during a take-back'(t) {
    const v = await t.running();
    const target = await t.partnerTarget(await v.call<string>('prepareMigrate', TARGET_URI));
    await v.call('completeMigrateOut', TARGET_URI);
    await target.completeMigrateIn(SOURCE_URI);
    await v.call('freeze', { at: 'wait' });
    v.fire('completeMigrateOut', TARGET_URI, { cancel: true, timeout: 600_000 });
    await v.frozen('wait');
    return { rule: t.space === 'indirect' ? holds(PINS) : () => [], free: free([{ res: 'A', byte: 0 }]) };
  },
  async 'source: right after a take-back'(t) {
    const v = await t.running();
    await t.partnerTarget(await v.call<string>('prepareMigrate', TARGET_URI));
    await v.call('completeMigrateOut', TARGET_URI);
    await v.call('freeze', { at: 'state:running', nth: 2 });
    v.fire('completeMigrateOut', TARGET_URI, { cancel: true });
    await v.frozen('state:running');
    return { rule: holds(LEASES) };
  },
  // shutdown
  async 'shutdown: stopping'(t) {
    const v = await t.running();
    await v.call('freeze', { at: 'state:stopping' });
    v.fire('shutdown', { graceMs: 600_000 });
    await v.frozen('state:stopping');
    return { rule: holds(LEASES), survives: false };
  },
  async 'shutdown: in the grace period'(t) {
    const v = await t.running();
    v.fire('shutdown', { graceMs: 600_000 });
    await v.until((r) => r.state === 'stopping', "state 'stopping'");
    return { rule: holds(LEASES), survives: false };
  },
};

// ---------------------------------------------------------------- random moments

interface RandomScript {
  /** Sets the scene, starts the script in the victim; returns when it runs. */
  run(t: Trial, v: Victim): Promise<void>;
  /** The rule for a live child, from what the victim reported before it died. */
  rule(t: Trial, records: Array<Record<string, unknown>>): Rule | null;
}

const SCRIPTS: Record<string, RandomScript> = {
  // start, then rounds of hotplug, release, migrate out and take back (or cancel), then shutdown.
  source: {
    async run(t, v) {
      await v.call('create', t.options);
      await v.call('register', t.disk('A'));
      await v.call('register', t.disk('C'));
      const [command, args, spawnOptions] = t.command;
      await v.call('script', 'source', { command, args, spawnOptions, hotplug: t.disk('B'), rounds: 3 });
    },
    rule(t, records) {
      // Between a completeMigrateOut() call and the 'running' that ends the take-back, the leases are the target's to take.
      let released = false;
      for (const r of records) {
        if (r.call === 'completeMigrateOut') released = true;
        if (r.state === 'running') released = false;
      }
      if (released) return t.space === 'indirect' ? holds(PINS) : () => [];
      return holds(LEASES);
    },
  },
  // a migration target: guard, incoming, completeMigrateIn while this process's source lets go, shutdown.
  target: {
    async run(t, v) {
      const src = await t.partner(['A', 'C']);
      await v.call('fromInquire', src.inquire(), { ...t.options, resources: t.registered() });
      const [command, args, spawnOptions] = t.command;
      void v.until((r) => r.state === 'incoming', 'incoming').then(
        async () => {
          await src.prepareMigrate(TARGET_URI);
          await src.completeMigrateOut(TARGET_URI);
        },
        () => undefined,
      );
      await v.call('script', 'target', { command, args, spawnOptions });
    },
    rule(_t, records) {
      return records.some((r) => r.state === 'running') ? holds(LEASES) : leaseOrGuard();
    },
  },
};

// ---------------------------------------------------------------- the observer

interface Outcome {
  step: string;
  lifetime: Lifetime;
  space: Space;
  /** A live child of the killed supervisor was checked for its leases. */
  childChecked: boolean;
  leftFiles: number;
  violations: string[];
}

async function observe(t: Trial, plan: Plan, records: Array<Record<string, unknown>>): Promise<Outcome> {
  const violations: string[] = [];
  const v = t.victim!;
  // The killed supervisor was reaped by this process at once.
  if (v.child.pid !== undefined && readdirSync('/proc').includes(String(v.child.pid)) && procStat(v.child.pid)[0] === 'Z') violations.push(`the killed supervisor ${v.child.pid} is a zombie`);
  // Everyone else lets go: the only holders left are the victim's children.
  for (const m of t.partners.splice(0)) await m.free();
  // The victim's children: by the trial's tag in their environment, and
  // anything that still has one of the trial's files open (a child that is
  // exiting has lost its environment with its memory, not yet its files).
  const found = new Map<number, Proc>();
  for (const p of [...tagged(t.tag), ...openers(trialFiles(t))]) found.set(p.pid, p);
  const live = [...found.values()].filter(isAlive);
  if (live.length > 1) violations.push(`${live.length} live processes of the trial: ${live.map((c) => c.pid).join(', ')}`);
  const child = live[0];
  let checked = false;
  if (plan.rule === null && child !== undefined) violations.push(`a child ${child.pid} runs at a step where none should exist`);
  violations.push(...(plan.free?.(t) ?? []));
  // Under 'child' lifetime the child it reported spawning outlives it (unless it was sent SIGTERM).
  const spawned = records.filter((r) => typeof r.spawned === 'number').map((r) => r.spawned as number);
  if (t.lifetime === 'child' && plan.survives !== false && t.variant === 'ignore-term') {
    for (const pid of spawned) if (!live.some((c) => c.pid === pid)) violations.push(`'child' lifetime: child ${pid} died with its supervisor`);
  }
  if (child !== undefined) {
    if (t.lifetime === 'supervisor') {
      // It dies with its supervisor; whenever it is seen alive, it must be seen holding its leases.
      await within(
        (async () => {
          while (isAlive(child)) {
            checked = true;
            const seen = plan.rule?.(t, child) ?? [];
            if (seen.length > 0 && isAlive(child)) {
              violations.push(`'supervisor' lifetime: child ${child.pid} seen alive without its leases: ${seen.join('; ')}`);
              break;
            }
            await new Promise((r) => setTimeout(r, 2));
          }
        })(),
        GUARD_MS,
        `the child ${child.pid} to die with its supervisor`,
      );
    } else if (plan.rule !== null) {
      checked = true;
      const seen = plan.rule(t, child);
      // Checked again after the fact: a child that died meanwhile is not running unlocked.
      if (seen.length > 0 && isAlive(child)) violations.push(...seen.map((s) => `'child' lifetime, live child ${child.pid}: ${s}`));
    }
  }
  for (const p of found.values()) {
    try {
      if (isAlive(p)) process.kill(p.pid, 'SIGKILL');
    } catch {
      // already gone
    }
    await within(
      (async () => {
        while (!isGoneOrZombie(p)) await new Promise((r) => setTimeout(r, 2));
      })(),
      GUARD_MS,
      `process ${p.pid} to die`,
    );
  }
  // Everything is dead now: nothing may be locked on any of the trial's files.
  const stillOpen = openers(trialFiles(t));
  if (stillOpen.length > 0) violations.push(`processes still have the trial's files open: ${stillOpen.map((p) => p.pid).join(', ')}`);
  for (const f of trialFiles(t)) {
    const held = locksOn(f).filter((l) => !l.blocked);
    if (held.length > 0) violations.push(`${f} still has ${held.length} lock(s) in /proc/locks with every holder dead`);
    let probe;
    try {
      probe = openLockable(f, { access: 'read' });
      const c = probe.getConflict('exclusive', { start: 0, length: 0 });
      if (c !== null) violations.push(`${f}: F_OFD_GETLK sees a ${c.mode} lock at ${c.start} with every holder dead`);
    } catch (err) {
      violations.push(`${f}: cannot probe: ${(err as Error).message}`);
    } finally {
      probe?.close();
    }
  }
  // Lock files a crash left behind are unlocked (checked above); the next user of the lockspace deletes them.
  const left = readdirSync(t.lockDir);
  for (const n of left) if (!/^[0-9a-f]{64}$/.test(n)) violations.push(`a stray file in the lock dir: ${n}`);
  if (t.space === 'indirect') {
    const sweep = new LockManager({ lockspace: t.lockspace });
    for (const r of ['A', 'B', 'C'] as const) sweep.registerResource(t.disk(r));
    await sweep.start(childBinary, ['plain', `${t.tag}-sweep`], { stdio: 'ignore' });
    await sweep.free();
    const after = readdirSync(t.lockDir);
    if (after.length > 0) violations.push(`lock files left in the lock dir after the next user came and went: ${after.join(', ')}`);
  }
  for (const z of zombieChildren(process.pid)) {
    if (z === v.child.pid) violations.push(`zombie child of the test: ${z}`);
  }
  void records;
  return { step: t.step, lifetime: t.lifetime, space: t.space, childChecked: checked, leftFiles: left.length, violations };
}

// ---------------------------------------------------------------- running trials

async function deterministicTrial(step: string, lifetime: Lifetime, space: Space, variant: 'ignore-term' | 'plain', env = process.env): Promise<Outcome> {
  const t = new Trial(step, lifetime, space, variant);
  t.env = env;
  try {
    const plan = await STEPS[step]!(t);
    await t.victim!.kill();
    return await observe(t, plan, t.victim!.records);
  } catch (err) {
    // A trial that breaks is a violation, and the other trials still run and clean up.
    return { step, lifetime, space, childChecked: false, leftFiles: 0, violations: [`the trial failed: ${(err as Error).stack ?? String(err)}`] };
  } finally {
    await cleanupTrial(t);
  }
}

async function randomTrial(script: string, lifetime: Lifetime, space: Space, delayMs: number): Promise<Outcome> {
  const t = new Trial(`random: ${script}`, lifetime, space, 'ignore-term');
  try {
    const v = await Victim.start({ ...process.env, CRASH_TRIAL: t.tag });
    t.victim = v;
    const s = SCRIPTS[script]!;
    await s.run(t, v);
    await new Promise((r) => setTimeout(r, delayMs));
    await v.kill();
    const rule = s.rule(t, v.records);
    return await observe(t, { rule: rule ?? (() => []), survives: !v.records.some((r) => r.call === 'shutdown') }, v.records);
  } catch (err) {
    return { step: t.step, lifetime, space, childChecked: false, leftFiles: 0, violations: [`the trial failed: ${(err as Error).stack ?? String(err)}`] };
  } finally {
    await cleanupTrial(t);
  }
}

async function cleanupTrial(t: Trial): Promise<void> {
  await t.victim?.kill().catch(() => undefined);
  for (const m of t.partners.splice(0)) await m.free().catch(() => undefined);
  for (const p of tagged(t.tag)) {
    try {
      process.kill(p.pid, 'SIGKILL');
    } catch {
      // gone
    }
  }
  t.cleanup();
}

/** How long a script runs uncut, to spread the random kills over it. */
async function calibrate(script: string, space: Space): Promise<number> {
  const t = new Trial(`calibrate: ${script}`, 'child', space, 'ignore-term');
  try {
    const v = await Victim.start({ ...process.env, CRASH_TRIAL: t.tag });
    t.victim = v;
    const begin = performance.now();
    await SCRIPTS[script]!.run(t, v);
    await v.until((r) => r.end === true || r.scriptFailed !== undefined, `the ${script} script to end`);
    const took = performance.now() - begin;
    const failed = v.records.find((r) => r.scriptFailed !== undefined);
    if (failed) throw new Error(`the ${script} script failed uncut: ${JSON.stringify(failed)}`);
    return took;
  } finally {
    await cleanupTrial(t);
  }
}

async function pool<T>(jobs: Array<() => Promise<T>>, width: number): Promise<T[]> {
  const out: T[] = new Array(jobs.length);
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(width, jobs.length) }, async () => {
      while (next < jobs.length) {
        const i = next++;
        out[i] = await jobs[i]!();
      }
    }),
  );
  return out;
}

// ---------------------------------------------------------------- the test

/** Compiles test/fixtures/NAME.c into an executable in `dir`. */
function compileBinary(name: string, dir: string): string {
  const out = join(dir, name);
  execFileSync('cc', ['-O2', '-o', out, fileURLToPath(new URL(`./fixtures/${name}.c`, import.meta.url))]);
  return out;
}

beforeAll(() => {
  binDir = mkdtempSync(join(tmpdir(), 'lockmgr-crash-bin-'));
  childBinary = compileBinary('crash-child', binDir);
});

afterAll(() => {
  if (binDir !== '') rmSync(binDir, { recursive: true, force: true });
});

describe('crash matrix: SIGKILL of the supervisor at every step', () => {
  it('keeps every invariant: no child without its locks, no lock without a live holder, no zombie, no stray lock file', async () => {
    const lifetimes: Lifetime[] = ['child', 'supervisor'];
    const spaces: Space[] = ['direct', 'indirect'];
    const jobs: Array<() => Promise<Outcome>> = [];
    for (let round = 0; round < ROUNDS; round++) {
      const variant = round % 2 === 0 ? 'ignore-term' : 'plain';
      for (const step of Object.keys(STEPS).filter((s) => ONLY === undefined || s.includes(ONLY))) for (const lifetime of lifetimes) for (const space of spaces) jobs.push(() => deterministicTrial(step, lifetime, space, variant));
    }
    if (RANDOM > 0 && ONLY === undefined) {
      for (const script of Object.keys(SCRIPTS)) {
        for (const space of spaces) {
          const span = await calibrate(script, space);
          for (const lifetime of lifetimes) {
            for (let i = 0; i < RANDOM; i++) jobs.push(() => randomTrial(script, lifetime, space, Math.random() * span * 1.1));
          }
        }
      }
    }
    const outcomes = await pool(jobs, PARALLEL);

    // Orphaned children are init's to reap (it does so every second or two
    // here): in the end none may be left, alive or zombie.
    await within(
      (async () => {
        while (childBinaryProcesses().length > 0) await new Promise((r) => setTimeout(r, 50));
      })(),
      GUARD_MS,
      'init to reap the orphaned children',
    ).catch(() => undefined);
    const lingering = childBinaryProcesses();
    const zombies = zombieChildren(process.pid);

    const table = new Map<string, { trials: number; alive: number; leftFiles: number; violations: number }>();
    for (const o of outcomes) {
      const row = table.get(o.step) ?? { trials: 0, alive: 0, leftFiles: 0, violations: 0 };
      row.trials++;
      if (o.childChecked) row.alive++;
      row.leftFiles += o.leftFiles;
      row.violations += o.violations.length;
      table.set(o.step, row);
    }
    const violations = outcomes.flatMap((o) => o.violations.map((v) => `${o.step} [${o.lifetime}, ${o.space}]: ${v}`));
    if (lingering.length > 0) violations.push(`children left behind (alive or zombie): ${lingering.join(', ')}`);
    if (zombies.length > 0) violations.push(`zombie children of the test process: ${zombies.join(', ')}`);
    const lines = [...table].map(([step, r]) => `  ${step.padEnd(42)} ${String(r.trials).padStart(4)} trials  ${String(r.alive).padStart(3)} live children checked  ${String(r.leftFiles).padStart(3)} lock files left (unlocked, swept)  ${r.violations} violations`);
    console.log(`crash matrix: ${outcomes.length} trials, ${violations.length} violations\n${lines.join('\n')}`);
    expect(violations).toEqual([]);
    if (ROUNDS >= 2 && RANDOM >= 9 && ONLY === undefined) expect(outcomes.length).toBeGreaterThanOrEqual(200);
  }, 600_000);
});

describe('the crash observer', () => {
  it('sees a child that runs without its locks (a victim that does not hand the lease fds to its child)', async () => {
    const env = { ...process.env, CRASH_PEER_BREAK: 'drop-lease-fds' };
    const outcomes = await pool(
      (['direct', 'indirect'] as const).flatMap((space) =>
        ['start: running', 'hotplug: right after acquire', 'source: right after a take-back'].map((step) => () => deterministicTrial(step, 'child', space, 'ignore-term', env)),
      ),
      PARALLEL,
    );
    for (const o of outcomes) {
      expect(o.childChecked).toBe(true);
      expect(o.violations.join('\n')).toMatch(/want exclusive, see free/);
    }
  }, 120_000);
});

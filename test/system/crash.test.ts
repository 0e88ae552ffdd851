// The crash matrix (issue 8): SIGKILL the supervising Node process at every
// step of start, hotplug, migration (both sides) and shutdown, under both lock
// lifetimes, in the direct and the indirect lockspace, and at seeded steps of
// scripted sequences. The victim is test/fixtures/crash-peer.mjs, a real
// process running a LockManager that reports each step synchronously and
// freezes at the chosen one (a 'state' event, a hook on the native spawn and
// lock-wait calls, or a step number of a script), so the kill lands there: no
// sleeps decide a step.
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
// prints the counts.
//
// Environment:
//   LOCKMGR_CRASH_ROUNDS    rounds of the deterministic matrix (default 2: 17
//                           steps x 2 lifetimes x 2 lockspaces each)
//   LOCKMGR_CRASH_RANDOM    seeded trials per script, lifetime and lockspace
//                           (default 9)
//   LOCKMGR_CRASH_SEED      the seed of the seeded trials (0..2^32-1; default a
//                           fresh one, printed). Each trial's seed is drawn
//                           from it (one for the two lifetimes of a script and
//                           lockspace); a trial's seed chooses its script's
//                           variant, the lock order of its files and its kill
//                           step (one per lifetime).
//   LOCKMGR_CRASH_REPLAY    runs only the listed seeded trials, comma-separated,
//                           each "<script>:<lifetime>:<space>:<seed>:<step>"
//                           (e.g. source:child:indirect:123456:57): the trial
//                           of that seed, frozen and killed after that step of
//                           its script. <step> 'all' kills at every step in
//                           turn (one trial each); left out, the seed chooses
//                           it. A failure prints this string for each failing
//                           trial.
//   LOCKMGR_CRASH_ONLY      only the deterministic steps whose name contains it
//   LOCKMGR_CRASH_PARALLEL  trials at once (default 3)
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, realpathSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LockManager, locksOn, openLockable, type LockManagerOptions, type LockspaceOptions as LockspaceConfig } from '../../lib/index.js';
import { inodeIdentity, lockFileName } from '../../lib/lockspaces/indirect.js';
import { GUARD_MS, Victim, type Rec } from '../harness/crash-victim.js';
import { lockAt } from '../helpers.js';
import { procStat, within, zombieChildren } from '../harness/process-helpers.js';
import { below, prng, seedFrom, subSeed } from '../harness/seeded.js';

const ROUNDS = Number(process.env.LOCKMGR_CRASH_ROUNDS ?? 2);
const RANDOM = Number(process.env.LOCKMGR_CRASH_RANDOM ?? 9);
/** Runs only the steps whose name contains this (for debugging). */
const ONLY = process.env.LOCKMGR_CRASH_ONLY;
const PARALLEL = Number(process.env.LOCKMGR_CRASH_PARALLEL ?? 3);
const SEED = seedFrom('LOCKMGR_CRASH_SEED');
const REPLAY = process.env.LOCKMGR_CRASH_REPLAY;
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

  /**
   * `order`: the order in which the manager must lock the trial's lease files
   * (its roles, lockOrderOf()). It follows from their names (indirect: hashes of
   * the path and of the inode) or identities (direct: the inode): a seeded
   * trial chooses it and makes files until they fall in it, so that its
   * replay runs the very same steps.
   */
  constructor(
    readonly step: string,
    readonly lifetime: Lifetime,
    readonly space: Space,
    readonly variant: 'ignore-term' | 'plain',
    order?: LockOrder,
  ) {
    this.tag = `crash-trial-${process.pid}-${++trialSeq}`;
    let dir = mkdtempSync(join(tmpdir(), 'lockmgr-crash-'));
    mkdirSync(join(dir, 'locks'), { mode: 0o700 });
    for (const name of IMAGES) writeImage(dir, name);
    if (order !== undefined) dir = arrange(dir, space, order, this.tag);
    this.dir = dir;
    this.lockDir = join(dir, 'locks');
    this.paths = { A: join(dir, 'a.img'), B: join(dir, 'b.img'), C: join(dir, 'c.img') };
  }

  /** Each lease file's role: 'A' (the image, direct), 'A.path' / 'A.inode' (its lock files, indirect). */
  roles(res: Res): Array<{ role: string; file: string }> {
    const files = this.leaseFiles(res);
    return this.space === 'direct' ? [{ role: res, file: files[0]! }] : files.map((file, i) => ({ role: `${res}.${i === 0 ? 'path' : 'inode'}`, file }));
  }

  /** A file of the trial as its role (for step descriptions). */
  roleOf(file: string): string {
    for (const res of ['A', 'B', 'C'] as const) {
      if (file === this.paths[res]) return basename(file);
      for (const r of this.roles(res)) if (r.file === file) return `${r.role} lock file`;
    }
    return file.startsWith(`${this.dir}/`) ? file.slice(this.dir.length + 1) : file;
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


const IMAGES = ['a.img', 'b.img', 'c.img'] as const;

/** Writes (or replaces, with a fresh inode) one of a trial's images. */
function writeImage(dir: string, name: string): void {
  writeFileSync(join(dir, `${name}.new`), 'x'.repeat(4096));
  renameSync(join(dir, `${name}.new`), join(dir, name));
}

/**
 * The lock order of a trial's lease files (their roles): by slot key, as
 * lib/resources.ts lockOrder() sorts them; for the images in `dir` as if the
 * directory were at `at` (a lock file's name hashes the image's path). Indirect:
 * a lock file's path, in one directory, so its name; direct: the image's
 * identity key (lib/locks.ts).
 */
function lockOrderOf(space: Space, dir: string, at = dir, inodes = inodeKeys(space, dir)): LockOrder {
  const keys: Array<{ role: string; res: string; key: string }> = [];
  IMAGES.forEach((name, i) => {
    const res = 'ABC'[i]!;
    if (space === 'direct') keys.push({ role: res, res, key: inodes[i]! });
    else {
      keys.push({ role: `${res}.path`, res, key: lockFileName(join(at, name)) });
      keys.push({ role: `${res}.inode`, res, key: inodes[i]! });
    }
  });
  const sorted = (res: string[]): string[] =>
    keys
      .filter((k) => res.includes(k.res))
      .sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0))
      .map((k) => k.role);
  return { registered: sorted(['A', 'C']), hotplug: sorted(['B']) };
}

/** Per image, the key its inode gives: the direct slot key, or the indirect inode lock file's name. */
function inodeKeys(space: Space, dir: string): string[] {
  return IMAGES.map((name) => {
    const st = statSync(join(dir, name), { bigint: true });
    return space === 'direct' ? `f:${st.dev}:${st.ino}` : lockFileName(inodeIdentity(st.dev, st.ino));
  });
}

function sameOrder(a: LockOrder, b: LockOrder): boolean {
  return JSON.stringify(a) === JSON.stringify(b);
}

/**
 * Makes the images in `dir` fall in the lock order `order`, and returns where
 * the directory is then. Nothing here is random: direct, the images' inodes
 * decide, and swapping two images' names swaps their inodes; indirect, the
 * inode lock files' names are fixed by the inodes, and the path ones' by the
 * directory's path, so candidate directory names are hashed (no file system
 * work) until one fits, then the directory is renamed to it; fresh inodes if
 * none of many fits.
 */
function arrange(dir: string, space: Space, order: LockOrder, tag: string): string {
  const parent = realpathSync(tmpdir());
  for (let round = 0; round < 1000; round++) {
    if (space === 'direct') {
      if (sameOrder(lockOrderOf(space, dir), order)) return dir;
      renameSync(join(dir, 'a.img'), join(dir, 'swap.img'));
      renameSync(join(dir, 'c.img'), join(dir, 'a.img'));
      renameSync(join(dir, 'swap.img'), join(dir, 'c.img'));
      if (sameOrder(lockOrderOf(space, dir), order)) return dir;
    } else {
      const inodes = inodeKeys(space, dir);
      for (let k = 0; k < 2000; k++) {
        const at = join(parent, `lockmgr-${tag}-${round}-${k}`);
        if (sameOrder(lockOrderOf(space, dir, at, inodes), order)) {
          renameSync(dir, at);
          return at;
        }
      }
    }
    for (const name of IMAGES) writeImage(dir, name);
  }
  throw new Error(`could not arrange the trial's files in the lock order ${JSON.stringify(order)}`);
}

// ---------------------------------------------------------------- what the observer sees

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

/**
 * The children of this run's trials (the child binary's processes a victim
 * spawned or the observer found), by pid and start time: at the end none may
 * be left, alive or zombie. Only ours: another run of the suite (another
 * checkout on this machine) has its own crash-child processes at the same time.
 */
const ourChildren = new Map<string, Proc>();

function track(p: Proc): void {
  ourChildren.set(`${p.pid}:${p.start}`, p);
}

/** The same process still exists, alive or zombie. */
function stillThere(p: Proc): boolean {
  return startTime(p.pid) === p.start;
}

/** Live processes running this run's copy of the child binary (a zombie has no exe link any more: those are tracked). */
function runningOurBinary(): number[] {
  const out: number[] = [];
  const exe = realpathSync(childBinary);
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      if (readlinkSync(`/proc/${name}/exe`) === exe) out.push(Number(name));
    } catch {
      // gone, or a kernel thread
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

/** null when the child holds `w` on `file` (one of w.res's lease files), else what is missing. */
function missingOn(child: Proc, w: Want, file: string): string | null {
  const seen = lockAt(file, w.byte);
  if (seen !== w.mode) return `${w.res} byte ${w.byte} of ${file}: want ${w.mode}, see ${seen}`;
  if (!hasFdOn(child.pid, file)) return `${w.res} byte ${w.byte}: ${file} is locked, but the child ${child.pid} has no fd on the inode its name points at`;
  return null;
}

/** Every want on every lease file of its resource. */
function holds(wants: Want[]): Rule {
  return (trial, child) => wants.flatMap((w) => trial.leaseFiles(w.res).flatMap((file) => missingOn(child, w, file) ?? []));
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

const BYTE_NAMES = ['lease', 'guard', 'pin'] as const;

/**
 * Each lock file of each resource: one of its `alternatives` (the lease, the
 * pin, ...) at least, each checked as holds() does. What is true at every
 * instant of a release or a take that goes one file at a time: a migration
 * source pins each lock file and then unlocks its lease, file by file.
 */
function eachFileHoldsOneOf(alternatives: Want[][]): Rule {
  return (trial, child) => {
    const out: string[] = [];
    for (const alts of alternatives) {
      const res = alts[0]!.res;
      for (const file of trial.leaseFiles(res)) {
        const missing = alts.map((w) => missingOn(child, w, file));
        if (missing.some((m) => m === null)) continue;
        const what = alts.map((w) => `its ${BYTE_NAMES[w.byte]}`).join(' nor ');
        out.push(`${res}: neither ${what} is held by the live child on ${file} (${missing.join('; ')})`);
      }
    }
    return out;
  };
}

/** Each lock file of A and C: its lease or its pin (a migration source between its completeMigrateOut() call and 'migrated'). */
const leaseOrPin = (): Rule =>
  eachFileHoldsOneOf([
    [LEASES[0]!, PINS[0]!],
    [LEASES[1]!, PINS[1]!],
  ]);

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

// ---------------------------------------------------------------- seeded scripts

/** The choices a trial's seed makes for its script, besides the lock order and the kill step. */
interface ScriptParams {
  /** target: the source lets go before completeMigrateIn() is called, or once it waits. */
  handover?: 'before' | 'waiting';
}

interface Script {
  choose(rand: () => number): ScriptParams;
  /** Sets the scene and starts the script in the victim, to freeze after step `freezeStep` of it (null: run to the end). */
  run(t: Trial, v: Victim, params: ScriptParams, freezeStep: number | null): Promise<void>;
  /**
   * What must be true after a kill, from the steps the victim reported: the
   * kill came right after the last of them, and nothing after it happened.
   * Exact: it holds at every step (the regression test and
   * LOCKMGR_CRASH_REPLAY=...:all check each), and a rule that asked more
   * would be wrong, not strict.
   */
  plan(t: Trial, steps: Rec[]): Plan;
}

/** SIGKILL's number: the child of a script dies only by the one its shutdown sends after the grace period. */
const SIGKILL = 9;

/** Before a child was spawned, and once it was reaped, no child may run. */
function childExists(steps: Rec[]): boolean {
  return steps.some((r) => r.spawned !== undefined) && !steps.some((r) => r.reaped !== undefined);
}

const SCRIPTS: Record<string, Script> = {
  // start, then rounds of hotplug, release, migrate out and take back (or cancel), then shutdown.
  source: {
    choose: () => ({}),
    async run(t, v, _params, freezeStep) {
      await v.call('create', t.options);
      await v.call('register', t.disk('A'));
      await v.call('register', t.disk('C'));
      const [command, args, spawnOptions] = t.command;
      v.fire('script', 'source', { command, args, spawnOptions, hotplug: t.disk('B'), rounds: 3 }, freezeStep);
    },
    plan(t, steps) {
      const survives = !steps.some((r) => r.signal === SIGKILL);
      // The hot-plugged lease is the supervisor's alone: it goes with it, at every step.
      const hotplug = [{ res: 'B', byte: 0 }] as const;
      if (!childExists(steps)) return { rule: null, free: free([...hotplug]), survives };
      // 'holding' from the start; a completeMigrateOut() call releases, the
      // lock files one at a time (indirect: pin, then unlock the lease);
      // 'migrated' ends that; a take-back takes the leases again one file at a
      // time, the pins staying; its 'running' ends it.
      let phase: 'holding' | 'releasing' | 'migrated' | 'taking-back' = 'holding';
      for (const r of steps) {
        if (r.call === 'completeMigrateOut') phase = 'releasing';
        else if (r.state === 'migrated') phase = 'migrated';
        else if (r.call === 'takeBack' && phase === 'migrated') phase = 'taking-back';
        else if (r.state === 'running') phase = 'holding';
      }
      const indirect = t.space === 'indirect';
      switch (phase) {
        case 'holding':
          return { rule: holds(LEASES), free: free([...hotplug]), survives };
        case 'releasing':
          // For each lock file its lease or its pin (or both); the image's lease (direct) may be gone already.
          return { rule: indirect ? leaseOrPin() : () => [], free: free([...hotplug]), survives };
        case 'migrated':
          // Released for the target: the leases are free; each lock file stays pinned by the child.
          return { rule: indirect ? holds(PINS) : () => [], free: free([...hotplug, { res: 'A', byte: 0 }, { res: 'C', byte: 0 }]), survives };
        case 'taking-back':
          return { rule: indirect ? holds(PINS) : () => [], free: free([...hotplug]), survives };
      }
    },
  },
  // a migration target: guard, incoming, completeMigrateIn while this process's source lets go, shutdown.
  target: {
    choose: (rand) => ({ handover: rand() < 0.5 ? 'before' : 'waiting' }),
    async run(t, v, params, freezeStep) {
      const src = await t.partner(['A', 'C']);
      await v.call('fromInquire', src.inquire(), { ...t.options, resources: t.registered() });
      v.onSync = async (r) => {
        await src.prepareMigrate(TARGET_URI);
        await src.completeMigrateOut(TARGET_URI);
        if (Array.isArray(r.waiting)) {
          // The victim's waiter thread takes the byte the source let go: the
          // step that follows finds it taken, as in every run.
          const [, start] = r.waiting as number[];
          const file = r.file as string;
          await within(
            (async () => {
              while (lockAt(file, start!) === 'free') await new Promise((resolve) => setTimeout(resolve, 1));
            })(),
            GUARD_MS,
            `the victim's waiter to take byte ${start} of ${file}`,
          );
        }
      };
      const [command, args, spawnOptions] = t.command;
      v.fire('script', 'target', { command, args, spawnOptions, handover: params.handover }, freezeStep);
    },
    plan(_t, steps) {
      const survives = !steps.some((r) => r.signal === SIGKILL);
      if (!childExists(steps)) return { rule: null, survives };
      // Each resource's guard until all its leases are taken, which happens
      // before the first guard goes; from 'running' the leases, the guards gone.
      if (steps.some((r) => r.state === 'running')) {
        return { rule: holds(LEASES), free: free([{ res: 'A', byte: 1 }, { res: 'C', byte: 1 }]), survives };
      }
      return { rule: leaseOrGuard(), survives };
    },
  },
};

/** The roles of the lease files in the order the manager locks them (resources.ts lockOrder(): by slot key), registered (A, C) and hot-plugged (B) apart. */
interface LockOrder {
  registered: string[];
  hotplug: string[];
}

function shuffled<T>(items: T[], rand: () => number): T[] {
  const out = [...items];
  for (let i = out.length - 1; i > 0; i--) {
    const j = below(rand, i + 1);
    [out[i], out[j]] = [out[j]!, out[i]!];
  }
  return out;
}

function chooseOrder(space: Space, rand: () => number): LockOrder {
  if (space === 'direct') return { registered: shuffled(['A', 'C'], rand), hotplug: ['B'] };
  return { registered: shuffled(['A.path', 'A.inode', 'C.path', 'C.inode'], rand), hotplug: shuffled(['B.path', 'B.inode'], rand) };
}

/** A step as a person reads it: the trial's files by their roles. */
function describeStep(t: Trial, r: Rec | undefined): string {
  if (r === undefined) return '(before the first step)';
  const { t: _time, step: _step, message: _message, ...rest } = r;
  if (typeof rest.file === 'string') rest.file = t.roleOf(rest.file);
  for (const k of ['open', 'closeFd', 'retireFd']) if (typeof rest[k] === 'string') rest[k] = t.roleOf(rest[k]);
  if (rest.spawned !== undefined) rest.spawned = 'pid';
  return JSON.stringify(rest);
}

// ---------------------------------------------------------------- the observer

interface Outcome {
  step: string;
  lifetime: Lifetime;
  space: Space;
  /** A live child of the killed supervisor was checked for its leases. */
  childChecked: boolean;
  leftFiles: number;
  violations: string[];
  /** What a checked live child was seen holding: for each lease file of A and C by its role, 'lease', 'pin', both or neither. */
  seen?: Record<string, string>;
  /** A seeded trial: its LOCKMGR_CRASH_REPLAY entry, and the step the kill hit (n of all, described). */
  replay?: string;
  at?: string;
}

/** Which of the lease and the pin each lease file of A and C carries, by role: the regression test's evidence. */
function leaseAndPin(t: Trial): Record<string, string> {
  const out: Record<string, string> = {};
  for (const res of ['A', 'C'] as const) {
    for (const { role, file } of t.roles(res)) {
      const held = [lockAt(file, 0) !== 'free' ? 'lease' : '', lockAt(file, 2) !== 'free' ? 'pin' : ''].filter((x) => x !== '');
      out[role] = held.length > 0 ? held.join('+') : 'neither';
    }
  }
  return out;
}

async function observe(t: Trial, plan: Plan, records: Rec[]): Promise<Outcome> {
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
  for (const p of found.values()) track(p);
  const live = [...found.values()].filter(isAlive);
  if (live.length > 1) violations.push(`${live.length} live processes of the trial: ${live.map((c) => c.pid).join(', ')}`);
  const child = live[0];
  let checked = false;
  const seen = child !== undefined ? leaseAndPin(t) : undefined;
  if (plan.rule === null && child !== undefined) violations.push(`a child ${child.pid} runs at a step where none should exist`);
  violations.push(...(plan.free?.(t) ?? []));
  // Under 'child' lifetime the child it reported spawning outlives it (unless it was sent SIGTERM).
  const spawned = records.filter((r) => typeof r.spawned === 'number').map((r) => r.spawned as number);
  for (const pid of spawned) {
    // Still the child binary (a zombie keeps its comm): a pid reused meanwhile is not ours.
    const start = startTime(pid);
    let comm = '';
    try {
      comm = readFileSync(`/proc/${pid}/comm`, 'utf8').trim();
    } catch {
      // gone
    }
    if (start !== null && comm === 'crash-child') track({ pid, start });
  }
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
  return { step: t.step, lifetime: t.lifetime, space: t.space, childChecked: checked, leftFiles: left.length, violations, seen };
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

/** A seeded trial: its script, lifetime, lockspace, seed and kill step (null: the seed chooses it). */
interface SeededSpec {
  script: string;
  lifetime: Lifetime;
  space: Space;
  seed: number;
  step: number | null;
}

/** An uncut run of a script with a trial's params and lock order: its steps (describeStep), which every run must repeat. */
interface Calibration {
  n: number;
  labels: string[];
}

/**
 * What a trial's seed chooses, in this order: its script's params, its files'
 * lock order, then (given the step count) a kill step for each lifetime. The
 * steps do not depend on the lifetime: one seed serves both, with one uncut
 * run.
 */
function drawn(spec: SeededSpec): { params: ScriptParams; order: LockOrder; step: (n: number) => number } {
  const rand = prng(spec.seed);
  const params = SCRIPTS[spec.script]!.choose(rand);
  const order = chooseOrder(spec.space, rand);
  return {
    params,
    order,
    step: (n) => {
      const child = 1 + below(rand, n);
      const supervisor = 1 + below(rand, n);
      return spec.step ?? (spec.lifetime === 'child' ? child : supervisor);
    },
  };
}

function replayOf(spec: SeededSpec, step: number): string {
  return `${spec.script}:${spec.lifetime}:${spec.space}:${spec.seed}:${step}`;
}

/** Runs a script uncut (with the params and lock order a seed chose) and records its steps. */
async function calibrate(script: string, lifetime: Lifetime, space: Space, params: ScriptParams, order: LockOrder): Promise<Calibration> {
  const t = new Trial(`calibrate: ${script}`, lifetime, space, 'ignore-term', order);
  try {
    const v = await Victim.start({ ...process.env, CRASH_TRIAL: t.tag });
    t.victim = v;
    await SCRIPTS[script]!.run(t, v, params, null);
    await v.until((r) => r.end === true || r.scriptFailed !== undefined, `the ${script} script to end`);
    const failed = v.records.find((r) => r.scriptFailed !== undefined);
    if (failed) throw new Error(`the ${script} script failed uncut: ${JSON.stringify(failed)}`);
    if (v.syncError !== null) throw v.syncError;
    const steps = v.scriptSteps();
    return { n: steps.length, labels: steps.map((r) => describeStep(t, r)) };
  } finally {
    await cleanupTrial(t);
  }
}

/** Calibrations, one per script, lockspace, params and lock order (either lifetime runs the same steps), each run once. */
const calibrations = new Map<string, Promise<Calibration>>();
function calibrationFor(spec: SeededSpec): Promise<Calibration> {
  const { params, order } = drawn(spec);
  const key = JSON.stringify([spec.script, spec.space, params, order]);
  let c = calibrations.get(key);
  if (c === undefined) {
    c = calibrate(spec.script, 'child', spec.space, params, order);
    calibrations.set(key, c);
  }
  return c;
}

/**
 * A seeded trial: the script runs and freezes after its step `step`; the kill
 * lands there, and the script's rule for the steps reported so far is checked.
 */
async function seededTrial(spec: SeededSpec, env = process.env): Promise<Outcome> {
  const { script, lifetime, space } = spec;
  let cal: Calibration;
  let params: ScriptParams;
  let order: LockOrder;
  let step: number;
  try {
    cal = await calibrationFor(spec);
    const d = drawn(spec);
    ({ params, order } = d);
    step = d.step(cal.n);
  } catch (err) {
    return { step: `random: ${script}`, lifetime, space, childChecked: false, leftFiles: 0, violations: [`calibration failed: ${(err as Error).stack ?? String(err)}`] };
  }
  const replay = replayOf(spec, step);
  const t = new Trial(`random: ${script}`, lifetime, space, 'ignore-term', order);
  try {
    const v = await Victim.start({ ...env, CRASH_TRIAL: t.tag });
    t.victim = v;
    const s = SCRIPTS[script]!;
    await s.run(t, v, params, step);
    // An end before the step means the script ran fewer steps; at the step, the freeze follows it.
    await v.until((r) => r.frozen === 'step' || r.scriptFailed !== undefined || (r.end === true && (r.step as number) < step), `step ${step} of the ${script} script`);
    await v.kill();
    const steps = v.scriptSteps();
    const at = `step ${step}/${cal.n} ${describeStep(t, steps[steps.length - 1])}`;
    const pre: string[] = [];
    if (v.syncError !== null) pre.push(`the test's part at a sync point failed: ${(v.syncError as Error).stack ?? String(v.syncError)}`);
    if (!v.records.some((r) => r.frozen === 'step')) pre.push(`the script ended after ${steps.length} steps without reaching step ${step}${failedRecord(v)}`);
    // The same steps as the uncut run: a freeze at a step number means the same thing in every run.
    const diverged = steps.findIndex((r, i) => describeStep(t, r) !== cal.labels[i]);
    if (diverged >= 0) pre.push(`step ${diverged + 1} is ${describeStep(t, steps[diverged])}, the uncut run's was ${cal.labels[diverged] ?? '(none)'}: the script does not run the same steps every time`);
    const outcome = await observe(t, s.plan(t, steps), steps);
    return { ...outcome, violations: [...pre, ...outcome.violations], replay, at };
  } catch (err) {
    return { step: t.step, lifetime, space, childChecked: false, leftFiles: 0, violations: [`the trial failed: ${(err as Error).stack ?? String(err)}`], replay };
  } finally {
    await cleanupTrial(t);
  }
}

function failedRecord(v: Victim): string {
  const failed = v.records.find((r) => r.scriptFailed !== undefined);
  return failed === undefined ? '' : `: ${JSON.stringify(failed)}`;
}

/** LOCKMGR_CRASH_REPLAY's entries as trials; 'all' expands to every step of the script. */
async function replaySpecs(text: string): Promise<SeededSpec[]> {
  const out: SeededSpec[] = [];
  for (const entry of text.split(',').map((e) => e.trim()).filter((e) => e !== '')) {
    const [script, lifetime, space, seedText, stepText, extra] = entry.split(':');
    const seed = Number(seedText);
    if (extra !== undefined || script === undefined || !(script in SCRIPTS) || (lifetime !== 'child' && lifetime !== 'supervisor') || (space !== 'direct' && space !== 'indirect') || !Number.isInteger(seed) || seed < 0 || seed >= 2 ** 32) {
      throw new Error(`LOCKMGR_CRASH_REPLAY: '${entry}' is not <script>:<lifetime>:<space>:<seed>[:<step>|all] (scripts: ${Object.keys(SCRIPTS).join(', ')}; lifetime child|supervisor; space direct|indirect)`);
    }
    const spec: SeededSpec = { script, lifetime, space, seed, step: null };
    if (stepText === 'all') {
      const { n } = await calibrationFor(spec);
      for (let k = 1; k <= n; k++) out.push({ ...spec, step: k });
    } else if (stepText !== undefined && stepText !== '') {
      const step = Number(stepText);
      if (!Number.isInteger(step) || step < 1) throw new Error(`LOCKMGR_CRASH_REPLAY: '${entry}': the step must be a number from 1, or 'all'`);
      out.push({ ...spec, step });
    } else {
      out.push(spec);
    }
  }
  return out;
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
  execFileSync('cc', ['-O2', '-o', out, fileURLToPath(new URL(`../fixtures/${name}.c`, import.meta.url))]);
  return out;
}

beforeAll(() => {
  binDir = mkdtempSync(join(tmpdir(), 'lockmgr-crash-bin-'));
  childBinary = compileBinary('crash-child', binDir);
});

afterAll(() => {
  if (binDir !== '') rmSync(binDir, { recursive: true, force: true });
});

/** Orphaned children are init's to reap (it does so every second or two here): in the end none of ours may be left, alive or zombie. */
async function leftBehind(): Promise<string[]> {
  const lingering = (): number[] => [...new Set([...[...ourChildren.values()].filter(stillThere).map((p) => p.pid), ...runningOurBinary()])];
  await within(
    (async () => {
      while (lingering().length > 0) await new Promise((r) => setTimeout(r, 50));
    })(),
    GUARD_MS,
    'init to reap the orphaned children',
  ).catch(() => undefined);
  const out: string[] = [];
  const left = lingering();
  const zombies = zombieChildren(process.pid);
  if (left.length > 0) out.push(`children left behind (alive or zombie): ${left.join(', ')}`);
  if (zombies.length > 0) out.push(`zombie children of the test process: ${zombies.join(', ')}`);
  return out;
}

/** Each violation with its trial; for a seeded trial, its seed and the step the kill hit, and how to replay it. */
function violationLines(outcomes: Outcome[]): string[] {
  return outcomes.flatMap((o) =>
    o.violations.map((v) => (o.replay === undefined ? `${o.step} [${o.lifetime}, ${o.space}]: ${v}` : `${o.step} [${o.lifetime}, ${o.space}], killed at ${o.at ?? '?'} (LOCKMGR_CRASH_REPLAY=${o.replay}): ${v}`)),
  );
}

/** The assertion message: the seed, and the replay of every failing seeded trial. */
function replayHint(outcomes: Outcome[]): string {
  const failing = [...new Set(outcomes.filter((o) => o.violations.length > 0 && o.replay !== undefined).map((o) => o.replay!))];
  return `seeded trials from LOCKMGR_CRASH_SEED=${SEED}${failing.length > 0 ? `; replay the failing ones: LOCKMGR_CRASH_REPLAY=${failing.join(',')}` : ''}`;
}

/** The steps of the source script from its first completeMigrateOut() call to the 'migrated' that ends it (1-based, both included). */
function releaseWindow(cal: Calibration): number[] {
  const from = cal.labels.indexOf(JSON.stringify({ call: 'completeMigrateOut' })) + 1;
  const to = cal.labels.indexOf(JSON.stringify({ state: 'migrated' })) + 1;
  if (from < 1 || to < from) throw new Error(`no completeMigrateOut() call followed by 'migrated' in the source script: ${cal.labels.join(' ')}`);
  return Array.from({ length: to - from + 1 }, (_, i) => from + i);
}

describe('crash matrix: SIGKILL of the supervisor at every step', () => {
  it('keeps every invariant: no child without its locks, no lock without a live holder, no zombie, no stray lock file', async () => {
    const lifetimes: Lifetime[] = ['child', 'supervisor'];
    const spaces: Space[] = ['direct', 'indirect'];
    const jobs: Array<() => Promise<Outcome>> = [];
    const specs: SeededSpec[] = [];
    if (REPLAY !== undefined && REPLAY !== '') {
      specs.push(...(await replaySpecs(REPLAY)));
    } else {
      for (let round = 0; round < ROUNDS; round++) {
        const variant = round % 2 === 0 ? 'ignore-term' : 'plain';
        for (const step of Object.keys(STEPS).filter((s) => ONLY === undefined || s.includes(ONLY))) for (const lifetime of lifetimes) for (const space of spaces) jobs.push(() => deterministicTrial(step, lifetime, space, variant));
      }
      if (ONLY === undefined) {
        const rand = prng(SEED);
        for (const script of Object.keys(SCRIPTS)) {
          for (const space of spaces) {
            for (let i = 0; i < RANDOM; i++) {
              // One seed for both lifetimes: one uncut run, a kill step each.
              const seed = subSeed(rand);
              for (const lifetime of lifetimes) specs.push({ script, lifetime, space, seed, step: null });
            }
          }
        }
      }
    }
    console.log(`crash matrix: ${specs.length} seeded trials from LOCKMGR_CRASH_SEED=${SEED}${REPLAY ? ` (LOCKMGR_CRASH_REPLAY=${REPLAY})` : ''}`);
    for (const spec of specs) jobs.push(() => seededTrial(spec));
    const outcomes = await pool(jobs, PARALLEL);

    const table = new Map<string, { trials: number; alive: number; leftFiles: number; violations: number }>();
    for (const o of outcomes) {
      const row = table.get(o.step) ?? { trials: 0, alive: 0, leftFiles: 0, violations: 0 };
      row.trials++;
      if (o.childChecked) row.alive++;
      row.leftFiles += o.leftFiles;
      row.violations += o.violations.length;
      table.set(o.step, row);
    }
    const violations = [...violationLines(outcomes), ...(await leftBehind())];
    const lines = [...table].map(([step, r]) => `  ${step.padEnd(42)} ${String(r.trials).padStart(4)} trials  ${String(r.alive).padStart(3)} live children checked  ${String(r.leftFiles).padStart(3)} lock files left (unlocked, swept)  ${r.violations} violations`);
    console.log(`crash matrix: ${outcomes.length} trials, ${violations.length} violations\n${lines.join('\n')}`);
    expect(violations, replayHint(outcomes)).toEqual([]);
    if (ROUNDS >= 2 && RANDOM >= 9 && ONLY === undefined && !REPLAY) expect(outcomes.length).toBeGreaterThanOrEqual(200);
    // A hang guard: about 2 minutes on an idle 2-CPU VM, up to 6 on one shared with 4 other suites.
  }, 1_200_000);
});

describe('the seeded scripts: rules exact at every step (issue 18)', () => {
  // The finding: the release pins each lock file and unlocks its lease one
  // file at a time, so between the completeMigrateOut() call and 'migrated' a
  // lock file may carry its lease and no pin yet, or its pin and no lease any
  // more. A rule that demanded the pins from the call on failed about 1 run
  // in 6 of the random trials; this kills at every one of those steps.
  it("source, indirect: a kill at each step from the completeMigrateOut() call to 'migrated' finds each lock file with its lease or its pin", async () => {
    const specs: SeededSpec[] = [];
    for (const lifetime of ['child', 'supervisor'] as const) {
      const spec: SeededSpec = { script: 'source', lifetime, space: 'indirect', seed: SEED, step: null };
      for (const step of releaseWindow(await calibrationFor(spec))) specs.push({ ...spec, step });
    }
    const outcomes = await pool(
      specs.map((spec) => () => seededTrial(spec)),
      PARALLEL,
    );
    const violations = [...violationLines(outcomes), ...(await leftBehind())];
    expect(violations, replayHint(outcomes)).toEqual([]);
    // Every step of the window was checked on a live child, and the window
    // has both halves of the finding: a lock file with its lease and no pin
    // yet (the first steps), and one with its pin and no lease any more.
    const child = outcomes.filter((o) => o.lifetime === 'child');
    expect(child.every((o) => o.childChecked)).toBe(true);
    const seen = child.flatMap((o) => Object.values(o.seen ?? {}));
    expect(seen).toContain('lease');
    expect(seen).toContain('pin');
    expect(seen).not.toContain('neither');
  }, 300_000);
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

  it("sees a migration source's child that holds neither the lease nor the pin of a lock file between completeMigrateOut() and 'migrated', and no pin after", async () => {
    const env = { ...process.env, CRASH_PEER_BREAK: 'drop-lease-fds' };
    const spec: SeededSpec = { script: 'source', lifetime: 'child', space: 'indirect', seed: SEED, step: null };
    const window = releaseWindow(await calibrationFor(spec));
    const outcomes = await pool(
      window.map((step) => () => seededTrial({ ...spec, step }, env)),
      PARALLEL,
    );
    outcomes.forEach((o, i) => {
      expect(o.childChecked, o.at).toBe(true);
      // The last step of the window is 'migrated': the pins are due.
      if (i < window.length - 1) expect(o.violations.join('\n'), o.at).toMatch(/A: neither its lease nor its pin is held by the live child/);
      else expect(o.violations.join('\n'), o.at).toMatch(/A byte 2 of .*: want shared, see free/);
    });
  }, 120_000);
});

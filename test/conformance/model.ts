// Property-based tests of LockManager (fast-check), a row of the conformance
// suite run against every lockspace (model-{direct,indirect,sanlock}.test.ts):
// random call sequences are run against a real manager (real disks of the
// backend's pool, a real child process, a real second lease holder: other
// managers with VMs of their own) and against a small reference model of the
// state machine, written from docs/contract.md. After every call: the state,
// the registered resources and the leases a third party sees on each disk
// (Backend.observe) must be the model's,
// and every rejection must be the documented error class for that call in
// that state. After every sequence: nothing leaks (fds back at the baseline,
// no child, the whole pool free).
//
// Environment: LOCKMGR_FC_SEED (fast-check's seed; default a fresh one,
// printed), LOCKMGR_FC_RUNS (default: the backend file's), and for a replay LOCKMGR_FC_PATH
// (fast-check's counterexample path) with LOCKMGR_FC_REPLAY_PATH (fc.commands'
// replayPath). A failure prints all of them as one line to paste:
// LOCKMGR_FC_SEED=<seed> LOCKMGR_FC_PATH=<path> LOCKMGR_FC_REPLAY_PATH=<replayPath>
// runs the shrunk counterexample at once. Every random choice is fast-check's,
// from the seed. Timing is never a pass condition: the only waits are for a
// child's exit event after it was killed or exited.
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { InvalidArgumentError, InvalidStateError, LockManager, LockManagerError, ResourceBusyError, SpawnError, type ManagerState, type ResourceMode } from '../../lib/index.js';
import { fdCount } from '../helpers.js';
import { childrenOf } from '../harness/process-helpers.js';
import { seedFrom } from '../harness/seeded.js';
import type { Backend } from './backends.js';

type LockMode = 'exclusive' | 'shared';
type ErrorName = 'InvalidArgumentError' | 'InvalidStateError' | 'ResourceBusyError' | 'SpawnError';
const ERRORS: Record<ErrorName, new (...args: never[]) => LockManagerError> = { InvalidArgumentError, InvalidStateError, ResourceBusyError, SpawnError };

const FILES = 3;
const TARGET = 'qemu+ssh://target/system';
const OTHER = 'qemu+ssh://elsewhere/system';

// ---------------------------------------------------------------------------
// The reference model (docs/contract.md, "States" and "Methods").

interface Model {
  state: Exclude<ManagerState, 'starting' | 'incoming' | 'stopping'>;
  /** Resources the manager knows (registered, or hot-plugged), by file index. */
  resources: Map<number, ResourceMode>;
  /** The target named by prepareMigrate(). */
  targetUri: string | null;
  /** Whether readonly excludes shared writers in this lockspace (capability readersExcludeWriters). */
  readersExcludeWriters: boolean;
  /** The lease the other holder has on each file. */
  external: Map<number, LockMode>;
}

const lockModeOf = (mode: ResourceMode): LockMode => (mode === 'exclusive' ? 'exclusive' : 'shared');
/** Whether two leases exclude each other (docs/contract.md, the mode matrix). */
const conflicts = (m: Model, a: ResourceMode, b: ResourceMode): boolean =>
  a === 'exclusive' || b === 'exclusive' || (m.readersExcludeWriters && ((a === 'readonly' && b === 'shared') || (a === 'shared' && b === 'readonly')));
/** The states in which the manager holds its leases. */
const holds = (m: Model): boolean => m.state === 'running' || m.state === 'migrating';
const withChild = (m: Model): boolean => m.state === 'running' || m.state === 'migrating' || m.state === 'migrated';
/** Whether the other holder's lock on `i` is in the way of a lease in `mode`. */
const busy = (m: Model, i: number, mode: ResourceMode): boolean => {
  const e = m.external.get(i);
  return e !== undefined && conflicts(m, e, mode);
};

// ---------------------------------------------------------------------------
// The real system.

interface Real {
  mgr: LockManager;
  b: Backend;
  paths: string[];
  /** The other lease holder: a manager with a VM of its own per file it holds. */
  external: Array<LockManager | null>;
}

type Outcome = { ok: unknown } | { error: ErrorName | ErrorName[] };

async function outcome(fn: () => unknown): Promise<{ ok: unknown } | { error: unknown }> {
  try {
    return { ok: await fn() };
  } catch (error) {
    return { error };
  }
}

/** Asserts that the call had the expected outcome: a value, or one of the documented error classes. */
function expectOutcome(actual: { ok: unknown } | { error: unknown }, expected: Outcome, what: string): void {
  if ('ok' in expected) {
    if ('error' in actual) throw new Error(`${what}: expected success, got ${String((actual.error as Error)?.stack ?? actual.error)}`);
    if (expected.ok !== undefined) expect(actual.ok, what).toEqual(expected.ok);
    return;
  }
  if (!('error' in actual)) throw new Error(`${what}: expected ${String(expected.error)}, but it succeeded with ${JSON.stringify(actual.ok)}`);
  const names = Array.isArray(expected.error) ? expected.error : [expected.error];
  const err = actual.error as LockManagerError;
  expect(err, `${what}: a typed error`).toBeInstanceOf(LockManagerError);
  expect(names, `${what}: ${err.name}: ${err.message}`).toContain(err.name);
  expect(err).toBeInstanceOf(ERRORS[err.name as ErrorName]);
}

/** After every command: the real manager and the leases look like the model. */
async function checkAgainstModel(m: Model, r: Real, what: string): Promise<void> {
  expect(r.mgr.state, `${what}: state`).toBe(m.state);
  const expected = m.state === 'freed' ? [] : [...m.resources].map(([i, mode]) => [r.paths[i], mode, holds(m)]).sort();
  const actual = r.mgr.resources.map((x) => [x.path, x.mode, x.held]).sort();
  expect(actual, `${what}: resources`).toEqual(expected);
  for (let i = 0; i < FILES; i++) {
    const modes: LockMode[] = [];
    if (holds(m) && m.resources.has(i)) modes.push(lockModeOf(m.resources.get(i)!));
    if (m.external.has(i)) modes.push(m.external.get(i)!);
    const strongest = modes.includes('exclusive') ? 'exclusive' : modes.length > 0 ? 'shared' : null;
    expect(await r.b.observe(r.b.disks[i]!), `${what}: the lease of file ${i}`).toBe(strongest ?? 'free');
  }
}

/** How often each (command, state, outcome) happened: printed, to show what the runs covered. */
const tally = new Map<string, number>();

/** Resolves with the manager's next 'exit' event. */
const nextExit = (mgr: LockManager): Promise<unknown> => new Promise((resolve) => mgr.once('exit', resolve));

abstract class Command implements fc.AsyncCommand<Model, Real> {
  check(_m: Readonly<Model>): boolean {
    return true;
  }
  abstract expect(m: Model): Outcome;
  /** The model after a call that went as expected. */
  abstract apply(m: Model): void;
  abstract call(r: Real, m: Model): Promise<unknown>;
  abstract toString(): string;
  async run(m: Model, r: Real): Promise<void> {
    const expected = this.expect(m);
    const actual = await outcome(() => this.call(r, m));
    expectOutcome(actual, expected, this.toString());
    const key = `${this.constructor.name} in ${m.state}: ${'ok' in actual ? 'ok' : (actual.error as Error).name}`;
    tally.set(key, (tally.get(key) ?? 0) + 1);
    if ('ok' in expected) this.apply(m);
    await checkAgainstModel(m, r, this.toString());
  }
}

class Register extends Command {
  constructor(readonly i: number, readonly mode: ResourceMode) {
    super();
  }
  expect(m: Model): Outcome {
    if (m.state !== 'new') return { error: 'InvalidStateError' };
    const known = m.resources.get(this.i);
    if (known !== undefined && known !== this.mode) return { error: 'InvalidArgumentError' };
    return { ok: undefined };
  }
  apply(m: Model): void {
    m.resources.set(this.i, this.mode);
  }
  call(r: Real): Promise<unknown> {
    return Promise.resolve().then(() => r.mgr.registerResource(r.b.disks[this.i]!.spec(this.mode)));
  }
  toString(): string {
    return `registerResource(file${this.i}, ${this.mode})`;
  }
}

type ChildKind = 'long' | 'short' | 'missing';

class Start extends Command {
  constructor(readonly kind: ChildKind) {
    super();
  }
  expect(m: Model): Outcome {
    if (m.state !== 'new') return { error: 'InvalidStateError' };
    if ([...m.resources].some(([i, mode]) => busy(m, i, mode))) return { error: 'ResourceBusyError' };
    if (this.kind === 'missing') return { error: 'SpawnError' };
    return { ok: undefined };
  }
  apply(m: Model): void {
    // A short-lived child has exited (and been awaited) by the time start's command returns.
    m.state = this.kind === 'short' ? 'stopped' : 'running';
  }
  async call(r: Real, m: Model): Promise<unknown> {
    const [command, args] = this.kind === 'long' ? ['sleep', ['1000']] : this.kind === 'short' ? ['true', []] : ['/nonexistent/lockmgr-model-command', []];
    const exit = this.kind === 'short' && m.state === 'new' ? nextExit(r.mgr) : null;
    await r.mgr.start(command as string, args as string[], { stdio: 'ignore' });
    // Only once start() succeeded: a failed start spawned nothing, and no 'exit' comes.
    if (exit !== null) await exit;
    return undefined;
  }
  toString(): string {
    return `start(${this.kind})`;
  }
}

class Acquire extends Command {
  constructor(readonly i: number, readonly mode: ResourceMode) {
    super();
  }
  expect(m: Model): Outcome {
    if (m.state !== 'running') return { error: 'InvalidStateError' };
    const known = m.resources.get(this.i);
    if (known !== undefined) return known === this.mode ? { ok: { wasHeld: true } } : { error: 'InvalidArgumentError' };
    if (busy(m, this.i, this.mode)) return { error: 'ResourceBusyError' };
    return { ok: { wasHeld: false } };
  }
  apply(m: Model): void {
    m.resources.set(this.i, this.mode);
  }
  call(r: Real): Promise<unknown> {
    return r.mgr.acquireResource(r.b.disks[this.i]!.spec(this.mode));
  }
  toString(): string {
    return `acquireResource(file${this.i}, ${this.mode})`;
  }
}

class Release extends Command {
  constructor(readonly i: number) {
    super();
  }
  expect(m: Model): Outcome {
    if (m.state !== 'running') return { error: 'InvalidStateError' };
    return { ok: { wasHeld: m.resources.has(this.i) } };
  }
  apply(m: Model): void {
    m.resources.delete(this.i);
  }
  call(r: Real): Promise<unknown> {
    return r.mgr.releaseResource({ type: 'disk', path: r.paths[this.i]! });
  }
  toString(): string {
    return `releaseResource(file${this.i})`;
  }
}

class Verify extends Command {
  expect(m: Model): Outcome {
    return holds(m) ? { ok: { lost: [] } } : { error: 'InvalidStateError' };
  }
  apply(): void {}
  call(r: Real): Promise<unknown> {
    return r.mgr.verify();
  }
  toString(): string {
    return 'verify()';
  }
}

class PrepareMigrate extends Command {
  expect(m: Model): Outcome {
    return m.state === 'running' ? { ok: undefined } : { error: 'InvalidStateError' };
  }
  apply(m: Model): void {
    m.state = 'migrating';
    m.targetUri = TARGET;
  }
  call(r: Real): Promise<unknown> {
    return r.mgr.prepareMigrate(TARGET);
  }
  toString(): string {
    return `prepareMigrate(${TARGET})`;
  }
}

class CompleteMigrateOut extends Command {
  constructor(readonly sameUri: boolean, readonly cancel: boolean) {
    super();
  }
  expect(m: Model): Outcome {
    if (m.state !== 'migrating' && m.state !== 'migrated') return { error: 'InvalidStateError' };
    if (!this.sameUri) return { error: 'InvalidArgumentError' };
    // Taking the leases back after they were released: busy if someone took one meanwhile.
    if (this.cancel && m.state === 'migrated' && [...m.resources].some(([i, mode]) => busy(m, i, mode))) return { error: 'ResourceBusyError' };
    return { ok: undefined };
  }
  apply(m: Model): void {
    if (this.cancel) {
      m.state = 'running';
      m.targetUri = null;
    } else {
      m.state = 'migrated';
    }
  }
  call(r: Real): Promise<unknown> {
    return r.mgr.completeMigrateOut(this.sameUri ? TARGET : OTHER, this.cancel ? { cancel: true } : undefined);
  }
  toString(): string {
    return `completeMigrateOut(${this.sameUri ? 'target' : 'another uri'}${this.cancel ? ', { cancel: true }' : ''})`;
  }
}

class Shutdown extends Command {
  /** Drawn from 0-2; only 0 runs: rarer than the calls that keep a child running. */
  constructor(readonly draw = 0) {
    super();
  }
  override check(): boolean {
    return this.draw === 0;
  }
  expect(): Outcome {
    return { ok: undefined };
  }
  apply(m: Model): void {
    if (withChild(m)) m.state = 'stopped';
  }
  call(r: Real): Promise<unknown> {
    return r.mgr.shutdown({ graceMs: 10_000 });
  }
  toString(): string {
    return 'shutdown()';
  }
}

class Free extends Command {
  /** Drawn from 0-9; only 0 runs: free() ends a sequence, so it must come rarely. */
  constructor(readonly draw = 0) {
    super();
  }
  override check(): boolean {
    return this.draw === 0;
  }
  expect(): Outcome {
    return { ok: undefined };
  }
  apply(m: Model): void {
    m.state = 'freed';
  }
  call(r: Real): Promise<unknown> {
    return r.mgr.free();
  }
  toString(): string {
    return 'free()';
  }
}

class Signal extends Command {
  constructor(readonly signal: 'SIGCONT' | 'SIGKILL' | 0 | 'SIGNOPE') {
    super();
  }
  expect(m: Model): Outcome {
    if (!withChild(m)) return { error: 'InvalidStateError' };
    if (this.signal === 'SIGNOPE') return { error: 'InvalidArgumentError' };
    return { ok: true };
  }
  apply(m: Model): void {
    if (this.signal === 'SIGKILL') m.state = 'stopped';
  }
  async call(r: Real, m: Model): Promise<unknown> {
    const exit = this.signal === 'SIGKILL' && withChild(m) ? nextExit(r.mgr) : null;
    const sent = r.mgr.signal(this.signal as NodeJS.Signals);
    if (exit !== null) await exit;
    return sent;
  }
  toString(): string {
    return `signal(${String(this.signal)})`;
  }
}

/** The child dies by itself (killed from outside the manager). */
class ChildDies extends Command {
  override check(m: Readonly<Model>): boolean {
    return withChild(m as Model);
  }
  expect(): Outcome {
    return { ok: undefined };
  }
  apply(m: Model): void {
    m.state = 'stopped';
  }
  async call(r: Real): Promise<unknown> {
    const exit = nextExit(r.mgr);
    process.kill(r.mgr.getChild().pid, 'SIGKILL');
    await exit;
    return undefined;
  }
  toString(): string {
    return 'the child is killed from outside';
  }
}

/** Another lease holder (a manager with a VM of its own) takes, or fails to take, a file's lease. */
class ExternalLock extends Command {
  constructor(readonly i: number, readonly mode: LockMode) {
    super();
  }
  override check(m: Readonly<Model>): boolean {
    return !m.external.has(this.i);
  }
  #blocked(m: Model): boolean {
    const mine = m.resources.get(this.i);
    return holds(m) && mine !== undefined && conflicts(m, mine, this.mode);
  }
  expect(m: Model): Outcome {
    return { ok: !this.#blocked(m) };
  }
  apply(m: Model): void {
    if (!this.#blocked(m)) m.external.set(this.i, this.mode);
  }
  async call(r: Real): Promise<unknown> {
    const other = new LockManager({ lockspace: r.b.lockspace('A') });
    other.registerResource(r.b.disks[this.i]!.spec(this.mode));
    try {
      await other.start('sleep', ['1000'], { stdio: 'ignore' });
    } catch (err) {
      await other.free();
      if (err instanceof ResourceBusyError) return false;
      throw err;
    }
    r.external[this.i] = other;
    return true;
  }
  toString(): string {
    return `other.take(file${this.i}, ${this.mode})`;
  }
}

class ExternalUnlock extends Command {
  constructor(readonly i: number) {
    super();
  }
  expect(): Outcome {
    return { ok: undefined };
  }
  apply(m: Model): void {
    m.external.delete(this.i);
  }
  async call(r: Real): Promise<unknown> {
    const other = r.external[this.i];
    r.external[this.i] = null;
    await other?.free();
    return undefined;
  }
  toString(): string {
    return `other.free(file${this.i})`;
  }
}

/** Bad arguments. Where the state is wrong too, either documented class is accepted: the contract does not order the checks. */
class BadCall extends Command {
  constructor(readonly which: 'register-relative' | 'acquire-bad-mode' | 'prepare-empty-uri' | 'start-nul-arg' | 'release-relative') {
    super();
  }
  expect(m: Model): Outcome {
    switch (this.which) {
      case 'register-relative':
        return { error: m.state === 'new' ? 'InvalidArgumentError' : ['InvalidStateError', 'InvalidArgumentError'] };
      case 'acquire-bad-mode':
      case 'release-relative':
        return { error: m.state === 'running' ? 'InvalidArgumentError' : ['InvalidStateError', 'InvalidArgumentError'] };
      case 'prepare-empty-uri':
        return { error: m.state === 'running' ? 'InvalidArgumentError' : ['InvalidStateError', 'InvalidArgumentError'] };
      case 'start-nul-arg':
        // The arguments are checked before any lease is taken: never busy, in every lockspace.
        return { error: m.state === 'new' ? 'InvalidArgumentError' : ['InvalidStateError', 'InvalidArgumentError'] };
    }
  }
  apply(): void {}
  call(r: Real): Promise<unknown> {
    switch (this.which) {
      case 'register-relative':
        return Promise.resolve().then(() => r.mgr.registerResource({ type: 'disk', path: 'disk.img', mode: 'exclusive' }));
      case 'acquire-bad-mode':
        return r.mgr.acquireResource({ type: 'disk', path: r.paths[0]!, mode: 'write' as never });
      case 'release-relative':
        return r.mgr.releaseResource({ type: 'disk', path: 'disk.img' });
      case 'prepare-empty-uri':
        return r.mgr.prepareMigrate('');
      case 'start-nul-arg':
        return r.mgr.start('sleep', ['10\0'], { stdio: 'ignore' });
    }
  }
  toString(): string {
    return `bad call: ${this.which}`;
  }
}

const file = fc.integer({ min: 0, max: FILES - 1 });
const mode = fc.constantFrom<ResourceMode>('exclusive', 'shared', 'readonly');
const lockMode = fc.constantFrom<LockMode>('exclusive', 'shared');

/** fc.commands picks its arbitraries uniformly: repeat an entry to weigh it. */
const weigh = <T>(n: number, arb: fc.Arbitrary<T>): Array<fc.Arbitrary<T>> => Array.from({ length: n }, () => arb);

const commands = [
  ...weigh(4, fc.tuple(file, mode).map(([i, m]) => new Register(i, m))),
  ...weigh(5, fc.constantFrom<ChildKind>('long', 'long', 'long', 'long', 'short', 'missing').map((k) => new Start(k))),
  ...weigh(4, fc.tuple(file, mode).map(([i, m]) => new Acquire(i, m))),
  ...weigh(2, file.map((i) => new Release(i))),
  fc.constant(new Verify()),
  ...weigh(2, fc.constant(new PrepareMigrate())),
  ...weigh(3, fc.tuple(fc.boolean(), fc.boolean(), fc.boolean()).map(([same, other, cancel]) => new CompleteMigrateOut(same || other, cancel))),
  fc.integer({ min: 0, max: 2 }).map((n) => new Shutdown(n)),
  fc.integer({ min: 0, max: 9 }).map((n) => new Free(n)),
  fc.constantFrom<'SIGCONT' | 'SIGKILL' | 0 | 'SIGNOPE'>('SIGCONT', 0, 'SIGKILL', 'SIGNOPE').map((s) => new Signal(s)),
  fc.constant(new ChildDies()),
  ...weigh(3, fc.tuple(file, lockMode).map(([i, m]) => new ExternalLock(i, m))),
  ...weigh(2, file.map((i) => new ExternalUnlock(i))),
  fc.constantFrom('register-relative', 'acquire-bad-mode', 'prepare-empty-uri', 'start-nul-arg', 'release-relative' as const).map((w) => new BadCall(w)),
];

// ---------------------------------------------------------------------------

/** The model row of the conformance suite against one backend; `runs`: its default number of sequences (LOCKMGR_FC_RUNS overrides). */
export function modelConformance(b: Backend, runs: number): void {
  const why = b.unavailable();
  if (why !== null) console.warn(`model conformance (${b.name}) skipped: ${why}`);
  describe.skipIf(why !== null)(`LockManager against its reference model (fast-check): ${b.name}`, () => {
    beforeAll(() => b.setup(), 120_000);
    afterAll(() => b.teardown(), 60_000);

    it('every call sequence matches the model, every rejection is the documented class, and nothing leaks', async () => {
      const seed = seedFrom('LOCKMGR_FC_SEED');
      const numRuns = Number(process.env.LOCKMGR_FC_RUNS ?? runs);
      const path = process.env.LOCKMGR_FC_PATH || undefined;
      const replayPath = process.env.LOCKMGR_FC_REPLAY_PATH || undefined;
      const file = `test/conformance/model-${b.name}.test.ts`;
      console.log(`model (${b.name}): fast-check seed ${seed}, ${numRuns} runs (replay with LOCKMGR_FC_SEED=${seed})${path === undefined ? '' : `, from path ${path}`}`);
      const paths = Array.from({ length: FILES }, (_, i) => b.disks[i]!.path);
      const warm = new LockManager({ lockspace: b.lockspace('A') });
      await warm.start('true', [], { stdio: 'ignore' });
      await warm.free();
      // The backend's own children (sanlock daemons) are the baseline: no VM is left beside them.
      const baseline = { fds: fdCount(), children: childrenOf() };
      let sequences = 0;
      let calls = 0;
      const details = await fc.check(
        fc.asyncProperty(fc.commands(commands, { maxCommands: 40, size: 'large', replayPath }), async (cmds) => {
          const real: Real = { mgr: new LockManager({ lockspace: b.lockspace('A') }), b, paths, external: paths.map(() => null) };
          const model: Model = { state: 'new', resources: new Map(), targetUri: null, readersExcludeWriters: b.capabilities.readersExcludeWriters, external: new Map() };
          try {
            await fc.asyncModelRun(() => ({ model, real }), cmds);
            sequences++;
            calls += [...cmds].length;
          } finally {
            await real.mgr.free();
            for (const other of real.external) await other?.free();
          }
          expect(fdCount(), 'fds').toBe(baseline.fds);
          expect(childrenOf(), 'children').toEqual(baseline.children);
          // Nothing held by anyone (sanlock: written free on the storage).
          await b.settle();
        }),
        { seed: seed | 0, numRuns, path, endOnFailure: path !== undefined },
      );
      if (details.failed) {
        const failingReplayPath = details.counterexample === null ? undefined : /replayPath="([^"]*)"/.exec(fc.stringify(details.counterexample))?.[1];
        const replay = [`LOCKMGR_FC_SEED=${seed}`, details.counterexamplePath === null ? '' : `LOCKMGR_FC_PATH=${details.counterexamplePath}`, failingReplayPath === undefined ? '' : `LOCKMGR_FC_REPLAY_PATH=${failingReplayPath}`].filter((x) => x !== '').join(' ');
        // What went wrong, not only where: fast-check's report leaves the error out.
        const why = details.errorInstance instanceof Error ? details.errorInstance.message : String(details.errorInstance);
        expect.fail(`${fc.defaultReportMessage(details) ?? 'the property failed'}\n${why}\nreplay: ${replay} npx vitest run ${file}`);
      }
      console.log(`model (${b.name}): ${sequences} sequences, ${calls} calls, all as the model says:\n${[...tally].sort().map(([k, n]) => `  ${k}: ${n}`).join('\n')}`);
      if (path === undefined) expect(sequences).toBe(numRuns);
    }, 1_800_000);
  });
}

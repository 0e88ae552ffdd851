// The victim of a crash test: test/fixtures/crash-peer.mjs, a real process
// running one LockManager over IPC, which reports every step on fd 4 and can
// freeze at a chosen one so that a SIGKILL lands exactly there (the peer's
// header says how). Used by the crash matrix (test/system/crash.test.ts) and
// by the conformance suite's crash rows (test/conformance/crash.ts).
import { fork, type ChildProcess } from 'node:child_process';
import type { Readable, Writable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { within } from './process-helpers.js';

/** Hang guards only: no pass condition depends on them. */
export const GUARD_MS = 30_000;
const peerScript = fileURLToPath(new URL('../fixtures/crash-peer.mjs', import.meta.url));

export type Rec = Record<string, unknown>;

/** The crash-peer process: IPC calls, the progress records it writes on fd 4, and the sync points it waits at on fd 5. */
export class Victim {
  readonly child: ChildProcess;
  readonly records: Rec[] = [];
  /** What the test does at a script's sync point; the peer goes on when it is done. */
  onSync: ((r: Rec) => Promise<void>) | null = null;
  /** The first error of onSync: the trial fails with it. */
  syncError: unknown = null;
  readonly exited: Promise<void>;
  readonly ended: Promise<void>;
  readonly #pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: unknown) => void }>();
  readonly #watchers: Array<() => void> = [];
  #next = 1;

  private constructor(env: NodeJS.ProcessEnv) {
    this.child = fork(peerScript, [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc', 'pipe', 'pipe'], env });
    this.exited = new Promise((resolve) => this.child.once('exit', () => resolve()));
    // A peer killed while the test answers a sync point: the write fails, and that is all.
    this.#go().on('error', () => undefined);
    const progress = this.child.stdio[4] as Readable;
    let buf = '';
    progress.setEncoding('utf8');
    progress.on('data', (d: string) => {
      buf += d;
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        const r = JSON.parse(buf.slice(0, nl)) as Rec;
        this.records.push(r);
        buf = buf.slice(nl + 1);
        if (r.sync !== undefined) void this.#sync(r);
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
        // A signal here is none of this test's (it signals a peer only once it is ready): say which, and when.
        v.child.once('exit', (code, signal) => reject(new Error(`crash-peer ${v.child.pid} exited before it was ready, with ${code ?? signal} at ${new Date().toISOString()}`)));
      }),
      GUARD_MS,
      'crash-peer to start',
    );
    return v;
  }

  async #sync(r: Rec): Promise<void> {
    try {
      await this.onSync?.(r);
    } catch (err) {
      this.syncError ??= err;
    }
    const go = this.#go();
    if (!go.destroyed) go.write('g');
  }

  /** The pipe to the peer's fd 5 (ChildProcess types only five stdio entries). */
  #go(): Writable {
    return (this.child.stdio as unknown as unknown[])[5] as Writable;
  }

  /** The steps of the script the peer runs (each numbered from 1), without the freeze marker. */
  scriptSteps(): Rec[] {
    let begin = this.records.length - 1;
    while (begin >= 0 && this.records[begin]!.script === undefined) begin--;
    return begin < 0 ? [] : this.records.slice(begin + 1).filter((r) => typeof r.step === 'number');
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
  until(match: (r: Rec) => boolean, what: string): Promise<Rec> {
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


// spawnSupervised() / attachProcess() against real processes. The whole suite
// runs twice: through clone3 and through the fallback (clone + pidfd_open),
// forced with LOCKMGR_SPAWN_FALLBACK=1; a counter in the addon proves which
// path started the children.
import { spawn as cpSpawn, spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { chmodSync, closeSync, openSync, readFileSync, readlinkSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import {
  InvalidArgumentError,
  SpawnError,
  attachProcess,
  openLockable,
  spawnSupervised,
  type SupervisedProcess,
} from '../../lib/index.js';
import { supervisionInfo } from '../../lib/os/supervise.js';
import { compileShim, distUrl, isRoot, preload, runScript, tempDir, threadCount, waitUntil } from '../helpers.js';
import { childrenOf, collect, firstJsonLine, openFds, procStat, procState, signalMasks, within, zombieChildren } from '../harness/process-helpers.js';

const here = fileURLToPath(new URL('.', import.meta.url));
const middle = join(here, '..', 'fixtures', 'supervise-middle.mjs');
const SIGPIPE_BIT = 1n << 12n;
const HANG_MS = 20_000;

let tmp: ReturnType<typeof tempDir>;
let dir: string;
beforeAll(() => {
  tmp = tempDir();
  dir = tmp.dir;
});
afterAll(() => tmp.cleanup());

function runMiddle(args: string[], extraStdio: Array<number | 'ignore'> = []) {
  return cpSpawn(process.execPath, [middle, ...args], { stdio: ['ignore', 'pipe', 'inherit', ...extraStdio] });
}

describe.each([
  { path: 'clone3', fallback: false },
  { path: 'fallback', fallback: true },
])('through $path', ({ fallback }) => {
  let saved: string | undefined;
  let before: ReturnType<typeof supervisionInfo>;
  beforeAll(() => {
    saved = process.env.LOCKMGR_SPAWN_FALLBACK;
    if (fallback) process.env.LOCKMGR_SPAWN_FALLBACK = '1';
    else delete process.env.LOCKMGR_SPAWN_FALLBACK;
    before = supervisionInfo();
  });
  afterAll(() => {
    // Every child of this block was started by the path it names, none by the other.
    const after = supervisionInfo();
    if (fallback) {
      expect(after.fallbackSpawns).toBeGreaterThan(before.fallbackSpawns);
      expect(after.clone3Spawns).toBe(before.clone3Spawns);
    } else {
      expect(after.clone3Spawns).toBeGreaterThan(before.clone3Spawns);
      expect(after.fallbackSpawns).toBe(before.fallbackSpawns);
    }
    if (saved === undefined) delete process.env.LOCKMGR_SPAWN_FALLBACK;
    else process.env.LOCKMGR_SPAWN_FALLBACK = saved;
  });

  test('reports exit codes and signals; signal() is true while it runs and false after', async () => {
    const ok = spawnSupervised('sh', ['-c', 'exit 7'], { stdio: 'ignore' });
    expect(ok.pid).toBeGreaterThan(0);
    expect(await ok.exited).toEqual({ code: 7, signal: null });
    expect(ok.exitStatus).toEqual({ code: 7, signal: null });

    const sleeper = spawnSupervised('sleep', ['1000'], { stdio: 'ignore' });
    expect(sleeper.exitStatus).toBeNull();
    expect(procState(sleeper.pid)).not.toBeNull();
    expect(sleeper.signal('SIGUSR1')).toBe(true);
    expect(await sleeper.exited).toEqual({ code: null, signal: 'SIGUSR1' });
    expect(sleeper.signal('SIGKILL')).toBe(false);
    expect(sleeper.signal()).toBe(false);
  });

  test('1,000 spawn/exit cycles leave no zombie, fd, thread or watch behind', async () => {
    const cycle = async (n: number, stdio: 'ignore' | 'pipe'): Promise<void> => {
      // Ten at a time, so the loop sees exits while it spawns.
      for (let i = 0; i < n; i += 10) {
        const batch: SupervisedProcess[] = [];
        for (let j = 0; j < 10; j++) batch.push(spawnSupervised('/bin/true', [], { stdio }));
        const ends = stdio === 'pipe' ? batch.flatMap((c) => [collect(c.stdout!), collect(c.stderr!)]) : [];
        batch.forEach((c) => c.stdin?.end());
        for (const c of batch) expect(await c.exited).toEqual({ code: 0, signal: null });
        await Promise.all(ends);
      }
    };
    await cycle(20, 'pipe'); // warm-up: lazily created loop and stream internals
    await settle();
    const fds = openFds();
    const threads = threadCount();
    await cycle(1000, 'ignore');
    await cycle(200, 'pipe');
    await settle();
    expect(zombieChildren()).toEqual([]);
    expect(childrenOf()).toEqual([]);
    expect(supervisionInfo().watched).toBe(0);
    expectNoNewFds(fds);
    expect(threadCount()).toBe(threads);
  });

  test('the child sees only 0, 1, 2 and keepFds, whatever we leave open without CLOEXEC', async () => {
    const leaky = openSync('/dev/null', 'r');
    const kept = openSync(join(dir, 'kept'), 'w');
    try {
      // The middle process inherits them as its fds 40 and 41, not CLOEXEC. (Node
      // reuses low inherited numbers for its own fds at startup, high ones stay.)
      const padding = Array.from({ length: 37 }, () => 'ignore' as const);
      const proc = runMiddle(['fds', '41'], [...padding, leaky, kept]);
      const report = await within(
        firstJsonLine<{ ours: number; control: number[]; child: number[]; status: unknown }>(proc.stdout!),
        HANG_MS,
        'fds report',
      );
      await once(proc, 'exit');
      // The precondition: a child of child_process gets both, so there is something to leak.
      expect(report.control).toEqual(expect.arrayContaining([0, 1, 2, 40, 41]));
      expect(report.ours).toBeGreaterThan(report.control.length);
      expect(report.child).toEqual([0, 1, 2, 41]);
      expect(report.status).toEqual({ code: 0, signal: null });
    } finally {
      closeSync(leaky);
      closeSync(kept);
    }
  });

  test('the same from this process: of its many fds only the kept one reaches the child', async () => {
    const path = join(dir, `kept-${fallback ? 'fallback' : 'clone3'}`);
    writeFileSync(path, 'x');
    using kept = openLockable(path);
    expect(openFds().length).toBeGreaterThan(10);
    const child = spawnSupervised('sh', ['-c', 'ls /proc/$$/fd; true'], { stdio: ['ignore', 'pipe', 'inherit'], keepFds: [kept.fd] });
    const listed = (await collect(child.stdout!)).split('\n').filter(Boolean).map(Number).sort((a, b) => a - b);
    expect(await child.exited).toEqual({ code: 0, signal: null });
    expect(listed).toEqual([0, 1, 2, kept.fd]);
  });

  test('signal dispositions and mask are default in the child, though Node ignores SIGPIPE', async () => {
    const ours = signalMasks(readFileSync('/proc/self/status', 'utf8'));
    expect(ours.SigIgn! & SIGPIPE_BIT).toBe(SIGPIPE_BIT); // the precondition
    const child = spawnSupervised('cat', ['/proc/self/status'], { stdio: ['ignore', 'pipe', 'inherit'] });
    const text = await collect(child.stdout!);
    expect(await child.exited).toEqual({ code: 0, signal: null });
    const masks = signalMasks(text);
    expect(masks.SigIgn).toBe(0n);
    expect(masks.SigBlk).toBe(0n);
  });

  test('a pid reused after the reap is never signalled', async (ctx) => {
    if (!isRoot) {
      console.log('skipped: writing /proc/sys/kernel/ns_last_pid needs root');
      ctx.skip();
    }
    const child = spawnSupervised('true', [], { stdio: 'ignore' });
    await child.exited;
    let decoy: ReturnType<typeof cpSpawn> | null = null;
    // Other processes and threads on the machine take pids too (a busy machine
    // runs other test suites): retry until the decoy lands on the number.
    for (let attempt = 0; attempt < 500 && decoy === null; attempt++) {
      writeFileSync('/proc/sys/kernel/ns_last_pid', String(child.pid - 1));
      const candidate = cpSpawn('sleep', ['1000'], { stdio: 'ignore' });
      if (candidate.pid === child.pid) {
        decoy = candidate;
      } else {
        candidate.kill('SIGKILL');
        await once(candidate, 'exit');
      }
    }
    expect(decoy?.pid).toBe(child.pid);
    const decoyExit = once(decoy!, 'exit');
    expect(child.signal('SIGKILL')).toBe(false);
    expect(child.signal('SIGTERM')).toBe(false);
    expect(['S', 'R']).toContain(procState(decoy!.pid!));
    expect(decoy!.exitCode).toBeNull();
    decoy!.kill('SIGKILL');
    expect((await decoyExit)[1]).toBe('SIGKILL');
  });

  test('a pid reused after its parent reaped an attached process is never signalled', async (ctx) => {
    if (!isRoot) {
      console.log('skipped: writing /proc/sys/kernel/ns_last_pid needs root');
      ctx.skip();
    }
    type Verdict = { reused: boolean; signalled: boolean; decoy: ReturnType<typeof cpSpawn> };
    let verdict: Verdict | null = null;
    for (let attempt = 0; attempt < 200 && verdict === null; attempt++) {
      const victim = cpSpawn('sleep', ['1000'], { stdio: 'ignore' });
      const attached = attachProcess(victim.pid!);
      victim.kill('SIGKILL');
      // child_process has reaped it when 'exit' fires. In the same tick, before
      // our poll may have run: reuse the pid and signal through the old handle.
      const outcome: Verdict | null = await new Promise<Verdict | null>((resolve) => {
        victim.on('exit', () => {
          writeFileSync('/proc/sys/kernel/ns_last_pid', String(victim.pid! - 1));
          const decoy = cpSpawn('sleep', ['1000'], { stdio: 'ignore' });
          if (decoy.pid !== victim.pid) {
            decoy.kill('SIGKILL');
            resolve(null);
            return;
          }
          resolve({ reused: true, signalled: attached.signal('SIGKILL'), decoy });
        });
      });
      await attached.exited;
      verdict = outcome;
    }
    expect(verdict?.reused).toBe(true);
    expect(verdict!.signalled).toBe(false);
    const decoy = verdict!.decoy;
    expect(['S', 'R']).toContain(procState(decoy.pid!));
    const decoyExit = once(decoy, 'exit');
    decoy.kill('SIGKILL');
    expect((await decoyExit)[1]).toBe('SIGKILL');
  });

  test("child_process keeps its 'exit' events while ours arrive too", async () => {
    const theirs = Array.from({ length: 20 }, (_, i) => {
      const c = cpSpawn('sh', ['-c', `exit ${i + 1}`], { stdio: 'ignore' });
      return once(c, 'exit').then(([code]) => code as number);
    });
    const ours = Array.from({ length: 20 }, (_, i) => spawnSupervised('sh', ['-c', `exit ${i + 100}`], { stdio: 'ignore' }).exited);
    expect(await within(Promise.all(theirs), HANG_MS, "child_process 'exit' events")).toEqual(theirs.map((_, i) => i + 1));
    expect((await Promise.all(ours)).map((s) => s.code)).toEqual(ours.map((_, i) => i + 100));
    // And attaching to a child_process child does not steal its status.
    const c = cpSpawn('sh', ['-c', 'exit 42'], { stdio: 'ignore' });
    const attached = attachProcess(c.pid!);
    const [code] = await within(once(c, 'exit'), HANG_MS, "the attached child's 'exit'");
    expect(code).toBe(42);
    expect(await attached.exited).toEqual({ code: null, signal: null });
  });

  test('parentDeathSignal: the supervised child dies with its SIGKILLed supervisor', async () => {
    const proc = runMiddle(['pdeathsig', 'SIGKILL']);
    const { pid } = await within(firstJsonLine<{ pid: number }>(proc.stdout!), HANG_MS, 'middle process');
    const grandchild = attachProcess(pid);
    expect(grandchild.exitStatus).toBeNull();
    proc.kill('SIGKILL');
    await once(proc, 'exit');
    expect(await within(grandchild.exited, HANG_MS, 'the grandchild to die')).toEqual({ code: null, signal: null });
  });

  test('without parentDeathSignal the child outlives its SIGKILLed supervisor', async () => {
    const proc = runMiddle(['pdeathsig', 'none']);
    const { pid } = await within(firstJsonLine<{ pid: number }>(proc.stdout!), HANG_MS, 'middle process');
    const grandchild = attachProcess(pid);
    proc.kill('SIGKILL');
    await once(proc, 'exit');
    // The kernel sends the death signal during the parent's exit, before 'exit'.
    expect(['S', 'R']).toContain(procState(pid));
    expect(Number(procStat(pid)[1])).not.toBe(proc.pid);
    expect(grandchild.signal('SIGKILL')).toBe(true);
    await grandchild.exited;
  });

  test("keepFds: an OFD lock outlives its taker's SIGKILL until the child that kept the fd exits", async () => {
    const path = join(dir, `lock-${fallback ? 'fallback' : 'clone3'}`);
    writeFileSync(path, 'x');
    const proc = runMiddle(['keepfd', path]);
    const { pid } = await within(firstJsonLine<{ pid: number }>(proc.stdout!), HANG_MS, 'middle process');
    using observer = openLockable(path);
    expect(observer.getConflict('exclusive')).not.toBeNull();
    proc.kill('SIGKILL');
    await once(proc, 'exit');
    expect(observer.getConflict('exclusive')).not.toBeNull();
    expect(observer.tryLock('shared')).toBe(false);
    const child = attachProcess(pid);
    expect(child.signal('SIGTERM')).toBe(true);
    await within(child.exited, HANG_MS, 'the lock holder to exit');
    expect(observer.getConflict('exclusive')).toBeNull();
    expect(observer.tryLock('exclusive')).toBe(true);
  });

  test('exec failures are SpawnErrors with the system error as cause, and leave no process', async () => {
    await settle();
    const fds = openFds();
    const expectSpawnError = (fn: () => unknown, code: string, syscall: string, path: string): void => {
      let caught: unknown;
      try {
        fn();
      } catch (err) {
        caught = err;
      }
      expect(caught).toBeInstanceOf(SpawnError);
      const err = caught as SpawnError;
      expect(err.code).toBe('ERR_SPAWN');
      expect(err.cause).toMatchObject({ code, syscall, path });
    };
    expectSpawnError(() => spawnSupervised('/nonexistent/command'), 'ENOENT', 'execve', '/nonexistent/command');
    expectSpawnError(() => spawnSupervised('lockmgr-no-such-command', ['a']), 'ENOENT', 'execve', 'lockmgr-no-such-command');
    expectSpawnError(() => spawnSupervised('sh', [], { env: { PATH: '/nonexistent' } }), 'ENOENT', 'execve', 'sh');
    const plain = join(dir, 'not-executable');
    writeFileSync(plain, '#!/bin/sh\nexit 0\n');
    chmodSync(plain, 0o644);
    expectSpawnError(() => spawnSupervised(plain), 'EACCES', 'execve', plain);
    expectSpawnError(() => spawnSupervised(dir), 'EACCES', 'execve', dir);
    expectSpawnError(() => spawnSupervised('true', [], { cwd: join(dir, 'missing') }), 'ENOENT', 'chdir', join(dir, 'missing'));
    expectSpawnError(() => spawnSupervised('true', [], { cwd: plain }), 'ENOTDIR', 'chdir', plain);
    // The failed children are reaped from the loop, never waited for on it.
    await waitUntil(() => supervisionInfo().watched === 0, HANG_MS, 'failed children reaped');
    expect(zombieChildren()).toEqual([]);
    expect(childrenOf()).toEqual([]);
    expectNoNewFds(fds);
  });

  test('ENOEXEC: an executable text file without #! runs with /bin/sh, as execvp does', async () => {
    const script = join(dir, 'no-shebang');
    writeFileSync(script, 'echo "ran by sh with $# args: $1"\n');
    chmodSync(script, 0o755);
    const child = spawnSupervised(script, ['first'], { stdio: ['ignore', 'pipe', 'inherit'] });
    expect(await collect(child.stdout!)).toBe('ran by sh with 1 args: first\n');
    expect(await child.exited).toEqual({ code: 0, signal: null });
  });

  test('bad arguments throw InvalidArgumentError and spawn nothing', async () => {
    const closed = openSync('/dev/null', 'r');
    closeSync(closed);
    await settle();
    const fds = openFds();
    const spawns = supervisionInfo();
    const bad: Array<[string, () => unknown]> = [
      ['non-string command', () => spawnSupervised(42 as never)],
      ['empty command', () => spawnSupervised('')],
      ['NUL in command', () => spawnSupervised('tr\0ue')],
      ['NUL in an arg', () => spawnSupervised('true', ['a\0b'])],
      ['non-string arg', () => spawnSupervised('true', ['a', 1 as never])],
      ['args not an array', () => spawnSupervised('true', 'a' as never)],
      ['NUL in an env value', () => spawnSupervised('true', [], { env: { A: 'x\0y' } })],
      ['NUL in an env name', () => spawnSupervised('true', [], { env: { 'A\0B': 'x' } })],
      ['= in an env name', () => spawnSupervised('true', [], { env: { 'A=B': 'x' } })],
      ['env not an object', () => spawnSupervised('true', [], { env: 'PATH=/bin' as never })],
      ['NUL in cwd', () => spawnSupervised('true', [], { cwd: '/tmp\0x' })],
      ['non-string cwd', () => spawnSupervised('true', [], { cwd: 3 as never })],
      ['unknown parentDeathSignal', () => spawnSupervised('true', [], { parentDeathSignal: 'SIGNOPE' as never })],
      ['closed keepFd', () => spawnSupervised('true', [], { keepFds: [closed] })],
      ['keepFd below 3', () => spawnSupervised('true', [], { keepFds: [1] })],
      ['non-integer keepFd', () => spawnSupervised('true', [], { keepFds: [3.5] })],
      ['keepFds not an array', () => spawnSupervised('true', [], { keepFds: 5 as never })],
      ['bad stdio string', () => spawnSupervised('true', [], { stdio: 'inherits' as never })],
      ['stdio array of two', () => spawnSupervised('true', [], { stdio: ['pipe', 'pipe'] as never })],
      ['closed stdio fd', () => spawnSupervised('true', [], { stdio: ['pipe', closed, 'pipe'] })],
      ['bad stdio entry', () => spawnSupervised('true', [], { stdio: ['pipe', {} as never, 'pipe'] })],
      ['non-boolean newSession', () => spawnSupervised('true', [], { newSession: 'yes' as never })],
      ['unknown option', () => spawnSupervised('true', [], { detached: true } as never)],
      ['options not an object', () => spawnSupervised('true', [], 'pipe' as never)],
      ['attach to pid 0', () => attachProcess(0)],
      ['attach to a non-integer', () => attachProcess(1.5)],
    ];
    for (const [what, fn] of bad) {
      expect(fn, what).toThrow(InvalidArgumentError);
    }
    const after = supervisionInfo();
    expect(after.clone3Spawns + after.fallbackSpawns).toBe(spawns.clone3Spawns + spawns.fallbackSpawns);
    expect(after.watched).toBe(0);
    expect(childrenOf()).toEqual([]);
    expectNoNewFds(fds);

    const child = spawnSupervised('sleep', ['1000'], { stdio: 'ignore' });
    expect(() => child.signal('SIGNOPE' as never)).toThrow(InvalidArgumentError);
    expect(() => child.signal(-1 as never)).toThrow(InvalidArgumentError);
    expect(() => child.signal(65 as never)).toThrow(InvalidArgumentError);
    // 0 sends nothing: it only checks that we may signal the process.
    expect(child.signal(0)).toBe(true);
    expect(() => child.stop({ graceMs: -1 })).toThrow(InvalidArgumentError);
    expect(() => child.stop({ grace: 1 } as never)).toThrow(InvalidArgumentError);
    expect(child.exitStatus).toBeNull();
    await child[Symbol.asyncDispose]();
    expect(child.exitStatus).toEqual({ code: null, signal: 'SIGKILL' });
  });

  test("'pipe' stdio carries data both ways and ends at exit", async () => {
    const child = spawnSupervised('sh', ['-c', 'cat; echo to-stderr >&2'], { stdio: 'pipe' });
    const out = collect(child.stdout!);
    const err = collect(child.stderr!);
    child.stdin!.write('line one\n');
    child.stdin!.end('line two\n');
    expect(await within(out, HANG_MS, 'stdout to end')).toBe('line one\nline two\n');
    expect(await within(err, HANG_MS, 'stderr to end')).toBe('to-stderr\n');
    expect(await child.exited).toEqual({ code: 0, signal: null });
  });

  test('stdio entries may be fds of ours, even ones in 0..2 at another number', async () => {
    const outPath = join(dir, 'stdout-file');
    const fd = openSync(outPath, 'w');
    try {
      const child = spawnSupervised('sh', ['-c', 'echo to-the-file'], { stdio: ['ignore', fd, 'inherit'] });
      expect(await child.exited).toEqual({ code: 0, signal: null });
      expect(readFileSync(outPath, 'utf8')).toBe('to-the-file\n');
    } finally {
      closeSync(fd);
    }
    // Swapped: the child's 1 is our 2 and its 2 is our 1.
    const swapped = spawnSupervised('sleep', ['1000'], { stdio: ['ignore', 2, 1] });
    try {
      expect(readlinkSync(`/proc/${swapped.pid}/fd/1`)).toBe(readlinkSync('/proc/self/fd/2'));
      expect(readlinkSync(`/proc/${swapped.pid}/fd/2`)).toBe(readlinkSync('/proc/self/fd/1'));
      expect(readlinkSync(`/proc/${swapped.pid}/fd/0`)).toBe('/dev/null');
    } finally {
      await swapped[Symbol.asyncDispose]();
    }
  });

  test('cwd, env and newSession reach the child', async () => {
    const child = spawnSupervised('sh', ['-c', 'pwd; echo "$LOCKMGR_TEST_VAR"'], {
      cwd: dir,
      env: { ...process.env, LOCKMGR_TEST_VAR: 'from-env' },
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    expect(await collect(child.stdout!)).toBe(`${dir}\nfrom-env\n`);
    await child.exited;

    process.env.LOCKMGR_TEST_DEFAULT = 'inherited';
    try {
      const byDefault = spawnSupervised('sh', ['-c', 'echo "$LOCKMGR_TEST_DEFAULT"'], { stdio: ['ignore', 'pipe', 'inherit'] });
      expect(await collect(byDefault.stdout!)).toBe('inherited\n');
      await byDefault.exited;
    } finally {
      delete process.env.LOCKMGR_TEST_DEFAULT;
    }

    const leader = spawnSupervised('sleep', ['1000'], { stdio: 'ignore', newSession: true });
    const member = spawnSupervised('sleep', ['1000'], { stdio: 'ignore' });
    try {
      expect(Number(procStat(leader.pid)[3])).toBe(leader.pid); // session id
      expect(Number(procStat(member.pid)[3])).toBe(Number(procStat(process.pid)[3]));
    } finally {
      await leader[Symbol.asyncDispose]();
      await member[Symbol.asyncDispose]();
    }
  });

  test('stop(): SIGTERM, SIGKILL after the grace, idempotent', async () => {
    const polite = spawnSupervised('sleep', ['1000'], { stdio: 'ignore' });
    const first = polite.stop({ graceMs: 60_000 });
    expect(polite.stop()).toBe(first);
    expect(await first).toEqual({ code: null, signal: 'SIGTERM' });
    expect(await polite.stop()).toEqual({ code: null, signal: 'SIGTERM' });

    // A child that ignores SIGTERM (it says so once the trap is set) gets SIGKILL.
    const stubborn = spawnSupervised('sh', ['-c', 'trap "" TERM; echo ready; while :; do sleep 1; done'], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    await within(firstLine(stubborn), HANG_MS, 'the trap to be set');
    expect(await within(stubborn.stop({ graceMs: 50 }), HANG_MS, 'SIGKILL after the grace')).toEqual({ code: null, signal: 'SIGKILL' });

    const done = spawnSupervised('true', [], { stdio: 'ignore' });
    await done.exited;
    expect(await done.stop()).toEqual({ code: 0, signal: null });
  });

  test('unref() lets the supervisor exit while the child runs; ref() is the default', async () => {
    const proc = runMiddle(['unref']);
    const { pid } = await within(firstJsonLine<{ pid: number }>(proc.stdout!), HANG_MS, 'middle process');
    const [code] = await within(once(proc, 'exit'), HANG_MS, 'the supervisor to exit despite its running child');
    expect(code).toBe(0);
    const orphan = attachProcess(pid);
    expect(orphan.exitStatus).toBeNull();
    expect(orphan.signal('SIGKILL')).toBe(true);
    await orphan.exited;

    const child = spawnSupervised('true', [], { stdio: 'ignore' });
    expect(child.unref()).toBe(child);
    expect(child.ref()).toBe(child);
    expect(await child.exited).toEqual({ code: 0, signal: null });
  });

  test('attachProcess: exit seen, status unknown; a missing pid is an InvalidArgumentError', async () => {
    const c = cpSpawn('sleep', ['1000'], { stdio: 'ignore' });
    const attached = attachProcess(c.pid!);
    expect(attached.pid).toBe(c.pid);
    expect(attached.stdin).toBeNull();
    expect(attached.exitStatus).toBeNull();
    expect(attached.signal('SIGTERM')).toBe(true);
    expect(await attached.exited).toEqual({ code: null, signal: null });
    expect(attached.signal('SIGTERM')).toBe(false);
    await once(c, 'exit');
    expect(c.signalCode).toBe('SIGTERM');
    expect(() => attachProcess(c.pid!)).toThrow(InvalidArgumentError);
  });

  test('works in a worker thread, whose children outlive it and are still reaped', async () => {
    const threads = threadCount();
    const worker = new Worker(
      `
      const { parentPort, workerData } = require('node:worker_threads');
      import(workerData.url).then(async (m) => {
        const c = m.spawnSupervised('sh', ['-c', 'cat; echo done'], { stdio: 'pipe' });
        let out = '';
        c.stdout.setEncoding('utf8').on('data', (d) => (out += d));
        const ended = new Promise((r) => c.stdout.on('end', r));
        c.stdin.end('from-worker\\n');
        const status = await c.exited;
        await ended;
        const orphan = m.spawnSupervised('sleep', ['1000'], { stdio: 'ignore' });
        parentPort.postMessage({ out, status, orphan: orphan.pid });
      });
      `,
      { eval: true, workerData: { url: distUrl }, env: { ...process.env } },
    );
    const [report] = (await within(once(worker, 'message'), HANG_MS, 'the worker')) as [{ out: string; status: unknown; orphan: number }];
    expect(report.out).toBe('from-worker\ndone\n');
    expect(report.status).toEqual({ code: 0, signal: null });
    await worker.terminate();
    // The worker is gone; its running child is ours to reap now.
    expect(supervisionInfo().orphans).toBe(1);
    expect(['S', 'R']).toContain(procState(report.orphan));
    const orphan = attachProcess(report.orphan);
    expect(orphan.signal('SIGKILL')).toBe(true);
    await orphan.exited;
    await waitUntil(() => procState(report.orphan) === null, HANG_MS, 'the orphan to be reaped');
    expect(zombieChildren()).toEqual([]);
    await waitUntil(() => supervisionInfo().orphans === 0 && threadCount() <= threads, HANG_MS, 'the reaper thread to exit');
  });

  test("parentDeathSignal in a worker fires when the worker ends (the spawning thread's death)", async () => {
    const worker = new Worker(
      `
      const { parentPort, workerData } = require('node:worker_threads');
      import(workerData.url).then((m) => {
        const c = m.spawnSupervised('sleep', ['1000'], { stdio: 'ignore', parentDeathSignal: 'SIGKILL' });
        parentPort.postMessage(c.pid);
      });
      `,
      { eval: true, workerData: { url: distUrl }, env: { ...process.env } },
    );
    const [pid] = (await within(once(worker, 'message'), HANG_MS, 'the worker')) as [number];
    const child = attachProcess(pid);
    expect(child.exitStatus).toBeNull();
    await worker.terminate();
    expect(await within(child.exited, HANG_MS, 'the child to die with its worker')).toEqual({ code: null, signal: null });
    await waitUntil(() => procState(pid) === null, HANG_MS, 'the child to be reaped');
    expect(zombieChildren()).toEqual([]);
  });

  test('workers terminated mid-spawn or mid-callback neither crash the process nor leave zombies', async () => {
    // Only the workers load the addon, so it is unloaded under the orphan reaper.
    const proc = cpSpawn(process.execPath, [join(here, '..', 'fixtures', 'supervise-workers.mjs'), '30'], { stdio: ['ignore', 'pipe', 'inherit'] });
    const exit = once(proc, 'exit');
    const report = await within(firstJsonLine<{ ok: boolean; left: string[] }>(proc.stdout!), 60_000, 'the workers fixture');
    expect(await exit).toEqual([0, null]);
    expect(report).toEqual({ ok: true, left: [] });
  });
});

test('where clone3 is ENOSYS (seccomp, old kernels) spawns fall back to clone + pidfd_open by themselves', () => {
  const shim = compileShim('deny-ofd', dir); // its DENY_CLONE3 filter
  const supervise = JSON.stringify(new URL('./os/supervise.js', distUrl).href);
  const script = `import { spawnSupervised, SpawnError } from ${JSON.stringify(distUrl)};
    import { supervisionInfo } from ${supervise};
    const out = {};
    out.status = await spawnSupervised('sh', ['-c', 'exit 3'], { stdio: 'ignore' }).exited;
    try { spawnSupervised('/nonexistent/command'); } catch (e) { out.error = (e instanceof SpawnError) + ' ' + e.cause.code; }
    out.again = await spawnSupervised('true', [], { stdio: 'ignore' }).exited;
    const info = supervisionInfo();
    out.info = { clone3Missing: info.clone3Missing, clone3Spawns: info.clone3Spawns, fallbackSpawns: info.fallbackSpawns };
    console.log(JSON.stringify(out));`;
  const env = { LD_PRELOAD: preload(shim), DENY_CLONE3: '1', LOCKMGR_SPAWN_FALLBACK: '' };
  expect(runScript(script, env)).toEqual({
    status: { code: 3, signal: null },
    error: 'true ENOENT',
    again: { code: 0, signal: null },
    info: { clone3Missing: true, clone3Spawns: 0, fallbackSpawns: 3 },
  });
  // The control: the same script without the filter goes through clone3.
  expect(runScript(script, { LOCKMGR_SPAWN_FALLBACK: '' })).toMatchObject({ info: { clone3Missing: false, clone3Spawns: 3, fallbackSpawns: 0 } });
});

test('inherited stdio is blocking in the child even when Node made it O_NONBLOCK (a slow reader, a big writer)', async () => {
  // The parent touches process.stdout (Node makes a pipe stdout O_NONBLOCK),
  // then lets a child write 2 MB through it to a reader that starts late.
  const script = `import { spawnSupervised } from ${JSON.stringify(distUrl)};
    process.stdout.write('');
    const status = await spawnSupervised('head', ['-c', '2000000', '/dev/zero'], { stdio: 'inherit' }).exited;
    process.stderr.write(JSON.stringify(status));`;
  const child = cpSpawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d));
  child.stdout!.pause();
  await new Promise((r) => setTimeout(r, 500));
  let bytes = 0;
  child.stdout!.on('data', (d: Buffer) => (bytes += d.length));
  child.stdout!.resume();
  await once(child, 'close');
  expect(JSON.parse(stderr)).toEqual({ code: 0, signal: null });
  expect(bytes).toBe(2_000_000);
});

test('a loop of failing execs leaves no zombie and no pidfd behind, even before the loop turns', () => {
  const script = `import { spawnSupervised } from ${JSON.stringify(distUrl)};
    import { readdirSync } from 'node:fs';
    const before = readdirSync('/proc/self/fd').length;
    const codes = new Set();
    for (let i = 0; i < 2000; i++) { try { spawnSupervised('/nonexistent/command'); } catch (e) { codes.add(e.cause.code); } }
    const during = readdirSync('/proc/self/fd').length;
    console.log(JSON.stringify({ codes: [...codes], grew: during - before }));`;
  // Under RLIMIT_NOFILE 256: were each failure to keep its pidfd until the loop turned, the loop would hit EMFILE.
  const r = spawnSync('prlimit', ['--nofile=256:256', process.execPath, '--input-type=module', '-e', script], { encoding: 'utf8' });
  expect(r.stderr).toBe('');
  expect(JSON.parse(r.stdout)).toEqual({ codes: ['ENOENT'], grew: 0 });
});

test('where close_range is refused (EPERM from an old seccomp profile) the child still gets only 0, 1, 2 and keepFds', () => {
  const shim = compileShim('deny-ofd', dir);
  const script = `import { spawnSupervised } from ${JSON.stringify(distUrl)};
    import { openSync } from 'node:fs';
    const kept = openSync('/dev/null', 'r');
    const extra = [openSync('/dev/null', 'r'), openSync('/dev/null', 'r')];
    const child = spawnSupervised('sh', ['-c', 'ls /proc/self/fd'], { stdio: ['ignore', 'pipe', 'ignore'], keepFds: [kept] });
    let out = ''; child.stdout.on('data', (d) => (out += d));
    // Listened for before awaiting the exit: the stream may close first.
    const closed = new Promise((r) => child.stdout.on('close', r));
    const status = await child.exited;
    await closed;
    console.log(JSON.stringify({ status, fds: out.trim().split(/\\s+/).map(Number).sort((a, b) => a - b), kept, extra }));`;
  const out = runScript(script, { LD_PRELOAD: preload(shim), DENY_CLOSE_RANGE: '1' }) as { status: unknown; fds: number[]; kept: number };
  expect(out.status).toEqual({ code: 0, signal: null });
  // ls itself opens one fd to list the directory.
  expect(out.fds.filter((fd) => fd !== 3 || out.kept === 3).slice(0, 3)).toEqual([0, 1, 2]);
  expect(out.fds).toContain(out.kept);
  expect(out.fds.length).toBe(5);
});

test('holes in args, stdio or keepFds are rejected, not skipped', () => {
  const holes: Array<() => unknown> = [
    () => spawnSupervised('sh', ['-c', 'exit 0', , 'x'] as string[]),
    () => spawnSupervised('true', [], { stdio: ['inherit', , 'inherit'] as never }),
    () => spawnSupervised('true', [], { keepFds: [, 5] as never }),
  ];
  for (const call of holes) expect(call).toThrow(InvalidArgumentError);
});

test("cwd is the child's chdir, through symlinks, not a lexically normalised path", async () => {
  const link = join(dir, 'link');
  symlinkSync('/usr/lib', link);
  const child = spawnSupervised('pwd', [], { cwd: `${link}/..`, stdio: ['ignore', 'pipe', 'ignore'] });
  const out = await collect(child.stdout!);
  await child.exited;
  expect(out.trim()).toBe('/usr');
});

/** Lets handles closed by earlier tests (stream sockets) finish closing. */
async function settle(): Promise<void> {
  for (let i = 0; i < 3; i++) await new Promise((r) => setImmediate(r));
}

/** No fd is open now that was not open before, and there are no more of them. */
function expectNoNewFds(before: number[]): void {
  const now = openFds();
  expect(now.filter((fd) => !before.includes(fd))).toEqual([]);
  expect(now.length).toBeLessThanOrEqual(before.length);
}

function firstLine(child: SupervisedProcess): Promise<string> {
  return new Promise((resolve) => {
    let text = '';
    child.stdout!.setEncoding('utf8');
    child.stdout!.on('data', (d: string) => {
      text += d;
      if (text.includes('\n')) resolve(text.slice(0, text.indexOf('\n')));
    });
  });
}

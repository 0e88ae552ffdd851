// The crash rows of the conformance suite: SIGKILL of the supervisor at named
// points and at seeded steps of a scripted life (start, hotplug, migration out
// with its cancels, shutdown), under both lock lifetimes, written once and run
// against every lockspace (crash-direct.test.ts, crash-indirect.test.ts,
// crash-sanlock.test.ts). The victim is test/fixtures/crash-peer.mjs on host
// B (for sanlock: the second simulated host), frozen at the point so that the
// kill lands exactly there; the observer is this process, host A, and sees the
// leases as any third party would (Backend.observe).
//
// After each kill, the rule, exact at every point of the script:
//   - a VM that runs the command (not a sanlock exec helper still in its gate)
//     holds the leases its manager had acquired for it: the registered disks
//     (disk 0 exclusive, disk 1 shared) from its spawn on, except from the
//     call of completeMigrateOut() to the end of the take-back that follows
//     it, and from the call of shutdown() on; the hot-plugged disk 2 where the
//     lockspace declares hotplugHeldByChild, from the end of acquireResource()
//     to the call of releaseResource(). Under lockLifetime 'child' it lives
//     on; under 'supervisor' it dies;
//   - a lease nobody alive holds is free: whatever only the supervisor held
//     (a hot-plugged disk without hotplugHeldByChild, an acquire in flight) is
//     free at once, outside the windows above, while the VM lives;
//   - a sanlock exec helper caught in its gate never execs the command: it
//     exits;
//   - once the VM is gone too, the whole pool is free (Backend.settle) and no
//     zombie of ours is left.
// The detailed matrix of the OFD lockspaces (guard and pin bytes, lock files
// by inode, every native step) is test/system/crash.test.ts.
//
// Environment: LOCKMGR_CRASH_SEED (the seed of the seeded trials, printed;
// default a fresh one), LOCKMGR_CONF_CRASH_RANDOM (seeded trials per lifetime,
// default 6), LOCKMGR_CONF_CRASH_REPLAY ("<lifetime>:<step>", comma-separated:
// only those trials; a failure prints them).
import { readdirSync, readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { attachProcess, type LockManagerOptions, type SupervisedProcess } from '../../lib/index.js';
import { GUARD_MS, Victim, type Rec } from '../harness/crash-victim.js';
import { procStat, within, zombieChildren } from '../harness/process-helpers.js';
import { below, prng, seedFrom } from '../harness/seeded.js';
import type { Backend, PoolResource, Seen } from './backends.js';

type Lifetime = 'child' | 'supervisor';
const LIFETIMES: readonly Lifetime[] = ['child', 'supervisor'];
const RANDOM = Number(process.env.LOCKMGR_CONF_CRASH_RANDOM ?? 6);
const REPLAY = process.env.LOCKMGR_CONF_CRASH_REPLAY;
const SEED = seedFrom('LOCKMGR_CRASH_SEED');
const VM: [string, string[], object] = ['sleep', ['1000'], { stdio: 'ignore' }];

/** Named kill points: how to get there, and the freeze that stops the victim there. */
interface Point {
  name: string;
  freeze: { at: string; nth?: number };
  /** The calls that lead to the freeze (the last one freezes: fired, not awaited). */
  drive(v: Victim, b: Backend): Promise<void>;
}

const disk = (b: Backend, i: number): PoolResource => b.disks[i]!;

async function started(v: Victim): Promise<void> {
  await v.call('start', ...VM);
}

const POINTS: Point[] = [
  { name: 'start: starting', freeze: { at: 'state:starting' }, drive: async (v) => v.fire('start', ...VM) },
  { name: 'start: running', freeze: { at: 'state:running' }, drive: async (v) => v.fire('start', ...VM) },
  {
    name: 'hotplug: acquired',
    freeze: { at: 'acquired' },
    drive: async (v, b) => {
      await started(v);
      v.fire('acquireThenHook', disk(b, 2).spec('exclusive'));
    },
  },
  {
    name: 'source: migrating',
    freeze: { at: 'state:migrating' },
    drive: async (v) => {
      await started(v);
      v.fire('prepareMigrate', 'qemu+ssh://target/system');
    },
  },
  {
    name: 'source: migrated',
    freeze: { at: 'state:migrated' },
    drive: async (v) => {
      await started(v);
      await v.call('prepareMigrate', 'qemu+ssh://target/system');
      v.fire('completeMigrateOut', 'qemu+ssh://target/system');
    },
  },
  {
    name: 'source: taken back',
    freeze: { at: 'state:running', nth: 2 },
    drive: async (v) => {
      await started(v);
      await v.call('prepareMigrate', 'qemu+ssh://target/system');
      await v.call('completeMigrateOut', 'qemu+ssh://target/system');
      v.fire('completeMigrateOut', 'qemu+ssh://target/system', { cancel: true });
    },
  },
  {
    name: 'shutdown: stopping',
    freeze: { at: 'state:stopping' },
    drive: async (v) => {
      await started(v);
      v.fire('shutdown', { graceMs: 20 });
    },
  },
];

type Want = 'held' | 'free' | 'any';

/**
 * What the lease of each pool disk must be while the VM runs the command,
 * from the steps the victim made before the kill: 'held' (in the disk's mode:
 * disk 0 exclusive, the others as registered), 'free', or 'any' (a window in
 * which the manager was changing it).
 */
function expected(records: Rec[], b: Backend): [Want, Want, Want] {
  // A VM that runs the command was spawned (OFD) or let exec (sanlock) only with its registered leases.
  let registered: Want = 'held';
  let hot: Want = 'free';
  for (const r of records) {
    if (r.call === 'completeMigrateOut' || r.call === 'shutdown') registered = 'any';
    if (r.done === 'takeBack') registered = 'held';
    if (b.capabilities.hotplugHeldByChild) {
      if (r.call === 'acquire' || r.call === 'release') hot = 'any';
      if (r.done === 'acquire') hot = 'held';
      if (r.done === 'release') hot = 'free';
    }
  }
  return [registered, registered, hot];
}
const MODE_OF: readonly Seen[] = ['exclusive', 'shared', 'exclusive'];

/** PF_EXITING in /proc/PID/stat's flags: do_exit() has begun and runs no more user code. */
const PF_EXITING = 0x4;

/** Whether `pid` runs the VM's command now: 'sleep', not a zombie, not exiting. Checked before and after a look, it brackets the look. */
function runsCommand(pid: number): boolean {
  try {
    if (readFileSync(`/proc/${pid}/comm`, 'utf8').trim() !== 'sleep') return false;
    const stat = procStat(pid);
    return stat[0] !== 'Z' && stat[0] !== 'X' && (Number(stat[6]) & PF_EXITING) === 0;
  } catch {
    return false;
  }
}

/** The pids of a process's children (a child belongs to the thread that made it: every thread's list). */
function childrenOf(pid: number): number[] {
  const out: number[] = [];
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    try {
      out.push(...readFileSync(`/proc/${pid}/task/${tid}/children`, 'utf8').trim().split(/\s+/).filter((t) => t !== '').map(Number));
    } catch {
      // The thread ended meanwhile.
    }
  }
  return out;
}

/** Gone, or a zombie nobody reaped yet. */
function over(pid: number): boolean {
  try {
    return procStat(pid)[0] === 'Z';
  } catch {
    return true;
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** One trial: a victim on host B, driven to a point, killed, and judged. Returns its violations. */
async function trial(b: Backend, lifetime: Lifetime, label: string, run: (v: Victim) => Promise<void>): Promise<string[]> {
  const violations: string[] = [];
  const v = await Victim.start(b.env('B'));
  const vms: Array<{ pid: number; p: SupervisedProcess }> = [];
  const ended = (x: { p: SupervisedProcess }): boolean => x.p.exitStatus !== null;
  try {
    await v.call('create', { lockspace: b.lockspace('B'), lockLifetime: lifetime } satisfies LockManagerOptions);
    await v.call('register', disk(b, 0).spec('exclusive'));
    await v.call('register', disk(b, 1).spec('shared'));
    await run(v);
    // Frozen, the victim reaps nobody: its children's pids stay theirs until we hold a pidfd of each.
    for (const pid of childrenOf(v.child.pid!)) {
      try {
        vms.push({ pid, p: attachProcess(pid) });
      } catch {
        // Gone already (a zombie of the frozen victim): nothing runs there.
      }
    }
    const want = expected(v.records, b);
    await v.kill();
    for (const vm of vms) {
      // A sanlock exec helper still in its gate either execs (its leases were all taken) or exits; wait for either.
      for (let t = 0; !runsCommand(vm.pid) && !ended(vm) && !over(vm.pid); t += 20) {
        if (t > GUARD_MS) {
          violations.push(`${label}: process ${vm.pid} neither ran the command nor ended within ${GUARD_MS} ms of its supervisor's death`);
          break;
        }
        await sleep(20);
      }
      for (let i = 0; i < 3; i++) {
        if (want[i] === 'any' || !runsCommand(vm.pid)) continue;
        const seen = await b.observe(disk(b, i));
        // Still running the command after the look: it ran it during the look, and held what it holds.
        if (!runsCommand(vm.pid)) continue;
        const w = want[i] === 'held' ? MODE_OF[i]! : 'free';
        if (seen !== w) violations.push(`${label}: the VM ${vm.pid} runs; disk ${i} is ${seen}, want ${w}`);
      }
      // Under 'supervisor' the VM dies with its supervisor (under 'child' it lives on, and we kill it below).
      if (lifetime === 'supervisor') {
        await within(vm.p.exited, GUARD_MS, `${label}: the VM ${vm.pid} to die with its supervisor`).catch((err: Error) => violations.push(err.message));
      }
    }
  } finally {
    await v.kill();
    for (const vm of vms) {
      vm.p.signal('SIGKILL');
      await within(vm.p.exited, GUARD_MS, `${label}: the VM ${vm.pid} to exit`);
    }
  }
  // Everything of the trial is gone: the whole pool is free for others (sanlock: written free on the storage).
  await b.settle().catch((err: Error) => violations.push(`${label}: ${err.message}`));
  return violations;
}

/** The steps of the 'source' script on this backend, counted once (no freeze). */
async function calibrate(b: Backend): Promise<number> {
  let steps = 0;
  await trial(b, 'child', 'calibration', async (v) => {
    v.fire('script', 'source', sourceParams(b), null);
    await v.until((r) => r.end === true || r.scriptFailed !== undefined, 'the source script to end');
    const failed = v.records.find((r) => r.scriptFailed !== undefined);
    if (failed !== undefined) throw new Error(`the source script failed on ${b.name}: ${JSON.stringify(failed)}`);
    steps = v.scriptSteps().length;
  });
  return steps;
}

function sourceParams(b: Backend): Record<string, unknown> {
  return { command: VM[0], args: VM[1], spawnOptions: VM[2], hotplug: disk(b, 2).spec('exclusive'), rounds: 2 };
}

export function crashConformance(b: Backend): void {
  const why = b.unavailable();
  if (why !== null) console.warn(`crash conformance (${b.name}) skipped: ${why}`);
  describe.skipIf(why !== null)(`crash conformance: ${b.name}`, () => {
    beforeAll(() => b.setup(), 120_000);
    afterAll(() => b.teardown(), 60_000);

    for (const point of POINTS) {
      for (const lifetime of LIFETIMES) {
        it.skipIf(REPLAY !== undefined)(`SIGKILL of the supervisor at '${point.name}' [${lifetime}]: the VM holds what it should, nothing else is held, nothing is left`, async () => {
          const label = `${b.name} ${point.name} [${lifetime}]`;
          const violations = await trial(b, lifetime, label, async (v) => {
            await v.call('freeze', point.freeze);
            await point.drive(v, b);
            await v.frozen(point.freeze.at);
          });
          expect(violations).toEqual([]);
          expect(zombieChildren()).toEqual([]);
        }, 120_000);
      }
    }

    it('SIGKILL of the supervisor at seeded steps of a scripted life (start, hotplug, migration out with cancels, shutdown)', async () => {
      const steps = await calibrate(b);
      expect(steps).toBeGreaterThan(10);
      // One stream per backend, from the one seed: a backend's trials do not depend on another's.
      const rand = prng(SEED ^ [...b.name].reduce((h, c) => (Math.imul(h, 31) + c.charCodeAt(0)) >>> 0, 0));
      const trials: Array<{ lifetime: Lifetime; step: number }> =
        REPLAY !== undefined
          ? REPLAY.split(',').map((e) => {
              const [lifetime, step] = e.split(':');
              if ((lifetime !== 'child' && lifetime !== 'supervisor') || !Number.isInteger(Number(step))) throw new Error(`LOCKMGR_CONF_CRASH_REPLAY: '${e}' is not <child|supervisor>:<step>`);
              return { lifetime, step: Number(step) };
            })
          : LIFETIMES.flatMap((lifetime) => Array.from({ length: RANDOM }, () => ({ lifetime, step: 1 + below(rand, steps) })));
      console.log(`crash conformance (${b.name}): ${trials.length} trials of ${steps} steps from LOCKMGR_CRASH_SEED=${SEED}`);
      const violations: string[] = [];
      for (const t of trials) {
        const label = `${b.name} source [${t.lifetime}] step ${t.step} (LOCKMGR_CONF_CRASH_REPLAY=${t.lifetime}:${t.step} LOCKMGR_CRASH_SEED=${SEED})`;
        const found = await trial(b, t.lifetime, label, async (v) => {
          v.fire('script', 'source', sourceParams(b), t.step);
          // The script may end before that step (a step count that varies by a record or two): then the kill finds it ended.
          await v.until((r) => r.frozen !== undefined || r.end === true || r.scriptFailed !== undefined, `step ${t.step}`);
          const failed = v.records.find((r) => r.scriptFailed !== undefined);
          if (failed !== undefined) violations.push(`${label}: the script failed: ${JSON.stringify(failed)}`);
        });
        violations.push(...found);
      }
      expect(violations).toEqual([]);
      expect(zombieChildren()).toEqual([]);
    }, 600_000);
  });
}

// The soak (issue 8): 8 processes, each doing LOCKMGR_SOAK_OPS (default 2,000;
// the full run is 10,000: docs/reliability.md) random acquire / release /
// lock-with-timeout / abort operations on 3 shared files, exclusive and
// shared, through openLockable() and LockManager hotplug. Every grant and
// release goes to one O_APPEND log (test/fixtures/soak-worker.mjs); the
// checker (test/harness/soak-log.ts) replays it: never two exclusive holders, never
// exclusive with shared, no grant lost, no record lost.
//
// Environment: LOCKMGR_SOAK_OPS (operations per worker), LOCKMGR_SOAK_WORKERS
// (default 8), LOCKMGR_SOAK_SEED (0..2^32-1; default a fresh one). The seed
// chooses every worker's seed (test/harness/seeded.ts), and so what each worker's nth
// operation aims at: file, mode, kind, timeout, abort point. A failure prints
// it, and LOCKMGR_SOAK_SEED=<seed> runs the same draws again. How the
// processes interleave is the kernel's scheduling, and with it what each
// operation gets (busy, timed out) and so whether the next one on that file
// acquires or releases: a replay reruns the same draws, not the same
// interleaving (the checker judges the log of whichever happened).
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { makeFile, tempDir } from '../helpers.js';
import { prng, seedFrom, subSeed } from '../harness/seeded.js';
import { checkSoakLog } from '../harness/soak-log.js';
import { join } from 'node:path';

const run = promisify(execFile);
const OPS = Number(process.env.LOCKMGR_SOAK_OPS ?? 2000);
const WORKERS = Number(process.env.LOCKMGR_SOAK_WORKERS ?? 8);
const RESOURCES = 3;
const SEED = seedFrom('LOCKMGR_SOAK_SEED');
/** The assertion messages: how to run the same operations again. */
const REPLAY = `soak seed ${SEED} (LOCKMGR_SOAK_SEED=${SEED} reruns the same draws; not the same interleaving)`;
const worker = fileURLToPath(new URL('../fixtures/soak-worker.mjs', import.meta.url));

interface Counts {
  ops: number;
  tryLock: number;
  busy: number;
  timedLock: number;
  timeouts: number;
  abortable: number;
  aborts: number;
  releases: number;
  hotplugAcquire: number;
  hotplugBusy: number;
  hotplugRelease: number;
  grants: { exclusive: number; shared: number };
}

let tmp: ReturnType<typeof tempDir>;
beforeEach(() => {
  tmp = tempDir();
});
afterEach(() => tmp.cleanup());

async function soak(workers: number, ops: number, env: NodeJS.ProcessEnv = process.env): Promise<{ counts: Counts[]; log: string }> {
  const files = Array.from({ length: RESOURCES }, (_, i) => makeFile(tmp.dir, `r${i}.img`));
  const logPath = join(tmp.dir, 'soak.log');
  const rand = prng(SEED);
  // Half the workers release everything at the end; the others leave it to process end.
  const results = await Promise.all(
    Array.from({ length: workers }, (_, w) => run(process.execPath, [worker, logPath, String(ops), String(subSeed(rand)), w % 2 === 1 ? 'release' : 'leave', ...files], { env, maxBuffer: 1 << 20 })),
  );
  return { counts: results.map((r) => JSON.parse(r.stdout) as Counts), log: readFileSync(logPath, 'utf8') };
}

describe('soak', () => {
  it(`${WORKERS} processes x ${OPS} random operations on ${RESOURCES} shared files: never two exclusive holders, never exclusive with shared, no grant lost`, async () => {
    const { counts, log } = await soak(WORKERS, OPS);
    const report = checkSoakLog(log);
    const sum = (f: (c: Counts) => number): number => counts.reduce((a, c) => a + f(c), 0);
    const summary = {
      processes: report.processes,
      operations: sum((c) => c.ops),
      grants: report.grants,
      releases: report.releases,
      releasedByProcessEnd: report.endedHolding,
      maxSharedHolders: report.maxShared,
      tryLock: sum((c) => c.tryLock),
      busy: sum((c) => c.busy),
      lockWithTimeout: sum((c) => c.timedLock),
      timeouts: sum((c) => c.timeouts),
      abortable: sum((c) => c.abortable),
      aborts: sum((c) => c.aborts),
      hotplugAcquires: sum((c) => c.hotplugAcquire),
      hotplugBusyOrTimeout: sum((c) => c.hotplugBusy),
      violations: report.violations.length,
    };
    console.log(`soak: ${REPLAY}: ${JSON.stringify(summary, null, 1)}`);
    expect(report.violations.slice(0, 20), REPLAY).toEqual([]);
    expect(summary.processes, REPLAY).toBe(WORKERS);
    expect(summary.operations, REPLAY).toBe(WORKERS * OPS);
    // Every grant a worker counted is in the log, and nothing else.
    expect(report.grants, REPLAY).toEqual({ exclusive: sum((c) => c.grants.exclusive), shared: sum((c) => c.grants.shared) });
    // The soak exercised what it claims: contention, both modes, timeouts, aborts, hotplug.
    for (const k of ['busy', 'timeouts', 'aborts', 'hotplugAcquires'] as const) expect(summary[k], `${k}: ${REPLAY}`).toBeGreaterThan(0);
    expect(report.grants.exclusive, REPLAY).toBeGreaterThan(0);
    expect(report.maxShared, REPLAY).toBeGreaterThan(1);
  }, 300_000);

  it('the checker finds overlaps: workers that log grants without locking', async () => {
    const { log } = await soak(4, 300, { ...process.env, SOAK_BREAK: 'no-lock' });
    const report = checkSoakLog(log);
    expect(
      report.violations.some((v) => /exclusive grant while|shared grant while/.test(v)),
      REPLAY,
    ).toBe(true);
  }, 120_000);

  it('the checker finds lost and unmatched records', () => {
    const good = ['G 1 fd 0 exclusive 1', 'R 1 fd 0 exclusive 2', 'G 2 fd 0 shared 1', 'G 3 fd 0 shared 1', 'E 2 all -1 - 2', 'R 3 fd 0 shared 2', 'E 1 all -1 - 3', 'E 3 all -1 - 3'];
    expect(checkSoakLog(good.join('\n')).violations).toEqual([]);
    expect(checkSoakLog(['G 1 fd 0 exclusive 1', 'G 2 fd 0 shared 1', 'E 1 all -1 - 2', 'E 2 all -1 - 2'].join('\n')).violations[0]).toMatch(/shared grant while 1\/fd holds exclusive/);
    expect(checkSoakLog(['G 1 fd 0 exclusive 1', 'E 1 all -1 - 3'].join('\n')).violations[0]).toMatch(/sequence 3 of process 1, expected 2/);
    expect(checkSoakLog(['R 1 fd 0 shared 1', 'E 1 all -1 - 2'].join('\n')).violations[0]).toMatch(/release of a shared lock/);
    expect(checkSoakLog('G 1 fd 0 exclusive 1').violations).toEqual(['process 1 has no end record', "resource 0: 1/fd's exclusive grant was never released and its process never ended"]);
  });
});

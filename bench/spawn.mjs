// Spawn + exit notification of /bin/true, one after another: spawnSupervised()
// (clone3 path and fallback path), child_process.spawn(), and C loops
// (bench/c/spawn.c: clone3 + poll + waitid with fork semantics, which is the
// "C" column, and the addon's own CLONE_VM | CLONE_VFORK flags as a second
// row). Rounds alternate between the contenders so all see the same machine
// noise. A last pair of rows repeats ours and child_process's with 1 GiB of
// touched memory in this process: fork-based spawning copies page tables,
// CLONE_VM does not.
//
// Standalone: node bench/spawn.mjs [--quick]. From bench/run.mjs: run({ quick }).
import { spawn as cpSpawn } from 'node:child_process';
import { execFileSync } from 'node:child_process';
import { once } from 'node:events';
import { cpus, release } from 'node:os';
import { fileURLToPath } from 'node:url';
import { spawnSupervised } from '../dist/index.js';
import { compileC, median } from './lib.mjs';

const TRUE = '/bin/true';

async function oursRound(n, fallback) {
  if (fallback) process.env.LOCKMGR_SPAWN_FALLBACK = '1';
  try {
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < n; i++) await spawnSupervised(TRUE, [], { stdio: 'ignore' }).exited;
    return Number(process.hrtime.bigint() - t0) / n / 1e3;
  } finally {
    delete process.env.LOCKMGR_SPAWN_FALLBACK;
  }
}

async function childProcessRound(n) {
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < n; i++) await once(cpSpawn(TRUE, [], { stdio: 'ignore' }), 'exit');
  return Number(process.hrtime.bigint() - t0) / n / 1e3;
}

function cRound(bin, mode, n) {
  return Number(execFileSync(bin, [mode, String(n), '1'], { encoding: 'utf8' }).trim());
}

/** Touches `mib` MiB so they are resident: what a Node process with a big heap looks like to fork(). */
function ballast(mib) {
  const chunks = [];
  for (let i = 0; i < mib; i++) chunks.push(Buffer.alloc(1 << 20, 1));
  return chunks;
}

export async function run({ quick = false } = {}) {
  const bin = compileC('spawn');
  const n = quick ? 100 : 500;
  const rounds = quick ? 5 : 7;
  const c = [];
  const cVm = [];
  const ours = [];
  const fallback = [];
  const cp = [];
  // Warm up the JIT and every path once.
  await oursRound(20, false);
  await oursRound(20, true);
  await childProcessRound(20);
  cRound(bin, 'fork', 20);
  cRound(bin, 'vm', 20);
  for (let r = 0; r < rounds; r++) {
    c.push(cRound(bin, 'fork', n));
    cVm.push(cRound(bin, 'vm', n));
    ours.push(await oursRound(n, false));
    fallback.push(await oursRound(n, true));
    cp.push(await childProcessRound(n));
  }
  // The C loop runs in this phase too: the machine may be busier or quieter now,
  // and ratios are only meaningful between rounds taken together.
  const bigOurs = [];
  const bigCp = [];
  const bigC = [];
  let heavy = ballast(1024);
  const bigN = quick ? 50 : 200;
  for (let r = 0; r < rounds; r++) {
    bigC.push(cRound(bin, 'fork', bigN));
    bigOurs.push(await oursRound(bigN, false));
    bigCp.push(await childProcessRound(bigN));
  }
  heavy = null;
  void heavy;
  const row = (name, xs, goal, iterations = n, cs = c) => ({
    case: name,
    unit: 'µs per spawn+exit',
    median: median(xs),
    c: median(cs),
    ratio: median(xs) / median(cs),
    goal,
    rounds,
    iterations,
  });
  const cpMedian = median(cp);
  const bigCpMedian = median(bigCp);
  const faster = (xs, base) => `faster than child_process (${(base / median(xs)).toFixed(2)} x)`;
  return [
    row('spawn+exit /bin/true, spawnSupervised (clone3, CLONE_VM)', ours, faster(ours, cpMedian)),
    row('spawn+exit /bin/true, spawnSupervised (fallback: clone + pidfd_open)', fallback, faster(fallback, cpMedian)),
    row('spawn+exit /bin/true, child_process.spawn', cp, 'report'),
    row('spawn+exit /bin/true, C loop with CLONE_VM + CLONE_VFORK (the addon\'s flags)', cVm, 'report'),
    row('spawn+exit /bin/true, spawnSupervised, 1 GiB resident', bigOurs, faster(bigOurs, bigCpMedian), bigN, bigC),
    row('spawn+exit /bin/true, child_process.spawn, 1 GiB resident', bigCp, 'report', bigN, bigC),
  ];
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const quick = process.argv.includes('--quick');
  const rows = await run({ quick });
  const fmt = (x) => (x >= 100 ? x.toFixed(0) : x.toFixed(2));
  console.log(`bench/spawn${quick ? ' (quick)' : ''}: Node ${process.version}, Linux ${release()}, ${cpus()[0]?.model ?? 'unknown CPU'} x${cpus().length}\n`);
  console.log('| case | unit | ours (median) | C clone3+waitid (median) | ratio to C | goal |');
  console.log('|---|---|---|---|---|---|');
  for (const r of rows) {
    console.log(`| ${r.case} | ${r.unit} | ${fmt(r.median)} | ${fmt(r.c)} | ${fmt(r.ratio)} x | ${r.goal} |`);
  }
  console.log(`\nmedians of ${rows[0].rounds} rounds; ${rows[0].iterations} spawns per round (${rows[4].iterations} with 1 GiB resident)`);
}

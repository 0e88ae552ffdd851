// 2, 4 and 8 processes contending for one OFD write lock on byte 0, each in a
// loop of `await lock()`, count, unlock() for a fixed time, against
// bench/c/contend.c, the same loop with F_OFD_SETLKW, and that program again
// shaped like the addon (SETLK first, then a waiter thread and an eventfd on
// conflict: bench/c/relay.h). Reported: acquisitions
// per second over all processes, Jain's fairness index over the per-process
// counts (1 = even, 1/N = one process took everything), the longest single
// wait, starvation (processes that got less than a tenth of a fair share), and
// the CPU time each acquisition cost: on a machine whose cores are busy, the
// rate is the CPU the processes get divided by that.
// All processes start together: each first runs the loop WARMUP times on a
// byte of its own (so V8 has compiled it: C needs no warm-up but does the
// same), then waits for a shared lock on byte 1 that this process holds until
// every one is blocked on it.
//
// Child: node bench/contend.mjs child PATH DURATION_MS INDEX WARMUP
import { fstatSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { openLockable } from '../dist/index.js';
import { blockedOn, compileC, jain, median, runTogether, scratchFile } from './lib.mjs';

const BYTE0 = { start: 0, length: 1 };
const GATE = { start: 1, length: 1 };
const self = fileURLToPath(import.meta.url);

async function child(path, durationMs, index, warmup) {
  const file = openLockable(path);
  const own = { start: 1000 + index, length: 1 };
  for (let i = 0; i < warmup; i++) {
    await file.lock('exclusive', own);
    file.unlock(own);
  }
  await file.lock('shared', GATE);
  // performance.now() in the loop: a double, where hrtime.bigint() would
  // allocate a BigInt per call; the stamps that other processes compare are
  // taken on CLOCK_MONOTONIC once at each end.
  const cpu0 = process.cpuUsage();
  const startNs = process.hrtime.bigint();
  const start = performance.now();
  let end = start;
  let longest = 0;
  let count = 0;
  while (end - start < durationMs) {
    const asked = performance.now();
    await file.lock('exclusive', BYTE0);
    end = performance.now();
    if (end - asked > longest) longest = end - asked;
    count++;
    file.unlock(BYTE0);
  }
  const endNs = startNs + BigInt(Math.round((end - start) * 1e6));
  const cpu = process.cpuUsage(cpu0);
  file.close();
  console.log(`${count} ${Math.round(longest * 1e6)} ${startNs} ${endNs} ${(cpu.user + cpu.system) * 1000}`);
}

/** One contest of `procs` copies of `cmd`; returns { rate, fairness, longestMs, starved, cpuUs (CPU time per acquisition) }. */
async function contest(cmd, path, procs, durationMs, warmup, extra = []) {
  const gate = openLockable(path);
  gate.tryLock('exclusive', GATE);
  const ino = fstatSync(gate.fd).ino;
  try {
    const outs = runTogether(Array.from({ length: procs }, (_, i) => [...cmd, path, String(durationMs), String(i), String(warmup), ...extra]));
    let ended = false;
    outs.catch(() => {}).finally(() => (ended = true));
    // Open the gate once all are blocked on it (or the children have failed).
    while (!ended && blockedOn(ino) < procs) await new Promise((res) => setTimeout(res, 2));
    gate.unlock(GATE);
    const rows = (await outs).map((out) => out.trim().split(' ').map(BigInt));
    const counts = rows.map((r) => Number(r[0]));
    const total = counts.reduce((a, b) => a + b, 0);
    const first = rows.reduce((m, r) => (r[2] < m ? r[2] : m), rows[0][2]);
    const last = rows.reduce((m, r) => (r[3] > m ? r[3] : m), rows[0][3]);
    return {
      rate: total / (Number(last - first) / 1e9),
      fairness: jain(counts),
      longestMs: Math.max(...rows.map((r) => Number(r[1]))) / 1e6,
      starved: counts.filter((c) => c < total / procs / 10).length,
      cpuUs: rows.reduce((a, r) => a + Number(r[4]), 0) / total / 1e3,
    };
  } finally {
    gate.close();
  }
}

export async function run({ quick = false } = {}) {
  const bin = compileC('contend');
  const { path, cleanup } = scratchFile();
  const rounds = quick ? 2 : 5;
  const durationMs = quick ? 200 : 1000;
  const warmup = quick ? 5_000 : 20_000;
  const counts = [2, 4, 8];
  const results = new Map(counts.map((n) => [n, { ours: [], c: [], relay: [] }]));
  try {
    for (let r = 0; r < rounds; r++) {
      for (const n of counts) {
        results.get(n).c.push(await contest([bin], path, n, durationMs, warmup));
        results.get(n).relay.push(await contest([bin], path, n, durationMs, warmup, ['relay']));
        results.get(n).ours.push(await contest([process.execPath, self, 'child'], path, n, durationMs, warmup));
      }
    }
  } finally {
    cleanup();
  }
  const rows = [];
  for (const n of counts) {
    const { ours, c, relay } = results.get(n);
    const med = (xs, key) => median(xs.map((x) => x[key]));
    const starved = (xs) => Math.max(...xs.map((x) => x.starved));
    const common = { rounds, iterations: `${durationMs} ms` };
    rows.push({
      case: `${n} processes contending for one lock: acquisitions per second`,
      unit: 'per s',
      median: med(ours, 'rate'),
      c: med(c, 'rate'),
      ratio: med(ours, 'rate') / med(c, 'rate'),
      goal: n === 8 ? '>= 0.8 x C' : 'report',
      met: n === 8 ? med(ours, 'rate') / med(c, 'rate') >= 0.8 : undefined,
      ...common,
    });
    rows.push({
      case: `${n} processes: acquisitions per second, C shaped like the addon (SETLK, then waiter thread + eventfd)`,
      unit: 'per s',
      median: med(relay, 'rate'),
      c: med(c, 'rate'),
      ratio: med(relay, 'rate') / med(c, 'rate'),
      goal: 'report',
      ...common,
    });
    rows.push({
      case: `${n} processes: Jain's fairness index (1 = even)`,
      unit: 'index',
      median: med(ours, 'fairness'),
      c: med(c, 'fairness'),
      goal: `no starvation: processes under 1/10 of a fair share, worst round: ours ${starved(ours)}/${n}, C ${starved(c)}/${n}`,
      met: starved(ours) === 0,
      ...common,
    });
    rows.push({
      case: `${n} processes: CPU time per acquisition (user + system, all threads)`,
      unit: 'µs',
      median: med(ours, 'cpuUs'),
      c: med(c, 'cpuUs'),
      ratio: med(ours, 'cpuUs') / med(c, 'cpuUs'),
      goal: `report (C shaped like the addon: ${med(relay, 'cpuUs').toFixed(2)} µs)`,
      ...common,
    });
    rows.push({
      case: `${n} processes: longest single wait`,
      unit: 'ms',
      median: med(ours, 'longestMs'),
      c: med(c, 'longestMs'),
      ratio: med(ours, 'longestMs') / med(c, 'longestMs'),
      goal: 'report',
      ...common,
    });
  }
  return rows;
}

if (process.argv[2] === 'child') {
  await child(process.argv[3], Number(process.argv[4]), Number(process.argv[5]), Number(process.argv[6]));
}

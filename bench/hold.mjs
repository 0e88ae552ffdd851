// One process holding 1, 100, 1,000 and 10,000 resources: the time to take each one
// (openLockable + tryLock, as LockManager does per disk) and the memory each
// held lock costs (VmRSS growth while the first take's locks are held, over a
// collected heap, divided by the count; and the JS heap's growth, exact to the
// byte), against bench/c/hold.c, which does the same safe open as
// openLockable (O_PATH open, fstat, fstatfs, reopen through /proc/self/fd,
// F_SETFL, close) and the same F_OFD_SETLK. Both should be flat in the count;
// ours within 2 x C per resource, and under 400 B of memory per held lock. Each measurement runs in a fresh child process
// so that one count's garbage does not land in another's figure; a count is
// taken `reps` times (closing everything between) so that every measurement
// covers about 10,000 resources.
//
// Child: node --expose-gc bench/hold.mjs child DIR COUNT REPS
import { closeSync, openSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { openLockable } from '../dist/index.js';
import { compileC, median, rss, runTogether, scratchDir } from './lib.mjs';

const BYTE0 = { start: 0, length: 1 };
const self = fileURLToPath(import.meta.url);

function take(paths) {
  const files = new Array(paths.length);
  for (let i = 0; i < paths.length; i++) {
    files[i] = openLockable(paths[i]);
    if (!files[i].tryLock('exclusive', BYTE0)) throw new Error(`${paths[i]} is locked`);
  }
  return files;
}

/** Full collections with a turn of the event loop between, so finalizers run and what they free goes too. */
async function settle() {
  globalThis.gc();
  await new Promise((res) => setImmediate(res));
  globalThis.gc();
}

async function child(dir, count, reps) {
  const paths = Array.from({ length: count }, (_, i) => join(dir, String(i)));
  for (const f of take(paths.slice(0, 100))) f.close(); // warm up the JIT
  let spent = 0n;
  let before = 0;
  let after = 0;
  let heapBefore = 0;
  let heapAfter = 0;
  for (let r = 0; r < reps; r++) {
    const measure = r === 0; // before other reps leave garbage behind
    if (measure) {
      await settle();
      before = rss();
      heapBefore = process.memoryUsage().heapUsed;
    }
    const t0 = process.hrtime.bigint();
    const files = take(paths);
    spent += process.hrtime.bigint() - t0;
    if (measure) {
      await settle();
      after = rss();
      heapAfter = process.memoryUsage().heapUsed;
    }
    for (const f of files) f.close();
  }
  console.log(`${Number(spent) / (count * reps)} ${(after - before) / count} ${(heapAfter - heapBefore) / count}`);
}

export async function run({ quick = false } = {}) {
  const bin = compileC('hold');
  const { dir, cleanup } = scratchDir();
  const counts = [1, 100, 1_000, 10_000];
  const rounds = quick ? 3 : 5;
  const perCount = quick ? 2_000 : 10_000;
  const results = new Map(counts.map((n) => [n, { ours: [], c: [] }]));
  try {
    for (let i = 0; i < Math.max(...counts); i++) closeSync(openSync(join(dir, String(i)), 'w'));
    for (let r = 0; r < rounds; r++) {
      for (const n of counts) {
        const reps = String(Math.max(1, Math.round(perCount / n)));
        const [c] = await runTogether([[bin, dir, String(n), reps]]);
        const [ours] = await runTogether([[process.execPath, '--expose-gc', self, 'child', dir, String(n), reps]]);
        results.get(n).c.push(c.trim().split(' ').map(Number));
        results.get(n).ours.push(ours.trim().split(' ').map(Number));
      }
    }
  } finally {
    cleanup();
  }
  const rows = [];
  const held = (n) => `holding ${n.toLocaleString('en')} resource${n === 1 ? '' : 's'}`;
  const timeRow = (n) => {
    const { ours, c } = results.get(n);
    const o = median(ours.map((x) => x[0])) / 1e3;
    const k = median(c.map((x) => x[0])) / 1e3;
    return {
      case: `${held(n)}: acquire (openLockable + tryLock) per resource (C: the same safe open + F_OFD_SETLK)`,
      unit: 'µs',
      median: o,
      c: k,
      ratio: o / k,
      goal: '<= 2 x C',
      met: o / k <= 2,
      rounds,
      iterations: `${perCount} resources`,
    };
  };
  const memRow = (n, column, what) => {
    const { ours, c } = results.get(n);
    const o = median(ours.map((x) => x[column]));
    const k = column === 1 ? median(c.map((x) => x[1])) : undefined;
    const goal = column === 1 ? { goal: '< 400 B', met: o < 400 } : { goal: 'report' };
    return { case: `${held(n)}: ${what}`, unit: 'bytes', median: o, c: k, ...goal, rounds };
  };
  for (const n of counts) rows.push(timeRow(n));
  // Memory per lock from 1,000 up: below that a page of RSS, or a few KiB the
  // collector frees or keeps (compiled code, feedback), outweigh the locks.
  // The JS heap's growth shows what the RSS figure is made of.
  const big = counts.filter((n) => n >= 1_000);
  for (const n of big) rows.push(memRow(n, 1, 'memory per held lock (RSS growth / count)'));
  for (const n of big) rows.push(memRow(n, 2, 'JS heap per held lock (heapUsed growth / count)'));
  const flatness = (group) => {
    const xs = group.map((r) => r.median);
    group.at(-1).goal += `; flat in the count: largest / smallest ${(Math.max(...xs) / Math.min(...xs)).toFixed(2)}`;
  };
  flatness(rows.slice(0, counts.length));
  flatness(rows.slice(counts.length, counts.length + big.length));
  flatness(rows.slice(counts.length + big.length));
  return rows;
}

if (process.argv[2] === 'child') {
  await child(process.argv[3], Number(process.argv[4]), Number(process.argv[5]));
}

// Uncontended acquire + release: tryLock/unlock (sync) and lock()/unlock()
// (promise) through the addon, against the same F_OFD_SETLK pair in C. Rounds
// alternate between C and ours so both see the same machine noise, and each
// ratio is the median of the rounds' own ratios (ours over the C run just
// before it): the load on these shared cores drifts within seconds, and a
// ratio of medians taken over a minute would carry that drift.
import { execFileSync } from 'node:child_process';
import { openLockable } from '../dist/index.js';
import { native } from '../dist/os/native.js';
import { compileC, median, scratchFile } from './lib.mjs';

const BYTE0 = { start: 0, length: 1 };

function jsRound(file, n) {
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < n; i++) {
    file.tryLock('exclusive', BYTE0);
    file.unlock(BYTE0);
  }
  return Number(process.hrtime.bigint() - t0) / n;
}

// The addon alone, without lib/'s checks: splits the gap to C into the policy
// layer's cost and the cost of crossing into native code and back.
function rawRound(fd, n) {
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < n; i++) {
    native.setlk(fd, 1, 0, 1);
    native.setlk(fd, 2, 0, 1);
  }
  return Number(process.hrtime.bigint() - t0) / n;
}

async function promiseRound(file, n) {
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < n; i++) {
    await file.lock('exclusive', BYTE0);
    file.unlock(BYTE0);
  }
  return Number(process.hrtime.bigint() - t0) / n;
}

export async function run({ quick = false } = {}) {
  const bin = compileC('acquire');
  const { path, cleanup } = scratchFile();
  const n = quick ? 20_000 : 200_000;
  const rounds = quick ? 5 : 11;
  const file = openLockable(path);
  try {
    jsRound(file, n); // warm up the JIT
    await promiseRound(file, n / 10);
    const c = [];
    const sync = [];
    const promise = [];
    const raw = [];
    rawRound(file.fd, n);
    for (let r = 0; r < rounds; r++) {
      c.push(Number(execFileSync(bin, [path, String(n), '1'], { encoding: 'utf8' }).trim()));
      raw.push(rawRound(file.fd, n));
      sync.push(jsRound(file, n));
      promise.push(await promiseRound(file, n));
    }
    const cMedian = median(c);
    const row = (name, xs, goal) => ({
      case: name,
      unit: 'ns per pair',
      median: median(xs),
      c: cMedian,
      ratio: median(xs.map((x, i) => x / c[i])),
      goal,
      rounds,
      iterations: n,
    });
    return [
      row('uncontended acquire+release, raw addon calls (no lib/ checks)', raw, undefined),
      row('uncontended acquire+release, sync (tryLock/unlock)', sync, 1.15),
      row('uncontended acquire+release, promise (lock()/unlock)', promise, 1.5),
    ];
  } finally {
    file.close();
    cleanup();
  }
}

// Contended handoff: two processes ping-pong one OFD write lock on byte 0.
// Measured: release in A (just before unlock) to lock() resolved in B (first
// thing after the await), against bench/c/handoff.c doing the same with
// F_OFD_SETLKW. Both sides stamp CLOCK_MONOTONIC, which is system-wide
// (process.hrtime reads it too), print their stamps at the end, and this file
// subtracts. The protocol, the same in both programs:
//   holder: wait until the peer is blocked on the lock (a "->" line on our
//           inode in /proc/locks), stamp, unlock;
//   waiter: wait until the peer holds the lock (getConflict), lock(), stamp.
// So every handoff starts with the waiter parked in the kernel, and the
// releaser is never racing it for the lock.
//
// Child: node bench/handoff.mjs child PATH ROLE HANDOFFS
import { fstatSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { openLockable } from '../dist/index.js';
import { blockedOn, compileC, median, pause, percentile, runTogether, scratchFile } from './lib.mjs';

const BYTE0 = { start: 0, length: 1 };
const self = fileURLToPath(import.meta.url);

function waitPeerBlocked(ino) {
  while (blockedOn(ino) === 0) pause(0.05);
}

function waitPeerHolds(file) {
  while (file.getConflict('exclusive', BYTE0) === null) pause(0.05);
}

async function child(path, role, n) {
  const file = openLockable(path);
  const ino = fstatSync(file.fd).ino;
  const t = new Array(n);
  if (role === 0 && !file.tryLock('exclusive', BYTE0)) throw new Error('role 0 must start holding the lock');
  for (let i = 0; i < n; i++) {
    if (i % 2 === role) {
      waitPeerBlocked(ino);
      t[i] = process.hrtime.bigint();
      file.unlock(BYTE0);
    } else {
      waitPeerHolds(file);
      await file.lock('exclusive', BYTE0);
      t[i] = process.hrtime.bigint();
    }
  }
  file.close();
  process.stdout.write(t.map((x, i) => `${i % 2 === role ? 'r' : 'a'} ${i} ${x}\n`).join(''));
}

/** Handoff latencies in µs from the two children's stamps, without the first tenth (warm-up). */
function latencies(outs, n) {
  const rel = new Array(n);
  const acq = new Array(n);
  for (const out of outs) {
    for (const line of out.trim().split('\n')) {
      const [kind, i, ns] = line.split(' ');
      (kind === 'r' ? rel : acq)[Number(i)] = BigInt(ns);
    }
  }
  const xs = [];
  for (let i = Math.floor(n / 10); i < n; i++) xs.push(Number(acq[i] - rel[i]) / 1e3);
  return xs;
}

async function round(cmd, path, n, extra) {
  return latencies(await runTogether([0, 1].map((role) => [...cmd, path, String(role), String(n), ...extra])), n);
}

export async function run({ quick = false } = {}) {
  const bin = compileC('handoff');
  const { path, cleanup } = scratchFile();
  const n = quick ? 200 : 2000;
  const rounds = quick ? 3 : 7;
  const ours = { p50: [], p99: [] };
  const c = { p50: [], p99: [] };
  const relay = { p50: [], p99: [] };
  try {
    for (let r = 0; r < rounds; r++) {
      for (const [into, cmd] of [
        [c, [bin]],
        [relay, [bin]],
        [ours, [process.execPath, self, 'child']],
      ]) {
        const xs = await round(cmd, path, n, into === relay ? ['relay'] : []);
        into.p50.push(percentile(xs, 50));
        into.p99.push(percentile(xs, 99));
      }
    }
  } finally {
    cleanup();
  }
  const row = (q, goal, xs = ours, what = 'lock() resolved in B') => ({
    case: `contended handoff between 2 processes, ${q}: release in A to ${what}`,
    unit: 'µs',
    median: median(xs[q]),
    c: median(c[q]),
    ratio: median(xs[q]) / median(c[q]),
    goal,
    met: goal === undefined ? undefined : median(xs[q]) / median(c[q]) <= goal,
    rounds,
    iterations: n,
  });
  const relayed = 'C waiter thread + eventfd + epoll_wait (the addon\'s design, in C)';
  return [row('p50', 3), row('p99'), row('p50', undefined, relay, relayed), row('p99', undefined, relay, relayed)];
}

if (process.argv[2] === 'child') {
  await child(process.argv[3], Number(process.argv[4]), Number(process.argv[5]));
}

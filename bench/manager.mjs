// LockManager end to end: a manager with 4 exclusive disks starts a child
// (`sleep`, spawned supervised with the four lease fds), then shuts it down
// (SIGTERM, reaped, leases released), then is freed. Reported: start (acquire
// all four + spawn), shutdown, and the whole cycle. No C baseline: this is the
// cost of the contract, not of a system call.
import { closeSync, openSync } from 'node:fs';
import { join } from 'node:path';
import { LockManager } from '../dist/index.js';
import { median, scratchDir } from './lib.mjs';

const DISKS = 4;

async function cycle(disks) {
  const m = new LockManager();
  try {
    for (const path of disks) m.registerResource({ type: 'disk', path, mode: 'exclusive' });
    const t0 = process.hrtime.bigint();
    await m.start('sleep', ['1000']);
    const t1 = process.hrtime.bigint();
    await m.shutdown({ graceMs: 5000 });
    const t2 = process.hrtime.bigint();
    return { start: Number(t1 - t0) / 1e6, shutdown: Number(t2 - t1) / 1e6, total: Number(t2 - t0) / 1e6 };
  } finally {
    await m.free();
  }
}

export async function run({ quick = false } = {}) {
  const { dir, cleanup } = scratchDir();
  const rounds = quick ? 5 : 21;
  const samples = [];
  try {
    const disks = Array.from({ length: DISKS }, (_, i) => join(dir, `disk${i}.img`));
    for (const d of disks) closeSync(openSync(d, 'w'));
    await cycle(disks); // warm up
    for (let r = 0; r < rounds; r++) samples.push(await cycle(disks));
  } finally {
    cleanup();
  }
  const row = (key, what) => ({
    case: `LockManager with ${DISKS} disks: ${what}`,
    unit: 'ms',
    median: median(samples.map((s) => s[key])),
    goal: 'report',
    rounds,
  });
  return [row('start', 'start() (acquire all + spawn)'), row('shutdown', 'shutdown() (SIGTERM, reap, release)'), row('total', 'start, then shutdown, end to end')];
}

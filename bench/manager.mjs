// LockManager end to end: a manager with 4 exclusive disks starts a child
// (`sleep`, spawned supervised with the four lease fds), then shuts it down
// (SIGTERM, reaped, leases released), then is freed. Reported: start (acquire
// all four + spawn), shutdown, and the whole cycle. No C baseline: this is the
// cost of the contract, not of a system call.
import { closeSync, mkdirSync, openSync } from 'node:fs';
import { join } from 'node:path';
import { LockManager } from '../dist/index.js';
import { median, scratchDir } from './lib.mjs';

const DISKS = 4;

async function cycle(disks, options) {
  const m = new LockManager(options);
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
  const indirect = [];
  try {
    const disks = Array.from({ length: DISKS }, (_, i) => join(dir, `disk${i}.img`));
    for (const d of disks) closeSync(openSync(d, 'w'));
    const locks = join(dir, 'locks');
    mkdirSync(locks, { mode: 0o700 });
    const space = { lockspace: { kind: 'indirect', dir: locks } };
    await cycle(disks); // warm up
    await cycle(disks, space);
    for (let r = 0; r < rounds; r++) {
      samples.push(await cycle(disks));
      indirect.push(await cycle(disks, space));
    }
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
  return [
    row('start', 'start() (acquire all + spawn)'),
    row('shutdown', 'shutdown() (SIGTERM, reap, release)'),
    row('total', 'start, then shutdown, end to end'),
    // The indirect lockspace: two lock files per disk, created at registration,
    // locked and re-checked at start, deleted at the last release.
    { case: `LockManager with ${DISKS} disks, indirect lockspace: start()`, unit: 'ms', median: median(indirect.map((s) => s.start)), goal: 'report', rounds },
    { case: `LockManager with ${DISKS} disks, indirect lockspace: start, then shutdown`, unit: 'ms', median: median(indirect.map((s) => s.total)), goal: 'report', rounds },
  ];
}

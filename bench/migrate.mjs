// Migration handover: a source manager holds 4 exclusive disks; a target made
// from its inquire() token has started (guard held) and waits in
// completeMigrateIn(). Measured: from the source's completeMigrateOut() call to
// the target holding every lease (the handover: one release, a waiter thread
// woken, four acquires; the guard keeps third parties out all along), and the
// whole protocol around it (token, fromInquire, target start, prepare, out,
// in) without the spawns' share. No C baseline: this is the contract's cost.
import { closeSync, openSync } from 'node:fs';
import { join } from 'node:path';
import { LockManager } from '../dist/index.js';
import { median, scratchDir } from './lib.mjs';

const DISKS = 4;
const ms = (a, b) => Number(b - a) / 1e6;

async function migrate(disks) {
  const s = new LockManager();
  let t;
  try {
    for (const path of disks) s.registerResource({ type: 'disk', path, mode: 'exclusive' });
    await s.start('sleep', ['1000']);
    const p0 = process.hrtime.bigint();
    t = LockManager.fromInquire(s.inquire(), { resources: disks.map((path) => ({ type: 'disk', path, mode: 'exclusive' })) });
    const p1 = process.hrtime.bigint();
    await t.start('sleep', ['1000']);
    const p2 = process.hrtime.bigint();
    await s.prepareMigrate('bench://target');
    const incoming = t.completeMigrateIn('bench://source', { timeout: 10_000 });
    const h0 = process.hrtime.bigint();
    await s.completeMigrateOut('bench://target');
    await incoming;
    const h1 = process.hrtime.bigint();
    return { handover: ms(h0, h1), protocol: ms(p0, p1) + ms(p2, h1) };
  } finally {
    await s.free();
    await t?.free();
  }
}

export async function run({ quick = false } = {}) {
  const { dir, cleanup } = scratchDir();
  const rounds = quick ? 3 : 21;
  const samples = [];
  try {
    const disks = Array.from({ length: DISKS }, (_, i) => join(dir, `disk${i}.img`));
    for (const d of disks) closeSync(openSync(d, 'w'));
    await migrate(disks); // warm up
    for (let r = 0; r < rounds; r++) samples.push(await migrate(disks));
  } finally {
    cleanup();
  }
  const row = (key, what) => ({ case: `migration of ${DISKS} disks: ${what}`, unit: 'ms', median: median(samples.map((x) => x[key])), goal: 'report', rounds });
  return [
    row('handover', 'completeMigrateOut() to the target holding every lease'),
    row('protocol', 'token, fromInquire, guards, prepare, out, in (spawns excluded)'),
  ];
}

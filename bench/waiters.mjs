// 1,000 waiters blocked in one process: how much the event loop notices
// (monitorEventLoopDelay p99 while they wait), and how long a release takes to
// wake them all.
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { openLockable } from '../dist/index.js';
import { median, scratchFile } from './lib.mjs';

export async function run({ quick = false } = {}) {
  const { path, cleanup } = scratchFile();
  const rounds = quick ? 3 : 5;
  const count = 1000;
  const delays = [];
  const wakes = [];
  try {
    for (let r = 0; r < rounds; r++) {
      const holder = openLockable(path);
      const f = openLockable(path);
      holder.tryLock('exclusive');
      const h = monitorEventLoopDelay({ resolution: 1 });
      h.enable();
      const waits = Array.from({ length: count }, (_, i) => f.lock('exclusive', { start: i, length: 1 }));
      // Keep the loop busy with timers while they wait, as a server would be.
      for (let i = 0; i < (quick ? 50 : 200); i++) await new Promise((res) => setTimeout(res, 1));
      h.disable();
      delays.push(h.percentile(99) / 1e6);
      const t0 = process.hrtime.bigint();
      holder.unlock();
      await Promise.all(waits);
      wakes.push(Number(process.hrtime.bigint() - t0) / 1e6);
      f.close();
      holder.close();
    }
  } finally {
    cleanup();
  }
  return [
    { case: `${count} waiters blocked in one process: event-loop delay p99`, unit: 'ms', median: median(delays), goal: '< 5 ms', met: median(delays) < 5, rounds },
    { case: `${count} waiters: release to all ${count} granted`, unit: 'ms', median: median(wakes), rounds },
  ];
}

// An experiment, not a suite (node bench/floor.mjs [--quick]): how much of a
// handoff's cost on these machines is the resuming of a large process, with
// none of its code. bench/c/handoff.c waits with F_OFD_SETLKW and then reads
// one word in each of TOUCH distinct pages before it stamps, pages adjacent
// or 2 MiB apart (each with a page table of its own, as a large process's
// working set is spread); the rows give the p50 handoff for TOUCH = 0 .. 4096
// pages, in the same rounds as ours
// (lockSync, which is the same F_OFD_SETLKW on a Node thread, and await
// lock()). Where ours falls on that curve is how many cold pages a Node
// process's resume amounts to here.
import { fileURLToPath } from 'node:url';
import { compileC, handoffLatencies, median, percentile, runTogether, scratchFile } from './lib.mjs';

const quick = process.argv.includes('--quick');
const handoff = fileURLToPath(new URL('./handoff.mjs', import.meta.url));

async function p50(cmd, path, n, extra) {
  const outs = await runTogether([0, 1].map((role) => [...cmd, path, String(role), String(n), ...extra]));
  return percentile(handoffLatencies(outs, n), 50);
}

const bin = compileC('handoff');
const { path, cleanup } = scratchFile();
const n = quick ? 300 : 2000;
const rounds = quick ? 3 : 5;
const touches = [0, 64, 256, 1024, 4096];
const layouts = ['adjacent', 'scatter'];
const name = (t, layout) => `C F_OFD_SETLKW, then ${t} pages read${t === 0 ? '' : layout === 'scatter' ? ', 2 MiB apart' : ', adjacent'}`;
const cases = touches.flatMap((t) => (t === 0 ? [[t, 'adjacent']] : layouts.map((l) => [t, l])));
const rows = new Map([...cases.map(([t, l]) => [name(t, l), []]), ['ours: lockSync()', []], ['ours: await lock()', []], ['C model: waiter thread + eventfd + epoll_wait', []]]);
try {
  for (let r = 0; r < rounds; r++) {
    for (const [t, l] of cases) rows.get(name(t, l)).push(await p50([bin], path, n, ['direct', String(t), ...(l === 'scatter' ? ['scatter'] : [])]));
    rows.get('ours: lockSync()').push(await p50([process.execPath, handoff, 'child'], path, n, ['sync']));
    rows.get('ours: await lock()').push(await p50([process.execPath, handoff, 'child'], path, n, []));
    rows.get('C model: waiter thread + eventfd + epoll_wait').push(await p50([bin], path, n, ['relay']));
  }
} finally {
  cleanup();
}
console.log('| handoff, release in A to the stamp in B | p50 µs (median of rounds) |\n|---|---|');
for (const [name, xs] of rows) console.log(`| ${name} | ${median(xs).toFixed(1)} |`);

// npm run bench [-- --quick]: every case, a markdown table on stdout, the rows in bench/results.json.
import { writeFileSync } from 'node:fs';
import { cpus, release } from 'node:os';

const quick = process.argv.includes('--quick');
const suites = ['./acquire.mjs', './waiters.mjs'];

const rows = [];
for (const s of suites) {
  const mod = await import(s);
  rows.push(...(await mod.run({ quick })));
}

const fmt = (x) => (typeof x === 'number' ? (Math.abs(x) >= 100 ? x.toFixed(0) : x.toFixed(2)) : (x ?? ''));
console.log(`lockmgr bench${quick ? ' (quick)' : ''}: Node ${process.version}, Linux ${release()}, ${cpus()[0]?.model ?? 'unknown CPU'} x${cpus().length}\n`);
console.log('| case | unit | ours (median) | C (median) | ratio to C | goal |');
console.log('|---|---|---|---|---|---|');
for (const r of rows) {
  const goal = typeof r.goal === 'number' ? `<= ${r.goal} x C` : (r.goal ?? 'report');
  console.log(`| ${r.case} | ${r.unit} | ${fmt(r.median)} | ${fmt(r.c)} | ${r.ratio === undefined ? '' : `${fmt(r.ratio)} x`} | ${goal} |`);
}
const results = { date: new Date().toISOString(), node: process.version, kernel: release(), cpu: cpus()[0]?.model, quick, rows };
writeFileSync(new URL('./results.json', import.meta.url), `${JSON.stringify(results, null, 2)}\n`);

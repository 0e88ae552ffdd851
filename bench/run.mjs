// npm run bench [-- --quick] [-- --only NAME[,NAME]]: every case, a markdown
// table on stdout, the rows in bench/results.json. --quick runs each case with
// few iterations (CI runs it to prove the suite works; no figure is checked).
import { execFileSync } from 'node:child_process';
import { existsSync, writeFileSync } from 'node:fs';
import { machine } from './lib.mjs';

const quick = process.argv.includes('--quick');
const onlyAt = process.argv.indexOf('--only');
const only = onlyAt > 0 ? process.argv[onlyAt + 1]?.split(',') : undefined;
const suites = ['acquire', 'handoff', 'contend', 'waiters', 'hold', 'spawn', 'manager', 'migrate', 'peers'].filter((s) => !only || only.includes(s));
const notes = [];

const rows = [];
for (const s of suites) {
  const file = new URL(`./${s}.mjs`, import.meta.url);
  // bench/spawn.mjs comes with the spawn branch: once merged it runs here as is.
  if (!existsSync(file)) {
    notes.push(`${s}: bench/${s}.mjs is not on this branch; its rows are missing.`);
    continue;
  }
  const t0 = Date.now();
  const mod = await import(file);
  const got = await mod.run({ quick });
  for (const r of got) r.suite = s;
  rows.push(...got);
  process.stderr.write(`bench: ${s} done in ${((Date.now() - t0) / 1000).toFixed(1)} s\n`);
}

// No case may leave a process behind.
try {
  const left = execFileSync('pgrep', ['-a', '-P', String(process.pid)], { encoding: 'utf8' }).trim();
  if (left) notes.push(`left-over children: ${left.replace(/\n/g, '; ')}`);
} catch {}

const m = machine();
const fmt = (x) => (typeof x === 'number' ? (Math.abs(x) >= 100 ? x.toFixed(0) : x.toFixed(2)) : (x ?? ''));
const verdict = (r) => {
  if (typeof r.goal === 'number') r.met ??= r.ratio <= r.goal;
  const goal = typeof r.goal === 'number' ? `<= ${r.goal} x C` : (r.goal ?? 'report');
  return r.met === undefined ? goal : `${goal}: ${r.met ? 'met' : 'MISSED'}`;
};
console.log(`lockmgr bench${quick ? ' (quick)' : ''}: Node ${process.version}, Linux ${m.kernel}, ${m.cpu} x${m.cpus}, virtualisation: ${m.virtualisation}, meltdown: ${m.meltdown} (pti=${m.pti}), PCID: ${m.pcid ? 'yes' : 'no'}\n`);
console.log('| case | unit | measured (median) | C (median) | ratio to C | goal |');
console.log('|---|---|---|---|---|---|');
for (const r of rows) {
  console.log(`| ${r.case} | ${r.unit} | ${fmt(r.median)} | ${fmt(r.c)} | ${r.ratio === undefined ? '' : `${fmt(r.ratio)} x`} | ${verdict(r)} |`);
}
if (notes.length) console.log(`\n${notes.map((n) => `- ${n}`).join('\n')}`);
const results = { date: new Date().toISOString(), node: process.version, machine: m, quick, notes, rows };
writeFileSync(new URL('./results.json', import.meta.url), `${JSON.stringify(results, null, 2)}\n`);

// Experiment: where a handoff's time goes, in the current code. Same protocol
// as bench/handoff.mjs; the traced build stamps the stages natively.
import { fstatSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { spawn } from 'node:child_process';
// ROOT: a checkout with bench/experiments/handoff-trace.patch applied and built.
const root = process.env.ROOT ?? new URL('../..', import.meta.url).pathname.replace(/\/$/, '');
const { openLockable } = await import(`${root}/dist/index.js`);
const { native } = await import(`${root}/dist/os/native.js`);
const { blockedOn, pause, percentile, scratchFile, median } = await import(`${root}/bench/lib.mjs`);
const BYTE0 = { start: 0, length: 1 };
async function child(path, role, n, sync) {
  const file = openLockable(path);
  const ino = fstatSync(file.fd).ino;
  const rows = [];
  const nt = new Float64Array(8);
  if (role === 0 && !file.tryLock('exclusive', BYTE0)) throw new Error('x');
  for (let i = 0; i < n; i++) {
    if (i % 2 === role) {
      while (blockedOn(ino) === 0) pause(0.05);
      rows.push(`r ${i} ${process.hrtime.bigint()}`);
      file.unlock(BYTE0);
    } else {
      while (file.getConflict('exclusive', BYTE0) === null) pause(0.05);
      if (sync) file.lockSync('exclusive', BYTE0); else await file.lock('exclusive', BYTE0);
      const t = Number(process.hrtime.bigint());
      native.traceGet(nt);
      rows.push(`a ${i} ${nt[0]} ${nt[1]} ${nt[2]} ${nt[3]} ${nt[4]} ${nt[5]} ${t}`);
    }
  }
  file.close();
  process.stdout.write(rows.join('\n') + '\n');
}
if (process.argv[2] === 'child') await child(process.argv[3], Number(process.argv[4]), Number(process.argv[5]), process.argv[6] === 'sync');
else {
  const n = Number(process.argv[2] ?? 2000);
  for (const mode of ['async', 'sync']) {
    const { path, cleanup } = scratchFile();
    const outs = await Promise.all([0, 1].map((role) => new Promise((res, rej) => {
      const c = spawn(process.execPath, [fileURLToPath(import.meta.url), 'child', path, String(role), String(n), mode], { stdio: ['ignore', 'pipe', 'inherit'] });
      let o = ''; c.stdout.on('data', (d) => (o += d)); c.on('close', (code) => (code === 0 ? res(o) : rej(new Error('child ' + code))));
    })));
    cleanup();
    const rel = [], acq = [];
    for (const out of outs) for (const l of out.trim().split('\n')) { const f = l.split(' '); (f[0] === 'r' ? rel : acq)[Number(f[1])] = f.slice(2).map(Number); }
    const names = mode === 'async'
      ? ['release->waiter thread back from fcntl', 'fcntl->tsfn call (waiter thread)', 'tsfn call->Deliver (loop thread woken)', 'Deliver->napi_call_function', 'call->JS settled, returned', 'call returned->await continuation', 'total']
      : ['release->fcntl returned (native)', 'fcntl returned->JS stamp after lockSync', 'total'];
    const cols = names.map(() => []);
    for (let i = Math.floor(n / 10); i < n; i++) {
      if (!acq[i]) continue;
      const r = rel[i][0]; const [w, c, d, cj, ret, s, t] = acq[i];
      const v = mode === 'async' ? [w - r, c - w, d - c, cj - d, ret - cj, t - ret, t - r] : [s - r, t - s, t - r];
      v.forEach((x, k) => cols[k].push(x / 1e3));
    }
    console.log(`-- ${mode}`);
    for (let k = 0; k < names.length; k++) console.log(`${names[k].padEnd(42)} p50 ${median(cols[k]).toFixed(2).padStart(8)} µs   p90 ${percentile(cols[k], 90).toFixed(2).padStart(8)}  p99 ${percentile(cols[k], 99).toFixed(2).padStart(8)}`);
  }
}

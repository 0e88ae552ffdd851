// The peers, side by side with the C loop doing the same system calls: one
// uncontended lock + release, in a loop, for each way of locking a file from
// Node or a script that runs here. Rounds alternate between all contenders.
//   - fs-ext (a nan addon): flock(2), and classic fcntl F_SETLK on the whole
//     file. Its fcntlSync('setlk') passes the lock type where the kernel wants
//     a struct pointer and fails with EFAULT (fs-ext 2.1.1), so F_SETLK goes
//     through its async fcntl, on libuv's threadpool.
//   - proper-lockfile: mkdir-based lock files, async lock() + release().
//   - Python's fcntl with F_OFD_SETLK (bench/peers/ofd.py).
//   - util-linux flock(1), per invocation: `flock -x FILE true`, run by a C
//     fork/exec/wait loop (bench/c/runcmd.c) against `true` alone, so the
//     ratio is what flock adds to starting a command.
// A peer that cannot run here gives 'n/a' and the reason; it never fails the suite.
import { execFileSync, spawnSync } from 'node:child_process';
import { openSync, closeSync } from 'node:fs';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { openLockable } from '../dist/index.js';
import { compileC, median, scratchFile } from './lib.mjs';

const require = createRequire(import.meta.url);
const pythonPeer = fileURLToPath(new URL('./peers/ofd.py', import.meta.url));

/** require() that reports why a peer is missing instead of throwing. */
function load(name) {
  try {
    return { mod: require(name) };
  } catch (err) {
    const why = err.code === 'MODULE_NOT_FOUND' ? 'not installed (npm install)' : `does not load on Node ${process.version}: ${err.message.split('\n')[0]}`;
    return { why: `${name} ${why}` };
  }
}

function runCmd(bin, n, command) {
  return Number(execFileSync(bin, [String(n), ...command], { encoding: 'utf8' }).trim());
}

function cRound(bin, path, n, mode) {
  return Number(execFileSync(bin, [path, String(n), '1', mode], { encoding: 'utf8' }).trim());
}

function loop(n, pair) {
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < n; i++) pair();
  return Number(process.hrtime.bigint() - t0) / n;
}

async function asyncLoop(n, pair) {
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < n; i++) await pair();
  return Number(process.hrtime.bigint() - t0) / n;
}

/**
 * Each contender: name; key (a C baseline, shown only for 'ofd') or baseline
 * (the key of its C column); n per round; round(n) -> ns per pair; why (the
 * reason it cannot run here); micro (shown in µs).
 */
function contenders(bin, runcmd, path, quick) {
  const n = quick ? 20_000 : 200_000;
  const fsExt = load('fs-ext');
  const lockfile = load('proper-lockfile');
  let fd = -1;
  const withFd = () => (fd >= 0 ? fd : (fd = openSync(path, 'r+')));
  let ours;
  const byte0 = { start: 0, length: 1 };
  return {
    close: () => {
      if (fd >= 0) closeSync(fd);
      ours?.close();
    },
    list: [
      { name: 'C F_OFD_SETLK pair (kernel limit)', key: 'ofd', n, round: (k) => cRound(bin, path, k, 'ofd') },
      {
        name: 'lockmgr tryLock + unlock (OFD, byte 0), in the same rounds as the peers',
        baseline: 'ofd',
        ours: true,
        n,
        round: (k) => {
          ours ??= openLockable(path);
          return loop(k, () => (ours.tryLock('exclusive', byte0), ours.unlock(byte0)));
        },
      },
      { name: 'C F_SETLK pair, whole file', key: 'posix', n, round: (k) => cRound(bin, path, k, 'posix') },
      { name: 'C flock(2) pair', key: 'flock', n, round: (k) => cRound(bin, path, k, 'flock') },
      {
        name: 'peer: fs-ext flockSync (exnb, un)',
        baseline: 'flock',
        n,
        why: fsExt.why,
        round: (k) => loop(k, () => (fsExt.mod.flockSync(withFd(), 'exnb'), fsExt.mod.flockSync(withFd(), 'un'))),
      },
      {
        name: "peer: fs-ext async fcntl ('setlk', F_WRLCK / F_UNLCK), whole file (its fcntlSync fails: EFAULT)",
        baseline: 'posix',
        micro: true,
        n: quick ? 2_000 : 20_000,
        why: fsExt.why,
        round: (k) => {
          const { F_WRLCK, F_UNLCK } = fsExt.mod.constants;
          const fcntl = promisify(fsExt.mod.fcntl);
          return asyncLoop(k, async () => {
            await fcntl(withFd(), 'setlk', F_WRLCK);
            await fcntl(withFd(), 'setlk', F_UNLCK);
          });
        },
      },
      {
        name: 'peer: Python fcntl.fcntl F_OFD_SETLK pair',
        baseline: 'ofd',
        n,
        why: pythonWhy(),
        round: (k) => Number(execFileSync('python3', [pythonPeer, path, String(k), '1'], { encoding: 'utf8' }).trim()),
      },
      {
        name: 'peer: proper-lockfile await lock() + await release() (mkdir-based)',
        baseline: 'ofd',
        micro: true,
        n: quick ? 200 : 2_000,
        why: lockfile.why,
        round: (k) => asyncLoop(k, async () => (await lockfile.mod.lock(path))()),
      },
      { name: 'C fork + exec + wait of true', key: 'spawn', n: quick ? 50 : 200, round: (k) => runCmd(runcmd, k, ['true']) },
      {
        name: 'peer: util-linux flock(1): flock -x FILE true, per invocation (C column: true alone)',
        baseline: 'spawn',
        micro: true,
        n: quick ? 50 : 200,
        why: flockWhy(),
        round: (k) => runCmd(runcmd, k, ['flock', '-x', path, 'true']),
      },
    ],
  };
}

function pythonWhy() {
  const r = spawnSync('python3', ['-c', 'import fcntl; fcntl.F_OFD_SETLK'], { encoding: 'utf8' });
  if (r.error) return `python3 cannot run here (${r.error.code})`;
  if (r.status !== 0) return `python3's fcntl has no F_OFD_SETLK: ${r.stderr.trim().split('\n').at(-1)}`;
  return undefined;
}

function flockWhy() {
  const r = spawnSync('flock', ['--version']);
  return r.error ? `util-linux flock(1) is not installed (${r.error.code})` : undefined;
}

export async function run({ quick = false } = {}) {
  const bin = compileC('acquire');
  const { path, cleanup } = scratchFile();
  const rounds = quick ? 5 : 11;
  const { list, close } = contenders(bin, compileC('runcmd'), path, quick);
  const times = new Map(list.map((c) => [c, []]));
  const failed = new Map();
  try {
    for (let r = -1; r < rounds; r++) {
      for (const c of list) {
        if (c.why || failed.has(c)) continue;
        try {
          // Round -1 warms up the JIT and the page cache with a tenth of the work.
          const x = await c.round(r < 0 ? Math.max(1, Math.round(c.n / 10)) : c.n);
          if (r >= 0) times.get(c).push(x);
        } catch (err) {
          failed.set(c, `failed here: ${err.message.split('\n')[0]}`);
        }
      }
    }
  } finally {
    close();
    cleanup();
  }
  const base = new Map(list.filter((c) => c.key).map((c) => [c.key, times.get(c).length ? median(times.get(c)) : undefined]));
  const rows = list
    .filter((c) => !c.key || c.key === 'ofd')
    .map((c) => {
      const why = c.why ?? failed.get(c);
      const scale = c.micro ? 1e3 : 1;
      const value = why ? 'n/a' : median(times.get(c)) / scale;
      const cValue = base.get(c.baseline ?? c.key);
      const cShown = cValue === undefined ? undefined : cValue / scale;
      return {
        case: c.name,
        unit: `${c.micro ? 'µs' : 'ns'} per ${c.baseline === 'spawn' ? 'invocation' : 'pair'}`,
        median: value,
        c: cShown,
        ratio: why || cShown === undefined ? undefined : value / cShown,
        goal: why ? `n/a: ${why}` : 'report',
        rounds,
        iterations: c.n,
        ours: c.ours,
      };
    });
  // The goal: our ratio to C below every peer's ratio to its own C loop.
  const oursRow = rows.find((r) => r.ours);
  const peerRows = rows.filter((r) => r.case.startsWith('peer:') && typeof r.ratio === 'number');
  if (oursRow && typeof oursRow.ratio === 'number' && peerRows.length) {
    const best = peerRows.reduce((a, b) => (b.ratio < a.ratio ? b : a));
    oursRow.goal = `ahead of every peer (best: ${best.case.replace(/^peer: /, '').split(' (')[0]} at ${best.ratio.toFixed(2)} x its C loop)`;
    oursRow.met = peerRows.every((r) => oursRow.ratio < r.ratio);
  }
  for (const r of rows) delete r.ours;
  return rows;
}

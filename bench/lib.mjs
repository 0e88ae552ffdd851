// Shared bench plumbing: statistics, compiling the C baselines, temp files.
import { execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));

export function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

export function percentile(xs, p) {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)];
}

/**
 * Handoff latencies in µs from two children's stamps ("r I NS" at release in
 * one, "a I NS" at acquire in the other), without the first tenth (warm-up).
 */
export function handoffLatencies(outs, n) {
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

/** Compiles bench/c/NAME.c to bench/c/NAME.bin with cc -O2 when it or a header there is newer; returns its path. */
export function compileC(name) {
  const dir = join(here, 'c');
  const src = join(dir, `${name}.c`);
  const bin = join(dir, `${name}.bin`);
  let stale = true;
  try {
    const built = statSync(bin).mtimeMs;
    const sources = [src, ...readdirSync(dir).filter((f) => f.endsWith('.h')).map((f) => join(dir, f))];
    stale = sources.some((f) => statSync(f).mtimeMs > built);
  } catch {}
  if (stale) execFileSync('cc', ['-O2', '-Wall', '-Werror', '-pthread', '-o', bin, src], { stdio: 'inherit' });
  return bin;
}

/** A temp dir with one 4 KiB file; returns { path, cleanup }. */
export function scratchFile() {
  const { dir, cleanup } = scratchDir();
  const path = join(dir, 'disk.img');
  writeFileSync(path, Buffer.alloc(4096));
  return { path, cleanup };
}

/** Jain's fairness index of per-process counts: 1 when all are equal, 1/n when one process got everything. */
export function jain(xs) {
  const sum = xs.reduce((a, b) => a + b, 0);
  const squares = xs.reduce((a, b) => a + b * b, 0);
  return squares === 0 ? 1 : (sum * sum) / (xs.length * squares);
}

/** A temp dir; returns { dir, cleanup }. */
export function scratchDir() {
  const dir = mkdtempSync(join(tmpdir(), 'lockmgr-bench-'));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/** This process's resident set in bytes (VmRSS), read from /proc/self/status. */
export function rss() {
  const m = /^VmRSS:\s+(\d+) kB/m.exec(readFileSync('/proc/self/status', 'latin1'));
  return Number(m[1]) * 1024;
}

/** How many lock requests are blocked on inode `ino` now ("->" lines in /proc/locks). */
export function blockedOn(ino) {
  const needle = `:${ino} `;
  let n = 0;
  for (const line of readFileSync('/proc/locks', 'latin1').split('\n')) {
    if (line.includes('->') && line.includes(needle)) n++;
  }
  return n;
}

/** Sleeps about `ms` milliseconds (fractions allowed) without returning to the event loop. */
export function pause(ms) {
  Atomics.wait(sleeper, 0, 0, ms);
}
const sleeper = new Int32Array(new SharedArrayBuffer(4));

/**
 * Runs the commands ([file, ...args]) at once and resolves with their stdouts
 * once all exited 0. A failing or hung child (`timeoutMs`) kills the others:
 * no child outlives a bench case.
 */
export function runTogether(commands, { timeoutMs = 120_000, onSpawn } = {}) {
  const children = commands.map(([file, ...args]) => spawn(file, args, { stdio: ['ignore', 'pipe', 'inherit'] }));
  const killAll = () => {
    for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  };
  const timer = setTimeout(killAll, timeoutMs);
  onSpawn?.(children);
  return Promise.all(
    children.map(
      (child, i) =>
        new Promise((resolve, reject) => {
          let out = '';
          child.stdout.setEncoding('utf8').on('data', (d) => (out += d));
          child.on('error', reject);
          child.on('close', (code, signal) => {
            if (code === 0) resolve(out);
            else reject(new Error(`${commands[i].join(' ')} exited with ${signal ?? code}`));
          });
        }),
    ),
  )
    .catch((err) => {
      killAll();
      throw err;
    })
    .finally(() => clearTimeout(timer));
}

function readOr(path, fallback) {
  try {
    return readFileSync(path, 'utf8').trim();
  } catch {
    return fallback;
  }
}

/** What the figures depend on: CPU, kernel, virtualisation, and whether system calls flush the TLB. */
export function machine() {
  const cpuinfo = readOr('/proc/cpuinfo', '');
  const flags = new Set((/^flags\s*:(.*)$/m.exec(cpuinfo)?.[1] ?? '').trim().split(/\s+/));
  const dmesgHypervisor = (() => {
    try {
      return /Hypervisor detected: (\S+)/.exec(execFileSync('dmesg', { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }))?.[1];
    } catch {
      return undefined;
    }
  })();
  return {
    cpu: /^model name\s*:\s*(.*)$/m.exec(cpuinfo)?.[1] ?? 'unknown CPU',
    cpus: cpuinfo.split('\n').filter((l) => l.startsWith('processor')).length,
    kernel: readOr('/proc/sys/kernel/osrelease', 'unknown'),
    virtualisation: flags.has('hypervisor') ? `guest (${dmesgHypervisor ?? 'hypervisor flag set'})` : 'none seen',
    pcid: flags.has('pcid'),
    meltdown: readOr('/sys/devices/system/cpu/vulnerabilities/meltdown', 'unknown'),
    pti: /\bpti=(\S+)/.exec(readOr('/proc/cmdline', ''))?.[1] ?? 'default',
  };
}

// Shared bench plumbing: statistics, compiling the C baselines, temp files.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
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

/** Compiles bench/c/NAME.c to bench/c/NAME.bin with cc -O2 when the source is newer; returns its path. */
export function compileC(name) {
  const src = join(here, 'c', `${name}.c`);
  const bin = join(here, 'c', `${name}.bin`);
  let stale = true;
  try {
    stale = statSync(bin).mtimeMs < statSync(src).mtimeMs;
  } catch {}
  if (stale) execFileSync('cc', ['-O2', '-Wall', '-Werror', '-o', bin, src], { stdio: 'inherit' });
  return bin;
}

/** A temp dir with one 4 KiB file; returns { path, cleanup }. */
export function scratchFile() {
  const dir = mkdtempSync(join(tmpdir(), 'lockmgr-bench-'));
  const path = join(dir, 'disk.img');
  writeFileSync(path, Buffer.alloc(4096));
  return { path, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

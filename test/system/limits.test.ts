// Resource limits (issue 18, part 4): with `ulimit -n 64` and 100 disks the
// run used to exit 75 ("try again later") for a limit that never clears, and
// the indirect lockspace left a lock file behind. A limit gets its own exit
// status (71) and says what to raise; no failure leaves a lock file. The real
// binary under real limits (sh's ulimit), in both OFD lockspaces.
import { spawnSync } from 'node:child_process';
import { mkdirSync, readdirSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { lockFixture } from '../helpers.js';

const fx = lockFixture();
const BIN = fileURLToPath(new URL('../../bin/lockmgr.js', import.meta.url));

function disks(n: number): string[] {
  return Array.from({ length: n }, (_, i) => {
    const p = join(fx.tmp.dir, `d${i}.img`);
    writeFileSync(p, '');
    truncateSync(p, 65536);
    return p;
  });
}

/** `lockmgr run` under `ulimit -n limit`. */
function runLimited(limit: number, flags: string[], paths: string[]) {
  const args = [BIN, 'run', ...flags, ...paths.flatMap((p) => ['--exclusive', p]), '--', 'true'];
  const r = spawnSync('sh', ['-c', `ulimit -n ${limit} && exec "$0" "$@"`, process.execPath, ...args], { encoding: 'utf8', timeout: 60_000, killSignal: 'SIGKILL' });
  return { code: r.status, stderr: r.stderr };
}

for (const lockspace of ['direct', 'indirect'] as const) {
  describe(`resource limits (${lockspace})`, () => {
    const setup = () => {
      if (lockspace === 'direct') return { flags: [] as string[], dir: null };
      const dir = join(fx.tmp.dir, 'locks');
      mkdirSync(dir, { mode: 0o700 });
      return { flags: ['--lockspace', dir], dir };
    };

    it('ulimit -n 64 and 100 disks: exit 71 naming the limit and what to do, nothing left in the lock dir', () => {
      const { flags, dir } = setup();
      const paths = disks(100);
      const before = readdirSync(fx.tmp.dir).sort();
      const r = runLimited(64, flags, paths);
      expect(r.code, r.stderr).toBe(71);
      expect(r.stderr).toMatch(/EMFILE: too many open files/);
      expect(r.stderr).toContain("this process may not open more files (ulimit -n is 64); each disk needs a descriptor for its image, and two for its lock files with --lockspace DIR;");
      expect(r.stderr).not.toMatch(/try again/);
      if (dir !== null) expect(readdirSync(dir)).toEqual([]);
      expect(readdirSync(fx.tmp.dir).sort()).toEqual(before);
    });

    it('every limit from too few to enough descriptors: exit 0 or 71, never a stray lock file, never a warning of a lease left held', () => {
      const { flags, dir } = setup();
      const paths = disks(20);
      const seen = new Set<number | null>();
      // From just above what node itself needs to start, to enough for every disk (3 per disk in a lock dir).
      for (let limit = 34; limit <= (dir === null ? 64 : 100); limit += 3) {
        const r = runLimited(limit, flags, paths);
        seen.add(r.code);
        expect([0, 71], `ulimit -n ${limit}: ${r.stderr}`).toContain(r.code);
        if (dir !== null) expect(readdirSync(dir), `ulimit -n ${limit}: ${r.stderr}`).toEqual([]);
      }
      // Both ends were reached: the limit failed some runs and was enough for others.
      expect([...seen].sort()).toEqual([0, 71]);
    }, 300_000);
  });
}

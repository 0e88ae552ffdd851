// A busy error names its holder from /proc after the conflict was found. A
// holder that exits in between used to be reported as "another open file
// description in this process" (13 of 187 busy errors in a fail-fast race;
// issue 18, part 4). A test seam runs between the conflict and the scan, and
// there kills a real holder, so the race happens every time.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it } from 'vitest';
import { LockManager, ResourceBusyError, type LockManagerOptions } from '../../lib/index.js';
import { busyHooks } from '../../lib/lockspaces/ofd.js';
import { lockFixture, waitUntil } from '../helpers.js';

const fx = lockFixture();
const BIN = fileURLToPath(new URL('../../bin/lockmgr.js', import.meta.url));
const children: ChildProcess[] = [];

afterEach(async () => {
  busyHooks.afterConflict = undefined;
  for (const c of children.splice(0)) {
    if (c.exitCode === null && c.signalCode === null) {
      const gone = new Promise((r) => c.once('exit', r));
      c.kill('SIGKILL');
      await gone;
    }
  }
});

/** Blocks until none of `pids` is alive (gone, or a zombie: its files, and so its locks, are closed by then). */
function waitDeadSync(pids: number[]): void {
  const alive = pids.map((p) => `grep -qs '^State:.[^Z]' /proc/${p}/status`).join(' || ');
  const r = spawnSync('sh', ['-c', `n=0; while ${alive}; do n=$((n+1)); [ $n -gt 3000 ] && exit 1; sleep 0.01; done`]);
  expect(r.status, 'the holder to die').toBe(0);
}

for (const lockspace of ['direct', 'indirect'] as const) {
  describe(`busy errors when the holder goes at the wrong moment (${lockspace})`, () => {
    const options = (): LockManagerOptions => {
      if (lockspace === 'direct') return {};
      const dir = join(fx.tmp.dir, 'locks');
      if (!existsSync(dir)) mkdirSync(dir, { mode: 0o700 });
      return { lockspace: { kind: 'indirect', dir } };
    };
    const flags = () => (lockspace === 'direct' ? [] : ['--lockspace', join(fx.tmp.dir, 'locks')]);

    /** A real holder: `lockmgr run --MODE IMG -- sleep`, both pids once the lease is held. */
    async function holder(mode: 'exclusive' | 'readonly' = 'exclusive'): Promise<number[]> {
      options();
      const pidFile = join(fx.tmp.dir, 'holder.pid');
      const c = spawn(process.execPath, [BIN, 'run', ...flags(), `--${mode}`, fx.path, '--', 'sh', '-c', `echo $$ > ${pidFile}; exec sleep 1000`], { stdio: 'ignore' });
      children.push(c);
      await waitUntil(() => existsSync(pidFile) && readFileSync(pidFile, 'utf8').endsWith('\n'), 10_000, 'the holder to start');
      return [c.pid!, Number(readFileSync(pidFile, 'utf8'))];
    }

    /**
     * A `held`-mode holder killed between the conflict and the /proc scan,
     * while a `wanted`-mode start fails on it: the error, after which the
     * disk is free again for another `wanted` start.
     */
    async function busyFromAGoneHolder(held: 'exclusive' | 'readonly', wanted: 'exclusive' | 'shared'): Promise<Error> {
      const pids = await holder(held);
      let ran = 0;
      busyHooks.afterConflict = () => {
        ran++;
        for (const p of pids) process.kill(p, 'SIGKILL');
        waitDeadSync(pids);
      };
      const m = new LockManager(options());
      m.registerResource({ type: 'disk', path: fx.path, mode: wanted });
      const err = await m.start('true', []).catch((e: unknown) => e);
      await m.free();
      busyHooks.afterConflict = undefined;
      expect(ran).toBe(1);
      expect(err).toBeInstanceOf(ResourceBusyError);
      // And it is so: the lease is free now.
      const again = new LockManager(options());
      again.registerResource({ type: 'disk', path: fx.path, mode: wanted });
      await again.start('true', []);
      await again.free();
      return err as Error;
    }

    it('the holder exits between the conflict and the /proc scan: the error says it has just let go, not "in this process"', async () => {
      const err = await busyFromAGoneHolder('exclusive', 'exclusive');
      expect(err.message).not.toContain('in this process');
      expect(err.message).toContain('a holder that has just let go (it exited or closed the file; nobody else has it open now): try again');
    });

    // The class byte's busy error (a shared lease against a readonly one) once
    // skipped the re-probe and said "in this process" for a holder that had gone.
    it('a readonly holder exits between the class conflict and the scan: a shared acquirer is told it has just let go', async () => {
      const err = await busyFromAGoneHolder('readonly', 'shared');
      expect(err.message).toContain('is held readonly by a holder that has just let go (it exited or closed the file; nobody else has it open now): try again');
    });

    it('a holder in this very process is still named as such', async () => {
      // Attached: the supervisor (this process) alone has the lease fds.
      const sleeper = spawn('sleep', ['1000'], { stdio: 'ignore' });
      children.push(sleeper);
      const a = new LockManager({ ...options(), attach: sleeper.pid!, lockLifetime: 'supervisor' });
      a.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
      await a.start();
      const b = new LockManager(options());
      b.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
      const err = await b.start('true', []).catch((e: unknown) => e);
      await b.free();
      await a.free();
      expect(err).toBeInstanceOf(ResourceBusyError);
      expect((err as Error).message).toMatch(/by this process \(pid \d+\)/);
    });
  });
}

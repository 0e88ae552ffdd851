// A command that daemonizes, or a supervisor killed with SIGKILL, leaves
// processes that still have the lease's open file descriptions (issue 18, part
// 2): the lease must stay held by them, a second exclusive run must be refused,
// and `lockmgr status` must name them as orphans. The real lockmgr binary, real
// background jobs, a real qemu-nbd --fork.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it } from 'vitest';
import type { StatusEntry } from '../../lib/cli/main.js';
import { LockManager, qemuLockState } from '../../lib/index.js';
import type { Orphans } from '../../lib/manager/types.js';
import { supervisedByLockmgr } from '../../lib/os/proc-locks.js';
import { lockFixture, processExists, waitUntil } from '../helpers.js';
import { killPids, lockmgr as runLockmgr } from '../harness/cli.js';

const fx = lockFixture();
const BIN = fileURLToPath(new URL('../../bin/lockmgr.js', import.meta.url));
/** Pids this file started outside lockmgr's supervision (orphans by design), killed by pid after each test. */
const leftovers: number[] = [];

afterEach(() => killPids(leftovers));

const lockmgr = (...args: string[]) => runLockmgr(args);

function status(...args: string[]): StatusEntry {
  const r = lockmgr('status', '--json', ...args);
  return (JSON.parse(r.stdout) as { entries: StatusEntry[] }).entries[0]!;
}

/** Who holds the lease: the image's holders (direct), and each lock file's (--lockspace DIR), byte 0 only. */
function leaseHolders(...args: string[]): NonNullable<StatusEntry['holders']> {
  const e = status(...args);
  const all = [...(e.holders ?? []), ...(e.lockspace?.locations ?? []).flatMap((l) => l.holders?.holders ?? [])];
  return all.filter((h) => h.start === 0);
}

function readPid(file: string): number {
  const pid = Number(readFileSync(file, 'utf8').trim());
  expect(pid).toBeGreaterThan(1);
  leftovers.push(pid);
  return pid;
}

/** The file's pid, once the shell has written it whole. */
async function pidIn(file: string): Promise<number> {
  await waitUntil(() => existsSync(file) && readFileSync(file, 'utf8').endsWith('\n'), 10_000, `${file} to be written`);
  return readPid(file);
}

/**
 * `lockmgr run FLAGS --exclusive fx.path -- sh -c ...` in the background: a
 * command that daemonizes a helper (its subshell exits, so the helper is no
 * descendant of it or of lockmgr) and then runs on. Resolves once the helper
 * is on its own.
 */
async function runWithDaemon(flags: string[]) {
  const cmdFile = join(fx.tmp.dir, 'cmd.pid');
  const daemonFile = join(fx.tmp.dir, 'daemon.pid');
  const script = `( sleep 1000 </dev/null >/dev/null 2>&1 & echo $! > ${daemonFile} ); echo $$ > ${cmdFile}; exec sleep 1000`;
  const run = spawn(process.execPath, [BIN, 'run', ...flags, '--exclusive', fx.path, '--', 'sh', '-c', script], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  run.stderr!.on('data', (d: Buffer) => (stderr += d));
  const exit = new Promise<number | null>((resolve) => run.once('exit', (code) => resolve(code)));
  const cmd = await pidIn(cmdFile);
  const daemon = await pidIn(daemonFile);
  await waitUntil(() => !supervisedByLockmgr(daemon), 10_000, 'the helper to be reparented away from the command');
  return { run, exit, cmd, daemon, stderr: () => stderr };
}

/** `lockmgr run --adopt PID ...` in the background; resolves once it says it took over. */
async function adopter(pid: number, flags: string[]) {
  const child = spawn(process.execPath, [BIN, 'run', '--adopt', String(pid), ...flags, '--exclusive', fx.path], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d));
  const exit = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  let gone = false;
  void exit.then(() => (gone = true));
  await waitUntil(() => stderr.includes('took over') || gone, 30_000, 'the new lockmgr to take over');
  expect(stderr, 'the new lockmgr took over').toMatch(new RegExp(`^lockmgr: took over process ${pid} \\(sleep 1000\\) and its leases on ${fx.path}\n`));
  return { child, exit, stderr: () => stderr };
}

const haveQemuNbd = spawnSync('qemu-nbd', ['--version']).status === 0;
const haveQemuIo = spawnSync('qemu-io', ['--version']).status === 0;
if (!haveQemuIo) console.warn('skipping the QEMU-descriptor orphan tests: qemu-io is not installed');

/**
 * A bash script that leaves a background process holding only the inherited
 * QEMU descriptor (every other fd above 2 closed: the lease's), writes its
 * pid once it is so, and exits 3.
 */
function qemuOnlyOrphan(pidFile: string): string {
  const close = 'for p in /proc/$BASHPID/fd/*; do n=${p##*/}; if [ "$n" -gt 2 ] && [ "$n" != "$LOCKMGR_QEMU_FD" ]; then eval "exec $n>&-"; fi; done 2>/dev/null';
  return `(${close}; echo $BASHPID > ${pidFile}.tmp; mv ${pidFile}.tmp ${pidFile}; exec sleep 1000) </dev/null >/dev/null 2>&1 & while [ ! -s ${pidFile} ]; do sleep 0.01; done; exit 3`;
}

/** How many of a process's descriptors name `path`. */
function openCount(pid: number, path: string): number {
  return readdirSync(`/proc/${pid}/fd`).filter((fd) => {
    try {
      return readlinkSync(`/proc/${pid}/fd/${fd}`) === path;
    } catch {
      return false;
    }
  }).length;
}

for (const lockspace of ['direct', 'indirect'] as const) {
  describe(`a command that leaves processes holding the lease (${lockspace})`, () => {
    const flags = (): string[] => {
      if (lockspace === 'direct') return [];
      const dir = join(fx.tmp.dir, 'locks');
      if (!existsSync(dir)) mkdirSync(dir, { mode: 0o700 });
      return ['--lockspace', dir];
    };

    it("`sh -c 'sleep &'`: run exits with the command's status naming the orphan, the lease stays held, a second exclusive run is refused until it exits", async () => {
      const pidFile = join(fx.tmp.dir, 'bg.pid');
      const r = lockmgr('run', ...flags(), '--exclusive', fx.path, '--', 'sh', '-c', `sleep 1000 </dev/null >/dev/null 2>&1 & echo $! > ${pidFile}; exit 3`);
      const orphan = readPid(pidFile);
      expect(r.code).toBe(3);
      const second = lockmgr('run', ...flags(), '--exclusive', fx.path, '--', 'true');
      expect(second.code, 'a second exclusive holder').toBe(75);
      // Named as it is when the scan runs: the forked shell may not have exec'd sleep yet.
      expect(r.stderr).toMatch(new RegExp(`stays held by ${orphan} \\((sleep 1000|sh )`));
      expect(second.stderr).toMatch(new RegExp(`pid ${orphan} +sleep 1000`));
      expect([...new Set(leaseHolders(...flags(), fx.path).map((h) => `${h.pid} ${h.command} ${h.mode} ${h.orphan}`))]).toEqual([`${orphan} sleep 1000 exclusive true`]);
      expect(lockmgr('status', ...flags(), fx.path).stdout).toMatch(new RegExp(`pid ${orphan} +sleep 1000 +\\(orphan: no lockmgr supervises it\\)`));
      // When the orphan goes, the kernel drops the lock with its last fd.
      process.kill(orphan, 'SIGKILL');
      await waitUntil(() => !processExists(orphan), 10_000, 'the orphan to exit');
      expect(lockmgr('run', ...flags(), '--exclusive', fx.path, '--', 'true').code).toBe(0);
      expect(leaseHolders(...flags(), fx.path)).toEqual([]);
      if (lockspace === 'indirect') expect(readdirSync(join(fx.tmp.dir, 'locks'))).toEqual([]);
    });

    it.skipIf(!haveQemuNbd)('qemu-nbd --fork: the forked server keeps the lease fd, so the lease stays its own', async () => {
      const pidFile = join(fx.tmp.dir, 'nbd.pid');
      const sock = join(fx.tmp.dir, 'nbd.sock');
      const r = lockmgr('run', ...flags(), '--exclusive', fx.path, '--', 'qemu-nbd', '--fork', '--persistent', `--pid-file=${pidFile}`, '-k', sock, '-f', 'raw', fx.path);
      expect(r.code, r.stderr).toBe(0);
      const server = readPid(pidFile);
      expect(r.stderr).toContain(`stays held by ${server} (qemu-nbd`);
      expect(lockmgr('run', ...flags(), '--exclusive', fx.path, '--', 'true').code).toBe(75);
      // One entry per lock (the lease, and whatever QEMU bytes qemu-nbd took itself): all the server's, an orphan.
      const held = leaseHolders(...flags(), fx.path);
      expect(held.length).toBeGreaterThan(0);
      expect([...new Set(held.map((h) => `${h.pid} ${h.orphan}`))]).toEqual([`${server} true`]);
    });

    it('a supervisor killed with SIGKILL: its command keeps the lease, status names it as an orphan, a second run is refused', async () => {
      const pidFile = join(fx.tmp.dir, 'cmd.pid');
      const child = spawn(process.execPath, [BIN, 'run', ...flags(), '--exclusive', fx.path, '--', 'sh', '-c', `echo $$ > ${pidFile}; exec sleep 1000`], { stdio: 'ignore' });
      const exited = new Promise((resolve) => child.once('exit', resolve));
      await waitUntil(() => existsSync(pidFile) && readFileSync(pidFile, 'utf8').endsWith('\n'), 10_000, 'the command to start');
      const cmd = readPid(pidFile);
      const before = leaseHolders(...flags(), fx.path);
      expect(before.map((h) => [h.pid, h.orphan])).toEqual(expect.arrayContaining([[child.pid, false], [cmd, false]]));
      child.kill('SIGKILL');
      await exited;
      const after = leaseHolders(...flags(), fx.path);
      expect(after.length).toBeGreaterThan(0);
      expect([...new Set(after.map((h) => `${h.pid} ${h.command} ${h.orphan}`))]).toEqual([`${cmd} sleep 1000 true`]);
      const second = lockmgr('run', ...flags(), '--exclusive', fx.path, '--', 'true');
      expect(second.code).toBe(75);
      expect(second.stderr).toMatch(new RegExp(`pid ${cmd} +sleep 1000`));
    });

    it("the API: 'orphans' comes before 'exit', the lease is not unlocked, and nothing is left open in the manager", async () => {
      const pidFile = join(fx.tmp.dir, 'api.pid');
      const mgr = new LockManager(lockspace === 'direct' ? {} : { lockspace: { kind: 'indirect', dir: flags()[1]! } });
      mgr.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
      const events: string[] = [];
      let orphans: unknown;
      mgr.on('orphans', (o) => {
        events.push('orphans');
        orphans = o;
      });
      const exit = new Promise((resolve) => mgr.once('exit', resolve));
      mgr.once('exit', () => events.push('exit'));
      await mgr.start('sh', ['-c', `sleep 1000 & echo $! > ${pidFile}`]);
      await exit;
      const orphan = readPid(pidFile);
      expect(events).toEqual(['orphans', 'exit']);
      // Named as it is when the scan runs: under load the forked shell may not have exec'd sleep yet.
      expect(orphans).toEqual({ resource: fx.path, processes: [{ pid: orphan, command: expect.stringMatching(/^(sleep 1000|sh )/) }], through: ['lease'] });
      expect(mgr.resources[0]!.held).toBe(false);
      await mgr.free();
      expect(lockmgr('run', ...flags(), '--exclusive', fx.path, '--', 'true').code).toBe(75);
      // None of the lease's files is open in this process any more.
      const mine = readdirSync('/proc/self/fd').filter((fd) => {
        try {
          return readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8').includes('lock:');
        } catch {
          return false;
        }
      });
      expect(mine).toEqual([]);
    });

    // A helper that kept only the QEMU descriptor once lost QEMU's locks when the
    // command exited: releasing them on our duplicate released its (issue 14, review defect 2).
    it.skipIf(!haveQemuIo)("a process that kept only the QEMU descriptor keeps QEMU's locks: run names it, qemu-io stays refused until it exits", async () => {
      const pidFile = join(fx.tmp.dir, 'qemu-only.pid');
      const r = lockmgr('run', ...flags(), '--qemu-compatible', '--exclusive', fx.path, '--', 'bash', '-c', qemuOnlyOrphan(pidFile));
      const orphan = readPid(pidFile);
      expect(r.code, r.stderr).toBe(3);
      // It has the image open once: the QEMU descriptor, none of the lease's.
      expect(openCount(orphan, fx.path)).toBe(1);
      expect(qemuLockState(fx.path)).toMatchObject({ held: ['consistent-read', 'write'], unshared: ['write', 'resize'] });
      const write = spawnSync('qemu-io', ['-f', 'raw', '-c', 'write 0 512', fx.path], { encoding: 'utf8' });
      expect(write.status).not.toBe(0);
      expect(`${write.stdout}${write.stderr}`).toContain('Failed to get "write" lock');
      expect(r.stderr).toMatch(
        new RegExp(`but QEMU's locks on ${fx.path} stay held by ${orphan} \\((sleep 1000|bash )[^)]*\\), which it started and which still has the QEMU descriptor \\(LOCKMGR_QEMU_FD\\) open;`),
      );
      expect(lockmgr('run', ...flags(), '--qemu-compatible', '--exclusive', fx.path, '--', 'true').code).toBe(75);
      process.kill(orphan, 'SIGKILL');
      await waitUntil(() => !processExists(orphan), 10_000, 'the orphan to exit');
      expect(qemuLockState(fx.path)).toMatchObject({ held: [], unshared: [] });
      expect(spawnSync('qemu-io', ['-f', 'raw', '-c', 'write 0 512', fx.path]).status).toBe(0);
      expect(lockmgr('run', ...flags(), '--qemu-compatible', '--exclusive', fx.path, '--', 'true').code).toBe(0);
    });

    it("the API: a QEMU-descriptor orphan is an 'orphans' event through 'qemu', and free() leaves QEMU's locks to it", async () => {
      const pidFile = join(fx.tmp.dir, 'qemu-api.pid');
      const mgr = new LockManager(lockspace === 'direct' ? {} : { lockspace: { kind: 'indirect', dir: flags()[1]! } });
      mgr.registerResource({ type: 'disk', path: fx.path, mode: 'shared', qemuCompatible: true });
      const seen: Orphans[] = [];
      mgr.on('orphans', (o) => seen.push(o));
      const exit = new Promise((resolve) => mgr.once('exit', resolve));
      await mgr.start('bash', ['-c', qemuOnlyOrphan(pidFile)]);
      await exit;
      const orphan = readPid(pidFile);
      expect(seen).toHaveLength(1);
      expect(seen[0]!).toMatchObject({ resource: fx.path, through: ['qemu'] });
      expect(seen[0]!.processes.map((p) => p.pid)).toEqual([orphan]);
      expect(mgr.resources[0]!.held).toBe(false);
      await mgr.free();
      expect(qemuLockState(fx.path)).toMatchObject({ held: ['consistent-read', 'write'], unshared: ['resize'] });
    });

    it('status: a daemon that shares the lease of a live run is no orphan; once the run is gone it is one', async () => {
      const r = await runWithDaemon(flags());
      const marks = () => [...new Set(leaseHolders(...flags(), fx.path).map((h) => `${h.pid} ${h.orphan}`))].sort();
      expect(marks()).toEqual([`${r.cmd} false`, `${r.daemon} false`, `${r.run.pid} false`].sort());
      process.kill(r.cmd, 'SIGKILL');
      expect(await r.exit).toBe(128 + 9);
      expect(r.stderr()).toContain(`stays held by ${r.daemon} (sleep 1000)`);
      expect(marks()).toEqual([`${r.daemon} true`]);
    });

    it('run --adopt: the adopted command and its new lockmgr are no orphans; when it exits leaving a daemon with the lease, the notice, exit 0, and the daemon is the orphan', async () => {
      const r = await runWithDaemon(flags());
      r.run.kill('SIGKILL');
      await r.exit;
      if (lockspace === 'indirect') {
        // Named with another lockspace, the command's lock files are not the ones it has open: refused, and said so.
        const wrong = join(fx.tmp.dir, 'other-locks');
        mkdirSync(wrong, { mode: 0o700 });
        const w = lockmgr('run', '--adopt', String(r.cmd), '--lockspace', wrong, '--exclusive', fx.path);
        expect(w.code, w.stderr).toBe(64);
        expect(w.stderr).toContain('does not have that lock file open (did its lockmgr keep its locks elsewhere, in another lockspace?)');
      }
      const a = await adopter(r.cmd, flags());
      const marks = () => [...new Set(leaseHolders(...flags(), fx.path).map((h) => `${h.pid} ${h.orphan}`))].sort();
      // The daemon shares the lease with the new lockmgr too: supervised, as under the first one.
      expect(marks()).toEqual([`${r.cmd} false`, `${r.daemon} false`, `${a.child.pid} false`].sort());
      process.kill(r.cmd, 'SIGTERM');
      expect(await a.exit, a.stderr()).toBe(0);
      expect(a.stderr()).toContain(`lockmgr: process ${r.cmd} exited, but the lease on ${fx.path} stays held by ${r.daemon} (sleep 1000)`);
      expect(marks()).toEqual([`${r.daemon} true`]);
      expect(lockmgr('run', ...flags(), '--exclusive', fx.path, '--', 'true').code).toBe(75);
    });

    it('a command whose children exit with it releases as before (no orphans, no notice)', () => {
      const r = lockmgr('run', ...flags(), '--exclusive', fx.path, '--', 'sh', '-c', 'sleep 0 & wait');
      expect(r.code).toBe(0);
      expect(r.stderr).toBe('');
      expect(leaseHolders(...flags(), fx.path)).toEqual([]);
    });
  });
}

// The real lockmgr binary, in subprocesses.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, readFileSync, readdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it } from 'vitest';
import { LockManager, openLockable } from '../../lib/index.js';
import { lockFileName } from '../../lib/lockspaces/indirect.js';
import type { StatusEntry } from '../../lib/cli/main.js';
import { lockFixture, makeFile, waitUntil } from '../helpers.js';
import { endRuns, killPids, lockmgr as runLockmgr } from '../harness/cli.js';

const fx = lockFixture();
const BIN = fileURLToPath(new URL('../../bin/lockmgr.js', import.meta.url));
const running: ChildProcess[] = [];
/** Commands whose lockmgr a test SIGKILLed (init's children now), killed by pid after each test, whatever it failed at. */
const leftovers: number[] = [];

afterEach(async () => {
  await killPids(leftovers);
  await endRuns(running);
});

const lockmgr = (...args: string[]) => runLockmgr(args);

/**
 * Starts `lockmgr run ... -- sh -c SCRIPT` in the background; resolves once
 * SCRIPT has reached READY (where it touches a file; the start if absent).
 */
async function background(flags: string[], script: string, env: NodeJS.ProcessEnv = process.env) {
  const ready = join(fx.tmp.dir, `ready-${running.length}`);
  const body = script.includes('READY') ? script.replace('READY', `touch ${ready}`) : `touch ${ready}; exec ${script}`;
  const child = spawn(process.execPath, [BIN, 'run', ...flags, '--', 'sh', '-c', body], { stdio: ['ignore', 'pipe', 'pipe'], env });
  running.push(child);
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d));
  const exit = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
  await Promise.race([waitUntil(() => existsSync(ready), 10_000, 'the command to start'), exit.then(() => {
    throw new Error(`lockmgr exited early: ${stderr}`);
  })]);
  return { child, exit, stderr: () => stderr };
}

function status(...paths: string[]): { code: number | null; entries: StatusEntry[] } {
  const r = lockmgr('status', '--json', ...paths);
  const doc = JSON.parse(r.stdout) as { version: number; entries: StatusEntry[] };
  expect(doc.version).toBe(1);
  return { code: r.code, entries: doc.entries };
}

describe('lockmgr run', () => {
  it("a PATH is used as typed ('/dir//disk.img' stays so): a peer that names its lock file after that spelling, as virtlockd does, refuses the run", () => {
    const dir = join(fx.tmp.dir, 'spelling-locks');
    mkdirSync(dir, { mode: 0o700 });
    const spelled = fx.path.replace(/\/([^/]+)$/, '//$1');
    // virtlockd's lock file for that spelling, held as it holds it (a write lock on byte 0).
    const peer = openLockable(join(dir, lockFileName(spelled)), { create: true });
    try {
      expect(peer.tryLock('exclusive', { start: 0, length: 1 })).toBe(true);
      const r = lockmgr('run', '--lockspace', dir, '--exclusive', spelled, '--', 'true');
      expect(r.code, r.stderr).toBe(75);
      expect(r.stderr).toContain(lockFileName(spelled));
    } finally {
      peer.close();
    }
  });

  it("exits with the command's exit code, holding the lease while it runs and releasing it after", () => {
    const r = lockmgr('run', '--exclusive', fx.path, '--', process.execPath, BIN, 'status', '--json', fx.path);
    expect(r.code).toBe(0);
    const inside = (JSON.parse(r.stdout) as { entries: StatusEntry[] }).entries[0]!;
    expect(inside.lease).toMatchObject({ byte: 0, state: 'exclusive' });
    expect(status(fx.path).entries[0]!.lease!.state).toBe('free');
    expect(lockmgr('run', '--shared', fx.path, '--', 'sh', '-c', 'exit 7').code).toBe(7);
  });

  it('exits with 128 + the signal number when a signal killed the command', () => {
    expect(lockmgr('run', '--exclusive', fx.path, '--', 'sh', '-c', 'kill -KILL $$').code).toBe(128 + 9);
  });

  for (const [signal, number] of [['SIGTERM', 15], ['SIGINT', 2], ['SIGHUP', 1]] as const) {
    it(`forwards ${signal} to the command and exits with the command's status`, async () => {
      const { child, exit } = await background(['--exclusive', fx.path], `trap 'exit ${40 + number}' ${signal.slice(3)}; READY; while :; do sleep 0.05; done`);
      child.kill(signal);
      expect(await exit).toBe(40 + number);
      expect(status(fx.path).entries[0]!.lease!.state).toBe('free');
    });
  }

  it('a signal that arrives while lockmgr waits for a busy resource ends the run: nothing spawned, exit 128 + N', async () => {
    const { exit: holderExit } = await background(['--exclusive', fx.path], 'sleep 1000');
    const marker = join(fx.tmp.dir, 'ran');
    const waiter = spawn(process.execPath, [BIN, 'run', '--wait', '60', '--exclusive', fx.path, '--', 'touch', marker], { stdio: 'ignore' });
    running.push(waiter);
    const exit = new Promise<number | null>((r) => waiter.once('exit', (code) => r(code)));
    // Until lockmgr has installed its forwarders, SIGTERM would kill it by its
    // default action. Node itself catches SIGINT and SIGTERM (to restore the
    // terminal), so watch for SIGHUP, which only lockmgr's forwarders catch.
    const catchesHup = () => (BigInt(`0x${/^SigCgt:\s+(\S+)$/m.exec(readFileSync(`/proc/${waiter.pid}/status`, 'utf8'))![1]}`) & 1n) === 1n;
    await waitUntil(catchesHup, 10_000, 'lockmgr to install its signal forwarders');
    waiter.kill('SIGTERM');
    expect(await exit).toBe(128 + 15);
    expect(existsSync(marker)).toBe(false);
    expect(status(fx.path).entries[0]!.lease!.state).toBe('exclusive');
    void holderExit;
  });

  it('fails with 75 and names the holder when a resource is busy; holds nothing of the rest', async () => {
    const other = makeFile(fx.tmp.dir, 'other.img');
    const { child } = await background(['--exclusive', fx.path], 'sleep 1000');
    const r = lockmgr('run', '--exclusive', other, '--shared', fx.path, '--', 'true');
    expect(r.code).toBe(75);
    expect(r.stderr).toMatch(new RegExp(`^lockmgr: ${fx.path} is busy: an exclusive OFD lock on byte 0 is held by\\n(  pid .*\\n)*  pid ${child.pid} +\\S*node \\S*lockmgr.js run`));
    expect(status(other).entries[0]!.lease!.state).toBe('free');
  });

  it('--wait waits for a busy resource', async () => {
    const { exit } = await background(['--exclusive', fx.path], 'sleep 0.3');
    const r = lockmgr('run', '--wait', '30', '--exclusive', fx.path, '--', 'sh', '-c', 'exit 5');
    expect(r.code).toBe(5);
    expect(await exit).toBe(0);
    expect(lockmgr('run', '--wait', '0.1', '--exclusive', fx.path, '--', 'true').code).toBe(0);
  });

  it('a --wait that runs out exits 75 and names the processes that have the image open', async () => {
    const { child } = await background(['--exclusive', fx.path], 'sleep 1000');
    const r = lockmgr('run', '--wait', '0.2', '--uri', 'qemu:///system', '--shared', fx.path, '--', 'true');
    expect(r.code).toBe(75);
    // In the user's units (seconds, as given), each holder on a line of its own.
    expect(r.stderr).toMatch(new RegExp(`^lockmgr: gave up after 0\\.2 s waiting for ${fx.path}: an exclusive OFD lock on byte 0 is still held by\\n(  pid .*\\n)*  pid ${child.pid} `, 'm'));
  });

  it('usage errors exit 64, unopenable resources 66, unsupported features 69, missing or unrunnable commands 127 and 126', () => {
    const symlinked = join(fx.tmp.dir, 'locks-link');
    symlinkSync(fx.tmp.dir, symlinked);
    const notExec = makeFile(fx.tmp.dir, 'script.sh', '#!/bin/sh\nexit 0\n');
    chmodSync(notExec, 0o644);
    const cases: Array<[string[], number, RegExp]> = [
      [['run', '--bogus', '--', 'true'], 64, /unknown option '--bogus'/],
      [['run', '--exclusive', fx.path, 'true'], 64, /the command goes after '--'/],
      [['run', '--exclusive', fx.path, '--'], 64, /the command is missing after '--'/],
      [['run', '--wait', 'soon', '--exclusive', fx.path, '--', 'true'], 64, /--wait needs a number/],
      [['run', '--lifetime', 'forever', '--exclusive', fx.path, '--', 'true'], 64, /--lifetime must be 'child' or 'supervisor'/],
      [['run', '--uuid', 'nope', '--exclusive', fx.path, '--', 'true'], 64, /uuid/],
      [['run', '--id', '-3', '--exclusive', fx.path, '--', 'true'], 64, /--id/],
      [['run', '--id', '1.5', '--exclusive', fx.path, '--', 'true'], 64, /--id needs an integer/],
      [['run', '--exclusive', 'relative.img', '--', 'true'], 66, /ENOENT/],
      [['run', '--exclusive', join(fx.tmp.dir, 'missing.img'), '--', 'true'], 66, /ENOENT/],
      [['run', '--exclusive', fx.tmp.dir, '--', 'true'], 66, /EISDIR/],
      [['run', '--lockspace', symlinked, '--exclusive', fx.path, '--', 'true'], 64, /lockspace dir .* is a symbolic link and was refused/],
      [['run', '--lockspace', join(fx.tmp.dir, 'no-such-dir'), '--exclusive', fx.path, '--', 'true'], 66, /ENOENT/],
      [['status', '--lockspace', symlinked, fx.path], 64, /symbolic link/],
      [['run', '--exclusive', fx.path, '--', join(fx.tmp.dir, 'no-such-command')], 127, /ENOENT/],
      [['run', '--exclusive', fx.path, '--', notExec], 126, /EACCES/],
      [['frobnicate'], 64, /unknown command 'frobnicate'/],
      [[], 64, /a command is needed/],
      [['status'], 64, /a PATH is needed/],
    ];
    for (const [args, code, message] of cases) {
      const r = lockmgr(...args);
      expect({ args, code: r.code }).toEqual({ args, code });
      expect(r.stderr).toMatch(message);
    }
    // None of them left anything held.
    expect(status(fx.path).entries[0]!.lease!.state).toBe('free');
  });

  it('--help lists the commands and every exit code', () => {
    const r = lockmgr('--help');
    expect(r.code).toBe(0);
    for (const code of ['64', '66', '69', '70', '71', '75', '126', '127']) expect(r.stdout).toContain(`  ${code} `);
  });

  it('--lockspace DIR: the lease lives in lock files there (image untouched); a second run is refused; status shows them; nothing left after', async () => {
    const dir = join(fx.tmp.dir, 'locks');
    mkdirSync(dir, { mode: 0o700 });
    const { child } = await background(['--lockspace', dir, '--exclusive', fx.path], 'sleep 1000');
    expect(status(fx.path).entries[0]!.lease!.state).toBe('free');
    const files = readdirSync(dir);
    expect(files).toHaveLength(2);
    const r = lockmgr('run', '--lockspace', dir, '--shared', fx.path, '--', 'true');
    expect(r.code).toBe(75);
    expect(r.stderr).toMatch(new RegExp(`${fx.path} \\(its lock file ${dir}/[0-9a-f]{64}\\) is busy: an exclusive OFD lock on byte 0 is held by\\n(  pid .*\\n)*  pid ${child.pid} `));
    const s = lockmgr('status', '--json', '--lockspace', dir, fx.path);
    const entry = (JSON.parse(s.stdout) as { entries: StatusEntry[] }).entries[0]!;
    expect(entry.lockFiles!.map((f) => [f.source, f.exists, f.lease.state, f.migrationGuard.state])).toEqual([
      ['path', true, 'exclusive', 'free'],
      ['inode', true, 'exclusive', 'free'],
    ]);
    expect(lockmgr('status', '--lockspace', dir, fx.path).stdout).toMatch(new RegExp(`lock file \\(path\\) +/.*: lease held exclusive \\(pid (\\d+, )*${child.pid}(, \\d+)*\\), guard free`));
    child.kill('SIGTERM');
    await new Promise((res) => child.once('exit', res));
    expect(readdirSync(dir)).toEqual([]);
    expect(lockmgr('run', '--lockspace', dir, '--exclusive', fx.path, '--', 'true').code).toBe(0);
    expect(readdirSync(dir)).toEqual([]);
  });

  it('--adopt PID: a new lockmgr takes over the command of a SIGKILLed one with its lease, forwards SIGTERM, exits 0 after it; bad input exits 64 and takes nothing', async () => {
    const first = await background(['--exclusive', fx.path], 'sleep 1000');
    // sh exec'd into sleep: the command is lockmgr's one child.
    const vm = Number(readFileSync(`/proc/${first.child.pid}/task/${first.child.pid}/children`, 'utf8').trim());
    expect(vm).toBeGreaterThan(0);
    leftovers.push(vm);
    first.child.kill('SIGKILL');
    await first.exit;
    expect(status(fx.path).entries[0]!.lease!.state).toBe('exclusive');
    expect(lockmgr('run', '--adopt', String(vm), '--shared', fx.path).stderr).toMatch(/does not hold a shared lease .*: it holds it exclusively, not shared/);
    for (const bad of [
      ['--adopt', String(vm), '--shared', fx.path],
      ['--adopt', String(vm), '--exclusive', fx.path, '--', 'true'],
      ['--adopt', 'vm1', '--exclusive', fx.path],
      ['--adopt', String(vm)],
      ['--adopt', String(vm), '--wait', '1', '--exclusive', fx.path],
      ['--adopt', String(vm), '--qemu-compatible', '--exclusive', fx.path],
    ]) {
      const r = lockmgr('run', ...bad);
      expect(r.code, bad.join(' ')).toBe(64);
      // In the command line's words: its flags, never the API's names.
      expect(r.stderr, bad.join(' ')).not.toMatch(/adopt\(\)|options\./);
    }
    const adopter = spawn(process.execPath, [BIN, 'run', '--adopt', String(vm), '--exclusive', fx.path], { stdio: ['ignore', 'pipe', 'pipe'] });
    running.push(adopter);
    let stderr = '';
    adopter.stderr!.on('data', (d: Buffer) => (stderr += d));
    const exit = new Promise<number | null>((r) => adopter.once('exit', (code) => r(code)));
    // It says when it has taken over (and forwards signals from then on).
    let gone = false;
    void exit.then(() => (gone = true));
    await waitUntil(() => stderr.includes('\n') || gone, 30_000, 'the new lockmgr to take over');
    expect(stderr).toBe(`lockmgr: took over process ${vm} (sleep 1000) and its leases on ${fx.path}\n`);
    expect(lockmgr('run', '--shared', fx.path, '--', 'true').code).toBe(75);
    adopter.kill('SIGTERM');
    expect(await exit, stderr).toBe(0);
    // The command is gone (or a zombie of its new parent, init): the SIGTERM reached it.
    const state = (() => {
      try {
        const st = readFileSync(`/proc/${vm}/stat`, 'utf8');
        return st.slice(st.lastIndexOf(')') + 2, st.lastIndexOf(')') + 3);
      } catch {
        return null;
      }
    })();
    expect(state === null || state === 'Z', `state ${state}`).toBe(true);
    expect(status(fx.path).entries[0]!.lease!.state).toBe('free');
    expect(lockmgr('run', '--exclusive', fx.path, '--', 'true').code).toBe(0);
  });

  it("runs the argv of a LockManager's supervisorArgs(), holding the same resources", async () => {
    const shared = makeFile(fx.tmp.dir, 'shared.img');
    const mgr = new LockManager({ params: { name: 'vm1', id: 3 }, lockLifetime: 'supervisor' });
    mgr.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    mgr.registerResource({ type: 'disk', path: shared, mode: 'shared' });
    const argv = mgr.supervisorArgs();
    expect(argv).toEqual(['run', '--lockspace', 'direct', '--exclusive', fx.path, '--shared', shared, '--lifetime', 'supervisor', '--name', 'vm1', '--id', '3', '--']);
    await mgr.free();
    const r = spawnSync(process.execPath, [mgr.supervisorPath(), ...argv, process.execPath, BIN, 'status', '--json', fx.path, shared], { encoding: 'utf8' });
    expect(r.status).toBe(0);
    const [a, b] = (JSON.parse(r.stdout) as { entries: StatusEntry[] }).entries;
    expect([a!.lease!.state, b!.lease!.state]).toEqual(['exclusive', 'shared']);
  });
});

describe('lockmgr status', () => {
  it('--json: the documented schema, with the processes that have the file open', async () => {
    const { child } = await background(['--shared', fx.path], 'sleep 1000');
    const { code, entries } = status(fx.path);
    expect(code).toBe(0);
    const e = entries[0]!;
    expect(Object.keys(e).sort()).toEqual(['fdinfoAvailable', 'holders', 'identity', 'kind', 'lease', 'locks', 'migrationGuard', 'openBy', 'openers', 'path', 'qemu', 'unreadable']);
    expect(e).toMatchObject({
      path: fx.path,
      kind: 'file',
      identity: expect.stringMatching(/^f:\d+:\d+$/),
      lease: { byte: 0, state: 'shared', holder: { mode: 'shared', start: 0, length: 1, pid: -1 } },
      migrationGuard: { byte: 1, state: 'free' },
      qemu: { held: [], unshared: [] },
    });
    // The lease (byte 0) and a shared lease's class byte (3).
    expect([...e.locks!].sort((x, y) => x.start - y.start)).toEqual([
      expect.objectContaining({ kind: 'OFDLCK', type: 'READ', pid: -1, start: 0, end: 0, blocked: false }),
      expect.objectContaining({ kind: 'OFDLCK', type: 'READ', pid: -1, start: 3, end: 3, blocked: false }),
    ]);
    expect(e.openBy!.map((p) => p.pid)).toContain(child.pid);
    expect(e.openBy!.find((p) => p.pid === child.pid)!.command).toContain('lockmgr.js run --shared');
    // The exact holders, from fdinfo: lockmgr and its command (which shares its description), neither an orphan.
    expect(e.holders!.map((h) => [h.pid, h.mode, h.start, h.orphan])).toContainEqual([child.pid, 'shared', 0, false]);
    expect(e.holders!.find((h) => h.command === 'sleep 1000')).toMatchObject({ mode: 'shared', orphan: false });
  });

  it('a PATH that is not a file or block device is an error entry with exit 66 too', () => {
    const { code, entries } = status('/dev/null');
    expect(code).toBe(66);
    expect(entries[0]).toEqual({ path: '/dev/null', error: { code: 'ERR_INVALID_ARGUMENT', message: expect.stringContaining('character device') } });
  });

  it('reports a free image, and a path it cannot open as an error entry with exit 66', () => {
    const missing = join(fx.tmp.dir, 'missing.img');
    const { code, entries } = status(fx.path, missing);
    expect(code).toBe(66);
    expect(entries[0]!.lease!.state).toBe('free');
    expect(entries[1]).toEqual({ path: missing, error: { code: 'ERR_RESOURCE_ACCESS', message: expect.stringContaining('ENOENT') } });
  });

  it('prints a readable table by default', () => {
    writeFileSync(fx.path, 'x');
    const r = lockmgr('status', fx.path);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(new RegExp(`^${fx.path}\\n  kind +file \\(f:\\d+:\\d+\\)\\n  lease \\(byte 0\\) +free\\n  migration guard +free\\n`));
  });
});

// A lock file deleted under a running holder (a tmp cleaner) lets the next
// acquirer in: `run` checks its leases where the lockspace declares them
// losable, and applies --on-lock-failure (issue 18, part 2).
describe('lockmgr run --verify-interval / --on-lock-failure', () => {
  const lockDir = () => {
    const dir = join(fx.tmp.dir, 'locks');
    if (!existsSync(dir)) mkdirSync(dir, { mode: 0o700 });
    return dir;
  };
  const deleteLockFiles = (dir: string) => {
    const names = readdirSync(dir);
    expect(names.length).toBeGreaterThan(0);
    for (const n of names) spawnSync('rm', ['-f', join(dir, n)]);
  };

  it('on by default in a lockspace whose leases are losable: deleting the lock files under a running run kills the command (poweroff) and says why', async () => {
    const dir = lockDir();
    const { exit, stderr } = await background(['--lockspace', dir, '--exclusive', fx.path], 'sleep 1000');
    deleteLockFiles(dir);
    // The default interval (10 s) is the only wait: the ceiling is a hang guard.
    const code = await Promise.race([exit, new Promise((_, reject) => setTimeout(() => reject(new Error('no lock failure within 60 s')), 60_000))]);
    expect(code).toBe(128 + 9);
    expect(stderr()).toContain(`lockmgr: lock lost: the exclusive lease on ${fx.path} is no longer held; --on-lock-failure poweroff: killing sh (SIGKILL)`);
  });

  it('--on-lock-failure ignore: reported once, however often the checks find it lost, and the command runs on', async () => {
    const dir = lockDir();
    // NODE_DEBUG=lockmgr logs each 'lock-failure' the checks raise: proof that they found it lost more than once.
    const env = { ...process.env, NODE_DEBUG: 'lockmgr' };
    const { child, exit, stderr } = await background(['--lockspace', dir, '--verify-interval', '0.2', '--on-lock-failure', 'ignore', '--exclusive', fx.path], 'sleep 1000', env);
    deleteLockFiles(dir);
    await waitUntil(() => (stderr().match(/: lock-lost /g) ?? []).length >= 3, 30_000, 'the checks to find the loss three times');
    expect(stderr().match(/^lockmgr: lock lost: /gm)).toEqual(['lockmgr: lock lost: ']);
    expect(stderr()).toContain('--on-lock-failure ignore: sh runs on');
    expect(child.exitCode).toBe(null);
    child.kill('SIGTERM');
    expect(await exit).toBe(128 + 15);
  });

  it('--on-lock-failure pause: the command is stopped (SIGSTOP)', async () => {
    const dir = lockDir();
    const pidFile = join(fx.tmp.dir, 'cmd.pid');
    const { child, stderr } = await background(['--lockspace', dir, '--verify-interval', '0.2', '--on-lock-failure', 'pause', '--exclusive', fx.path], `echo $$ > ${pidFile}; READY; exec sleep 1000`);
    const pid = Number(readFileSync(pidFile, 'utf8'));
    deleteLockFiles(dir);
    await waitUntil(() => stderr().includes('lock lost'), 30_000, 'the lock failure to be reported');
    await waitUntil(() => /^State:\s+T/m.test(readFileSync(`/proc/${pid}/status`, 'utf8')), 10_000, 'the command to be stopped');
    expect(stderr()).toContain('--on-lock-failure pause: stopping sh (SIGSTOP)');
    expect(child.exitCode).toBe(null);
    process.kill(pid, 'SIGCONT');
  });

  it('--verify-interval 0 turns it off; bad values are usage errors naming the flag', () => {
    const bad: Array<[string[], RegExp]> = [
      [['--verify-interval', 'soon'], /--verify-interval needs a number of seconds >= 0, got 'soon'/],
      [['--verify-interval='], /--verify-interval needs a number of seconds >= 0, got ''/],
      [['--verify-interval=-1'], /--verify-interval needs a number of seconds >= 0, got '-1'/],
      [['--on-lock-failure', 'reboot'], /--on-lock-failure needs one of poweroff, pause, ignore, got 'reboot'/],
      [['--on-lock-failure', 'pause', '--verify-interval', '0'], /--on-lock-failure needs the lease checks that --verify-interval 0 turns off: drop one of them/],
    ];
    for (const [flags, why] of bad) {
      const r = lockmgr('run', ...flags, '--exclusive', fx.path, '--', 'true');
      expect(r.code, flags.join(' ')).toBe(64);
      expect(r.stderr).toMatch(why);
    }
    expect(lockmgr('run', '--lockspace', lockDir(), '--verify-interval', '0', '--exclusive', fx.path, '--', 'true').code).toBe(0);
  });
});

// The real binary, telling a user who is in the way: busy runs, waits, their
// timeouts, `status` (table and --json), --conflict-exit-code, and untrusted
// text (paths, command lines) escaped on every line it prints.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import type { StatusEntry } from '../../lib/cli/main.js';
import { isRoot, lockFixture, makeFile, waitUntil } from '../helpers.js';
import { endGroups } from '../harness/process-helpers.js';
import { BIN, backgroundRuns, lockmgr, touchThen } from '../harness/cli.js';

const fx = lockFixture();
const runs = backgroundRuns();
const haveScript = spawnSync('sh', ['-c', 'command -v script']).status === 0;
const have = (cmd: string) => spawnSync('sh', ['-c', `command -v ${cmd}`]).status === 0;
const PYTHON = existsSync('/usr/bin/python3') ? '/usr/bin/python3' : 'python3';
const havePython = spawnSync(PYTHON, ['-c', 'import fcntl']).status === 0;

// Holders that are not lockmgr, each in a process group of its own, ended
// whole after the test (flock(1) does not pass SIGTERM on to its command).
const others: ChildProcess[] = [];
afterEach(() => endGroups(others));

function startOther(command: string, args: string[]): ChildProcess {
  const child = spawn(command, args, { stdio: ['pipe', 'ignore', 'inherit'], detached: true });
  others.push(child);
  return child;
}

// A classic POSIX lock (lockf) on byte 0 by Python, as virtlockd's are: /proc/locks records its owner.
const PY_POSIX = 'import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDWR)\nfcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)\ntime.sleep(1000)\n';

/** `lockmgr run --exclusive PATH -- sleep 1000` in the background: its pid and its command's. */
async function holder(path = fx.path, flags: string[] = ['--exclusive']) {
  const { argv, ready } = touchThen(fx.tmp.dir, 'sleep 1000', `ready-${runs.children.length}`);
  const run = await runs.start(['run', ...flags, path, '--', ...argv], { ready });
  const entry = statusOf(path);
  const command = entry.holders!.find((h) => h.pid !== run.child.pid)!;
  return { ...run, pid: run.child.pid!, commandPid: command.pid };
}

function statusOf(path: string): StatusEntry {
  const r = lockmgr(['status', '--json', path]);
  expect(r.code).toBe(0);
  return (JSON.parse(r.stdout) as { entries: StatusEntry[] }).entries[0]!;
}

describe('a busy resource names its holders', () => {
  it('run: 75, the lock in the way, each holding process on a line with its command line; nothing of the rest held', async () => {
    const other = makeFile(fx.tmp.dir, 'other.img');
    const h = await holder();
    const r = lockmgr(['run', '--exclusive', other, '--shared', fx.path, '--', 'true']);
    expect(r.code).toBe(75);
    const lines = r.stderr.trimEnd().split('\n');
    expect(lines[0]).toBe(`lockmgr: ${fx.path} is busy: an exclusive OFD lock on byte 0 is held by`);
    // In pid order (the command's pid is lockmgr's + something, unless pids wrapped around).
    const line = (pid: number) => lines.slice(1, 3).find((l) => l.startsWith(`  pid ${pid} `));
    expect(line(h.pid)).toMatch(new RegExp(`^  pid ${h.pid} +\\S*node \\S*lockmgr\\.js run --exclusive ${fx.path} -- sh -c `));
    expect(line(h.commandPid)).toMatch(new RegExp(`^  pid ${h.commandPid} +sleep 1000$`));
    // Whether other.img was taken (and released again) first depends on the two files' identities.
    expect([[], [`released again: ${other}`]]).toContainEqual(lines.slice(3));
    expect(statusOf(other).lease!.state).toBe('free');
  });

  it('--conflict-exit-code N (-E N) replaces 75 for busy and timed-out runs only, so a command exiting 75 is not taken for busy', async () => {
    expect(lockmgr(['run', '--exclusive', fx.path, '--', 'sh', '-c', 'exit 75']).code).toBe(75);
    expect(lockmgr(['run', '-E', '3', '--exclusive', fx.path, '--', 'sh', '-c', 'exit 75']).code).toBe(75);
    await holder();
    expect(lockmgr(['run', '--conflict-exit-code', '3', '--exclusive', fx.path, '--', 'true']).code).toBe(3);
    expect(lockmgr(['run', '-E', '0', '--exclusive', fx.path, '--', 'true']).code).toBe(0);
    expect(lockmgr(['run', '-E', '9', '--wait', '0.1', '--exclusive', fx.path, '--', 'true']).code).toBe(9);
    // Other failures keep their own status.
    expect(lockmgr(['run', '-E', '3', '--exclusive', join(fx.tmp.dir, 'missing.img'), '--', 'true']).code).toBe(66);
  });

  it('--wait: one line when the wait begins (what, held by whom); a timeout says so in seconds, as given', async () => {
    const h = await holder();
    const r = lockmgr(['run', '--wait', '0.3', '--shared', fx.path, '--', 'true']);
    expect(r.code).toBe(75);
    const lines = r.stderr.trimEnd().split('\n');
    expect(lines[0]).toMatch(new RegExp(`^lockmgr: waiting up to 0\\.3 s for ${fx.path}, held by pid \\d+ \\(.*\\) and pid \\d+ \\(.*\\) with an exclusive OFD lock on byte 0$`));
    for (const pid of [h.pid, h.commandPid]) expect(lines[0]).toContain(`pid ${pid} (`);
    expect(lines[1]).toBe(`lockmgr: gave up after 0.3 s waiting for ${fx.path}: an exclusive OFD lock on byte 0 is still held by`);
    expect(lines.slice(2).map((l) => Number(l.replace(/^ {2}pid (\d+) +.*/, '$1'))).sort()).toEqual([h.pid, h.commandPid].sort());
    expect(r.stderr).not.toMatch(/\d ms\b/);
  });

  it('--wait behind a readonly holder (a shared lease waits on its class byte): the same waiting line, naming the reader', async () => {
    const h = await holder(fx.path, ['--readonly']);
    const r = lockmgr(['run', '--wait', '0.3', '--shared', fx.path, '--', 'true']);
    expect(r.code).toBe(75);
    const lines = r.stderr.trimEnd().split('\n');
    expect(lines[0]).toMatch(new RegExp(`^lockmgr: waiting up to 0\\.3 s for ${fx.path}, held by pid \\d+ `));
    expect(lines[0]).toContain(`pid ${h.pid} (`);
    expect(r.stderr).toContain('gave up after 0.3 s');
  });

  it('--wait that gets the lock: the waiting line, then the command runs', async () => {
    const h = await holder();
    const waiter = spawn(process.execPath, [BIN, 'run', '--wait', '60', '--exclusive', fx.path, '--', 'sh', '-c', 'echo ran'], { stdio: ['ignore', 'pipe', 'pipe'] });
    runs.children.push(waiter);
    let stderr = '';
    let stdout = '';
    waiter.stderr!.on('data', (d: Buffer) => (stderr += d));
    waiter.stdout!.on('data', (d: Buffer) => (stdout += d));
    const exit = new Promise<number | null>((r) => waiter.once('exit', (code) => r(code)));
    await waitUntil(() => stderr.includes('\n'), 20_000, 'the waiting line');
    expect(stderr).toMatch(new RegExp(`^lockmgr: waiting up to 60 s for ${fx.path}, held by pid ${h.pid} `));
    h.child.kill('SIGTERM');
    expect(await exit).toBe(0);
    expect(stdout).toBe('ran\n');
    expect(stderr.split('\n')).toHaveLength(2);
  });

  it.skipIf(!haveScript)('--wait on a terminal: the seconds waited so far, rewritten in place and cleared', async () => {
    const h = await holder();
    // script(1) gives lockmgr a terminal (a pty) and copies what it prints.
    const cmd = [process.execPath, BIN, 'run', '--wait', '60', '--exclusive', fx.path, '--', 'echo', 'ran'].map((a) => `'${a}'`).join(' ');
    const tty = spawn('script', ['-qec', cmd, '/dev/null'], { stdio: ['pipe', 'pipe', 'pipe'] });
    runs.children.push(tty);
    let out = '';
    tty.stdout!.on('data', (d: Buffer) => (out += d));
    const exit = new Promise<number | null>((r) => tty.once('exit', (code) => r(code)));
    await waitUntil(() => /waited [1-9]\d* s/.test(out), 30_000, 'the elapsed time to count');
    h.child.kill('SIGTERM');
    expect(await exit).toBe(0);
    // The command (another process on the same terminal) may print before lockmgr clears its line:
    // the order of "ran" and the final clear is the two processes' race, not lockmgr's to fix here.
    expect(out).toMatch(/^lockmgr: waiting up to 60 s for .*\r\n\r\x1b\[K {2}waited 0 s(\r\x1b\[K {2}waited \d+ s)+/);
    expect(out.replace(/\r\x1b\[K/g, '')).toMatch(/ran\r\n$/);
    expect(out.match(/\r\x1b\[K/g)!.length).toBeGreaterThanOrEqual(3);
  });

  it('a waiter is never named as a holder: status marks it waiting, and a third run names only the holder', async () => {
    const h = await holder();
    const waiter = await runs.start(['run', '--wait', '600', '--exclusive', fx.path, '--', 'true']);
    await waitUntil(() => statusOf(fx.path).openers!.some((o) => o.pid === waiter.child.pid && o.waiting === true), 20_000, 'the waiter to block');
    const e = statusOf(fx.path);
    expect(e.holders!.map((x) => x.pid).sort()).toEqual([h.pid, h.commandPid].sort());
    const table = lockmgr(['status', fx.path]).stdout;
    expect(table).toMatch(new RegExp(`^  also open in +pid ${waiter.child.pid} +\\S*node .*lockmgr\\.js run --wait 600 .*\\(waiting for a lock\\)$`, 'm'));
    const r = lockmgr(['run', '--exclusive', fx.path, '--', 'true']);
    expect(r.stderr).toMatch(new RegExp(`^also open in:\\n  pid ${waiter.child.pid} +\\S*node .*\\(waiting for a lock\\)$`, 'm'));
    expect(r.stderr.split('also open in:')[0]).not.toContain(String(waiter.child.pid));
  });
});

describe('lockmgr status names the holders', () => {
  it('table: the lease with its holders pids, each holder with its command and its locks, then the other openers', async () => {
    const h = await holder(fx.path, ['--qemu-compatible', '--exclusive']);
    const lines = lockmgr(['status', fx.path]).stdout.split('\n');
    expect(lines[0]).toBe(fx.path);
    expect(lines).toContain(`  lease (byte 0)      held exclusive by pid ${[h.pid, h.commandPid].sort((a, b) => a - b).join(', ')}`);
    // The lockmgr process's two lines (pid and command; its locks), wherever pid order puts them.
    const at = lines.findIndex((l) => new RegExp(`^ +(held by +)?pid ${h.pid} `).test(l));
    expect(lines[at]).toMatch(new RegExp(`^ +(held by +)?pid ${h.pid} +\\S*node \\S*lockmgr\\.js run --qemu-compatible --exclusive ${fx.path} `));
    // Each of its locks on a line of its own, with the descriptor that holds it.
    expect(lines.slice(at + 1, at + 5).map((l) => l.trim().replace(/ \(fd \d+\)$/, ''))).toEqual([
      'an exclusive OFD lock on byte 0',
      'a shared OFD lock on bytes 100-101 (QEMU holds "consistent-read", "write")',
      'a shared OFD lock on byte 201 (QEMU does not share "write")',
      'a shared OFD lock on byte 203 (QEMU does not share "resize")',
    ]);
    expect(lines[at + 1]).toMatch(/ \(fd \d+\)$/);
    expect(lines).toContainEqual(expect.stringMatching(new RegExp(`^ +(held by +)?pid ${h.commandPid} +sleep 1000$`)));
  });

  it('--json: holders, openers, unreadable and fdinfoAvailable, besides the fields of before', async () => {
    const h = await holder(fx.path, ['--shared']);
    const e = statusOf(fx.path);
    expect(Object.keys(e).sort()).toEqual(['fdinfoAvailable', 'holders', 'identity', 'kind', 'lease', 'locks', 'migrationGuard', 'openBy', 'openers', 'path', 'qemu', 'unreadable']);
    // The lease (byte 0); a shared lease also holds its class byte (3). Both supervised by lockmgr: no orphan.
    const lease = [...e.holders!].filter((x) => x.start === 0).sort((a, b) => (a.pid === h.pid ? -1 : b.pid === h.pid ? 1 : 0));
    expect(lease).toEqual([
      { pid: h.pid, command: expect.stringContaining('lockmgr.js run --shared'), kind: 'OFD', mode: 'shared', start: 0, end: 0, fds: [expect.any(Number)], orphan: false },
      { pid: h.commandPid, command: 'sleep 1000', kind: 'OFD', mode: 'shared', start: 0, end: 0, fds: [expect.any(Number)], orphan: false },
    ]);
    expect(e.holders!.filter((x) => x.start !== 0).map((x) => [x.pid, x.mode, x.start, x.end]).sort()).toEqual([[h.pid, 'shared', 3, 3], [h.commandPid, 'shared', 3, 3]].sort());
    expect(e).toMatchObject({ openers: [], unreadable: [], fdinfoAvailable: true });
    expect(e.openBy!.map((p) => p.pid).sort()).toEqual([h.pid, h.commandPid].sort());
  });
});

describe('untrusted text is escaped on every line written', () => {
  it('a path with an escape sequence, in a busy error, a timeout, the waiting line, the table and --json', async () => {
    const evil = makeFile(fx.tmp.dir, 'vm\x1b]0;owned\x07\x1b[2J\u202e.img');
    await holder(evil);
    const outputs = [
      lockmgr(['run', '--exclusive', evil, '--', 'true']).stderr,
      lockmgr(['run', '--wait', '0.1', '--exclusive', evil, '--', 'true']).stderr,
      lockmgr(['status', evil]).stdout,
      lockmgr(['status', '--json', evil]).stdout,
      lockmgr(['run', '--exclusive', `${evil}\nlockmgr: all is well`, '--', 'true']).stderr,
    ];
    for (const text of outputs) {
      expect(text).not.toMatch(/[\x00-\x09\x0b-\x1f\x7f-\x9f\u202e]/);
      expect(text).toMatch(/vm(\\e|\\u001b)\]0;owned(\\x07|\\u0007)(\\e|\\u001b)\[2J(\\u\{202e\}|\\u202e)\.img/);
    }
    // An untrusted newline cannot fake a line of its own.
    expect(outputs[4]).not.toMatch(/^lockmgr: all is well/m);
    // The JSON is still JSON, and says the real path.
    expect((JSON.parse(outputs[3]!) as { entries: StatusEntry[] }).entries[0]!.path).toBe(evil);
  });

  it("another process's command line with control characters", async () => {
    const { ready, argv } = touchThen(fx.tmp.dir, `bash -c 'exec -a "$(printf "innocent\\033[8m")" sleep 1000'`);
    await runs.start(['run', '--exclusive', fx.path, '--', ...argv], { ready });
    await waitUntil(() => statusOf(fx.path).holders!.some((x) => x.command.startsWith('innocent')), 20_000, 'the command to rename itself');
    for (const text of [lockmgr(['run', '--exclusive', fx.path, '--', 'true']).stderr, lockmgr(['status', fx.path]).stdout]) {
      expect(text).toContain('innocent\\e[8m');
      expect(text).not.toContain('\x1b');
    }
  });
});

describe('holders that are not lockmgr, named by the real binary', () => {
  it.skipIf(!havePython || !have('flock') || !have('qemu-io'))('QEMU (qemu-io), a POSIX lock (Python) and flock(1): status names each with its lock; a busy run names the POSIX holder only', async () => {
    const qemu = startOther('qemu-io', ['-f', 'raw', fx.path]);
    const py = startOther(PYTHON, ['-c', PY_POSIX, fx.path]);
    const flock = startOther('flock', ['-s', fx.path, 'sleep', '1000']);
    await waitUntil(() => {
      const e = statusOf(fx.path);
      return [qemu.pid, py.pid, flock.pid].every((pid) => e.holders!.some((h) => h.pid === pid));
    }, 20_000, 'qemu-io, python and flock to lock');
    const e = statusOf(fx.path);
    const kinds = (pid: number) => e.holders!.filter((h) => h.pid === pid).map((h) => [h.kind, h.mode, h.start, h.end]);
    expect(kinds(qemu.pid!)).toEqual([['OFD', 'shared', 100, 101]]);
    expect(kinds(py.pid!)).toEqual([['POSIX', 'exclusive', 0, 0]]);
    expect(kinds(flock.pid!)).toEqual([['FLOCK', 'shared', 0, null]]);
    // flock(1)'s command inherited the flock lock's open file description: it holds it too.
    expect(e.holders!.filter((h) => h.kind === 'FLOCK' && h.pid !== flock.pid).map((h) => h.command)).toEqual(['sleep 1000']);
    // None of them holds a lease (lockmgr's OFD bytes 0-4): none is anybody's orphan, in JSON or in the table.
    expect(e.holders!.filter((h) => h.orphan !== undefined)).toEqual([]);

    const table = lockmgr(['status', fx.path]).stdout.split('\n');
    // The lease names only the byte-range holder of byte 0: flock and QEMU's bytes are not it.
    expect(table).toContain(`  lease (byte 0)      held exclusive by pid ${py.pid}`);
    const after = (pid: number) => table[table.findIndex((l) => new RegExp(`pid ${pid} +\\S`).test(l)) + 1];
    expect(after(qemu.pid!)).toMatch(/^ +a shared OFD lock on bytes 100-101 \(QEMU holds "consistent-read", "write"\) \(fd \d+\)$/);
    expect(after(py.pid!)).toMatch(/^ +an exclusive POSIX lock on byte 0 \(fd 3\)$/);
    expect(after(flock.pid!)).toMatch(/^ +a shared flock lock on the whole file \(fd \d+\)$/);
    expect(table.filter((l) => l.includes('orphan'))).toEqual([]);

    const r = lockmgr(['run', '--exclusive', fx.path, '--', 'true']);
    expect(r.code).toBe(75);
    const [head, ...rest] = r.stderr.trimEnd().split('\n');
    expect(head).toBe(`lockmgr: ${fx.path} is busy: an exclusive POSIX lock on byte 0 is held by`);
    expect(rest[0]).toMatch(new RegExp(`^  pid ${py.pid} +\\S*python3? -c import fcntl`));
    expect(rest[1]).toBe('also open in:');
    // QEMU's and flock's locks do not conflict with byte 0: they are openers here.
    expect(rest.slice(2).map((l) => Number(/^ {2}pid (\d+) /.exec(l)![1])).sort()).toEqual(
      [qemu.pid!, flock.pid!, ...e.holders!.filter((h) => h.command === 'sleep 1000').map((h) => h.pid)].sort(),
    );
  });

  it('status --lockspace DIR: each lock file names its holders (pid and command) in the table, and in --json', async () => {
    const dir = join(fx.tmp.dir, 'locks');
    mkdirSync(dir, { mode: 0o700 });
    const { argv, ready } = touchThen(fx.tmp.dir, 'sleep 1000');
    const run = await runs.start(['run', '--lockspace', dir, '--exclusive', fx.path, '--', ...argv], { ready });
    const r = lockmgr(['status', '--json', '--lockspace', dir, fx.path]);
    const e = (JSON.parse(r.stdout) as { entries: StatusEntry[] }).entries[0]!;
    const files = e.lockspace!.locations;
    expect(files.map((l) => l.what)).toEqual(['lock file (path)', 'lock file (inode)']);
    for (const l of files) {
      expect(l.holders!.holders.map((h) => [h.kind, h.mode, h.start, h.end])).toEqual([['OFD', 'exclusive', 0, 0], ['OFD', 'exclusive', 0, 0]]);
      expect(l.holders!.holders.map((h) => h.pid)).toContain(run.child.pid);
    }
    const command = files[0]!.holders!.holders.find((h) => h.pid !== run.child.pid)!;
    expect(command.command).toBe('sleep 1000');
    const pids = [run.child.pid!, command.pid].sort((a, b) => a - b);
    const table = lockmgr(['status', '--lockspace', dir, fx.path]).stdout.split('\n');
    for (const l of files) {
      const at = table.findIndex((line) => line.includes(l.path));
      expect(table[at]).toBe(`  ${l.what.padEnd(20)}${l.path}: lease held exclusive (pid ${pids.join(', ')}), guard free`);
      // Each holder on a line of its own, pid then command (a long one abbreviated to fit: its tail is kept).
      const lines = table.slice(at + 1, at + 3);
      expect(lines.map((x) => Number(/^ +pid (\d+) +/.exec(x)?.[1]))).toEqual(pids);
      expect(lines[pids.indexOf(command.pid)]).toMatch(/ sleep 1000$/);
      expect(lines[pids.indexOf(run.child.pid!)]).toMatch(/lockmgr\.js run --lockspace .* -- sh -c /);
    }
    // Every value starts in one column, a space after the longest label: none runs into its label.
    const column = /^ {2}kind +/.exec(table[1]!)![0].length;
    for (const line of table.slice(1).filter((x) => /^ {2}\S/.test(x))) expect([line, line[column - 1], line[column]]).toEqual([line, ' ', expect.stringMatching(/\S/)]);
  });
});

describe.skipIf(!isRoot || !have('setpriv'))('a holder this user may not inspect', () => {
  it('as nobody, a busy run and status report the lock as held by a process lockmgr cannot name, and why; never drop it', async () => {
    // The observer must reach the file: a world-searchable directory, a world-readable file.
    chmodSync(fx.tmp.dir, 0o755);
    chmodSync(fx.path, 0o644);
    const h = await holder();
    const asNobody = (args: string[]) =>
      spawnSync('setpriv', ['--reuid', '65534', '--regid', '65534', '--clear-groups', process.execPath, BIN, ...args], { encoding: 'utf8', timeout: 60_000 });
    const r = asNobody(['run', '--shared', fx.path, '--', 'true']);
    expect(r.status).toBe(75);
    expect(r.stderr.trimEnd().split('\n')).toEqual([
      `lockmgr: ${fx.path} is busy: an exclusive OFD lock on byte 0 is held by`,
      expect.stringMatching(/^  a process lockmgr cannot name: an exclusive OFD lock on byte 0; held by a process this user may not inspect: .*could not be read/),
    ]);
    expect(r.stderr).not.toContain(String(h.pid));
    const s = asNobody(['status', fx.path]);
    expect(s.status).toBe(0);
    expect(s.stdout).toContain('  lease (byte 0)      held exclusive (by a process not named here: see below)');
    expect(s.stdout).toMatch(/^ {2}not named +a process lockmgr cannot name: an exclusive OFD lock on byte 0; /m);
  });
});

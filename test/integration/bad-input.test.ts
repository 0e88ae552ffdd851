// Bad input, table-driven: every case must give its documented typed error
// (class, code, and a message that says what was wrong), and leave nothing
// behind: no fd, no child, no lock on the test files, nothing spawned, nothing
// created. The same bad paths go through openLockable, LockManager
// (registration and hotplug), spawnSupervised and the real CLI binary.
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmodSync, existsSync, mkdirSync, readdirSync, readlinkSync, rmSync, statSync, symlinkSync, unlinkSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import {
  InvalidArgumentError,
  InvalidStateError,
  LockManager,
  LockManagerError,
  ResourceAccessError,
  SpawnError,
  openLockable,
  spawnSupervised,
  type LockableFile,
  type ResourceSpec,
  type SupervisedProcess,
} from '../../lib/index.js';
import { locksOn } from '../../lib/os/proc-locks.js';
import { distUrl, fdCount, isRoot, makeFile, runScript, syscallsOnPaths, tempDir, waitUntil } from '../helpers.js';
import { childrenOf } from '../harness/process-helpers.js';

const BIN = fileURLToPath(new URL('../../bin/lockmgr.js', import.meta.url));
/** A sysfs attribute its owner may write (read-only ones refuse a readwrite open with EACCES first). */
const SYS_FILE = ['/sys/kernel/mm/ksm/run', '/sys/kernel/mm/transparent_hugepage/enabled', '/sys/power/pm_async'].find((p) => {
  try {
    return (statSync(p).mode & 0o200) !== 0;
  } catch {
    return false;
  }
});
if (SYS_FILE === undefined) console.warn('bad-input: skipping the /sys case: no writable sysfs attribute found (ksm, transparent_hugepage, pm_async)');
type ErrorClass = abstract new (...args: never[]) => LockManagerError;

// ---------------------------------------------------------------------------
// Fixtures: one directory of odd files for the whole file, and a manager that
// runs a child for the hotplug cases.

let tmp: ReturnType<typeof tempDir>;
let disk: string; // a regular file: the subject of every "nothing held" check
let observer: LockableFile; // sees any lock on disk
let server: Server;
const P: Record<string, string> = {};
let hot: LockManager; // running, for acquireResource()
let hotChild: number;

beforeAll(async () => {
  tmp = tempDir();
  chmodSync(tmp.dir, 0o755);
  disk = makeFile(tmp.dir, 'disk.img');
  observer = openLockable(disk, { access: 'read' });
  P.dir = join(tmp.dir, 'a-dir');
  mkdirSync(P.dir);
  P.fifo = join(tmp.dir, 'fifo');
  execFileSync('mkfifo', [P.fifo]);
  P.socket = join(tmp.dir, 'socket');
  server = createServer();
  await new Promise<void>((resolve) => server.listen(P.socket, resolve));
  P.dangling = join(tmp.dir, 'dangling');
  symlinkSync(join(tmp.dir, 'nowhere'), P.dangling);
  P.loop = join(tmp.dir, 'loop-a');
  symlinkSync(join(tmp.dir, 'loop-b'), P.loop);
  symlinkSync(P.loop, join(tmp.dir, 'loop-b'));
  P.missing = join(tmp.dir, 'missing.img');
  P.underFile = join(disk, 'child.img');
  // Writable by their owner, so that a readwrite open gets as far as the type check.
  P.proc = '/proc/self/comm';
  P.sys = SYS_FILE ?? '/sys/kernel/mm/ksm/run';
  P.devnull = '/dev/null';
  // 4,095 bytes: passes the length check, made of short components that do not exist.
  P.len4095 = `/${'a'.repeat(200)}`.repeat(20) + `/${'b'.repeat(4095 - 201 * 20 - 1)}`;
  P.component256 = join(tmp.dir, 'c'.repeat(256));
  // Warm up what the first use of supervision and of the CLI creates once per process.
  const warm = spawnSupervised('true', [], { stdio: 'ignore' });
  await warm.exited;
  hot = new LockManager();
  hot.registerResource({ type: 'disk', path: makeFile(tmp.dir, 'hot.img'), mode: 'exclusive' });
  await hot.start('sleep', ['1000'], { stdio: 'ignore' });
  hotChild = hot.getChild().pid;
});

// A case that wrongly made the running manager acquire something fails itself;
// releasing it here keeps the failure from spreading to every later case.
afterEach(async () => {
  for (const r of hot?.state === 'running' ? hot.resources : []) {
    if (!r.path.endsWith('hot.img')) await hot.releaseResource({ type: 'disk', path: r.path });
  }
});

afterAll(async () => {
  await hot?.free();
  observer?.close();
  server?.close();
  tmp?.cleanup();
});

// ---------------------------------------------------------------------------
// The leak check every case runs.

interface Snapshot {
  fds: number;
  children: number[];
  locks: string;
}

function locksOnTestFiles(): string {
  return JSON.stringify(locksOn(disk));
}

function snapshot(): Snapshot {
  return { fds: fdCount(), children: childrenOf().sort(), locks: locksOnTestFiles() };
}

async function expectNothingLeft(before: Snapshot): Promise<void> {
  expect(fdCount(), 'fds').toBe(before.fds);
  // A child that failed before execve is reaped from the event loop: give it the turn.
  await waitUntil(() => JSON.stringify(childrenOf().sort()) === JSON.stringify(before.children), 5_000, 'children to be back to the baseline');
  expect(childrenOf().sort(), 'children').toEqual(before.children);
  expect(locksOnTestFiles(), '/proc/locks on the test file').toBe(before.locks);
  expect(observer.getConflict('exclusive'), 'a lock on the test file').toBeNull();
  expect(hot.state, 'the running manager').toBe('running');
  expect(hot.getChild().pid).toBe(hotChild);
  expect(hot.resources.map((r) => [r.path.endsWith('hot.img'), r.held]), 'the running manager holds only its own').toEqual([[true, true]]);
}

async function caught(fn: () => unknown): Promise<unknown> {
  try {
    await fn();
  } catch (err) {
    return err;
  }
  return undefined;
}

interface Expectation {
  error: ErrorClass;
  message: RegExp;
  /** The system error's code, for errors that came from a system call. */
  cause?: string;
}

/** Runs `fn`, asserts the error it throws (or rejects with), then that nothing was left behind. */
async function expectFailure(fn: () => unknown, x: Expectation, cleanup?: () => Promise<void> | void): Promise<void> {
  const before = snapshot();
  const err = (await caught(fn)) as LockManagerError & { cause?: { code?: string } };
  await cleanup?.();
  expect(err, 'it must fail').toBeInstanceOf(LockManagerError);
  expect(err.name).toBe(x.error.name);
  expect(err).toBeInstanceOf(x.error);
  expect(err.code).toBe(CODES[x.error.name]);
  expect(err.message).toMatch(x.message);
  if (x.cause !== undefined) expect(err.cause?.code).toBe(x.cause);
  await expectNothingLeft(before);
}

const CODES: Record<string, string> = {
  InvalidArgumentError: 'ERR_INVALID_ARGUMENT',
  ResourceAccessError: 'ERR_RESOURCE_ACCESS',
  InvalidStateError: 'ERR_INVALID_STATE',
  SpawnError: 'ERR_SPAWN',
  UnsupportedError: 'ERR_UNSUPPORTED',
  ResourceBusyError: 'ERR_RESOURCE_BUSY',
};

/** registerResource on a fresh manager: it must throw, and the manager must be left 'new' with nothing registered. */
async function register(spec: unknown): Promise<void> {
  const m = new LockManager();
  try {
    m.registerResource(spec as never);
  } finally {
    expect(m.state).toBe('new');
    expect(m.resources).toEqual([]);
    await m.free();
  }
}

function cli(args: string[], options: { uid?: number } = {}): { code: number | null; stdout: string; stderr: string } {
  const argv = options.uid === undefined ? [process.execPath, BIN, ...args] : ['setpriv', `--reuid=${options.uid}`, `--regid=${options.uid}`, '--clear-groups', process.execPath, BIN, ...args];
  const r = spawnSync(argv[0]!, argv.slice(1), { encoding: 'utf8', timeout: 30_000, killSignal: 'SIGKILL' });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** `lockmgr run ARGS -- touch MARKER`: the exit code and message, and the marker must not appear. */
async function expectCliRun(args: string[], exit: number, message: RegExp, options: { uid?: number } = {}): Promise<void> {
  const before = snapshot();
  const marker = join(tmp.dir, `spawned-${process.hrtime.bigint()}`);
  const r = cli(['run', ...args, '--', 'touch', marker], options);
  expect(r.code, r.stderr).toBe(exit);
  expect(r.stderr).toMatch(/^lockmgr: /);
  expect(r.stderr).toMatch(message);
  expect(existsSync(marker), 'the command must not have run').toBe(false);
  await expectNothingLeft(before);
}

function statusEntry(path: string, options: { uid?: number } = {}): { code: number | null; error: { code: string; message: string } | undefined } {
  const r = cli(['status', '--json', path], options);
  const doc = JSON.parse(r.stdout) as { entries: Array<{ error?: { code: string; message: string } }> };
  return { code: r.code, error: doc.entries[0]?.error };
}

// ---------------------------------------------------------------------------
// Paths, through every entry point that takes one.

interface PathCase {
  label: string;
  path: () => string;
  /** What openLockable / registerResource / acquireResource throw. */
  api: Expectation;
  /** `lockmgr run --exclusive PATH`: exit code (null: argv cannot carry it). */
  run: number | null;
  /** The code of `lockmgr status --json PATH`'s error entry (null: argv cannot carry it). */
  status: string | null;
  /** What the CLI says, where it differs from the API (it resolves a relative PATH, and names its flags). */
  cli?: RegExp;
}

const IAE = InvalidArgumentError;
const RAE = ResourceAccessError;

const pathCases: PathCase[] = [
  // The CLI takes a relative PATH from its working directory (where no disk.img is).
  { label: 'a relative path', path: () => 'disk.img', api: { error: IAE, message: /path must be absolute, got "disk\.img"/ }, run: 66, status: 'ERR_RESOURCE_ACCESS', cli: /cannot open '\/.*disk\.img'.*ENOENT/ },
  { label: 'an empty path', path: () => '', api: { error: IAE, message: /path must not be empty/ }, run: 64, status: 'ERR_INVALID_ARGUMENT', cli: /--exclusive needs a PATH, got ''|path must not be empty/ },
  { label: 'a path with a NUL byte', path: () => `${disk}\0x`, api: { error: IAE, message: /must not contain a NUL byte/ }, run: null, status: null },
  { label: 'a path of 4,097 bytes', path: () => `/${'a'.repeat(4096)}`, api: { error: IAE, message: /is 4097 bytes long; Linux allows at most 4095/ }, run: 66, status: 'ERR_INVALID_ARGUMENT' },
  { label: 'a path of exactly 4,096 bytes (PATH_MAX counts the NUL)', path: () => `/${'a'.repeat(4095)}`, api: { error: IAE, message: /is 4096 bytes long/ }, run: 66, status: 'ERR_INVALID_ARGUMENT' },
  { label: 'a path of 4,095 bytes that does not exist (passes the length check)', path: () => P.len4095!, api: { error: RAE, message: /cannot open '\/a+/, cause: 'ENOENT' }, run: 66, status: 'ERR_RESOURCE_ACCESS' },
  { label: 'a path component of 256 bytes', path: () => P.component256!, api: { error: RAE, message: /ENAMETOOLONG: name too long/, cause: 'ENAMETOOLONG' }, run: 66, status: 'ERR_RESOURCE_ACCESS' },
  { label: 'a missing file', path: () => P.missing!, api: { error: RAE, message: /cannot open '.*missing\.img'.*ENOENT/, cause: 'ENOENT' }, run: 66, status: 'ERR_RESOURCE_ACCESS' },
  { label: 'a regular file used as a directory', path: () => P.underFile!, api: { error: RAE, message: /ENOTDIR: not a directory/, cause: 'ENOTDIR' }, run: 66, status: 'ERR_RESOURCE_ACCESS' },
  { label: 'a directory', path: () => P.dir!, api: { error: RAE, message: /'.*a-dir'.*EISDIR/, cause: 'EISDIR' }, run: 66, status: 'ERR_RESOURCE_ACCESS' },
  { label: 'a FIFO', path: () => P.fifo!, api: { error: IAE, message: /is a FIFO; only regular files and block devices can be locked/ }, run: 66, status: 'ERR_INVALID_ARGUMENT' },
  { label: 'a unix socket', path: () => P.socket!, api: { error: IAE, message: /is a socket; only regular files and block devices can be locked \(it was not opened\)/ }, run: 66, status: 'ERR_INVALID_ARGUMENT' },
  { label: 'a /proc file (/proc/self/comm: another file in every process)', path: () => P.proc!, api: { error: IAE, message: /'\/proc\/self\/comm' is on proc, a pseudo filesystem/ }, run: 66, status: 'ERR_INVALID_ARGUMENT' },
  ...(SYS_FILE === undefined ? [] : [{ label: `a /sys file (${SYS_FILE})`, path: () => P.sys!, api: { error: IAE, message: /is on sysfs, a pseudo filesystem/ }, run: 66, status: 'ERR_INVALID_ARGUMENT' }]),
  { label: '/dev/null (a character device)', path: () => P.devnull!, api: { error: IAE, message: /'\/dev\/null' is a character device/ }, run: 66, status: 'ERR_INVALID_ARGUMENT' },
  { label: 'a dangling symlink', path: () => P.dangling!, api: { error: RAE, message: /'.*dangling'.*ENOENT/, cause: 'ENOENT' }, run: 66, status: 'ERR_RESOURCE_ACCESS' },
  { label: 'a symlink loop', path: () => P.loop!, api: { error: RAE, message: /ELOOP: too many symbolic links/, cause: 'ELOOP' }, run: 66, status: 'ERR_RESOURCE_ACCESS' },
];

describe('paths', () => {
  for (const c of pathCases) {
    describe(c.label, () => {
      it('openLockable(readwrite)', () => expectFailure(() => openLockable(c.path()), c.api));
      it('openLockable(read)', () => expectFailure(() => openLockable(c.path(), { access: 'read' }), c.api));
      it('LockManager.registerResource(exclusive)', () => expectFailure(() => register({ type: 'disk', path: c.path(), mode: 'exclusive' }), c.api));
      it('LockManager.registerResource(readonly)', () => expectFailure(() => register({ type: 'disk', path: c.path(), mode: 'readonly' }), c.api));
      it('LockManager.acquireResource (hotplug): non-fatal, the manager runs on', () =>
        expectFailure(() => hot.acquireResource({ type: 'disk', path: c.path(), mode: 'shared' }), c.api));
      if (c.run !== null) {
        it(`lockmgr run --exclusive PATH exits ${c.run}`, () => expectCliRun(['--exclusive', c.path()], c.run!, c.cli ?? c.api.message));
      }
      if (c.status !== null) {
        it(`lockmgr status PATH exits 66 with an ${c.status} entry`, async () => {
          const before = snapshot();
          const s = statusEntry(c.path());
          expect(s.code).toBe(66);
          expect(s.error?.code).toBe(c.status);
          expect(s.error?.message).toMatch(c.cli ?? c.api.message);
          await expectNothingLeft(before);
        });
      }
    });
  }

  describe('spawnSupervised: bad commands and working directories', () => {
    const spawnCases: Array<[string, () => SupervisedProcess, Expectation]> = [
      ['an empty command', () => spawnSupervised(''), { error: IAE, message: /command must not be empty/ }],
      ['a command with a NUL byte', () => spawnSupervised('tr\0ue'), { error: IAE, message: /command must not contain a NUL byte/ }],
      ['a command that is not a string', () => spawnSupervised(42 as never), { error: IAE, message: /command must be a string, got 42/ }],
      ['a missing command', () => spawnSupervised(P.missing!), { error: SpawnError, message: /cannot spawn '.*missing\.img': ENOENT/, cause: 'ENOENT' }],
      ['a command not found in PATH', () => spawnSupervised('no-such-command-lockmgr', [], { env: { PATH: tmp.dir } }), { error: SpawnError, message: /ENOENT.*execve/, cause: 'ENOENT' }],
      ['a directory as the command', () => spawnSupervised(P.dir!), { error: SpawnError, message: /EACCES: permission denied, execve/, cause: 'EACCES' }],
      ['/dev/null as the command', () => spawnSupervised('/dev/null'), { error: SpawnError, message: /EACCES/, cause: 'EACCES' }],
      ['a data file without the execute bit as the command', () => spawnSupervised(disk), { error: SpawnError, message: /EACCES/, cause: 'EACCES' }],
      ['a symlink loop as the command', () => spawnSupervised(P.loop!), { error: SpawnError, message: /ELOOP/, cause: 'ELOOP' }],
      ['a command path of 5,000 bytes', () => spawnSupervised(`/${'a'.repeat(5000)}`), { error: SpawnError, message: /ENAMETOOLONG/, cause: 'ENAMETOOLONG' }],
      ['a missing cwd', () => spawnSupervised('true', [], { cwd: P.missing! }), { error: SpawnError, message: /ENOENT: no such file or directory, chdir/, cause: 'ENOENT' }],
      ['a regular file as cwd', () => spawnSupervised('true', [], { cwd: disk }), { error: SpawnError, message: /ENOTDIR: not a directory, chdir/, cause: 'ENOTDIR' }],
      ['a cwd with a NUL byte', () => spawnSupervised('true', [], { cwd: '/tmp\0' }), { error: IAE, message: /cwd must not contain a NUL byte/ }],
      ['a cwd of 4,097 bytes', () => spawnSupervised('true', [], { cwd: `/${'a'.repeat(4096)}` }), { error: IAE, message: /cwd is 4097 bytes long/ }],
      ['a cwd that is not a string', () => spawnSupervised('true', [], { cwd: 7 as never }), { error: IAE, message: /cwd must be a string, got 7/ }],
    ];
    for (const [label, fn, x] of spawnCases) it(label, () => expectFailure(fn, x));
  });
});

// ---------------------------------------------------------------------------
// Host safety (issue 18, part 3): opening a character device can act (a
// watchdog arms, a tape rewinds). What a path names is decided through an
// O_PATH descriptor, which opens nothing; a device is never opened for I/O.

describe('a character device is never opened', () => {
  const cli = fileURLToPath(new URL('../../bin/lockmgr.js', import.meta.url));
  const cases: Array<[string, string[]]> = [
    ['openLockable', ['--input-type=module', '-e', `import { openLockable } from ${JSON.stringify(distUrl)}; try { openLockable('/dev/zero'); } catch {}`]],
    [
      'registerResource and acquireResource',
      ['--input-type=module', '-e', `import { LockManager } from ${JSON.stringify(distUrl)}; const m = new LockManager(); try { m.registerResource({ type: 'disk', path: '/dev/zero', mode: 'readonly' }); } catch {} await m.free();`],
    ],
    ['lockmgr status /dev/zero', [cli, 'status', '/dev/zero']],
    ['lockmgr run --exclusive /dev/zero', [cli, 'run', '--exclusive', '/dev/zero', '--', 'true']],
  ];
  for (const [label, args] of cases) {
    it(`${label}: only O_PATH opens of /dev/zero (strace)`, (ctx) => {
      const calls = syscallsOnPaths(args, ['/dev/zero']);
      if (calls === null) {
        console.log('skipped: strace is not installed');
        return ctx.skip();
      }
      expect(calls.length, 'the path was looked at').toBeGreaterThan(0);
      expect(calls.filter((line) => !line.includes('O_PATH'))).toEqual([]);
    });
  }
});

// ---------------------------------------------------------------------------
// A file deleted while it is locked.

describe('a file deleted while locked', () => {
  it('openLockable of its path fails with ResourceAccessError (ENOENT); the holder keeps its lock and releases it cleanly', async () => {
    const path = makeFile(tmp.dir, 'deleted-1.img');
    const holder = openLockable(path);
    expect(holder.tryLock('exclusive', { start: 0, length: 1 })).toBe(true);
    // An observer on the same inode, reached through the holder's fd.
    const inode = openLockable(`/proc/self/fd/${holder.fd}`, { access: 'read' });
    unlinkSync(path);
    try {
      await expectFailure(() => openLockable(path), { error: RAE, message: /cannot open '.*deleted-1\.img'.*ENOENT/, cause: 'ENOENT' });
      expect(inode.getConflict('shared', { start: 0, length: 1 })).toMatchObject({ mode: 'exclusive', start: 0, length: 1 });
      holder.unlock({ start: 0, length: 1 });
      expect(inode.getConflict('exclusive')).toBeNull();
    } finally {
      holder.close();
      inode.close();
    }
  });

  it('a running manager: hotplug of the path fails with ResourceAccessError, verify() still sees the lease, release works, nothing stays held', async () => {
    const path = makeFile(tmp.dir, 'deleted-2.img');
    const m = new LockManager();
    m.registerResource({ type: 'disk', path, mode: 'exclusive' });
    await m.start('sleep', ['1000'], { stdio: 'ignore' });
    // An observer on the same inode, through the supervisor's own lease fd.
    const inode = openLockable(`/proc/self/fd/${fdOf(path)}`, { access: 'read' });
    unlinkSync(path);
    try {
      const err = await caught(() => m.acquireResource({ type: 'disk', path, mode: 'exclusive' }));
      expect(err).toBeInstanceOf(ResourceAccessError);
      expect((err as Error).message).toMatch(/deleted-2\.img'.*ENOENT/);
      expect(m.state).toBe('running');
      expect(await m.verify()).toEqual({ lost: [] });
      expect(inode.getConflict('shared', { start: 0, length: 1 })).toMatchObject({ mode: 'exclusive' });
      expect(await m.releaseResource({ type: 'disk', path })).toEqual({ wasHeld: true });
      expect(inode.getConflict('exclusive')).toBeNull();
    } finally {
      await m.free();
      inode.close();
    }
  });

  it('lockmgr run: a command that deletes its own image exits 0, with no warning, and leaves nothing locked', async () => {
    const path = makeFile(tmp.dir, 'deleted-3.img');
    const before = snapshot();
    const r = cli(['run', '--exclusive', path, '--', 'rm', path]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toBe('');
    expect(existsSync(path)).toBe(false);
    await expectNothingLeft(before);
  });

  it('lockmgr status of a deleted path exits 66 with an ERR_RESOURCE_ACCESS entry', () => {
    const path = makeFile(tmp.dir, 'deleted-4.img');
    unlinkSync(path);
    const s = statusEntry(path);
    expect(s.code).toBe(66);
    expect(s.error?.code).toBe('ERR_RESOURCE_ACCESS');
    expect(s.error?.message).toMatch(/ENOENT/);
  });
});

/** An fd of this process open on `path`. */
function fdOf(path: string): number {
  for (const fd of readdirSync('/proc/self/fd')) {
    try {
      if (readlinkSync(`/proc/self/fd/${fd}`) === path) return Number(fd);
    } catch {
      // the fd of readdir itself, closed meanwhile
    }
  }
  throw new Error(`this process does not have ${path} open`);
}

// ---------------------------------------------------------------------------
// No permission: a non-root user, through setpriv, in child processes.

const NOBODY = 65534;
const haveSetpriv = spawnSync('setpriv', ['--version']).status === 0;
if (!isRoot || !haveSetpriv) console.warn(`bad-input: skipping the no-permission cases: ${!isRoot ? 'not root (cannot switch user)' : 'setpriv is missing (util-linux)'}`);

describe.skipIf(!isRoot || !haveSetpriv)('no permission (uid 65534 through setpriv)', () => {
  let results: Record<string, { name?: string; code?: string; cause?: string; message?: string; ok?: boolean; fds: number; children: number }>;
  let secret: string;
  let publicRo: string;
  let hidden: string;

  beforeAll(() => {
    secret = makeFile(tmp.dir, 'secret.img');
    chmodSync(secret, 0o600);
    publicRo = makeFile(tmp.dir, 'public.img');
    chmodSync(publicRo, 0o644);
    const closed = join(tmp.dir, 'closed');
    mkdirSync(closed, { mode: 0o700 });
    hidden = makeFile(closed, 'hidden.img');
    chmodSync(hidden, 0o666);
    // Each case in the child: the error, and the child's own fd and child counts before and after.
    const script = `
      import { openLockable, LockManager } from ${JSON.stringify(distUrl)};
      import { readdirSync, readFileSync } from 'node:fs';
      const fds = () => readdirSync('/proc/self/fd').length;
      const parentOf = (pid) => { try { const s = readFileSync('/proc/' + pid + '/stat', 'utf8'); return Number(s.slice(s.lastIndexOf(')') + 2).split(' ')[1]); } catch { return -1; } };
      const kids = () => readdirSync('/proc').filter((p) => /^\\d+$/.test(p) && parentOf(p) === process.pid).length;
      const out = {};
      async function run(label, fn) {
        const f0 = fds();
        try { await fn(); out[label] = { ok: true }; }
        catch (e) { out[label] = { name: e.name, code: e.code, cause: e.cause?.code, message: e.message }; }
        out[label].fds = fds() - f0;
        out[label].children = kids();
      }
      const P = JSON.parse(process.argv[1]);
      await run('read of a 0600 file of root', () => openLockable(P.secret, { access: 'read' }));
      await run('readwrite of a 0644 file of root', () => openLockable(P.publicRo));
      await run('a file in a 0700 directory of root', () => openLockable(P.hidden, { access: 'read' }));
      await run('registerResource(shared) of a 0600 file of root', async () => { const m = new LockManager(); try { m.registerResource({ type: 'disk', path: P.secret, mode: 'shared' }); } finally { await m.free(); } });
      await run('registerResource(exclusive) of a 0644 file of root', async () => { const m = new LockManager(); try { m.registerResource({ type: 'disk', path: P.publicRo, mode: 'exclusive' }); } finally { await m.free(); } });
      await run('the control: read of a 0644 file works', () => openLockable(P.publicRo, { access: 'read' }).close());
      console.log(JSON.stringify(out));
    `;
    const r = spawnSync('setpriv', [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', process.execPath, '--input-type=module', '-e', script, JSON.stringify({ secret, publicRo, hidden })], { encoding: 'utf8' });
    expect(r.stderr).toBe('');
    results = JSON.parse(r.stdout) as typeof results;
  });

  const apiCases = [
    'read of a 0600 file of root',
    'readwrite of a 0644 file of root',
    'a file in a 0700 directory of root',
    'registerResource(shared) of a 0600 file of root',
    'registerResource(exclusive) of a 0644 file of root',
  ];
  for (const label of apiCases) {
    it(`${label}: ResourceAccessError (EACCES), no fd left open in the child`, () => {
      const r = results[label]!;
      expect(r).toMatchObject({ name: 'ResourceAccessError', code: 'ERR_RESOURCE_ACCESS', cause: 'EACCES', fds: 0, children: 0 });
      expect(r.message).toMatch(/cannot open '.*' for reading( and writing)?: EACCES: permission denied/);
    });
  }
  it('the control: the same user may read a 0644 file', () => {
    expect(results['the control: read of a 0644 file works']).toMatchObject({ ok: true, fds: 0 });
  });

  it('lockmgr run --shared on a 0600 file of root exits 66', () => expectCliRun(['--shared', secret], 66, /EACCES: permission denied/, { uid: NOBODY }));
  it('lockmgr run --exclusive on a 0644 file of root exits 66', () => expectCliRun(['--exclusive', publicRo], 66, /for reading and writing: EACCES/, { uid: NOBODY }));
  it('lockmgr status on a file in a 0700 directory exits 66', () => {
    const s = statusEntry(hidden, { uid: NOBODY });
    expect(s.code).toBe(66);
    expect(s.error).toMatchObject({ code: 'ERR_RESOURCE_ACCESS' });
    expect(s.error!.message).toMatch(/EACCES/);
  });
});

// ---------------------------------------------------------------------------
// A read-only filesystem: a loop device with ext4, mounted read-only.

function have(tool: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${tool}`]).status === 0;
}
const roMissing = !isRoot ? 'not root (losetup and mount need root)' : ['losetup', 'mkfs.ext4', 'mount', 'umount'].find((t) => !have(t));
if (roMissing) console.warn(`bad-input: skipping the read-only filesystem cases: ${roMissing === undefined ? '' : roMissing.includes(' ') ? roMissing : `${roMissing} is missing`}`);

describe.skipIf(roMissing !== undefined)('a read-only filesystem (ext4 on a loop device, mounted ro)', () => {
  let base: string;
  let device = '';
  let mnt: string;
  let image: string;

  beforeAll(() => {
    base = join(tmp.dir, 'rofs');
    const src = join(base, 'src');
    mnt = join(base, 'mnt');
    mkdirSync(src, { recursive: true });
    mkdirSync(mnt);
    mkdirSync(join(src, 'locks'));
    writeFileSync(join(src, 'disk.img'), 'x'.repeat(4096));
    const fsImage = join(base, 'fs.img');
    execFileSync('truncate', ['-s', '8M', fsImage]);
    execFileSync('mkfs.ext4', ['-q', '-F', '-d', src, fsImage]);
    device = execFileSync('losetup', ['-f', '--show', fsImage], { encoding: 'utf8' }).trim();
    execFileSync('mount', ['-o', 'ro', device, mnt]);
    image = join(mnt, 'disk.img');
  });

  afterAll(() => {
    if (mnt !== undefined) spawnSync('umount', [mnt]);
    if (device !== '') spawnSync('losetup', ['-d', device]);
    if (base !== undefined) rmSync(base, { recursive: true, force: true });
  });

  const erofs: Expectation = { error: RAE, message: /for reading and writing: EROFS: read-only file system/, cause: 'EROFS' };
  it('openLockable(readwrite): ResourceAccessError (EROFS)', () => expectFailure(() => openLockable(image), erofs));
  it('openLockable(create) of a new lock file: ResourceAccessError (EROFS)', () =>
    expectFailure(() => openLockable(join(mnt, 'locks', 'new.lock'), { create: true }), { error: RAE, message: /cannot create or open .*EROFS/, cause: 'EROFS' }));
  it('registerResource(exclusive): ResourceAccessError (EROFS)', () => expectFailure(() => register({ type: 'disk', path: image, mode: 'exclusive' }), erofs));
  it('acquireResource(exclusive) while running: ResourceAccessError, the manager runs on', () =>
    expectFailure(() => hot.acquireResource({ type: 'disk', path: image, mode: 'exclusive' }), erofs));
  it('an indirect lockspace on the read-only filesystem: registerResource fails with ResourceAccessError (EROFS), nothing created', async () => {
    await expectFailure(
      async () => {
        const m = new LockManager({ lockspace: { kind: 'indirect', dir: join(mnt, 'locks') } });
        try {
          m.registerResource({ type: 'disk', path: disk, mode: 'shared' });
        } finally {
          await m.free();
        }
      },
      { error: RAE, message: /EROFS/, cause: 'EROFS' },
    );
    expect(readdirSync(join(mnt, 'locks'))).toEqual([]);
  });
  it('lockmgr run --exclusive exits 66', () => expectCliRun(['--exclusive', image], 66, /EROFS: read-only file system/));
  it('the control: a shared lease needs only read access, and works', async () => {
    const before = snapshot();
    const m = new LockManager();
    m.registerResource({ type: 'disk', path: image, mode: 'shared' });
    await m.start('true', [], { stdio: 'ignore' });
    await m.free();
    expect(cli(['run', '--shared', image, '--', 'true']).code).toBe(0);
    await expectNothingLeft(before);
  });
});

// ---------------------------------------------------------------------------
// Ranges, through every method that takes one.

const badRanges: Array<[string, unknown, RegExp]> = [
  ['a negative start', { start: -1, length: 1 }, /range\.start must be a non-negative safe integer, got -1/],
  ['a negative length', { start: 0, length: -1 }, /range\.length must be a non-negative safe integer, got -1/],
  ['a NaN start', { start: Number.NaN }, /range\.start .* got NaN/],
  ['a NaN length', { length: Number.NaN }, /range\.length .* got NaN/],
  ['an Infinity start', { start: Number.POSITIVE_INFINITY }, /range\.start .* got Infinity/],
  ['an Infinity length', { length: Number.POSITIVE_INFINITY }, /range\.length .* got Infinity/],
  ['a -Infinity start', { start: Number.NEGATIVE_INFINITY }, /got -Infinity/],
  ['a start of 2^63', { start: 2 ** 63 }, /range\.start .* got 9223372036854776000/],
  ['a length of 2^63', { length: 2 ** 63 }, /range\.length .* got 9223372036854776000/],
  ['a start of 2^53 (not a safe integer)', { start: 2 ** 53 }, /range\.start .* got 9007199254740992/],
  ['a fractional start', { start: 1.5, length: 1 }, /range\.start .* got 1\.5/],
  ['a fractional length', { start: 0, length: 0.5 }, /range\.length .* got 0\.5/],
  ['a start given as a string', { start: '1' }, /range\.start .* got "1"/],
  ['a start given as a bigint', { start: 1n }, /range\.start .* got 1n/],
  ['an unknown key', { start: 0, len: 1 }, /range has an unknown key 'len'/],
  ['null', null, /range must be an object \{ start, length \}, got null/],
  ['a number', 5, /range must be an object \{ start, length \}, got 5/],
  ['an empty array', [], /range must be an object \{ start, length \}, got an array/],
  ['a tuple [start, length]', [0, 1], /range must be an object \{ start, length \}, got an array/],
];

describe('ranges', () => {
  let file: LockableFile;
  beforeAll(() => {
    file = openLockable(disk);
  });
  afterAll(() => file.close());
  const methods: Array<[string, (range: unknown) => unknown]> = [
    ['tryLock', (r) => file.tryLock('exclusive', r as never)],
    ['lock', (r) => file.lock('exclusive', r as never, { timeout: 0 })],
    ['unlock', (r) => file.unlock(r as never)],
    ['getConflict', (r) => file.getConflict('shared', r as never)],
  ];
  for (const [label, range, message] of badRanges) {
    for (const [method, call] of methods) {
      it(`${method}: ${label}`, () => expectFailure(() => call(range), { error: IAE, message }));
    }
  }
  it('the largest safe range is accepted, and released (control)', async () => {
    const before = snapshot();
    expect(file.tryLock('exclusive', { start: 2 ** 53 - 1, length: 2 ** 53 - 1 })).toBe(true);
    expect(observer.getConflict('shared', { start: 2 ** 53 - 1, length: 1 })).toMatchObject({ mode: 'exclusive' });
    file.unlock({ start: 2 ** 53 - 1, length: 2 ** 53 - 1 });
    await expectNothingLeft(before);
  });
  it('a bad mode', () => expectFailure(() => file.tryLock('write' as never), { error: IAE, message: /mode must be 'exclusive' or 'shared', got "write"/ }));
});

// ---------------------------------------------------------------------------
// Options: unknown keys and wrong types.

describe('options', () => {
  const optionCases: Array<[string, () => unknown, RegExp]> = [
    ['openLockable: an unknown key', () => openLockable(disk, { acces: 'read' } as never), /openLockable options has an unknown option 'acces'/],
    ['openLockable: options not an object', () => openLockable(disk, 'read' as never), /openLockable options must be an object, got "read"/],
    ['openLockable: options null', () => openLockable(disk, null as never), /must be an object, got null/],
    ['openLockable: access not a known mode', () => openLockable(disk, { access: 'write' as never }), /access must be one of 'read', 'readwrite', got "write"/],
    ['openLockable: create not a boolean', () => openLockable(disk, { create: 'yes' as never }), /create must be a boolean, got "yes"/],
    ['openLockable: create with access read', () => openLockable(disk, { create: true, access: 'read' }), /create needs access 'readwrite'/],
    ['openLockable: a path that is a Buffer', () => openLockable(Buffer.from(disk) as never), /path must be a string, a file descriptor or a FileHandle, got an object/],
    ['lock(): an unknown option', () => withFile((f) => f.lock('shared', undefined, { timeout: 0, wait: true } as never)), /lock options has an unknown option 'wait'/],
    ['lock(): a negative timeout', () => withFile((f) => f.lock('shared', undefined, { timeout: -1 })), /timeout must be a finite number of milliseconds >= 0, got -1/],
    ['lock(): a NaN timeout', () => withFile((f) => f.lock('shared', undefined, { timeout: Number.NaN })), /timeout must be .* got NaN/],
    ['lock(): a string timeout', () => withFile((f) => f.lock('shared', undefined, { timeout: '5' as never })), /timeout must be .* got "5"/],
    ['lock(): a signal that is not an AbortSignal', () => withFile((f) => f.lock('shared', undefined, { signal: {} as never })), /signal must be an AbortSignal, got an object/],
    ['LockManager: an unknown key', () => new LockManager({ lifetime: 'child' } as never), /LockManager options has an unknown option 'lifetime'/],
    ['LockManager: options not an object', () => new LockManager(7 as never), /LockManager options must be an object, got 7/],
    ['LockManager: an unknown lockLifetime', () => new LockManager({ lockLifetime: 'forever' as never }), /lockLifetime must be one of 'child', 'supervisor', got "forever"/],
    ['LockManager: an unknown onLockFailure', () => new LockManager({ onLockFailure: 'explode' as never }), /onLockFailure must be one of 'poweroff', 'pause', 'ignore', got "explode"/],
    ['LockManager: verifyInterval 0', () => new LockManager({ verifyInterval: 0 }), /verifyInterval must be > 0/],
    ['LockManager: a negative verifyInterval', () => new LockManager({ verifyInterval: -5 }), /verifyInterval must be .* got -5/],
    ['LockManager: verifyInterval beyond what a timer can hold (it would fire every millisecond)', () => new LockManager({ verifyInterval: 2 ** 31 }), /verifyInterval must be at most 2147483647 ms, got 2147483648/],
    ['LockManager: attach not a number', () => new LockManager({ attach: '123' as never }), /attach must be a process id \(an integer > 0\), got "123"/],
    ['LockManager: attach 0', () => new LockManager({ attach: 0 }), /attach must be a process id .* got 0/],
    ['LockManager: attach a fraction', () => new LockManager({ attach: 1.5 }), /attach must be a process id .* got 1\.5/],
    ['LockManager: attach beyond any pid (2^40)', () => new LockManager({ attach: 2 ** 40 }), /attach must be a process id .* got 1099511627776/],
    ['LockManager: attach with lockLifetime child', () => new LockManager({ attach: process.pid, lockLifetime: 'child' }), /lockLifetime 'child' cannot be used with attach/],
    ['LockManager: flags.migrate not a boolean', () => new LockManager({ flags: { migrate: 'yes' as never } }), /flags\.migrate must be a boolean, got "yes"/],
    ['LockManager: an unknown flag', () => new LockManager({ flags: { restrict: true } as never }), /flags has an unknown option 'restrict'/],
    ['LockManager: flags.migrate with attach', () => new LockManager({ flags: { migrate: true }, attach: process.pid }), /flags\.migrate cannot be used with attach/],
    ['LockManager: an unknown lockspace kind', () => new LockManager({ lockspace: { kind: 'nfs' } as never }), /lockspace\.kind must be one of 'direct', 'indirect', 'sanlock', got "nfs"/],
    ['LockManager: a direct lockspace with a dir', () => new LockManager({ lockspace: { kind: 'direct', dir: tmp.dir } as never }), /lockspace\.dir is for kind 'indirect'/],
    ['LockManager: an indirect lockspace without a dir', () => new LockManager({ lockspace: { kind: 'indirect' } as never }), /lockspace\.dir must be a string, got undefined/],
    ['LockManager: an indirect lockspace with a relative dir', () => new LockManager({ lockspace: { kind: 'indirect', dir: 'locks' } }), /lockspace\.dir must be absolute, got "locks"/],
    ['LockManager: an indirect lockspace dir that is a file', () => new LockManager({ lockspace: { kind: 'indirect', dir: disk } }), /lockspace dir '.*disk\.img' is not a directory/],
    ['LockManager: params not an object', () => new LockManager({ params: 'vm1' as never }), /params must be an object, got "vm1"/],
    ['LockManager: an unknown param', () => new LockManager({ params: { colour: 'red' } as never }), /params has an unknown option 'colour'/],
    ['LockManager: a negative id', () => new LockManager({ params: { id: -1 } }), /params\.id must be an integer >= 0, got -1/],
    ['LockManager: a fractional id', () => new LockManager({ params: { id: 1.5 } }), /params\.id must be an integer >= 0, got 1\.5/],
    ['LockManager: an id given as a string', () => new LockManager({ params: { id: '1' as never } }), /params\.id must be an integer >= 0, got "1"/],
    ['LockManager: an empty name', () => new LockManager({ params: { name: '' } }), /params\.name must be a non-empty string without NUL bytes/],
    ['LockManager: a name with a NUL byte', () => new LockManager({ params: { name: 'vm\0' } }), /params\.name must be a non-empty string without NUL bytes/],
    ['LockManager: a uri that is not a string', () => new LockManager({ params: { uri: 5 as never } }), /params\.uri must be a non-empty string without NUL bytes, got 5/],
    ['registerResource: an unknown key', () => register({ type: 'disk', path: disk, mode: 'exclusive', readOnly: true }), /resource has an unknown option 'readOnly'/],
    ['registerResource: an unknown type', () => register({ type: 'cdrom', path: disk, mode: 'exclusive' }), /resource\.type must be one of 'disk', 'lease', got "cdrom"/],
    ['registerResource: no mode', () => register({ type: 'disk', path: disk }), /resource\.mode must be one of 'exclusive', 'shared', 'readonly'/],
    ['registerResource: an unknown mode', () => register({ type: 'disk', path: disk, mode: 'write' }), /resource\.mode must be one of .* got "write"/],
    ['registerResource: qemuCompatible not a boolean', () => register({ type: 'disk', path: disk, mode: 'shared', qemuCompatible: 1 }), /resource\.qemuCompatible must be a boolean, got 1/],
    ['registerResource: lease keys on a disk', () => register({ type: 'disk', path: disk, mode: 'shared', key: 'k' }), /resource has an unknown option 'key'/],
    ['registerResource: a spec that is not an object', () => register('disk'), /resource must be an object, got "disk"/],
    ['registerResource: no spec', () => register(undefined), /resource is required/],
    ['start: options with an unknown key', () => freshStart((m) => m.start('true', [], {}, { wait: true } as never)), /start options has an unknown option 'wait'/],
    ['start: a negative timeout', () => freshStart((m) => m.start('true', [], {}, { timeout: -1 })), /timeout must be a finite number .* got -1/],
    ['start: a signal that is not an AbortSignal', () => freshStart((m) => m.start('true', [], {}, { signal: 'abort' as never })), /signal must be an AbortSignal, got "abort"/],
    ['start: no command', () => freshStart((m) => m.start()), /start\(\) needs a command, got undefined/],
    ['start: spawn options null', () => freshStart((m) => m.start('true', [], null as never)), /spawn options must be an object, got null/],
    ['start: an unknown spawn option (after the leases were taken: released)', () => freshStart((m) => m.start('true', [], { shell: true } as never)), /spawnSupervised options has an unknown option 'shell'/],
    ['start: lifetime supervisor with another parentDeathSignal', () => freshStart((m) => m.start('true', [], { parentDeathSignal: 'SIGTERM' }), { lockLifetime: 'supervisor' }), /lockLifetime 'supervisor' kills the child with SIGKILL/],
    ['spawnSupervised: an unknown option', () => spawnSupervised('true', [], { detached: true } as never), /spawnSupervised options has an unknown option 'detached'/],
    ['spawnSupervised: stdio not a known kind', () => spawnSupervised('true', [], { stdio: 'bogus' as never }), /stdio must be 'inherit', 'ignore', 'pipe' or an array of three, got "bogus"/],
    ['spawnSupervised: stdio of two entries', () => spawnSupervised('true', [], { stdio: ['pipe', 'pipe'] as never }), /an array of three entries/],
    ['spawnSupervised: stdio with a hole', () => spawnSupervised('true', [], { stdio: ['pipe', , 'pipe'] as never }), /stdio\[1\] must be 'inherit', 'ignore', 'pipe' or an fd number, got undefined/],
    ['spawnSupervised: stdio with an fd that is not open', () => spawnSupervised('true', [], { stdio: ['ignore', 999_999, 'ignore'] }), /stdio\[1\] is fd 999999, which is not open/],
    ['spawnSupervised: keepFds with fd 2', () => spawnSupervised('true', [], { keepFds: [2] }), /keepFds\[0\] must be an integer fd >= 3, got 2/],
    ['spawnSupervised: keepFds with an fd that is not open', () => spawnSupervised('true', [], { keepFds: [999_999] }), /keepFds\[0\] is fd 999999, which is not open/],
    ['spawnSupervised: keepFds not an array', () => spawnSupervised('true', [], { keepFds: 5 as never }), /keepFds must be an array of fd numbers, got 5/],
    ['spawnSupervised: newSession not a boolean', () => spawnSupervised('true', [], { newSession: 1 as never }), /newSession must be a boolean, got 1/],
    ['spawnSupervised: env an array', () => spawnSupervised('true', [], { env: ['A=b'] as never }), /env must be an object of strings, got an array/],
    ['spawnSupervised: args not an array', () => spawnSupervised('true', 'x' as never), /args must be an array of strings, got "x"/],
    ['spawnSupervised: an argument that is not a string', () => spawnSupervised('echo', ['a', 5 as never]), /args\[1\] must be a string, got 5/],
    ['shutdown: an unknown option', () => new LockManager().shutdown({ grace: 1 } as never), /shutdown options has an unknown option 'grace'/],
    ['shutdown: a negative graceMs', () => new LockManager().shutdown({ graceMs: -1 }), /graceMs must be a finite number .* got -1/],
    ['completeMigrateOut: an unknown option', () => new LockManager().completeMigrateOut('qemu+ssh://b/system', { force: true } as never), /completeMigrateOut options has an unknown option 'force'/],
    ['completeMigrateOut: cancel not a boolean', () => new LockManager().completeMigrateOut('qemu+ssh://b/system', { cancel: 'yes' as never }), /cancel must be a boolean, got "yes"/],
    ['prepareMigrate: an empty URI', () => new LockManager().prepareMigrate(''), /targetUri must be a non-empty string without NUL bytes, got ""/],
    ['completeMigrateIn: a URI with a NUL byte', () => new LockManager().completeMigrateIn('qemu\0'), /sourceUri must be a non-empty string without NUL bytes/],
    ['setParameter: an unknown key', () => new LockManager().setParameter('colour' as never, 'red' as never), /parameter key must be one of 'id', 'uuid', 'name', 'uri', got "colour"/],
    ['acquireResource: an unknown option', () => hot.acquireResource({ type: 'disk', path: disk, mode: 'shared' }, { wait: true } as never), /acquireResource options has an unknown option 'wait'/],
    ['releaseResource: no spec', () => hot.releaseResource(undefined as never), /resource is required/],
  ];
  for (const [label, fn, message] of optionCases) it(label, () => expectFailure(fn, { error: IAE, message }));

  it('a stop() of a supervised process with a bad option leaves it running; a good one stops it', async () => {
    const child = spawnSupervised('sleep', ['1000'], { stdio: 'ignore' });
    try {
      const err = await caught(() => child.stop({ graceMs: Number.NaN }));
      expect(err).toBeInstanceOf(InvalidArgumentError);
      expect((err as Error).message).toMatch(/graceMs must be .* got NaN/);
      expect(child.exitStatus).toBeNull();
      expect(child.signal(0)).toBe(true);
    } finally {
      expect(await child.stop({ graceMs: 0 })).toEqual({ code: null, signal: 'SIGKILL' });
    }
  });
});

function withFile<T>(fn: (f: LockableFile) => T): T {
  const f = openLockable(disk);
  try {
    return fn(f);
  } finally {
    f.close();
  }
}

/** A fresh manager with `disk` registered exclusively; `fn` must fail; after it the manager is 'new' and holds nothing. */
async function freshStart(fn: (m: LockManager) => Promise<unknown>, options: ConstructorParameters<typeof LockManager>[0] = {}): Promise<void> {
  const m = new LockManager(options);
  m.registerResource({ type: 'disk', path: disk, mode: 'exclusive' });
  try {
    await fn(m);
  } finally {
    expect(m.state).toBe('new');
    expect(m.resources.map((r) => r.held)).toEqual([false]);
    expect(observer.getConflict('exclusive')).toBeNull();
    await m.free();
  }
}

// ---------------------------------------------------------------------------
// argv and env with NUL bytes (a real process's argv cannot carry one: the
// CLI cases of NUL are therefore impossible, and are left out).

describe('argv and env with NUL bytes', () => {
  const nulCases: Array<[string, () => unknown, RegExp]> = [
    ['spawnSupervised: an argument', () => spawnSupervised('echo', ['ok', 'a\0b']), /args\[1\] must not contain a NUL byte: "a\\u0000b"/],
    ['spawnSupervised: an env value', () => spawnSupervised('true', [], { env: { A: 'x\0y' } }), /env\.A must not contain a NUL byte/],
    ['spawnSupervised: an env name', () => spawnSupervised('true', [], { env: { 'A\0B': 'x' } }), /an env variable name must not contain a NUL byte/],
    ['spawnSupervised: an env name with =', () => spawnSupervised('true', [], { env: { 'A=B': 'x' } }), /env has an invalid variable name "A=B"/],
    ['spawnSupervised: an empty env name', () => spawnSupervised('true', [], { env: { '': 'x' } }), /env has an invalid variable name ""/],
    ['spawnSupervised: PATH with a NUL byte', () => spawnSupervised('true', [], { env: { PATH: '/bin\0/usr/bin' } }), /env\.PATH must not contain a NUL byte/],
    ['LockManager.start: an argument (checked before any lease is taken; state new)', () => freshStart((m) => m.start('echo', ['a\0b'])), /args\[0\] must not contain a NUL byte/],
    ['LockManager.start: an env value (checked before any lease is taken; state new)', () => freshStart((m) => m.start('true', [], { env: { A: '\0' } })), /env\.A must not contain a NUL byte/],
    ['LockManager.start: the command', () => freshStart((m) => m.start('tr\0ue')), /command must not contain a NUL byte/],
  ];
  for (const [label, fn, message] of nulCases) it(label, () => expectFailure(fn, { error: IAE, message }));
});

// ---------------------------------------------------------------------------
// Unknown signals.

describe('unknown signals', () => {
  let child: SupervisedProcess;
  beforeAll(() => {
    child = spawnSupervised('sleep', ['1000'], { stdio: 'ignore' });
  });
  afterAll(async () => {
    await child[Symbol.asyncDispose]();
  });
  const bad: Array<[string, unknown]> = [
    ['a made-up name', 'SIGFOO'],
    ['a lower-case name', 'sigterm'],
    ['a name without SIG', 'TERM'],
    ['number 65', 65],
    ['a negative number', -1],
    ['a fraction', 1.5],
    ['null', null],
    ['an object', {}],
  ];
  for (const [label, signal] of bad) {
    it(`SupervisedProcess.signal(): ${label}; nothing is sent`, async () => {
      await expectFailure(() => child.signal(signal as never), { error: IAE, message: /signal must be a signal name such as 'SIGTERM' \(or a number 0-64\)/ });
      expect(child.exitStatus).toBeNull();
    });
  }
  it('LockManager.signal(): a made-up name; the child runs on', async () => {
    await expectFailure(() => hot.signal('SIGNOPE' as never), { error: IAE, message: /got "SIGNOPE"/ });
    expect(hot.signal(0)).toBe(true);
  });
  it('LockManager.signal() in state new: InvalidStateError', () => expectFailure(() => new LockManager().signal('SIGTERM'), { error: InvalidStateError, message: /signal\(\) is not allowed in state 'new'/ }));
  it('spawnSupervised: an unknown parentDeathSignal', () =>
    expectFailure(() => spawnSupervised('true', [], { parentDeathSignal: 'SIGFOO' as never }), { error: IAE, message: /parentDeathSignal must be a signal name .* got "SIGFOO"/ }));
  it('spawnSupervised: parentDeathSignal 0', () =>
    expectFailure(() => spawnSupervised('true', [], { parentDeathSignal: 0 as never }), { error: IAE, message: /parentDeathSignal must be a signal name .*\(or a number 1-64\), got 0/ }));
  for (const [label, value, message] of [
    ['not a number', 'abc', /LOCKMGR_WAKE_SIGNAL must be a real-time signal number, got "abc"/],
    ['not a real-time signal (SIGTERM)', '15', /LOCKMGR_WAKE_SIGNAL must be a real-time signal number \(SIGRTMIN\.\.SIGRTMAX\), got 15/],
    ['beyond SIGRTMAX', '99', /got 99/],
  ] as const) {
    it(`LOCKMGR_WAKE_SIGNAL ${label}: the first wait fails with InvalidArgumentError; tryLock still works (in a child process)`, () => {
      const script = `
        import { openLockable } from ${JSON.stringify(distUrl)};
        import { readdirSync } from 'node:fs';
        const fds = readdirSync('/proc/self/fd').length;
        const holder = openLockable(${JSON.stringify(disk)});
        holder.tryLock('exclusive', { start: 7, length: 1 });
        const f = openLockable(${JSON.stringify(disk)});
        let error;
        try { await f.lock('exclusive', { start: 7, length: 1 }, { timeout: 5000 }); } catch (e) { error = { name: e.name, code: e.code, message: e.message }; }
        const free = f.tryLock('exclusive', { start: 8, length: 1 });
        f.close(); holder.close();
        console.log(JSON.stringify({ error, free, fdsLeft: readdirSync('/proc/self/fd').length - fds }));`;
      const out = runScript(script, { LOCKMGR_WAKE_SIGNAL: value }) as { error: { name: string; code: string; message: string }; free: boolean; fdsLeft: number };
      expect(out.error).toMatchObject({ name: 'InvalidArgumentError', code: 'ERR_INVALID_ARGUMENT' });
      expect(out.error.message).toMatch(message);
      expect(out.free).toBe(true);
      expect(out.fdsLeft).toBe(0);
    });
  }
});

// ---------------------------------------------------------------------------
// UUIDs.

describe('malformed uuids', () => {
  const uuids: Array<[string, unknown]> = [
    ['not a uuid', 'not-a-uuid'],
    ['one hex digit short', '12345678-1234-1234-1234-123456789ab'],
    ['non-hex digits', 'zzzzzzzz-1234-1234-1234-123456789abc'],
    ['without dashes', '12345678123412341234123456789abc'],
    ['in braces', '{12345678-1234-1234-1234-123456789abc}'],
    ['with a trailing newline', '12345678-1234-1234-1234-123456789abc\n'],
    ['with a NUL byte', '12345678-1234-1234-1234-123456789abc\0'],
    ['a number', 12345678],
    ['a urn', 'urn:uuid:12345678-1234-1234-1234-123456789abc'],
  ];
  for (const [label, uuid] of uuids) {
    it(`new LockManager: ${label}`, () => expectFailure(() => new LockManager({ params: { uuid: uuid as string } }), { error: IAE, message: /params\.uuid must be a UUID in RFC 4122 text form/ }));
  }
  it('setParameter: a uuid with the dashes in the wrong places', () =>
    expectFailure(() => new LockManager().setParameter('uuid', '1234567-81234-1234-1234-123456789abc'), { error: IAE, message: /params\.uuid must be a UUID/ }));
  it('setParameter after start: InvalidStateError', () =>
    expectFailure(() => hot.setParameter('uuid', '12345678-1234-1234-1234-123456789abc'), { error: InvalidStateError, message: /setParameter\(\) is not allowed in state 'running'/ }));
  it('lockmgr run --uuid exits 64', () => expectCliRun(['--uuid', 'not-a-uuid', '--exclusive', disk], 64, /--uuid needs a UUID .*, got 'not-a-uuid'/));
  it('the control: upper-case hex is a uuid, stored in lower case', () => {
    expect(new LockManager({ params: { uuid: 'ABCDEF01-1234-1234-1234-123456789ABC' } }).params.uuid).toBe('abcdef01-1234-1234-1234-123456789abc');
  });
});

// ---------------------------------------------------------------------------
// Lease names: a lockspace or key with '/' or '..' must never escape the lease directory.

describe("lease lockspace and key names", () => {
  let leases: string;
  beforeAll(() => {
    leases = join(tmp.dir, 'leases');
    mkdirSync(leases, { mode: 0o755 });
  });
  afterEach(() => {
    // Nothing created: not the lockspace directory, not a lock file, anywhere.
    expect(readdirSync(leases)).toEqual([]);
    expect(existsSync(join(tmp.dir, 'etc'))).toBe(false);
  });
  const names: Array<[string, string, string, RegExp]> = [
    ['a key with /', 'ls', 'a/b', /lease key must not contain '\/': "a\/b"/],
    ['a key ..', 'ls', '..', /lease key must not be '\.' or '\.\.'/],
    ['a key .', 'ls', '.', /lease key must not be '\.' or '\.\.'/],
    ['a key ../../etc/passwd', 'ls', '../../etc/passwd', /lease key must not contain '\/'/],
    ['an empty key', 'ls', '', /lease key must not be empty/],
    ['a key with a NUL byte', 'ls', 'k\0', /lease key must not contain a NUL byte/],
    ['a key of 256 bytes', 'ls', 'k'.repeat(256), /lease key is 256 bytes long; a file name has at most 255/],
    ['a lockspace with /', 'a/b', 'k', /lease lockspace must not contain '\/': "a\/b"/],
    ['a lockspace ..', '..', 'k', /lease lockspace must not be '\.' or '\.\.'/],
    ['a lockspace .', '.', 'k', /lease lockspace must not be '\.' or '\.\.'/],
    ['an empty lockspace', '', 'k', /lease lockspace must not be empty/],
  ];
  for (const [label, lockspace, key, message] of names) {
    it(`registerResource: ${label}`, () => expectFailure(() => register({ type: 'lease', lockspace, key, path: leases, mode: 'exclusive' }), { error: IAE, message }));
    it(`acquireResource (hotplug): ${label}`, () => expectFailure(() => hot.acquireResource({ type: 'lease', lockspace, key, path: leases, mode: 'exclusive' }), { error: IAE, message }));
  }
  it('registerResource: a key that is not a string', () => expectFailure(() => register({ type: 'lease', lockspace: 'ls', key: 5, path: leases, mode: 'exclusive' }), { error: IAE, message: /resource\.key must be a string, got 5/ }));
  it('registerResource: a relative lease path', () => expectFailure(() => register({ type: 'lease', lockspace: 'ls', key: 'k', path: 'leases', mode: 'exclusive' }), { error: IAE, message: /resource\.path must be absolute/ }));
  it('registerResource: a lease path that is a symlink', () => {
    const link = join(tmp.dir, 'leases-link');
    if (!existsSync(link)) symlinkSync(leases, link);
    return expectFailure(() => register({ type: 'lease', lockspace: 'ls', key: 'k', path: link, mode: 'exclusive' }), { error: IAE, message: /symbolic link/ });
  });
});

// ---------------------------------------------------------------------------
// Inquire tokens.

describe('inquire tokens', () => {
  let token: string;
  let body: Record<string, unknown>;
  const UUID = '12345678-1234-1234-1234-123456789abc';
  const digest = (text: string): string => createHash('sha256').update(text).digest('hex').slice(0, 16);
  /** A token with a correct digest: only what is inside is wrong. */
  const forge = (manager: string, version: string | number, state: unknown): string => {
    const head = `${manager}.${version}.${Buffer.from(typeof state === 'string' ? state : JSON.stringify(state)).toString('base64url')}`;
    return `${head}.${digest(head)}`;
  };
  beforeAll(async () => {
    const source = new LockManager({ params: { name: 'vm1', uuid: UUID } });
    source.registerResource({ type: 'disk', path: disk, mode: 'exclusive' });
    token = source.inquire();
    await source.free();
    body = JSON.parse(Buffer.from(token.split('.')[2]!, 'base64url').toString('utf8')) as Record<string, unknown>;
  });
  /** The target's own configuration: the disk the source registered. */
  const mine = (): ResourceSpec[] => [{ type: 'disk', path: disk, mode: 'exclusive' }];
  const tokenCases: Array<[string, () => string, RegExp, ErrorClass?]> = [
    ['truncated by a few characters', () => token.slice(0, -3), /its digest does not match: it was truncated or altered/],
    ['truncated to its head', () => token.slice(0, 12), /it is not in the form lockmgr\.VERSION\.STATE\.DIGEST \(truncated\?\)/],
    ['cut before its digest', () => token.slice(0, token.lastIndexOf('.')), /not in the form/],
    ['empty', () => '', /not in the form/],
    ['with a newline appended', () => `${token}\n`, /its digest does not match/],
    ['tampered: one character of the state changed', () => { const i = 20; return token.slice(0, i) + (token[i] === 'A' ? 'B' : 'A') + token.slice(i + 1); }, /its digest does not match/],
    ['tampered: a resource made shared, digest recomputed over the old header', () => { const parts = token.split('.'); parts[2] = Buffer.from(JSON.stringify({ ...body, resources: [{ ...(body.resources as object[])[0], mode: 'shared' }] })).toString('base64url'); return parts.join('.'); }, /its digest does not match/],
    ['from another version (2)', () => forge('lockmgr', 2, { ...body, version: 2 }), /it is version 2, and this lockmgr reads version 1 only/],
    ['from another version (0)', () => forge('lockmgr', 0, { ...body, version: 0 }), /it is version 0/],
    ['from another lock manager (virtlockd)', () => forge('virtlockd', 1, body), /it comes from lock manager 'virtlockd', and this one is 'lockmgr'/],
    ['a header that does not match its state', () => forge('lockmgr', 1, { ...body, version: 2 }), /its state does not match its header/],
    ['a state that is not JSON', () => forge('lockmgr', 1, '{nope'), /its state is not valid base64url JSON/],
    ['a state that is not an object', () => forge('lockmgr', 1, 'null'), /its state is not an object/],
    ['no resources list', () => forge('lockmgr', 1, { ...body, resources: 'all' }), /its resources are not a list/],
    ['a resource without a path', () => forge('lockmgr', 1, { ...body, resources: [{ type: 'disk', mode: 'exclusive' }] }), /resource 0 is not a disk or lease with a path and a mode/],
    ['an unknown lockspace', () => forge('lockmgr', 1, { ...body, lockspace: { kind: 'nfs' } }), /it names no known lockspace/],
    ['a resource with an unknown mode', () => forge('lockmgr', 1, { ...body, resources: [{ type: 'disk', path: disk, mode: 'write', qemuCompatible: false }] }), /resource 0 has an unknown mode "write"/],
    ['a resource with a relative path', () => forge('lockmgr', 1, { ...body, resources: [{ type: 'disk', path: 'disk.img', mode: 'exclusive', qemuCompatible: false }] }), /the token names disk disk\.img \(exclusive\), which this target did not register/],
    ['a resource with an unknown key', () => forge('lockmgr', 1, { ...body, resources: [{ type: 'disk', path: disk, mode: 'exclusive', qemuCompatible: false, evil: true }] }), /resource 0 has an unknown key 'evil'/],
    ['a lease resource whose key escapes with ..', () => forge('lockmgr', 1, { ...body, resources: [{ type: 'lease', lockspace: 'ls', key: '..', path: tmp.dir, mode: 'exclusive' }] }), /the token names lease ls\/\.\. in .*, which this target did not register/],
    ['malformed uuid in its params', () => forge('lockmgr', 1, { ...body, params: { uuid: 'nope' } }), /params\.uuid must be a UUID/],
    ['an unknown param', () => forge('lockmgr', 1, { ...body, params: { owner: 'x' } }), /params has an unknown option 'owner'/],
    ['from an indirect lockspace, for a direct target', () => forge('lockmgr', 1, { ...body, lockspace: { kind: 'indirect', dir: tmp.dir } }), /comes from a lockspace indirect .* and this manager's is direct/],
    ['naming a file this target did not configure', () => forge('lockmgr', 1, { ...body, resources: [{ type: 'disk', path: P.missing, mode: 'exclusive', qemuCompatible: false }] }), /the token names disk .*missing\.img \(exclusive\), which this target did not register/],
    ['naming a FIFO', () => forge('lockmgr', 1, { ...body, resources: [{ type: 'disk', path: P.fifo, mode: 'shared', qemuCompatible: false }] }), /the token names disk .*, which this target did not register/],
    ['a disk made shared', () => forge('lockmgr', 1, { ...body, resources: [{ type: 'disk', path: disk, mode: 'shared', qemuCompatible: false }] }), /the token has disk .* \(shared\), and this target disk .* \(exclusive\)/],
    ['a disk missing from it', () => forge('lockmgr', 1, { ...body, resources: [] }), /this target registered disk .* \(exclusive\), which the source does not hold/],
  ];
  for (const [label, make, message, error = IAE] of tokenCases) {
    it(`fromInquire: ${label}`, () => expectFailure(() => LockManager.fromInquire(make(), { resources: mine() }), { error, message }));
  }
  it('fromInquire: not a string', () => expectFailure(() => LockManager.fromInquire(42 as never, { resources: mine() }), { error: IAE, message: /expected a string from inquire\(\), got 42/ }));
  it('fromInquire: no resources of the target\'s own', () =>
    expectFailure(() => LockManager.fromInquire(token, {} as never), { error: IAE, message: /fromInquire options\.resources must be the target's own list of resources .*, got undefined/ }));
  it('fromInquire: a target resource that is not a resource', () =>
    expectFailure(() => LockManager.fromInquire(token, { resources: [{ type: 'disk', path: disk }] as never }), { error: IAE, message: /resources\[0\]\.mode must be one of/ }));
  it('fromInquire: a target uuid that differs from the token', () =>
    expectFailure(() => LockManager.fromInquire(token, { resources: mine(), params: { uuid: '22345678-1234-1234-1234-123456789abc' } }), { error: IAE, message: /the migration token is for domain 12345678-.*, not "22345678-/ }));
  it('fromInquire: a target option that a target may not have (flags)', () => expectFailure(() => LockManager.fromInquire(token, { resources: mine(), flags: { migrate: false } } as never), { error: IAE, message: /fromInquire options has an unknown option 'flags'/ }));
  it('the control: the untouched token makes a target in state new, holding nothing', async () => {
    const before = snapshot();
    const target = LockManager.fromInquire(token, { resources: mine() });
    expect(target.state).toBe('new');
    expect(target.resources.map((r) => [r.path, r.mode, r.held])).toEqual([[disk, 'exclusive', false]]);
    await target.free();
    await expectNothingLeft(before);
  });
});

// ---------------------------------------------------------------------------
// The CLI: flags and their combinations, run as the real binary.

describe('lockmgr: flags and combinations (exit codes of docs/cli.md)', () => {
  const runCases: Array<[string, string[], number, RegExp]> = [
    ['an unknown flag', ['--exclusive', '@disk', '--bogus'], 64, /unknown option '--bogus'/],
    ['--wait -1 (a negative number)', ['--exclusive', '@disk', '--wait=-1'], 64, /--wait needs a number of seconds >= 0, got '-1'/],
    ['--wait abc', ['--exclusive', '@disk', '--wait', 'abc'], 64, /--wait needs a number of seconds >= 0, got 'abc'/],
    ['--wait empty', ['--exclusive', '@disk', '--wait', ''], 64, /--wait needs a number of seconds >= 0, got ''/],
    ['--wait Infinity', ['--exclusive', '@disk', '--wait', 'Infinity'], 64, /got 'Infinity'/],
    ['--wait without a value', ['--exclusive', '@disk', '--wait'], 64, /--wait needs a value/],
    ['--verify-interval beyond a timer', ['--exclusive', '@disk', '--verify-interval', '99999999999'], 64, /^lockmgr: --verify-interval must be at most 2147483 seconds \(24 days\), got '99999999999'/],
    ['--lifetime forever', ['--exclusive', '@disk', '--lifetime', 'forever'], 64, /--lifetime must be 'child' or 'supervisor', got 'forever'/],
    ['--id -3', ['--exclusive', '@disk', '--id=-3'], 64, /--id needs an integer >= 0, got '-3'/],
    ['--id 1.5', ['--exclusive', '@disk', '--id', '1.5'], 64, /--id needs an integer >= 0, got '1\.5'/],
    ['--id beyond a safe integer', ['--exclusive', '@disk', '--id', '99999999999999999999'], 64, /--id needs an integer >= 0, got '99999999999999999999'/],
    ['--name empty', ['--exclusive', '@disk', '--name', ''], 64, /--name needs a non-empty value/],
    ['--uri empty', ['--exclusive', '@disk', '--uri', ''], 64, /--uri needs a non-empty value/],
    ['--qemu-compatible with a value', ['--exclusive', '@disk', '--qemu-compatible=yes'], 64, /--qemu-compatible takes no value/],
    ['--exclusive without a path (parseArgs will not take the next flag as its value)', ['--exclusive', '--shared', '@disk'], 64, /--exclusive needs a value; one that starts with '-' is written --exclusive=VALUE/],
    ['a stray argument before --', ['--exclusive', '@disk', 'stray'], 64, /unexpected argument 'stray': the command goes after '--'/],
    ['one file both exclusive and shared', ['--exclusive', '@disk', '--shared', '@disk'], 64, /is given as both --exclusive and --shared/],
    ['one file exclusive, and shared through a symlink', ['--exclusive', '@disk', '--shared', '@disklink'], 64, /the same file as .*\) is already given as --exclusive, not --shared: name each disk once, in one mode\n$/],
    ['--lockspace that is missing', ['--lockspace', '@missing', '--exclusive', '@disk'], 66, /lockspace dir '.*missing\.img' cannot be used; create it/],
    ['--lockspace that is a symlink', ['--lockspace', '@dirlink', '--exclusive', '@disk'], 64, /is a symbolic link and was refused/],
    ['--lockspace that is a file', ['--lockspace', '@disk', '--exclusive', '@disk'], 64, /is not a directory/],
    ['--lockspace writable by others without the sticky bit', ['--lockspace', '@worldwritable', '--exclusive', '@disk'], 64, /is writable by its group \(mode 0777\) and not sticky/],
  ];
  let links: Record<string, string>;
  beforeAll(() => {
    links = { '@disk': disk, '@missing': P.missing!, '@disklink': join(tmp.dir, 'disk-link'), '@dirlink': join(tmp.dir, 'dir-link'), '@worldwritable': join(tmp.dir, 'ww') };
    symlinkSync(disk, links['@disklink']!);
    symlinkSync(P.dir!, links['@dirlink']!);
    mkdirSync(links['@worldwritable']!);
    chmodSync(links['@worldwritable']!, 0o777);
  });
  for (const [label, args, exit, message] of runCases) {
    it(`run: ${label} exits ${exit}`, () => expectCliRun(args.map((a) => links[a] ?? a), exit, message));
  }

  const otherCases: Array<[string, () => string[], number, RegExp]> = [
    ['no command at all', () => [], 64, /a command is needed/],
    ['an unknown command', () => ['frobnicate'], 64, /unknown command 'frobnicate'/],
    ["run without '--'", () => ['run', '--exclusive', disk, 'true'], 64, /unexpected argument 'true': the command goes after '--'/],
    ["run with nothing after '--'", () => ['run', '--exclusive', disk, '--'], 64, /the command is missing after '--'/],
    ['run of a command that does not exist', () => ['run', '--exclusive', disk, '--', join(tmp.dir, 'no-such-command')], 127, /cannot spawn '.*no-such-command': ENOENT/],
    ['run of a file that is not executable', () => ['run', '--exclusive', disk, '--', disk], 126, /cannot spawn '.*disk\.img': EACCES/],
    ['run of a directory', () => ['run', '--exclusive', disk, '--', tmp.dir], 126, /EACCES/],
    ['run --adopt beyond any process id', () => ['run', '--adopt', '99999999999', '--exclusive', disk], 64, /^lockmgr: --adopt needs a process id \(an integer from 1 to 2147483647\), got '99999999999' \(see 'lockmgr run --help'\)\n$/],
    // Above pid_max: no process has it. Said so, not as kill(2)'s ESRCH.
    ['run --adopt of a process that does not exist', () => ['run', '--adopt', '2147483647', '--exclusive', disk], 64, /^lockmgr: cannot attach to process 2147483647: there is no such process\n$/],
    ['status without a PATH', () => ['status', '--json'], 64, /a PATH is needed/],
    ['status with an unknown flag', () => ['status', '--yaml', disk], 64, /unknown option '--yaml'/],
    ['status --lockspace that is a symlink', () => ['status', '--lockspace', join(tmp.dir, 'dir-link'), disk], 64, /symbolic link/],
  ];
  for (const [label, args, exit, message] of otherCases) {
    it(`${label} exits ${exit}`, async () => {
      const before = snapshot();
      const r = cli(args());
      expect(r.code, r.stderr).toBe(exit);
      expect(r.stderr).toMatch(message);
      await expectNothingLeft(before);
    });
  }

  it('status with one good and one bad PATH: exits 66, reports the good one and the error of the bad one', () => {
    const r = cli(['status', '--json', disk, P.missing!]);
    expect(r.code).toBe(66);
    const doc = JSON.parse(r.stdout) as { entries: Array<{ path: string; lease?: { state: string }; error?: { code: string } }> };
    expect(doc.entries.map((e) => [e.path, e.lease?.state ?? e.error?.code])).toEqual([
      [disk, 'free'],
      [P.missing, 'ERR_RESOURCE_ACCESS'],
    ]);
  });
  it('--version and --help exit 0 (controls)', () => {
    expect(cli(['--version'])).toMatchObject({ code: 0, stdout: expect.stringMatching(/^lockmgr \d+\.\d+\.\d+\n$/) as unknown });
    expect(cli(['--help'])).toMatchObject({ code: 0, stdout: expect.stringContaining('exit status:') as unknown });
  });
});

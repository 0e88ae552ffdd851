import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { chmodSync, mkdirSync, openSync, readFileSync, symlinkSync, writeFileSync, copyFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { AccessModeError, InternalError, InvalidArgumentError, LockManagerError, ResourceAccessError, ResourceExhaustedError, openLockable } from '../../lib/index.js';
import { ERRNO_CLASSES, errnoName, errnoOf, fromErrno, systemError, type ErrorClass } from '../../lib/os/errors.js';
import { compileShim, distUrl, fdCount, isRoot, lockFixture, preload, runScript } from '../helpers.js';

const fx = lockFixture();
const open = fx.opened;


/** The error openLockable throws, checking it leaves no fd behind. */
function openError(p: string, options?: object): LockManagerError {
  const before = fdCount();
  try {
    open.push(openLockable(p, options as never));
  } catch (err) {
    expect(fdCount()).toBe(before);
    return err as LockManagerError;
  }
  throw new Error(`openLockable(${p}) succeeded`);
}

function expectSystem(err: LockManagerError, Class: Function, code: string, syscall = 'open'): void {
  expect(err).toBeInstanceOf(Class);
  expect(err).toBeInstanceOf(LockManagerError);
  expect(err.cause).toMatchObject({ code, errno: -errnoOf(code), syscall });
}

describe('the errno table', () => {
  const rows = Object.entries(ERRNO_CLASSES).flatMap(([syscall, table]) =>
    Object.entries(table as Record<string, ErrorClass>).map(([name, Class]) => ({ syscall, name, Class })),
  );
  /** An errno for a row: '*' stands for any errno the syscall's table does not list. */
  const errnoFor = (syscall: string, name: string): string =>
    name !== '*' ? name : ['EPERM', 'EIO', 'EXDEV', 'ENOTTY'].find((e) => !Object.hasOwn((ERRNO_CLASSES as Record<string, object>)[syscall]!, e))!;

  it.each(rows)('$syscall $name -> $Class.name', ({ syscall, name: row, Class }) => {
    const name = errnoFor(syscall, row);
    const err = fromErrno(syscall, errnoOf(name), '/images/vm1.img', 'doing something');
    expect(err).toBeInstanceOf(Class);
    expect(err.code).toMatch(/^(ERR_[A-Z_]+|ABORT_ERR)$/);
    expect(err.cause).toMatchObject({ code: errnoName(errnoOf(name)), errno: -errnoOf(name), syscall, path: '/images/vm1.img' });
    expect((err.cause as Error).message).toMatch(new RegExp(`^E[A-Z]+: [a-z][^,]+, ${syscall} '/images/vm1.img'$`));
    expect((err.cause as Error).message).not.toMatch(/unknown/i);
    expect(err.message).toBe(`doing something: ${(err.cause as Error).message}`);
  });

  it('an errno outside the table is InternalError', () => {
    expect(fromErrno('fcntl', errnoOf('ECHILD'), undefined, 'x')).toBeInstanceOf(InternalError);
  });

  it('docs/errors.md lists exactly the rows of the code', () => {
    const doc = readFileSync(fileURLToPath(new URL('../../docs/errors.md', import.meta.url)), 'utf8');
    const documented = [...doc.matchAll(/^\| ([a-z_0-9]+) \| (E[A-Z]+|any other) \| (\w+) \|/gm)].map((m) => `${m[1]} ${m[2] === 'any other' ? '*' : m[2]} ${m[3]}`);
    expect(documented.sort()).toEqual(rows.map((r) => `${r.syscall} ${r.name} ${r.Class.name}`).sort());
  });

  it('system errors read exactly like Node fs errors', () => {
    let nodeErr: NodeJS.ErrnoException | undefined;
    try {
      openSync('/nonexistent/vm1.img', 'r');
    } catch (e) {
      nodeErr = e as NodeJS.ErrnoException;
    }
    const ours = systemError(errnoOf('ENOENT'), 'open', '/nonexistent/vm1.img');
    expect(ours.message).toBe(nodeErr!.message);
    expect({ ...ours }).toEqual({ errno: nodeErr!.errno, code: nodeErr!.code, syscall: nodeErr!.syscall, path: nodeErr!.path });
  });
});

describe('real triggers', () => {
  it('ENOENT: a missing file, and a dangling symlink', () => {
    expectSystem(openError(join(fx.tmp.dir, 'missing.img')), ResourceAccessError, 'ENOENT');
    symlinkSync(join(fx.tmp.dir, 'gone'), join(fx.tmp.dir, 'dangling'));
    expectSystem(openError(join(fx.tmp.dir, 'dangling')), ResourceAccessError, 'ENOENT');
  });

  it('ENOTDIR: a file used as a directory', () => {
    expectSystem(openError(join(fx.path, 'x')), ResourceAccessError, 'ENOTDIR');
  });

  it('EISDIR: a directory, opened readwrite (the kernel refuses) or read (we refuse)', () => {
    expectSystem(openError(fx.tmp.dir), ResourceAccessError, 'EISDIR');
    expectSystem(openError(fx.tmp.dir, { access: 'read' }), ResourceAccessError, 'EISDIR');
  });

  it('ELOOP: a symlink loop', () => {
    symlinkSync(join(fx.tmp.dir, 'b'), join(fx.tmp.dir, 'a'));
    symlinkSync(join(fx.tmp.dir, 'a'), join(fx.tmp.dir, 'b'));
    expectSystem(openError(join(fx.tmp.dir, 'a')), ResourceAccessError, 'ELOOP');
  });

  it('ENAMETOOLONG: a path component over 255 bytes', () => {
    expectSystem(openError(join(fx.tmp.dir, 'x'.repeat(300))), ResourceAccessError, 'ENAMETOOLONG');
  });

  it('ENXIO: a block device node with no device behind it (root: mknod, major 60 is for local use)', (ctx) => {
    if (!isRoot) {
      console.log('skipped: mknod needs root');
      return ctx.skip();
    }
    const node = join(fx.tmp.dir, 'nodev');
    execFileSync('mknod', [node, 'b', '60', '0']);
    expectSystem(openError(node), ResourceAccessError, 'ENXIO');
  });

  it('a unix socket is refused before it is opened: InvalidArgumentError', async () => {
    const sock = join(fx.tmp.dir, 'sock');
    const server = createServer();
    await new Promise<void>((r) => server.listen(sock, r));
    try {
      expect(openError(sock)).toBeInstanceOf(InvalidArgumentError);
      expect(openError(sock).message).toMatch(/is a socket; only regular files and block devices can be locked \(it was not opened\)/);
    } finally {
      server.close();
    }
  });

  it('ETXTBSY: readwrite access to a running program', async () => {
    const prog = join(fx.tmp.dir, 'sleeper');
    copyFileSync('/bin/sleep', prog);
    chmodSync(prog, 0o755);
    const child = spawn(prog, ['30'], { stdio: 'ignore' });
    await new Promise((r) => child.once('spawn', r));
    try {
      expectSystem(openError(prog), ResourceAccessError, 'ETXTBSY');
      open.push(openLockable(prog, { access: 'read' }));
    } finally {
      child.kill('SIGKILL');
    }
  });

  it.skipIf(!isRoot)('EROFS: readwrite access on a read-only filesystem (root: tmpfs remounted read-only)', () => {
    const mnt = join(fx.tmp.dir, 'mnt');
    mkdirSync(mnt);
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'lockmgr-test', mnt]);
    try {
      writeFileSync(join(mnt, 'disk.img'), 'x');
      execFileSync('mount', ['-o', 'remount,ro', mnt]);
      expectSystem(openError(join(mnt, 'disk.img')), ResourceAccessError, 'EROFS');
      const f = openLockable(join(mnt, 'disk.img'), { access: 'read' });
      expect(f.tryLock('shared')).toBe(true);
      f.close();
    } finally {
      execFileSync('umount', [mnt]);
    }
  });

  it.skipIf(!isRoot)('EACCES: a file the user may not open (root runs the check as nobody through setpriv)', () => {
    chmodSync(fx.tmp.dir, 0o755);
    chmodSync(fx.path, 0o600);
    const script = `import { openLockable } from ${JSON.stringify(distUrl)};
      try { openLockable(${JSON.stringify(fx.path)}, { access: 'read' }); console.log('opened'); }
      catch (e) { console.log(JSON.stringify({ name: e.name, code: e.cause?.code })); }`;
    const r = spawnSync('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, '--input-type=module', '-e', script], {
      encoding: 'utf8',
    });
    expect(r.stderr).toBe('');
    expect(JSON.parse(r.stdout)).toEqual({ name: 'ResourceAccessError', code: 'EACCES' });
  });

  it('EMFILE: out of file descriptors (a child with RLIMIT_NOFILE lowered)', () => {
    const script = `import { openLockable } from ${JSON.stringify(distUrl)};
      import { openSync } from 'node:fs';
      const fds = []; try { for (;;) fds.push(openSync('/dev/null', 'r')); } catch {}
      try { openLockable(${JSON.stringify(fx.path)}); console.log('opened'); }
      catch (e) { console.log(JSON.stringify({ name: e.name, code: e.cause?.code })); }`;
    const r = spawnSync('prlimit', ['--nofile=128:128', process.execPath, '--input-type=module', '-e', script], { encoding: 'utf8' });
    expect(JSON.parse(r.stdout)).toEqual({ name: ResourceExhaustedError.name, code: 'EMFILE' });
  });

  it('EBADF from fcntl: an exclusive lock on a file opened for reading is AccessModeError', () => {
    const f = openLockable(fx.path, { access: 'read' });
    open.push(f);
    let err: LockManagerError | undefined;
    try {
      f.tryLock('exclusive', { start: 0, length: 1 });
    } catch (e) {
      err = e as LockManagerError;
    }
    expect(err).toBeInstanceOf(AccessModeError);
    expect(err!.code).toBe('ERR_ACCESS_MODE');
    expect(err!.message).toContain('exclusive locks need readwrite access');
    expect(err!.cause).toMatchObject({ code: 'EBADF', syscall: 'fcntl', path: fx.path });
    return expect(f.lock('exclusive')).rejects.toBeInstanceOf(AccessModeError);
  });

  it('fcntl EINVAL (a kernel or seccomp profile without OFD locks) is UnsupportedError, from every lock call', () => {
    const shim = compileShim('deny-ofd', fx.tmp.dir);
    const script = `import { openLockable } from ${JSON.stringify(distUrl)};
      const f = openLockable(${JSON.stringify(fx.path)});
      const out = {};
      for (const [name, call] of [['tryLock', () => f.tryLock('exclusive')], ['getConflict', () => f.getConflict('shared')], ['unlock', () => f.unlock()]]) {
        try { call(); out[name] = 'ok'; } catch (e) { out[name] = e.name + ' ' + e.cause?.code + ' ' + e.cause?.syscall; }
      }
      await f.lock('shared').then(() => { out.lock = 'ok'; }, (e) => { out.lock = e.name; });
      console.log(JSON.stringify(out));`;
    expect(runScript(script, { LD_PRELOAD: preload(shim), DENY_OFD_ERRNO: String(errnoOf('EINVAL')) })).toEqual({
      tryLock: 'UnsupportedError EINVAL fcntl',
      getConflict: 'UnsupportedError EINVAL fcntl',
      unlock: 'UnsupportedError EINVAL fcntl',
      lock: 'UnsupportedError',
    });
  });

  it('fcntl ENOLCK (lock table full, lock manager down) is NoLocksAvailableError', () => {
    const shim = compileShim('deny-ofd', fx.tmp.dir);
    const script = `import { openLockable } from ${JSON.stringify(distUrl)};
      const f = openLockable(${JSON.stringify(fx.path)});
      try { f.tryLock('exclusive'); console.log('"ok"'); } catch (e) { console.log(JSON.stringify(e.name + ' ' + e.code + ' ' + e.cause?.code)); }`;
    expect(runScript(script, { LD_PRELOAD: preload(shim), DENY_OFD_ERRNO: String(errnoOf('ENOLCK')) })).toBe('NoLocksAvailableError ERR_NO_LOCKS ENOLCK');
  });

  it('a FIFO is refused without blocking on the open', () => {
    const fifo = join(fx.tmp.dir, 'fifo');
    execFileSync('mkfifo', [fifo]);
    for (const access of ['read', 'readwrite']) {
      const err = openError(fifo, { access });
      expect(err).toBeInstanceOf(InvalidArgumentError);
      expect(err.message).toContain('FIFO');
    }
  });

  it('a character device (/dev/null) is refused', () => {
    const err = openError('/dev/null');
    expect(err).toBeInstanceOf(InvalidArgumentError);
    expect(err.message).toContain('character device');
  });
});

describe('bad arguments: InvalidArgumentError, nothing opened or held', () => {
  const paths: Array<[string, unknown]> = [
    ['relative', 'disk.img'],
    ['empty', ''],
    ['NUL byte', '/tmp/a\0b'],
    ['4,096 bytes', `/${'a'.repeat(4095)}`],
    ['not a string', 42],
    ['a Buffer', Buffer.from('/tmp/x')],
  ];
  it.each(paths)('path: %s', (_, p) => {
    expect(openError(p as string)).toBeInstanceOf(InvalidArgumentError);
  });

  const options: Array<[string, unknown]> = [
    ['unknown key', { acces: 'read' }],
    ['bad access', { access: 'write' }],
    ['not an object', 'read'],
    ['null', null],
  ];
  it.each(options)('open options: %s', (_, o) => {
    expect(openError(fx.path, o as object)).toBeInstanceOf(InvalidArgumentError);
  });

  const ranges: Array<[string, unknown]> = [
    ['negative start', { start: -1, length: 1 }],
    ['NaN length', { start: 0, length: Number.NaN }],
    ['Infinity length', { start: 0, length: Number.POSITIVE_INFINITY }],
    ['fractional start', { start: 0.5, length: 1 }],
    ['2^53 start', { start: 2 ** 53, length: 1 }],
    ['2^63 length', { start: 0, length: 2 ** 63 }],
    ['string start', { start: '0', length: 1 }],
    ['bigint length', { start: 0, length: 1n }],
    ['unknown key', { start: 0, len: 1 }],
    ['not an object', 5],
    ['null', null],
  ];
  it.each(ranges)('range: %s', async (_, range) => {
    const f = openLockable(fx.path);
    open.push(f);
    expect(() => f.tryLock('exclusive', range as never)).toThrow(InvalidArgumentError);
    expect(() => f.unlock(range as never)).toThrow(InvalidArgumentError);
    expect(() => f.getConflict('shared', range as never)).toThrow(InvalidArgumentError);
    await expect(f.lock('exclusive', range as never)).rejects.toBeInstanceOf(InvalidArgumentError);
    const other = openLockable(fx.path);
    open.push(other);
    expect(other.tryLock('exclusive')).toBe(true);
  });

  const modes: unknown[] = ['write', 'EXCLUSIVE', undefined, 1, 'readonly'];
  it.each(modes)('mode: %s', async (mode) => {
    const f = openLockable(fx.path);
    open.push(f);
    expect(() => f.tryLock(mode as never)).toThrow(InvalidArgumentError);
    expect(() => f.getConflict(mode as never)).toThrow(InvalidArgumentError);
    await expect(f.lock(mode as never)).rejects.toBeInstanceOf(InvalidArgumentError);
  });

  const lockOptions: Array<[string, unknown]> = [
    ['negative timeout', { timeout: -1 }],
    ['NaN timeout', { timeout: Number.NaN }],
    ['Infinity timeout', { timeout: Number.POSITIVE_INFINITY }],
    ['string timeout', { timeout: '100' }],
    ['signal not an AbortSignal', { signal: {} }],
    ['unknown key', { timeoutMs: 100 }],
  ];
  it.each(lockOptions)('lock options: %s', async (_, o) => {
    const f = openLockable(fx.path);
    open.push(f);
    await expect(f.lock('shared', undefined, o as never)).rejects.toBeInstanceOf(InvalidArgumentError);
  });
});

describe('inCliWords: an API error in the command line\'s words', () => {
  it('drops API calls and API-only advice, keeps the class, and leaves other errors alone', async () => {
    const { inCliWords } = await import('../../lib/cli/report.js');
    const { InvalidArgumentError, InvalidStateError } = await import('../../lib/os/errors.js');
    const joined = inCliWords(new InvalidStateError('acquire: this host has not joined the lockspace (joinLockspace(), or lockmgr sanlock join): EINVAL')) as Error;
    expect(joined).toBeInstanceOf(InvalidStateError);
    expect(joined.message).toBe('acquire: this host has not joined the lockspace (lockmgr sanlock join): EINVAL');
    const twice = inCliWords(new InvalidArgumentError("'/a' (the same file as '/b') is already registered exclusive, not shared; release it first")) as Error;
    expect(twice.message).toBe("'/a' (the same file as '/b') is already given as --exclusive, not --shared: name each disk once, in one mode");
    expect((inCliWords(new InvalidArgumentError('resource.path must be a string'), '--shared') as Error).message).toBe('--shared PATH must be a string');
    const plain = new InvalidArgumentError('nothing to reword');
    expect(inCliWords(plain)).toBe(plain);
  });
});

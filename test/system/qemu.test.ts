// Interop with QEMU's own image locks, against Debian's real qemu-img, qemu-io
// and qemu-nbd (installed by .ci/run).
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, readdirSync, readlinkSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { LockManager, ResourceBusyError, qemuLockState } from '../../lib/index.js';
import type { StatusEntry } from '../../lib/cli/main.js';
import { locksOn } from '../../lib/os/proc-locks.js';
import { isRoot, tempDir, waitUntil } from '../helpers.js';

const haveQemu = ['qemu-img', 'qemu-io', 'qemu-nbd'].every((t) => spawnSync('sh', ['-c', `command -v ${t}`]).status === 0);
if (!haveQemu) console.warn('skipping QEMU interop tests: qemu-img, qemu-io or qemu-nbd is not installed (apt-get install qemu-utils)');
const canLoop = isRoot && existsSync('/dev/loop-control');
if (haveQemu && !canLoop) console.warn('skipping the QEMU interop tests on a loop device: losetup needs root');

const BIN = fileURLToPath(new URL('../../bin/lockmgr.js', import.meta.url));

function qemu(tool: string, ...args: string[]) {
  const r = spawnSync(tool, args, { encoding: 'utf8' });
  return { code: r.status, out: `${r.stdout}${r.stderr}` };
}

// The suite runs on a regular file, and as root on a loop block device too.
const targets = [{ name: 'a regular file', block: false }, ...(canLoop ? [{ name: 'a loop block device', block: true }] : [])];

/** After each test: its managers freed, its servers (qemu-nbd, ...) killed and reaped. */
async function endAll(managers: LockManager[], servers: ChildProcess[]): Promise<void> {
  for (const m of managers.splice(0)) await m.free();
  for (const s of servers.splice(0)) {
    const gone = new Promise((r) => s.once('exit', r));
    s.kill('SIGKILL');
    await gone;
  }
}

describe.skipIf(!haveQemu).each(targets)('QEMU interop on $name', ({ block }) => {
  let tmp: ReturnType<typeof tempDir>;
  let image: string;
  let device: string | undefined;
  const managers: LockManager[] = [];
  const servers: ChildProcess[] = [];

  beforeAll(() => {
    tmp = tempDir();
    const file = join(tmp.dir, 'vm1.img');
    writeFileSync(file, '');
    truncateSync(file, 4 * 1024 * 1024);
    if (block) device = execFileSync('losetup', ['-f', '--show', file], { encoding: 'utf8' }).trim();
    image = device ?? file;
  });
  afterAll(() => {
    if (device) execFileSync('losetup', ['-d', device]);
    tmp.cleanup();
  });
  afterEach(() => endAll(managers, servers));

  async function hold(mode: 'exclusive' | 'shared' | 'readonly', qemuCompatible: boolean): Promise<LockManager> {
    const m = new LockManager();
    managers.push(m);
    m.registerResource({ type: 'disk', path: image, mode, qemuCompatible });
    await m.start('sleep', ['1000']);
    return m;
  }

  /** qemu-nbd serving the image (read-write unless readOnly), once its locks are in place. */
  async function nbd(readOnly = false): Promise<ChildProcess> {
    const sock = join(tmp.dir, `nbd-${servers.length}.sock`);
    const s = spawn('qemu-nbd', ['-f', 'raw', ...(readOnly ? ['-r'] : []), '-k', sock, image], { stdio: 'ignore' });
    servers.push(s);
    await waitUntil(() => qemuLockState(image).held.includes('consistent-read'), 10_000, 'qemu-nbd to lock the image');
    return s;
  }

  it('qemuLockState and lockmgr status report what a QEMU writer holds and refuses to share, naming it', async () => {
    const server = await nbd();
    const state = qemuLockState(image);
    expect(state.held).toEqual(['consistent-read', 'write']);
    expect(state.unshared).toEqual(['resize']);
    expect(state.candidates.map((c) => c.pid)).toContain(server.pid);
    expect(state.locks.every((l) => l.kind === 'OFDLCK' && l.pid === -1)).toBe(true);
    const r = spawnSync(process.execPath, [BIN, 'status', '--json', image], { encoding: 'utf8' });
    const entry = (JSON.parse(r.stdout) as { entries: StatusEntry[] }).entries[0]!;
    expect(entry.qemu).toEqual({ held: ['consistent-read', 'write'], unshared: ['resize'] });
    expect(entry.lease!.state).toBe('free');
    expect(entry.openBy!.find((p) => p.pid === server.pid)!.command).toMatch(/^qemu-nbd /);
  });

  it('a qemu-compatible exclusive acquire fails while QEMU writes the image, naming QEMU; nothing is held', async () => {
    const server = await nbd();
    const m = new LockManager();
    managers.push(m);
    m.registerResource({ type: 'disk', path: image, mode: 'exclusive', qemuCompatible: true });
    const err = (await m.start('sleep', ['1000']).catch((e: unknown) => e)) as ResourceBusyError;
    expect(err).toBeInstanceOf(ResourceBusyError);
    expect(err.message).toContain('holds the QEMU "write" permission');
    expect(err.message).toMatch(new RegExp(`${server.pid} \\(qemu-nbd `));
    expect(err.candidates.map((c) => c.pid)).toContain(server.pid);
    const r = spawnSync(process.execPath, [BIN, 'run', '--exclusive', image, '--qemu-compatible', '--', 'true'], { encoding: 'utf8' });
    expect(r.status).toBe(75);
    expect(r.stderr).toContain('qemu-nbd');
    expect(qemuLockState(image).held).toEqual(['consistent-read', 'write']);
  });

  it('while we hold the image qemu-compatibly and exclusively, QEMU refuses to write, resize or convert it, and still reads it', async () => {
    await hold('exclusive', true);
    const write = qemu('qemu-io', '-f', 'raw', '-c', 'write 0 512', image);
    expect(write.code).not.toBe(0);
    expect(write.out).toContain('Failed to get "write" lock');
    const resize = qemu('qemu-img', 'resize', '-f', 'raw', image, '8M');
    expect(resize.code).not.toBe(0);
    expect(resize.out).toContain('Failed to get "write" lock');
    const convert = qemu('qemu-img', 'convert', '-f', 'raw', '-O', 'raw', image, join(tmp.dir, 'copy.img'));
    expect(convert.code).not.toBe(0);
    expect(convert.out).toContain('Failed to get shared "write" lock');
    expect(qemu('qemu-img', 'info', '-f', 'raw', image).code).toBe(0);
    expect(qemu('qemu-io', '-r', '-f', 'raw', '-c', 'read 0 512', image).code).toBe(0);
  });

  it('a plain lease (byte 0) never disturbs QEMU: qemu-io writes the image we hold', async () => {
    const m = await hold('exclusive', false);
    const write = qemu('qemu-io', '-f', 'raw', '-c', 'write 0 512', image);
    expect(write.out).not.toContain('lock');
    expect(write.code).toBe(0);
    expect(m.state).toBe('running');
  });

  it('a qemu-compatible shared lease is a QEMU writer that shares writing: QEMU may write, but not resize', async () => {
    await hold('shared', true);
    expect(qemuLockState(image)).toMatchObject({ held: ['consistent-read', 'write'], unshared: ['resize'] });
    expect(qemu('qemu-io', '-f', 'raw', '-c', 'write 0 512', image).code).toBe(0);
    const resize = qemu('qemu-img', 'resize', '-f', 'raw', image, '8M');
    expect(resize.code).not.toBe(0);
    expect(resize.out).toContain('lock');
  });

  it('a qemu-compatible readonly lease lets QEMU read and refuses every QEMU writer (issue 14)', async () => {
    await hold('readonly', true);
    expect(qemuLockState(image)).toMatchObject({ held: ['consistent-read'], unshared: ['write', 'resize'] });
    const write = qemu('qemu-io', '-f', 'raw', '-c', 'write 0 512', image);
    expect(write.code).not.toBe(0);
    expect(write.out).toContain('Failed to get "write" lock');
    expect(qemu('qemu-io', '-r', '-f', 'raw', '-c', 'read 0 512', image).code).toBe(0);
    expect(qemu('qemu-img', 'info', '-f', 'raw', image).code).toBe(0);
  });

  it('releasing the lease releases the QEMU locks too', async () => {
    const m = await hold('exclusive', true);
    expect(qemuLockState(image).held).toEqual(['consistent-read', 'write']);
    await m.shutdown({ graceMs: 1000 });
    expect(qemuLockState(image)).toMatchObject({ held: [], unshared: [] });
    expect(qemu('qemu-io', '-f', 'raw', '-c', 'write 0 512', image).code).toBe(0);
  });
});

// A loop device writes its backing file: QEMU's locks taken on the device must
// be on the file too, or a QEMU opening the file directly writes under a VM
// that holds the device (issue 14, review defect 3).
describe.skipIf(!haveQemu || !canLoop)('QEMU locks on a loop device cover its backing file (real losetup, qemu-io, qemu-nbd)', () => {
  let tmp: ReturnType<typeof tempDir>;
  let file: string;
  let loop = '';
  const managers: LockManager[] = [];
  const servers: ChildProcess[] = [];

  beforeAll(() => {
    tmp = tempDir();
    file = join(tmp.dir, 'backing.img');
    writeFileSync(file, '');
    truncateSync(file, 4 * 1024 * 1024);
    loop = execFileSync('losetup', ['-f', '--show', file], { encoding: 'utf8' }).trim();
  });
  afterAll(() => {
    if (loop !== '') execFileSync('losetup', ['-d', loop]);
    tmp.cleanup();
  });
  afterEach(() => endAll(managers, servers));

  const expected = {
    exclusive: { held: ['consistent-read', 'write'], unshared: ['write', 'resize'] },
    shared: { held: ['consistent-read', 'write'], unshared: ['resize'] },
    readonly: { held: ['consistent-read'], unshared: ['write', 'resize'] },
  } as const;

  for (const mode of ['exclusive', 'shared', 'readonly'] as const) {
    it(`${mode}: the backing file carries the same QEMU locks as the device, so qemu-io on the file is refused as on the device; released together`, async () => {
      const m = new LockManager();
      managers.push(m);
      m.registerResource({ type: 'disk', path: loop, mode, qemuCompatible: true });
      await m.start('sleep', ['1000']);
      expect(qemuLockState(loop)).toMatchObject(expected[mode]);
      expect(qemuLockState(file)).toMatchObject(expected[mode]);
      // The child has the backing file's description too, as it has the lease's: QEMU's locks on it are its own as well.
      const pid = m.getChild().pid;
      const theirs = readdirSync(`/proc/${pid}/fd`).map((fd) => {
        try {
          return readlinkSync(`/proc/${pid}/fd/${fd}`);
        } catch {
          return '';
        }
      });
      expect(theirs).toContain(file);
      for (const target of [file, loop]) {
        if (mode === 'shared') {
          const resize = qemu('qemu-img', 'resize', '-f', 'raw', target, '8M');
          expect(resize.code, target).not.toBe(0);
          expect(resize.out).toContain('Failed to get "resize" lock');
        } else {
          const write = qemu('qemu-io', '-f', 'raw', '-c', 'write 0 512', target);
          expect(write.code, target).not.toBe(0);
          expect(write.out).toContain('Failed to get "write" lock');
        }
      }
      await m.shutdown({ graceMs: 1000 });
      expect(qemuLockState(file)).toMatchObject({ held: [], unshared: [] });
      expect(qemuLockState(loop)).toMatchObject({ held: [], unshared: [] });
      expect(qemu('qemu-io', '-f', 'raw', '-c', 'write 0 512', file).code).toBe(0);
    });
  }

  it('QEMU writing the backing file: acquiring the device qemu-compatibly fails naming the file and QEMU, and holds nothing on either', async () => {
    const sock = join(tmp.dir, 'nbd.sock');
    const server = spawn('qemu-nbd', ['-f', 'raw', '-k', sock, file], { stdio: 'ignore' });
    servers.push(server);
    await waitUntil(() => qemuLockState(file).held.includes('write'), 10_000, 'qemu-nbd to lock the backing file');
    const m = new LockManager();
    managers.push(m);
    m.registerResource({ type: 'disk', path: loop, mode: 'exclusive', qemuCompatible: true });
    const err = (await m.start('sleep', ['1000']).catch((e: unknown) => e)) as ResourceBusyError;
    expect(err).toBeInstanceOf(ResourceBusyError);
    expect(err.message).toMatch(new RegExp(`^${file}: another process holds the QEMU "write" permission \\(held by .*${server.pid} \\(qemu-nbd `));
    expect(m.resources[0]!.held).toBe(false);
    // All or nothing: neither the lease nor QEMU's bytes stayed on the device, and the file has only qemu-nbd's.
    expect(locksOn(loop)).toEqual([]);
    expect(qemuLockState(file)).toMatchObject({ held: ['consistent-read', 'write'], unshared: ['resize'] });
    expect(locksOn(file).filter((l) => l.start < 100)).toEqual([]);
  });
});

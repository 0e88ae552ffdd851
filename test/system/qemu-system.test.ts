// A real QEMU (qemu-system-x86_64, TCG) supervised by lockmgr on its own
// image, through the descriptor lockmgr gives it (-add-fd; docs/cli.md): it
// runs, and while it runs a second QEMU, qemu-io and another lockmgr are let
// in or refused as the lease's mode says; all is free after it exits.
//
// The VMs start paused (-S): their disks are opened and locked at device
// realize, as in a running guest, without a vCPU burning a core on this
// shared machine. Startup is awaited through QMP, never a fixed sleep.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, truncateSync, writeFileSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { LockManager, locksOn, qemuDiskArgs, qemuLockState, type ExitStatus } from '../../lib/index.js';
import { childrenOf, openFds, within, zombieChildren } from '../harness/process-helpers.js';
import { tempDir, waitUntil } from '../helpers.js';

const have = (t: string): boolean => spawnSync('sh', ['-c', `command -v ${t}`]).status === 0;
const haveQemu = have('qemu-system-x86_64') && have('qemu-io') && have('qemu-img');
if (!haveQemu) console.warn('skipping the QEMU system tests: qemu-system-x86_64, qemu-io or qemu-img is not installed (apt-get install qemu-system-x86 qemu-utils)');

const BIN = fileURLToPath(new URL('../../bin/lockmgr.js', import.meta.url));
// Hang guards only: TCG startup on a loaded 2-core machine takes seconds.
const STARTUP_MS = 90_000;
const TEST_MS = 300_000;

type Mode = 'exclusive' | 'shared' | 'readonly';

/** A command's exit code and output, without blocking the event loop (the manager under test lives in it). */
function tool(cmd: string, args: readonly string[]): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    p.stdout.on('data', (d: Buffer) => (out += d.toString()));
    p.stderr.on('data', (d: Buffer) => (out += d.toString()));
    p.once('error', reject);
    p.once('close', (code) => resolve({ code, out }));
  });
}

const lockmgr = (...args: string[]) => tool(process.execPath, [BIN, ...args]);

class QemuGone extends Error {
  constructor() {
    super('QEMU exited before it answered on QMP');
  }
}

/** A minimal QMP client: one command at a time, events skipped. */
class Qmp {
  readonly #sock: Socket;
  #buf = '';
  #waiting: ((line: Record<string, unknown>) => void) | null = null;
  #lines: Record<string, unknown>[] = [];
  #closed = false;

  private constructor(sock: Socket) {
    this.#sock = sock;
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => {
      this.#buf += d;
      for (let i = this.#buf.indexOf('\n'); i >= 0; i = this.#buf.indexOf('\n')) {
        const msg = JSON.parse(this.#buf.slice(0, i)) as Record<string, unknown>;
        this.#buf = this.#buf.slice(i + 1);
        if ('event' in msg) continue;
        if (this.#waiting) {
          const w = this.#waiting;
          this.#waiting = null;
          w(msg);
        } else this.#lines.push(msg);
      }
    });
    sock.on('error', () => undefined);
    // A QEMU that fails after it listened (a refused one) closes the socket: no answer will come.
    sock.on('close', () => {
      this.#closed = true;
      const w = this.#waiting;
      this.#waiting = null;
      w?.({ closed: true });
    });
  }

  #next(): Promise<Record<string, unknown>> {
    const queued = this.#lines.shift();
    if (queued) return Promise.resolve(queued);
    if (this.#closed) return Promise.resolve({ closed: true });
    return new Promise((resolve) => (this.#waiting = resolve));
  }

  /**
   * Connects once QEMU listens, and negotiates: QEMU answers only once the
   * machine and its devices are set up. Rejects with QemuGone if QEMU exits
   * first (a refused QEMU leaves its socket file behind).
   */
  static async connect(path: string, alive: () => boolean): Promise<Qmp> {
    const end = Date.now() + STARTUP_MS;
    let sock: Socket | undefined;
    while (sock === undefined) {
      if (!alive()) throw new QemuGone();
      if (Date.now() > end) throw new Error(`timed out waiting for QMP on ${path}`);
      sock = await new Promise<Socket | undefined>((resolve) => {
        const s = connect(path, () => resolve(s));
        s.once('error', () => {
          s.destroy();
          setTimeout(() => resolve(undefined), 50);
        });
      });
    }
    const qmp = new Qmp(sock);
    if ('closed' in (await within(qmp.#next(), STARTUP_MS, 'the QMP greeting'))) throw new QemuGone();
    await qmp.command('qmp_capabilities');
    return qmp;
  }

  async command(execute: string, args?: Record<string, unknown>): Promise<unknown> {
    this.#sock.write(`${JSON.stringify({ execute, arguments: args })}\n`);
    const reply = await within(this.#next(), STARTUP_MS, `QMP ${execute}`);
    if ('closed' in reply) throw new QemuGone();
    if ('error' in reply) throw new Error(`QMP ${execute}: ${JSON.stringify(reply.error)}`);
    return reply.return;
  }

  close(): void {
    this.#sock.destroy();
  }
}

/** qemu-system-x86_64 with nothing but a QMP socket: TCG, paused, no display. */
function vmBase(qmpPath: string): string[] {
  return ['-machine', 'pc,accel=tcg', '-S', '-nodefaults', '-nographic', '-display', 'none', '-qmp', `unix:${qmpPath},server=on,wait=off`];
}

/** A QEMU that opens the image by path itself (not through lockmgr), with a virtio disk of that kind. */
function plainDisk(image: string, kind: 'writer' | 'shared-writer' | 'reader'): string[] {
  const ro = kind === 'reader' ? ',read-only=on' : '';
  return [
    '-blockdev',
    `driver=file,filename=${image},node-name=f0${ro}`,
    '-blockdev',
    `driver=raw,file=f0,node-name=d0${ro}`,
    '-device',
    `virtio-blk-pci,drive=d0${kind === 'shared-writer' ? ',share-rw=on' : ''}`,
  ];
}

/** The disk names QEMU has attached (query-block): proof its devices are set up. */
async function attached(qmp: Qmp): Promise<string[]> {
  const blocks = (await qmp.command('query-block')) as Array<{ qdev?: string; inserted?: { 'node-name'?: string } }>;
  return blocks.map((b) => b.inserted?.['node-name'] ?? '').filter((n) => n !== '');
}

describe.skipIf(!haveQemu)('a real QEMU supervised by lockmgr on its own image', () => {
  let tmp: ReturnType<typeof tempDir>;
  let image: string;
  let n = 0;
  const procs: ChildProcess[] = [];
  const managers: LockManager[] = [];
  let fdsBefore: number[];
  let childrenBefore: number[];

  const socketPath = () => join(tmp.dir, `qmp-${n++}.sock`);

  beforeAll(() => {
    tmp = tempDir();
    image = join(tmp.dir, 'vm1.img');
    writeFileSync(image, '');
    truncateSync(image, 16 * 1024 * 1024);
  });
  afterAll(() => tmp.cleanup());

  const track = () => {
    fdsBefore = openFds();
    childrenBefore = childrenOf();
  };

  afterEach(async () => {
    for (const m of managers.splice(0)) await m.free();
    for (const p of procs.splice(0)) {
      if (p.exitCode === null && p.signalCode === null) {
        const gone = new Promise((r) => p.once('exit', r));
        // lockmgr run forwards SIGTERM to its VM, which quits; a QEMU quits on it too.
        p.kill('SIGTERM');
        await within(gone, STARTUP_MS, `pid ${p.pid} to exit on SIGTERM`);
      }
    }
  });

  /** Nothing of the test is left: no lock on the image, no child, no zombie, no fd. */
  async function expectAllFree(): Promise<void> {
    expect(locksOn(image)).toEqual([]);
    expect(qemuLockState(image)).toMatchObject({ held: [], unshared: [] });
    const write = await tool('qemu-io', ['-f', 'raw', '-c', 'write 0 512', image]);
    expect(write.out).not.toContain('lock');
    expect(write.code).toBe(0);
    expect((await lockmgr('run', '--qemu-compatible', '--exclusive', image, '--', 'true')).code).toBe(0);
    await waitUntil(() => childrenOf().filter((p) => !childrenBefore.includes(p)).length === 0, 10_000, 'children to be reaped');
    expect(zombieChildren()).toEqual([]);
    // A freed manager's pidfd closes a moment after free() resolves (its poll handle closes on the loop), as leaks.test.ts waits too.
    await waitUntil(() => openFds().filter((fd) => !fdsBefore.includes(fd)).length === 0, 10_000, "the test's fds to close");
  }

  /** The VM under test: started by `lockmgr run` (sh -c expands $LOCKMGR_QEMU_FD) or by a LockManager. */
  interface Vm {
    qmp: Qmp;
    /** Resolves with the supervisor's exit code (lockmgr run) or the VM's (LockManager). */
    exited: Promise<number | null>;
    /** Frees what the launcher still has once the VM exited (a stopped LockManager keeps its files until free()). */
    free(): Promise<void>;
  }

  async function startVm(launcher: 'lockmgr run' | 'LockManager', mode: Mode, after = ''): Promise<Vm> {
    const qmpPath = socketPath();
    if (launcher === 'lockmgr run') {
      const disk = qemuDiskArgs(3, { id: 'd0', mode }).map((a) => a.replaceAll('3', '$LOCKMGR_QEMU_FD'));
      // qemuDiskArgs() with a placeholder fd: every '3' in it is the descriptor (fd=3,set=3, /dev/fdset/3).
      const script = `qemu-system-x86_64 ${[...vmBase(qmpPath), ...disk].join(' ')}${after === '' ? '' : `; ${after}`}`;
      const p = spawn(process.execPath, [BIN, 'run', '--qemu-compatible', `--${mode}`, image, '--', 'sh', '-c', after === '' ? `exec ${script}` : script], { stdio: 'inherit' });
      procs.push(p);
      let gone = false;
      const exited = new Promise<number | null>((r) =>
        p.once('exit', (code) => {
          gone = true;
          r(code);
        }),
      );
      const qmp = await Qmp.connect(qmpPath, () => !gone);
      return { qmp, exited, free: async () => undefined };
    }
    const m = new LockManager();
    managers.push(m);
    m.registerResource({ type: 'disk', path: image, mode, qemuCompatible: true });
    const [d] = m.qemuDescriptors;
    expect(d).toMatchObject({ path: image, mode });
    const exited = new Promise<number | null>((r) => m.once('exit', (s: ExitStatus) => r(s.code)));
    await m.start('qemu-system-x86_64', [...vmBase(qmpPath), ...qemuDiskArgs(d!.fd, { id: 'd0', mode })], { stdio: 'inherit' });
    expect(m.state).toBe('running');
    const qmp = await Qmp.connect(qmpPath, () => m.state === 'running');
    return { qmp, exited, free: () => m.free() };
  }

  /** A second QEMU on the image: 'runs' once its disk is attached (then quit), or its refusal. */
  async function secondQemu(kind: 'writer' | 'shared-writer' | 'reader'): Promise<{ ran: true } | { ran: false; code: number | null; out: string }> {
    const qmpPath = socketPath();
    const p = spawn('qemu-system-x86_64', [...vmBase(qmpPath), ...plainDisk(image, kind)], { stdio: ['ignore', 'pipe', 'pipe'] });
    procs.push(p);
    let out = '';
    p.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    p.stderr!.on('data', (d: Buffer) => (out += d.toString()));
    let gone = false;
    const exited = new Promise<number | null>((r) =>
      p.once('exit', (code) => {
        gone = true;
        r(code);
      }),
    );
    try {
      const qmp = await Qmp.connect(qmpPath, () => !gone);
      expect(await attached(qmp)).toContain('d0');
      await qmp.command('quit');
      qmp.close();
      expect(await within(exited, STARTUP_MS, 'the second QEMU to quit')).toBe(0);
      return { ran: true };
    } catch (err) {
      if (!(err instanceof QemuGone)) throw err;
      const code = await exited;
      // Its pipes may still hold the last words after 'exit'.
      await new Promise((r) => (p.stderr!.readableEnded ? r(null) : p.stderr!.once('end', r)));
      return { ran: false, code, out };
    }
  }

  const refused = (r: { ran: boolean; code?: number | null; out?: string }) => {
    expect(r.ran).toBe(false);
    expect(r).toMatchObject({ code: 1 });
    expect((r as { out: string }).out).toMatch(/Failed to get (shared )?"write" lock/);
  };

  async function quit(vm: Vm): Promise<number | null> {
    expect(await attached(vm.qmp)).toContain('d0');
    await vm.qmp.command('quit');
    vm.qmp.close();
    const code = await within(vm.exited, STARTUP_MS, 'the VM to exit');
    await vm.free();
    return code;
  }

  describe.each(['lockmgr run', 'LockManager'] as const)('started by %s', (launcher) => {
    it(
      'exclusive: it runs; a second QEMU, qemu-io write and another lockmgr are refused; qemu-io -r reads; all free after it exits',
      async () => {
        track();
        const vm = await startVm(launcher, 'exclusive');
        expect(qemuLockState(image)).toMatchObject({ held: ['consistent-read', 'write'], unshared: ['write', 'resize'] });
        refused(await secondQemu('shared-writer'));
        refused(await secondQemu('writer'));
        const write = await tool('qemu-io', ['-f', 'raw', '-c', 'write 0 512', image]);
        expect(write.code).not.toBe(0);
        expect(write.out).toContain('Failed to get "write" lock');
        expect((await tool('qemu-io', ['-r', '-f', 'raw', '-c', 'read 0 512', image])).code).toBe(0);
        const other = await lockmgr('run', '--exclusive', image, '--', 'true');
        expect(other.code).toBe(75);
        expect(other.out).toContain('qemu-system-x86_64');
        expect((await lockmgr('run', '--shared', image, '--', 'true')).code).toBe(75);
        expect(await quit(vm)).toBe(0);
        await expectAllFree();
      },
      TEST_MS,
    );

    it(
      'shared (share-rw=on): other sharing writers are let in; a QEMU that refuses to share write, qemu-img convert and an exclusive lockmgr are refused; all free after',
      async () => {
        track();
        const vm = await startVm(launcher, 'shared');
        expect(qemuLockState(image)).toMatchObject({ held: ['consistent-read', 'write'], unshared: ['resize'] });
        expect(await secondQemu('shared-writer')).toEqual({ ran: true });
        expect((await tool('qemu-io', ['-f', 'raw', '-c', 'write 0 512', image])).code).toBe(0);
        expect((await lockmgr('run', '--qemu-compatible', '--shared', image, '--', 'true')).code).toBe(0);
        refused(await secondQemu('writer'));
        const convert = await tool('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', image, join(tmp.dir, 'copy.img')]);
        expect(convert.code).not.toBe(0);
        expect(convert.out).toContain('Failed to get shared "write" lock');
        expect((await lockmgr('run', '--exclusive', image, '--', 'true')).code).toBe(75);
        expect((await lockmgr('run', '--readonly', image, '--', 'true')).code).toBe(75);
        expect(await quit(vm)).toBe(0);
        await expectAllFree();
      },
      TEST_MS,
    );

    it(
      'readonly (readonly=on): other readers are let in; every writer is refused; all free after',
      async () => {
        track();
        const vm = await startVm(launcher, 'readonly');
        expect(qemuLockState(image)).toMatchObject({ held: ['consistent-read'], unshared: ['write', 'resize'] });
        expect(await secondQemu('reader')).toEqual({ ran: true });
        expect((await tool('qemu-io', ['-r', '-f', 'raw', '-c', 'read 0 512', image])).code).toBe(0);
        expect((await lockmgr('run', '--qemu-compatible', '--readonly', image, '--', 'true')).code).toBe(0);
        refused(await secondQemu('shared-writer'));
        const write = await tool('qemu-io', ['-f', 'raw', '-c', 'write 0 512', image]);
        expect(write.code).not.toBe(0);
        expect(write.out).toContain('Failed to get "write" lock');
        expect((await lockmgr('run', '--shared', image, '--', 'true')).code).toBe(75);
        expect((await lockmgr('run', '--exclusive', image, '--', 'true')).code).toBe(75);
        expect(await quit(vm)).toBe(0);
        await expectAllFree();
      },
      TEST_MS,
    );
  });

  it(
    "after QEMU lets go, its unlocks have dropped our QEMU bytes with its own: only the lease holds until lockmgr releases it",
    async () => {
      track();
      const fifo = join(tmp.dir, 'go');
      const done = join(tmp.dir, 'qemu-exited');
      spawnSync('mkfifo', [fifo]);
      // The child outlives QEMU: a shell that records QEMU's exit, then waits on the fifo.
      const vm = await startVm('lockmgr run', 'exclusive', `echo $? > ${done}; read x < ${fifo}`);
      await vm.qmp.command('quit');
      vm.qmp.close();
      await waitUntil(() => existsSync(done), STARTUP_MS, 'QEMU to exit under the shell');
      // QEMU unlocked 100-101 and 201 on the shared description, ours included;
      // 203 (resize), which QEMU never took, stays ours.
      expect(qemuLockState(image)).toMatchObject({ held: [], unshared: ['resize'] });
      const write = await tool('qemu-io', ['-f', 'raw', '-c', 'write 0 512', image]);
      expect(write.code).toBe(0);
      // The lease (byte 0) is held until lockmgr reaps its child.
      expect((await lockmgr('run', '--exclusive', image, '--', 'true')).code).toBe(75);
      await writeFile(fifo, '\n');
      expect(await within(vm.exited, STARTUP_MS, 'lockmgr run to exit')).toBe(0);
      await expectAllFree();
    },
    TEST_MS,
  );

  it(
    'qcow2: under exclusive and shared even qemu-img info and qemu-io -r are refused (qcow2 openers refuse to share write); under readonly they read; -U reads always',
    async () => {
      track();
      const qcow = join(tmp.dir, 'vm2.qcow2');
      expect((await tool('qemu-img', ['create', '-f', 'qcow2', qcow, '16M'])).code).toBe(0);
      for (const mode of ['exclusive', 'shared', 'readonly'] as const) {
        const m = new LockManager();
        managers.push(m);
        m.registerResource({ type: 'disk', path: qcow, mode, qemuCompatible: true });
        await m.start('sleep', ['1000']);
        const info = await tool('qemu-img', ['info', qcow]);
        const read = await tool('qemu-io', ['-r', '-f', 'qcow2', '-c', 'read 0 512', qcow]);
        if (mode === 'readonly') {
          expect(info.code).toBe(0);
          expect(read.code).toBe(0);
        } else {
          for (const r of [info, read]) {
            expect(r.code, mode).not.toBe(0);
            expect(r.out).toContain('Failed to get shared "write" lock');
          }
        }
        expect((await tool('qemu-img', ['info', '-U', qcow])).code).toBe(0);
        await m.free();
      }
      expect(locksOn(qcow)).toEqual([]);
      await waitUntil(() => childrenOf().filter((p) => !childrenBefore.includes(p)).length === 0, 10_000, 'children to be reaped');
      // A freed manager's pidfd closes a moment after free() resolves (its poll handle closes on the loop), as leaks.test.ts waits too.
      await waitUntil(() => openFds().filter((fd) => !fdsBefore.includes(fd)).length === 0, 10_000, "the test's fds to close");
    },
    TEST_MS,
  );

  it(
    'a QEMU that opens the image by path itself, under a QEMU-compatible lease, is refused by our locks (the use docs/cli.md warns against)',
    async () => {
      track();
      const qmpPath = socketPath();
      const r = await lockmgr('run', '--qemu-compatible', '--exclusive', image, '--', 'qemu-system-x86_64', ...vmBase(qmpPath), ...plainDisk(image, 'writer'));
      expect(r.code).toBe(1);
      expect(r.out).toContain('Failed to get "write" lock');
      await expectAllFree();
    },
    TEST_MS,
  );
});

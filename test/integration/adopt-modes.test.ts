// LockManager.adopt() takes over a lease only in the mode it is held in:
// shared and readonly both read-lock byte 0, and only their class byte
// (3 shared, 4 readonly) tells them apart. The holder here is a plain process
// that holds the bytes itself (no supervisor watches it), as a VM whose
// lockmgr died does.
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { readdirSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { InvalidArgumentError, LockManager, ResourceBusyError } from '../../lib/index.js';
import { fileURLToPath } from 'node:url';
import { watchedBy } from '../../lib/os/proc-locks.js';
import { distUrl, fdCount, lockFixture, processExists, waitUntil } from '../helpers.js';

const fx = lockFixture();
const children: ChildProcess[] = [];
/** Daemons the holders left (init's children now), killed by pid. */
const daemons: number[] = [];
afterEach(async () => {
  for (const pid of daemons.splice(0)) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // Gone already.
    }
    await waitUntil(() => !processExists(pid), 10_000, `daemon ${pid} to exit`);
  }
  for (const c of children.splice(0)) {
    if (c.exitCode === null && c.signalCode === null) {
      c.kill('SIGKILL');
      await once(c, 'exit');
    }
  }
});

/** A process holding byte 0 shared and the class byte `cls` shared on the image, until killed. */
async function holder(cls: number): Promise<ChildProcess> {
  const src = `const { openLockable } = await import(${JSON.stringify(distUrl)});
    const f = openLockable(${JSON.stringify(fx.path)}, { access: 'read' });
    if (!f.tryLock('shared', { start: 0, length: 1 }) || !f.tryLock('shared', { start: ${cls}, length: 1 })) process.exit(3);
    console.log('held');
    setInterval(() => {}, 1000);`;
  const c = spawn(process.execPath, ['--input-type=module', '-e', src], { stdio: ['ignore', 'pipe', 'inherit'] });
  children.push(c);
  const [line] = (await once(c.stdout!, 'data')) as [Buffer];
  expect(String(line).trim()).toBe('held');
  return c;
}

describe('adopt() checks the mode, class byte included', () => {
  for (const [held, cls, asked] of [
    ['readonly', 4, 'shared'],
    ['shared', 3, 'readonly'],
  ] as const) {
    it(`a ${held} holder named ${asked}: InvalidArgumentError naming the mode it holds; nothing held, no fd left`, async () => {
      const vm = await holder(cls);
      const fds = fdCount();
      const err = await LockManager.adopt(vm.pid!, { resources: [{ type: 'disk', path: fx.path, mode: asked }] }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(InvalidArgumentError);
      expect((err as Error).message).toContain(`holds it ${held}, not ${asked}`);
      // The pidfd of the refused adoption is closed on the event loop, after the rejection.
      await waitUntil(() => fdCount() === fds, 10_000, `fds back at ${fds} (now ${fdCount()})`);
    });
  }

  it('the control: named in the mode it holds, it is adopted', async () => {
    const vm = await holder(4);
    const m = await LockManager.adopt(vm.pid!, { resources: [{ type: 'disk', path: fx.path, mode: 'readonly' }] });
    expect(m.state).toBe('running');
    await m.free();
  });
});

/**
 * A VM whose lockmgr is gone, holding byte 0 of the image exclusively, that
 * has daemonized a helper: the helper inherited the lease's descriptor (the
 * same open file description) and, its parent shell gone, is init's child, no
 * descendant of the VM. Resolves the VM and the helper's pid.
 */
async function vmWithDaemon(): Promise<{ vm: ChildProcess; daemon: number }> {
  const src = `const { openLockable } = await import(${JSON.stringify(distUrl)});
    const { spawnSync } = await import('node:child_process');
    const f = openLockable(${JSON.stringify(fx.path)});
    if (!f.tryLock('exclusive', { start: 0, length: 1 })) process.exit(3);
    // The shell forks the helper with the lease fd as its fd 3 and exits at once.
    const r = spawnSync('sh', ['-c', 'sleep 1000 </dev/null >/dev/null 2>&1 & echo $!'], { stdio: ['ignore', 'pipe', 'inherit', f.fd], encoding: 'utf8' });
    console.log(r.stdout.trim());
    setInterval(() => {}, 1000);`;
  const vm = spawn(process.execPath, ['--input-type=module', '-e', src], { stdio: ['ignore', 'pipe', 'inherit'] });
  children.push(vm);
  const [line] = (await once(vm.stdout!, 'data')) as [Buffer];
  const daemon = Number(String(line).trim());
  expect(daemon).toBeGreaterThan(1);
  daemons.push(daemon);
  // The helper's own descriptor of the image, proof that it shares the lease.
  await waitUntil(() => readdirSync(`/proc/${daemon}/fd`).includes('3'), 10_000, 'the helper to run');
  return { vm, daemon };
}

describe('adopt() and the processes that share the lease', () => {
  it("a VM's daemonized helper shares its lease: adopted all the same; when the VM exits the lease is left to the helper ('orphans')", async () => {
    const { vm, daemon } = await vmWithDaemon();
    const m = await LockManager.adopt(vm.pid!, { resources: [{ type: 'disk', path: fx.path, mode: 'exclusive' }] });
    expect(m.state).toBe('running');
    const orphans = new Promise((resolve) => m.once('orphans', resolve));
    const exit = new Promise((resolve) => m.once('exit', resolve));
    vm.kill('SIGKILL');
    expect(await orphans).toEqual({ resource: fx.path, processes: [{ pid: daemon, command: 'sleep 1000' }], through: ['lease'] });
    await exit;
    await m.free();
    // Still the helper's: a new exclusive holder is refused.
    const third = new LockManager();
    third.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
    await expect(third.start('true')).rejects.toBeInstanceOf(ResourceBusyError);
    await third.free();
  });

  it('a live lockmgr supervisor is no VM to take over: InvalidArgumentError naming what it supervises, nothing taken', async () => {
    const run = spawn(process.execPath, [fileURLToPath(new URL('../../bin/lockmgr.js', import.meta.url)), 'run', '--exclusive', fx.path, '--', 'sleep', '1000'], { stdio: 'ignore' });
    children.push(run);
    await waitUntil(() => watchedBy(run.pid!).length > 0, 10_000, 'lockmgr run to start its command');
    const [vm] = watchedBy(run.pid!);
    daemons.push(vm!);
    const fds = fdCount();
    const err = (await LockManager.adopt(run.pid!, { resources: [{ type: 'disk', path: fx.path, mode: 'exclusive' }] }).catch((e: unknown) => e)) as Error;
    expect(err).toBeInstanceOf(InvalidArgumentError);
    expect(err.message).toBe(`process ${run.pid} is a lockmgr supervisor (it watches process ${vm}): take over the process it supervises once it is gone, not it`);
    expect(fdCount()).toBe(fds);
    expect(run.exitCode).toBe(null);
  });

  it('a process that runs lockmgr and shares the lease (an earlier adopter) is its supervisor: ResourceBusyError naming it, nothing taken', async () => {
    const { vm } = await vmWithDaemon();
    const src = `const { LockManager } = await import(${JSON.stringify(distUrl)});
      const m = await LockManager.adopt(${vm.pid}, { resources: [{ type: 'disk', path: ${JSON.stringify(fx.path)}, mode: 'exclusive' }] }).catch((e) => e);
      console.log(m instanceof Error ? m.message : 'adopted');
      setInterval(() => {}, 1000);`;
    const first = spawn(process.execPath, ['--input-type=module', '-e', src], { stdio: ['ignore', 'pipe', 'inherit'] });
    children.push(first);
    const [line] = (await once(first.stdout!, 'data')) as [Buffer];
    expect(String(line).trim()).toBe('adopted');
    const fds = fdCount();
    const err = (await LockManager.adopt(vm.pid!, { resources: [{ type: 'disk', path: fx.path, mode: 'exclusive' }] }).catch((e: unknown) => e)) as ResourceBusyError;
    expect(err).toBeInstanceOf(ResourceBusyError);
    expect(err.message).toMatch(new RegExp(`^process ${vm.pid} still has a supervisor: ${first.pid} \\(node `));
    expect(err.message).not.toMatch(/adopt\(\)/);
    expect(err.candidates.map((c) => c.pid)).toEqual([first.pid]);
    await waitUntil(() => fdCount() === fds, 10_000, `fds back at ${fds} (now ${fdCount()})`);
  });
});

// LockManager.adopt() takes over a lease only in the mode it is held in:
// shared and readonly both read-lock byte 0, and only their class byte
// (3 shared, 4 readonly) tells them apart. The holder here is a plain process
// that holds the bytes itself (no supervisor watches it), as a VM whose
// lockmgr died does.
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { afterEach, describe, expect, it } from 'vitest';
import { InvalidArgumentError, LockManager } from '../../lib/index.js';
import { distUrl, fdCount, lockFixture, waitUntil } from '../helpers.js';

const fx = lockFixture();
const children: ChildProcess[] = [];
afterEach(async () => {
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

import { execFileSync, spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { makeFile, preload, tempDir } from '../helpers.js';

// The wake-up signal (SIGRTMIN+6 unless LOCKMGR_WAKE_SIGNAL says otherwise) must
// be ours alone: a handler someone else installed would swallow our wake-ups.
let tmp: ReturnType<typeof tempDir>;
let shim: string;
let path: string;
const dist = new URL('../../dist/index.js', import.meta.url).href;

beforeAll(() => {
  tmp = tempDir();
  path = makeFile(tmp.dir);
  shim = join(tmp.dir, 'take-signal.so');
  execFileSync('cc', ['-shared', '-fPIC', '-o', shim, fileURLToPath(new URL('../fixtures/take-signal.c', import.meta.url))]);
});
afterAll(() => tmp.cleanup());

/** Runs a process that must wait for a lock, returning what lock() settled with. */
function waitInChild(env: Record<string, string>): { tryLock?: boolean; result: string } {
  const script = `import { openLockable } from ${JSON.stringify(dist)};
    const a = openLockable(${JSON.stringify(path)});
    const b = openLockable(${JSON.stringify(path)});
    a.tryLock('exclusive');
    const tryLock = b.tryLock('shared');
    b.lock('shared', undefined, { timeout: 50 }).then(
      () => console.log(JSON.stringify({ tryLock, result: 'granted' })),
      (e) => console.log(JSON.stringify({ tryLock, result: e.name + ' ' + e.code + ' ' + e.message })));`;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], {
    encoding: 'utf8',
    env: { ...process.env, LD_PRELOAD: preload(shim), ...env },
  });
  expect(r.stderr).toBe('');
  return JSON.parse(r.stdout);
}

it('a wait fails with UnsupportedError when the wake-up signal already has a handler; tryLock still works', () => {
  const r = waitInChild({ TAKE_SIGNAL_OFFSET: '6' });
  expect(r.tryLock).toBe(false);
  expect(r.result).toMatch(/^UnsupportedError ERR_UNSUPPORTED .*already has a handler.*LOCKMGR_WAKE_SIGNAL/);
});

it('LOCKMGR_WAKE_SIGNAL moves the wake-up signal to a free one', () => {
  const r = waitInChild({ TAKE_SIGNAL_OFFSET: '6', LOCKMGR_WAKE_SIGNAL: '50' });
  expect(r.result).toMatch(/^LockTimeoutError ERR_LOCK_TIMEOUT /);
});

it('LOCKMGR_WAKE_SIGNAL must name a real-time signal', () => {
  expect(waitInChild({ LOCKMGR_WAKE_SIGNAL: '10' }).result).toMatch(/^InvalidArgumentError ERR_INVALID_ARGUMENT .*real-time/);
  expect(waitInChild({ LOCKMGR_WAKE_SIGNAL: 'SIGUSR1' }).result).toMatch(/^InvalidArgumentError ERR_INVALID_ARGUMENT /);
});

it('without a conflicting handler the same wait times out normally', () => {
  expect(waitInChild({}).result).toMatch(/^LockTimeoutError ERR_LOCK_TIMEOUT /);
});

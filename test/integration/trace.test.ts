// Debugging as Node users expect: node:diagnostics_channel messages for open,
// wait, grant, release, lock loss and child exit, and util.debuglog lines
// with NODE_DEBUG=lockmgr, from real locks, a real peer process and a real
// supervised child.
import { spawnSync } from 'node:child_process';
import { subscribe, unsubscribe } from 'node:diagnostics_channel';
import { mkdirSync, readdirSync, unlinkSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { LockManager } from '../../lib/index.js';
import { distUrl, lockFixture, waitUntil } from '../helpers.js';

const fx = lockFixture({ peer: true });
const NAMES = ['open', 'wait', 'grant', 'release', 'lock-lost', 'child-exit'] as const;

/** Every message on lockmgr's channels while the test runs, in order, as [channel, message]. */
function record(): Array<[string, Record<string, unknown>]> {
  const seen: Array<[string, Record<string, unknown>]> = [];
  for (const name of NAMES) {
    const listener = (message: unknown) => seen.push([name, message as Record<string, unknown>]);
    subscribe(`lockmgr:${name}`, listener);
    subscriptions.push(() => unsubscribe(`lockmgr:${name}`, listener));
  }
  return seen;
}
const subscriptions: Array<() => void> = [];
afterEach(() => {
  for (const off of subscriptions.splice(0)) off();
});

describe('node:diagnostics_channel', () => {
  it('open, grant, wait, grant after the wait, release and close, each with the file, its path, fd, mode and range', async () => {
    const seen = record();
    const f = fx.open();
    expect(f.tryLock('shared', { start: 0, length: 1 })).toBe(true);
    f.unlock({ start: 0, length: 1 });
    const h = await fx.peer.call<number>('open', fx.path);
    await fx.peer.call('tryLock', h, 'exclusive', { start: 0, length: 1 });
    const waiting = f.lock('exclusive', { start: 0, length: 1 }, { timeout: 60_000 });
    await waitUntil(() => seen.some(([n]) => n === 'wait'), 20_000, 'the wait to be published');
    await fx.peer.call('close', h);
    await waiting;
    f.close();
    const common = { file: f, path: fx.path, fd: expect.any(Number) };
    expect(seen).toEqual([
      ['open', { ...common, access: 'readwrite', kind: 'file', created: false, adopted: false }],
      ['grant', { ...common, mode: 'shared', start: 0, length: 1, waited: false, timeout: undefined }],
      ['release', { ...common, start: 0, length: 1, closed: false }],
      ['wait', { ...common, mode: 'exclusive', start: 0, length: 1, waited: undefined, timeout: 60_000 }],
      ['grant', { ...common, mode: 'exclusive', start: 0, length: 1, waited: true, timeout: undefined }],
      ['release', { ...common, start: 0, length: 0, closed: true }],
    ]);
  });

  it("a LockManager's child exit and lock loss (an indirect lockspace's lock files deleted under it)", async () => {
    const dir = join(fx.tmp.dir, 'locks');
    mkdirSync(dir, { mode: 0o700 });
    const seen = record();
    const m = new LockManager({ lockspace: { kind: 'indirect', dir }, onLockFailure: 'poweroff' });
    try {
      m.registerResource({ type: 'disk', path: fx.path, mode: 'exclusive' });
      await m.start('sleep', ['1000']);
      const pid = m.getChild().pid;
      for (const name of readdirSync(dir)) unlinkSync(join(dir, name));
      expect((await m.verify()).lost).toEqual([fx.path]);
      await waitUntil(() => seen.some(([n]) => n === 'child-exit'), 20_000, 'the child to exit');
      expect(seen.filter(([n]) => n === 'lock-lost')).toEqual([['lock-lost', { manager: m, resource: fx.path, reason: expect.stringContaining('no longer held'), action: 'poweroff' }]]);
      expect(seen.filter(([n]) => n === 'child-exit')).toEqual([['child-exit', { manager: m, pid, code: null, signal: 'SIGKILL' }]]);
    } finally {
      await m.free();
    }
  });
});

describe('util.debuglog: NODE_DEBUG=lockmgr', () => {
  // fx.path is per test: the script is built when a test runs.
  const script = () => `
    const { openLockable } = await import(${JSON.stringify(distUrl)});
    const f = openLockable(${JSON.stringify(fx.path)});
    f.tryLock('exclusive', { start: 0, length: 1 });
    f.unlock({ start: 0, length: 1 });
    f.close();`;
  const run = (env: NodeJS.ProcessEnv) =>
    spawnSync(process.execPath, ['--input-type=module', '-e', script()], { encoding: 'utf8', timeout: 60_000, env: { ...process.env, ...env } });

  it('one line per event on stderr, naming it and its fields', () => {
    const r = run({ NODE_DEBUG: 'lockmgr' });
    expect(r.status).toBe(0);
    const lines = r.stderr.trimEnd().split('\n');
    const path = JSON.stringify(fx.path);
    expect(lines).toEqual([
      expect.stringMatching(new RegExp(`^LOCKMGR \\d+: open path=${escape(path)} fd=\\d+ access="readwrite" kind="file" created=false adopted=false$`)),
      expect.stringMatching(new RegExp(`^LOCKMGR \\d+: grant path=${escape(path)} fd=\\d+ mode="exclusive" start=0 length=1 waited=false$`)),
      expect.stringMatching(new RegExp(`^LOCKMGR \\d+: release path=${escape(path)} fd=\\d+ start=0 length=1 closed=false$`)),
      expect.stringMatching(new RegExp(`^LOCKMGR \\d+: release path=${escape(path)} fd=\\d+ start=0 length=0 closed=true$`)),
    ]);
  });

  it('silent without NODE_DEBUG', () => {
    const r = run({ NODE_DEBUG: '' });
    expect({ status: r.status, stderr: r.stderr }).toEqual({ status: 0, stderr: '' });
  });
});

function escape(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

// The sanlock lockspace against real sanlock daemons (docs/sanlock.md).
//
// Two simulated hosts on this machine: two daemons, each with its own
// SANLOCK_RUN_DIR and host name, unprivileged and without a watchdog, sharing
// one lockspace on a loop device. The sanlock client library reads
// SANLOCK_RUN_DIR once per process, so one host is one process: this test
// process is host 1, and host 2 is a manager peer process.
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AbortError, InvalidArgumentError, LockManager, LockTimeoutError, ResourceAccessError, ResourceBusyError, SpawnError, InvalidStateError, UnsupportedError } from '../../lib/index.js';
import { SANLOCK_NAMES_VERSION, classResourceName, createDiskLease, diskResourceName, initStorage, joinLockspace, leaveLockspace, lockspaceJoined, lockspaceState, leaseOwners, lookupLease } from '../../lib/lockspaces/sanlock-client.js';
import { SanlockCluster, sanlockUnavailable } from '../harness/sanlock.js';
import { Peer, fdCount, managerPeerScript, processExists, threadCount, waitUntil } from '../helpers.js';

const LS = 'lmtest';
// Host 1 is this process: the cluster points SANLOCK_RUN_DIR at it now, before the first call into the client library.
const cluster = new SanlockCluster({ lockspace: LS });
const why = sanlockUnavailable();
if (why !== null) console.warn(`test/system/sanlock.test.ts skipped: ${why}`);
const root = cluster.root;
const runDir = (h: number) => cluster.runDir(h);

const daemons = cluster.daemons;
const peers: Peer[] = [];
const managers: LockManager[] = [];
const disk = join(root, 'vm1.img');
const disk2 = join(root, 'vm2.img');
const host = (h: number) => cluster.config(h);
const timings: Record<string, number> = {};
const client = (h: number, ...args: string[]): string => cluster.client(h, ...args);
/** The leases host h's daemon holds, as "r LS:RES:PATH:OFFSET:LVER p PID" lines. */
const heldOn = (h: number): string[] => cluster.heldOn(h);

async function host2(): Promise<Peer> {
  const p = await Peer.start({ ...process.env, SANLOCK_RUN_DIR: runDir(2) }, managerPeerScript);
  peers.push(p);
  return p;
}

function manager(h = 1): LockManager {
  const m = new LockManager({ lockspace: host(h) });
  managers.push(m);
  return m;
}

async function cleanupManagers(): Promise<void> {
  for (const m of managers.splice(0)) await m.free();
  for (const p of peers.splice(0)) {
    if (p.child.exitCode === null && p.child.signalCode === null) await p.call('free').catch(() => undefined);
    await p.kill();
  }
  // A VM whose supervisor was killed (lease kept, by design) is killed here; the daemons then drop its leases.
  for (const h of [1, 2]) {
    for (const l of heldOn(h)) {
      const pid = Number(/ p (\d+)/.exec(l)?.[1]);
      if (pid > 0 && alive(pid)) process.kill(pid, 'SIGKILL');
    }
  }
  await waitUntil(() => heldOn(1).length === 0 && heldOn(2).length === 0, 10_000, 'the daemons to drop every lease');
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const bin = join(import.meta.dirname, '..', '..', 'bin', 'lockmgr.js');

/** Host 1's daemon stopped (SIGSTOP) until resume(): a daemon that hangs. Short pauses only: at io_timeout 1 the lockspace is lost after about 8 s. */
function stopDaemon1(): { resume: () => void; stopped: () => boolean } {
  const d = daemons[0]!;
  d.kill('SIGSTOP');
  let stopped = true;
  const resume = () => {
    if (!stopped) return;
    stopped = false;
    d.kill('SIGCONT');
  };
  // Never left stopped, even if the test under it hangs.
  setTimeout(resume, 6000).unref();
  return { resume, stopped: () => stopped };
}

const alive = processExists;

// Also when the suite below is skipped or filtered out: root is made at load.
afterAll(() => rmSync(root, { recursive: true, force: true }));

describe.skipIf(why !== null)('sanlock lockspace', () => {
  beforeAll(async () => {
    await cluster.setup();
    timings.join = cluster.joinMs;
    writeFileSync(disk, 'x'.repeat(4096));
    writeFileSync(disk2, 'x'.repeat(4096));
    expect(await createDiskLease({ lockspace: LS, path: cluster.loop, disk })).toMatchObject({ created: true });
    expect(await createDiskLease({ lockspace: LS, path: cluster.loop, disk: disk2 })).toMatchObject({ created: true });
  }, 60_000);

  afterAll(async () => {
    await cleanupManagers();
    await cluster.teardown();
    console.log(`sanlock timings (ms): ${JSON.stringify(timings)}`);
    // Bounded above by the managers' cleanup (10 s) and two daemon shutdowns (5 s each): vitest's
    // default 10 s hook timeout would end the worker first and orphan the daemons and the loop device.
  }, 60_000);

  it('storage helpers: joined, idempotent join and lease creation', async () => {
    expect(await lockspaceJoined({ lockspace: LS, path: cluster.loop, hostId: 1 })).toBe(true);
    expect(await joinLockspace({ lockspace: LS, path: cluster.loop, hostId: 1, ioTimeout: 1 })).toEqual({ wasJoined: true });
    const again = await createDiskLease({ lockspace: LS, path: cluster.loop, disk });
    expect(again.created).toBe(false);
    expect(again.offset).toBeGreaterThanOrEqual(8 * 1024 * 1024);
  });

  it('host 1 VM holds the disk: the lease is the VM pid\'s; host 2 is refused, naming host 1; host 2 acquires once the VM exits', async () => {
    const m = manager(1);
    m.registerResource({ type: 'disk', path: disk, mode: 'exclusive' });
    const t0 = performance.now();
    await m.start('sleep', ['1000']);
    timings.start = Math.round(performance.now() - t0);
    const vm = m.getChild().pid;
    expect(heldOn(1).some((l) => l.endsWith(` p ${vm}`))).toBe(true);

    const p = await host2();
    await p.call('create', { lockspace: host(2) });
    await p.call('register', { type: 'disk', path: disk, mode: 'exclusive' });
    const err = await p.callError('start', 'sleep', ['1000']);
    expect(err.name).toBe('ResourceBusyError');
    expect(err.message).toMatch(/held by host 1 \(host1\)/);
    expect(await p.call('state')).toBe('new');
    // The refused host's helper never exec'd and left nothing registered.
    expect(heldOn(2)).toEqual([]);

    await m.shutdown({ graceMs: 2000 });
    // Once shutdown() resolves, host 2 takes the disk at once (a fail-fast start), whatever the
    // daemon of host 1 still lists while it finishes forgetting the lease (REM).
    const vm2 = await p.call<number>('start', 'sleep', ['1000']);
    expect(heldOn(2).some((l) => l.endsWith(` p ${vm2}`))).toBe(true);
    await waitUntil(() => heldOn(1).length === 0, 10_000, "host 1's daemon to forget the released lease");
    await cleanupManagers();
  });

  it('the lease outlives the supervisor and goes with the VM (it is the registered process)', async () => {
    const p = await host2();
    await p.call('create', { lockspace: host(2) });
    await p.call('register', { type: 'disk', path: disk, mode: 'exclusive' });
    const vm = await p.call<number>('start', 'sleep', ['1000']);
    await p.kill('SIGKILL');
    expect(alive(vm)).toBe(true);
    expect(heldOn(2).some((l) => l.endsWith(` p ${vm}`))).toBe(true);
    const m = manager(1);
    m.registerResource({ type: 'disk', path: disk, mode: 'exclusive' });
    await expect(m.start('sleep', ['1000'])).rejects.toThrow(ResourceBusyError);
    process.kill(vm, 'SIGKILL');
    await waitUntil(() => heldOn(2).length === 0, 5000, 'host 2 to release with its VM');
    await m.start('sleep', ['1000'], {}, { timeout: 5000 });
    await cleanupManagers();
  });

  it('waits for the lease with a timeout: LockTimeoutError, then success when the holder exits', async () => {
    const a = manager(1);
    a.registerResource({ type: 'disk', path: disk, mode: 'exclusive' });
    await a.start('sleep', ['1000']);
    const p = await host2();
    await p.call('create', { lockspace: host(2) });
    await p.call('register', { type: 'disk', path: disk, mode: 'exclusive' });
    const timeout = await p.callError('start', 'sleep', ['1000'], {}, { timeout: 300 });
    expect(timeout.name).toBe('LockTimeoutError');
    expect(timeout.message).toMatch(/host 1/);
    const started = p.call<number>('start', 'sleep', ['1000'], {}, { timeout: 10_000 });
    await new Promise((r) => setTimeout(r, 200));
    await a.shutdown({ graceMs: 2000 });
    expect(await started).toBeGreaterThan(0);
    await cleanupManagers();
  });

  it('shared leases coexist across hosts, and readonly ones too; exclusive against them is busy', async () => {
    for (const mode of ['shared', 'readonly'] as const) {
      const a = manager(1);
      a.registerResource({ type: 'disk', path: disk2, mode });
      await a.start('sleep', ['1000']);
      const p = await host2();
      await p.call('create', { lockspace: host(2) });
      await p.call('register', { type: 'disk', path: disk2, mode });
      const vm2 = await p.call<number>('start', 'sleep', ['1000']);
      expect(heldOn(2).some((l) => l.endsWith(` p ${vm2}`))).toBe(true);
      const x = manager(1);
      x.registerResource({ type: 'disk', path: disk2, mode: 'exclusive' });
      await expect(x.start('sleep', ['1000'])).rejects.toThrow(ResourceBusyError);
      await cleanupManagers();
    }
  });

  it('readonly and shared exclude each other across hosts, both ways, through their class leases', async () => {
    const main = diskResourceName(disk2);
    for (const [held, wanted] of [
      ['readonly', 'shared'],
      ['shared', 'readonly'],
    ] as const) {
      const a = manager(1);
      a.registerResource({ type: 'disk', path: disk2, mode: held });
      await a.start('sleep', ['1000']);
      // Host 1's VM holds the main lease and its own class, both sanlock-shared.
      const vm = a.getChild().pid;
      expect(heldOn(1).filter((l) => l.endsWith(`:SH p ${vm}`)).map((l) => l.split(':')[1])).toEqual(expect.arrayContaining([main, classResourceName(main, held)]));
      // lockmgr status shows the class resources and who holds them.
      const status = spawnSync(process.execPath, [bin, 'status', '--lockspace', `sanlock:${LS}:${cluster.loop}:1`, disk2], { encoding: 'utf8', env: cluster.env(1) });
      expect(status.stdout).toMatch(new RegExp(`sanlock ${held} class +${LS}:${classResourceName(main, held)} on \\S+: lease held shared by host 1 \\(host1\\)`));
      expect(status.stdout).toMatch(new RegExp(`sanlock ${wanted} class +${LS}:${classResourceName(main, wanted)} on \\S+: lease free`));
      const p = await host2();
      await p.call('create', { lockspace: host(2) });
      await p.call('register', { type: 'disk', path: disk2, mode: wanted });
      const err = await p.callError('start', 'sleep', ['1000']);
      expect(err.name).toBe('ResourceBusyError');
      expect(err.message).toMatch(new RegExp(`held ${held} by host 1 \\(host1\\).*a ${wanted} lease and a ${held} one exclude each other`));
      expect(await p.call('state')).toBe('new');
      // All or nothing: the refused start left nothing held on host 2, nor on the storage.
      expect(heldOn(2)).toEqual([]);
      // And on the same host: a second manager of host 1 is refused alike.
      const b = manager(1);
      b.registerResource({ type: 'disk', path: disk2, mode: wanted });
      await expect(b.start('sleep', ['1000'])).rejects.toThrow(new RegExp(`held ${held} by host 1 \\(host1\\)`));
      await cleanupManagers();
    }
  });

  it('racing at once on two hosts, five rounds: readonly against shared never both run; readonly with readonly (waiting) both run', async () => {
    const p = await host2();
    for (const [mine, theirs] of [
      ['readonly', 'shared'],
      ['readonly', 'readonly'],
    ] as const) {
      for (let round = 0; round < 5; round++) {
        await p.call('create', { lockspace: host(2) });
        await p.call('register', { type: 'disk', path: disk2, mode: theirs });
        const a = manager(1);
        a.registerResource({ type: 'disk', path: disk2, mode: mine });
        // Readers wait (a fail-fast shared acquire can still lose a paxos round to the other host's: see docs/sanlock.md, "Limits").
        const wait = mine === theirs ? { timeout: 10_000 } : undefined;
        const [ours, peer] = await Promise.allSettled([a.start('sleep', ['1000'], {}, wait), p.call<number>('start', 'sleep', ['1000'], ...(wait === undefined ? [] : [{}, wait]))]);
        const ran = [ours.status === 'fulfilled', peer.status === 'fulfilled'];
        const what = `${mine} against ${theirs}, round ${round}: ${JSON.stringify(ran)}`;
        if (mine === theirs) expect(ran, `${what} ${[ours, peer].map((r) => (r.status === "rejected" ? `${(r.reason as Error).message} ${JSON.stringify((r.reason as { cause?: unknown }).cause ?? null)}` : "")).join(" / ")}`).toEqual([true, true]);
        else expect(ran.filter(Boolean).length, what).toBeLessThanOrEqual(1);
        for (const r of [ours, peer]) if (r.status === 'rejected') expect((r.reason as Error).name, what).toBe('ResourceBusyError');
        await a.free();
        managers.splice(managers.indexOf(a), 1);
        await p.call('free');
        await waitUntil(() => heldOn(1).length === 0 && heldOn(2).length === 0, 10_000, 'both hosts to let go');
      }
    }
    await cleanupManagers();
  });

  it('a wait for the other class ends when it lets go; a timeout names its holder', async () => {
    const a = manager(1);
    a.registerResource({ type: 'disk', path: disk2, mode: 'readonly' });
    await a.start('sleep', ['1000']);
    const p = await host2();
    await p.call('create', { lockspace: host(2) });
    await p.call('register', { type: 'disk', path: disk2, mode: 'shared' });
    const timeout = await p.callError('start', 'sleep', ['1000'], {}, { timeout: 300 });
    expect(timeout.name).toBe('LockTimeoutError');
    expect(timeout.message).toMatch(/held readonly by host 1 \(host1\)/);
    expect(heldOn(2)).toEqual([]);
    const started = p.call<number>('start', 'sleep', ['1000'], {}, { timeout: 30_000 });
    // The wait has begun once host 2 holds the main lease (it keeps it while it looks at the class again).
    const main = diskResourceName(disk2);
    await waitUntil(() => heldOn(2).some((l) => l.includes(`:${main}:`)), 10_000, 'host 2 to wait for the readonly class');
    await a.shutdown({ graceMs: 2000 });
    const vm2 = await started;
    expect(heldOn(2).filter((l) => l.endsWith(`:SH p ${vm2}`)).map((l) => l.split(':')[1])).toEqual(expect.arrayContaining([main, classResourceName(main, 'shared')]));
    await cleanupManagers();
  });

  it('adopt: the class lease tells readonly from shared, is taken over with the main lease, and goes at shutdown', async () => {
    const main = diskResourceName(disk2);
    // A supervisor on host 1 whose VM keeps its leases when it dies (lockLifetime 'child').
    const p = await Peer.start({ ...process.env, SANLOCK_RUN_DIR: runDir(1) }, managerPeerScript);
    peers.push(p);
    await p.call('create', { lockspace: host(1), lockLifetime: 'child' });
    await p.call('register', { type: 'disk', path: disk2, mode: 'shared' });
    const vm = await p.call<number>('start', 'sleep', ['1000']);
    await p.kill('SIGKILL');
    const wrong = await LockManager.adopt(vm, { lockspace: host(1), resources: [{ type: 'disk', path: disk2, mode: 'readonly' }] }).then(() => null, (e: unknown) => e as Error);
    expect(wrong).toBeInstanceOf(InvalidArgumentError);
    expect(wrong!.message).toMatch(/holds it shared, not readonly/);
    const m = await LockManager.adopt(vm, { lockspace: host(1), resources: [{ type: 'disk', path: disk2, mode: 'shared' }] });
    managers.push(m);
    expect(await m.verify()).toEqual({ lost: [] });
    // Still a shared writer for everyone else: a reader on host 2 is refused.
    const r = await host2();
    await r.call('create', { lockspace: host(2) });
    await r.call('register', { type: 'disk', path: disk2, mode: 'readonly' });
    expect((await r.callError('start', 'sleep', ['1000'])).message).toMatch(/held shared by host 1 \(host1\)/);
    await m.shutdown({ graceMs: 2000 });
    // Both the main lease and the class lease went with the VM.
    await waitUntil(() => !heldOn(1).some((l) => l.includes(`:${main}:`) || l.includes(`:${classResourceName(main, 'shared')}:`)), 10_000, 'host 1 to release both leases');
    expect(await r.call<number>('start', 'sleep', ['1000'])).toBeGreaterThan(0);
    await cleanupManagers();
  });

  it('names version 2 beside version 1: the main lease is unchanged, so exclusive excludes a version 1 holder; a lease without class leases is refused for readonly and shared until add-disk adds them', async () => {
    expect(SANLOCK_NAMES_VERSION).toBe(2);
    // A version 1 add-disk: the main resource only.
    const old = join(root, 'v1.img');
    writeFileSync(old, 'x'.repeat(4096));
    const main = diskResourceName(old);
    const rindex = `${LS}:${cluster.loop}:${8 * 1024 * 1024}`;
    client(1, 'create', '-x', rindex, '-e', main);
    const offset = (await lookupLease(LS, cluster.loop, main))!;
    // A version 1 shared holder on host 2: the main lease sanlock-shared, as version 1 took it for readonly and shared.
    const v1 = spawn('sanlock', ['client', 'command', '-r', `${LS}:${main}:${cluster.loop}:${offset}:SH`, '-c', '/bin/sleep', '1000'], { env: cluster.env(2), stdio: 'ignore' });
    try {
      await waitUntil(() => heldOn(2).some((l) => l.includes(`:${main}:`) && !l.endsWith(' ADD')), 10_000, 'the version 1 holder on host 2');
      const x = manager(1);
      x.registerResource({ type: 'disk', path: old, mode: 'exclusive' });
      await expect(x.start('sleep', ['1000'])).rejects.toThrow(/held by host 2 \(host2\)/);
      for (const mode of ['readonly', 'shared'] as const) {
        const m = manager(1);
        m.registerResource({ type: 'disk', path: old, mode });
        const err = (await m.start('sleep', ['1000']).then(() => null, (e: unknown) => e)) as Error;
        expect(err).toBeInstanceOf(ResourceAccessError);
        expect(err.message).toMatch(new RegExp(`no ${mode} class lease .*before sanlock names version 2.*lockmgr sanlock add-disk`));
        expect(heldOn(1)).toEqual([]);
      }
    } finally {
      v1.kill('SIGKILL');
      await new Promise((r) => (v1.exitCode === null && v1.signalCode === null ? v1.once('exit', r) : r(null)));
    }
    await cleanupManagers();
    // add-disk again adds the class leases; the main lease keeps its offset.
    const again = await createDiskLease({ lockspace: LS, path: cluster.loop, disk: old });
    expect(again).toMatchObject({ offset, created: false, classes: { created: true } });
    const m = manager(1);
    m.registerResource({ type: 'disk', path: old, mode: 'readonly' });
    await m.start('sleep', ['1000']);
    await cleanupManagers();
  });

  it('lockmgr run on a disk without its lease, or without class leases: the advice names the command only, no API call', async () => {
    const old = join(root, 'v1-cli.img');
    writeFileSync(old, 'x'.repeat(4096));
    client(1, 'create', '-x', `${LS}:${cluster.loop}:${8 * 1024 * 1024}`, '-e', diskResourceName(old));
    const r = spawnSync(process.execPath, [bin, 'run', '--lockspace', `sanlock:${LS}:${cluster.loop}:1`, '--readonly', old, '--', 'true'], { encoding: 'utf8', env: cluster.env(1) });
    expect(r.stderr).toMatch(/no readonly class lease .*\(lockmgr sanlock add-disk\)/);
    expect(r.stderr).not.toMatch(/\w\(\)/);
    expect(heldOn(1)).toEqual([]);
    // No lease at all: the same.
    const none = join(root, 'no-lease-cli.img');
    writeFileSync(none, 'x'.repeat(4096));
    const n = spawnSync(process.execPath, [bin, 'run', '--lockspace', `sanlock:${LS}:${cluster.loop}:1`, '--exclusive', none, '--', 'true'], { encoding: 'utf8', env: cluster.env(1) });
    expect(n.stderr).toMatch(/has no sanlock lease .*: create it once \(lockmgr sanlock add-disk\)\n$/);
    expect(heldOn(1)).toEqual([]);
  });

  it('all or nothing: the second disk busy leaves the first released and the command never run', async () => {
    const p = await host2();
    await p.call('create', { lockspace: host(2) });
    await p.call('register', { type: 'disk', path: disk2, mode: 'exclusive' });
    await p.call('start', 'sleep', ['1000']);
    const m = manager(1);
    m.registerResource({ type: 'disk', path: disk, mode: 'exclusive' });
    m.registerResource({ type: 'disk', path: disk2, mode: 'exclusive' });
    const marker = join(root, 'ran');
    const err = await m.start('sh', ['-c', `touch ${marker}; sleep 1000`]).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ResourceBusyError);
    expect(existsSync(marker)).toBe(false);
    await waitUntil(() => heldOn(1).length === 0, 5000, 'the rolled-back lease to go');
    expect(m.state).toBe('new');
    await cleanupManagers();
  });

  it('migration from host 1 to host 2 with the lease state: the target acquires with the source\'s lease version', async () => {
    const src = manager(1);
    src.registerResource({ type: 'disk', path: disk, mode: 'exclusive' });
    await src.start('sleep', ['1000']);
    const token = src.inquire();
    const p = await host2();
    await p.call('fromInquire', token, { lockspace: host(2), resources: [{ type: 'disk', path: disk, mode: 'exclusive' }] });
    await p.call('start', 'sleep', ['1000']);
    expect(await p.call('state')).toBe('incoming');
    await src.prepareMigrate('host2');
    const t0 = performance.now();
    await src.completeMigrateOut('host2');
    timings.release = Math.round(performance.now() - t0);
    expect(heldOn(1)).toEqual([]);
    const t1 = performance.now();
    await p.call('completeMigrateIn', 'host1', { timeout: 10_000 });
    timings.migrateIn = Math.round(performance.now() - t1);
    expect(await p.call('state')).toBe('running');
    expect(heldOn(2)).toHaveLength(1);
    // The source cannot take it back any more.
    await expect(src.completeMigrateOut('host2', { cancel: true })).rejects.toThrow(ResourceBusyError);
    await cleanupManagers();
  });

  it('a third party that takes the lease during the handover makes the target fail (lease version changed)', async () => {
    const src = manager(1);
    src.registerResource({ type: 'disk', path: disk, mode: 'exclusive' });
    await src.start('sleep', ['1000']);
    const token = src.inquire();
    const p = await host2();
    await p.call('fromInquire', token, { lockspace: host(2), resources: [{ type: 'disk', path: disk, mode: 'exclusive' }] });
    await p.call('start', 'sleep', ['1000']);
    await src.prepareMigrate('host2');
    await src.completeMigrateOut('host2');
    const third = manager(1);
    third.registerResource({ type: 'disk', path: disk, mode: 'exclusive' });
    await third.start('sleep', ['1000']);
    await third.shutdown({ graceMs: 2000 });
    const err = await p.callError('completeMigrateIn', 'host1', { timeout: 5000 });
    expect(err.name).toBe('ResourceBusyError');
    expect(err.message).toMatch(/changed hands/);
    await cleanupManagers();
  });

  it('lease loss: sanlock kills the VM when the lockspace goes; the manager reports lock-failure', async () => {
    const m = manager(1);
    const failures: unknown[] = [];
    m.on('lock-failure', (f) => failures.push(f));
    m.registerResource({ type: 'disk', path: disk, mode: 'exclusive' });
    await m.start('sleep', ['1000']);
    const exited = new Promise((r) => m.once('exit', r));
    await leaveLockspace({ lockspace: LS, path: cluster.loop, hostId: 1 });
    try {
      await lostAndRefused();
    } finally {
      const t0 = Date.now();
      await joinLockspace({ lockspace: LS, path: cluster.loop, hostId: 1, ioTimeout: 1 });
      timings.rejoin = Date.now() - t0;
    }
    await cleanupManagers();
    async function lostAndRefused(): Promise<void> {
    expect(await exited).toEqual({ code: null, signal: 'SIGKILL' });
    expect(failures).toEqual([{ resource: disk, reason: expect.stringMatching(/no longer held by this host/), action: 'poweroff' }]);
    expect(m.state).toBe('stopped');
    // Not joined: InvalidStateError, and the command never runs.
    const b = manager(1);
    b.registerResource({ type: 'disk', path: disk, mode: 'exclusive' });
    await expect(b.start('sleep', ['1000'])).rejects.toThrow(InvalidStateError);
    expect(b.state).toBe('new');
    }
  });

  it('typed errors: lease missing, command missing, attach', async () => {
    const none = join(root, 'no-lease.img');
    writeFileSync(none, 'x');
    const a = manager(1);
    a.registerResource({ type: 'disk', path: none, mode: 'exclusive' });
    await expect(a.start('sleep', ['1000'])).rejects.toThrow(ResourceAccessError);
    expect(a.state).toBe('new');

    const c = manager(1);
    c.registerResource({ type: 'disk', path: disk, mode: 'exclusive' });
    const spawnErr = await c.start('/nonexistent/qemu', []).catch((e: unknown) => e);
    expect(spawnErr).toBeInstanceOf(SpawnError);
    expect((spawnErr as SpawnError).cause.code).toBe('ENOENT');
    await waitUntil(() => heldOn(1).length === 0, 5000, 'the failed exec to release');

    // Refused when asked for, naming the capability, never found out halfway through start().
    expect(() => new LockManager({ lockspace: host(1), attach: process.pid })).toThrow(UnsupportedError);
    expect(() => new LockManager({ lockspace: host(1), attach: process.pid })).toThrow(/lacks the capability 'attach'/);
    await cleanupManagers();
  });

  it('CLI: lockmgr sanlock joined and add-disk', () => {
    const cli = (...args: string[]) => spawnSync(process.execPath, [join(import.meta.dirname, '..', '..', 'bin', 'lockmgr.js'), 'sanlock', ...args], { encoding: 'utf8', env: { ...process.env, SANLOCK_RUN_DIR: runDir(1) } });
    expect(cli('joined', '--lockspace', LS, '--path', cluster.loop, '--host-id', '1').status).toBe(0);
    expect(cli('joined', '--lockspace', LS, '--path', cluster.loop, '--host-id', '7').status).toBe(1);
    const add = cli('add-disk', '--lockspace', LS, '--path', cluster.loop, disk);
    expect(add.status).toBe(0);
    expect(add.stdout).toMatch(/lease exists at offset \d+; class leases exist at offsets \d+ \(readonly\), \d+ \(shared\)/);
    const none = spawnSync(process.execPath, [join(import.meta.dirname, '..', '..', 'bin', 'lockmgr.js'), 'sanlock', 'joined', '--lockspace', LS, '--path', cluster.loop, '--host-id', '1'], { encoding: 'utf8', env: { ...process.env, SANLOCK_RUN_DIR: join(root, 'nowhere') } });
    expect(none.status).toBe(69);
    expect(none.stderr).toMatch(/no sanlock daemon answers/);
  });

  it('no daemon: UnsupportedError naming the socket', async () => {
    const empty = join(root, 'nodaemon');
    mkdirSync(empty, { recursive: true });
    const p = await Peer.start({ ...process.env, SANLOCK_RUN_DIR: empty }, managerPeerScript);
    peers.push(p);
    await p.call('create', { lockspace: host(1) });
    await p.call('register', { type: 'disk', path: disk, mode: 'exclusive' });
    const err = await p.callError('start', 'sleep', ['1000']);
    expect(err.name).toBe('UnsupportedError');
    expect(err.message).toMatch(/no sanlock daemon answers at .*nodaemon\/sanlock.sock/);
    await cleanupManagers();
  });

  it('free(), an abort or the deadline while the gate is closed: start() rejects and the command never runs', async () => {
    for (const variant of ['free', 'abort', 'timeout'] as const) {
      const marker = join(root, `ran-${variant}`);
      const m = manager(1);
      m.registerResource({ type: 'disk', path: disk, mode: 'exclusive' });
      const ac = new AbortController();
      const opts = variant === 'abort' ? { signal: ac.signal } : variant === 'timeout' ? { timeout: 100 } : undefined;
      // The helper blocks in sanlock_register() on the stopped daemon: the gate is closed.
      const daemon = stopDaemon1();
      const started = m.start('sh', ['-c', `touch ${marker}; exec sleep 1000`], {}, opts).then(() => null, (e: unknown) => e);
      await sleep(100);
      const freed = variant === 'free' ? m.free() : undefined;
      if (variant === 'abort') ac.abort();
      // The timeout variant: the daemon answers (register, acquire) after the deadline.
      await sleep(300);
      daemon.resume();
      const err = await started;
      await freed;
      expect(err).toBeInstanceOf(variant === 'timeout' ? LockTimeoutError : AbortError);
      expect(m.state).toBe(variant === 'free' ? 'freed' : 'new');
      await waitUntil(() => heldOn(1).length === 0, 5000, 'nothing held');
      expect(existsSync(marker)).toBe(false);
    }
    await cleanupManagers();
    expect(await lockspaceJoined({ lockspace: LS, path: cluster.loop, hostId: 1 })).toBe(true);
  });

  it('a hung daemon: free() and the deadline end start() without waiting for the daemon', async () => {
    const a = manager(1);
    a.registerResource({ type: 'disk', path: disk, mode: 'exclusive' });
    const b = manager(1);
    b.registerResource({ type: 'disk', path: disk2, mode: 'exclusive' });
    const daemon = stopDaemon1();
    try {
      const timedOut = a.start('sleep', ['1000'], {}, { timeout: 100 }).then(() => null, (e: unknown) => [e, daemon.stopped()]);
      const freed = b.start('sleep', ['1000']).then(() => null, (e: unknown) => e);
      await sleep(100);
      await b.free();
      expect(daemon.stopped()).toBe(true);
      expect(await freed).toBeInstanceOf(AbortError);
      const [err, whileStopped] = (await timedOut) as [unknown, boolean];
      expect(err).toBeInstanceOf(LockTimeoutError);
      expect((err as Error).message).toMatch(/did not answer/);
      expect(whileStopped).toBe(true);
      expect(a.state).toBe('new');
    } finally {
      daemon.resume();
    }
    await waitUntil(() => heldOn(1).length === 0, 5000, 'nothing held');
    await cleanupManagers();
    expect(await lockspaceJoined({ lockspace: LS, path: cluster.loop, hostId: 1 })).toBe(true);
  });

  it("a VM whose child inherited the registration: its leases are released at 'exit' all the same", async () => {
    const pidFile = join(root, 'bg.pid');
    const m = manager(1);
    const warnings: unknown[] = [];
    m.on('warning', (w) => warnings.push(w));
    m.registerResource({ type: 'disk', path: disk, mode: 'exclusive' });
    const exited = new Promise((r) => m.once('exit', r));
    await m.start('sh', ['-c', `sleep 1000 & echo $! > ${pidFile}; exit 0`]);
    expect(await exited).toEqual({ code: 0, signal: null });
    const bg = Number(readFileSync(pidFile, 'utf8'));
    try {
      expect(alive(bg)).toBe(true);
      expect(warnings).toEqual([]);
      // The daemon may still list the lease while it finishes forgetting it (REM); host 2 taking it below proves it free.
      await waitUntil(() => heldOn(1).length === 0, 10_000, "host 1's daemon to forget the released lease");
      const p = await host2();
      await p.call('create', { lockspace: host(2) });
      await p.call('register', { type: 'disk', path: disk, mode: 'exclusive' });
      const vm2 = await p.call<number>('start', 'sleep', ['1000']);
      expect(heldOn(2).some((l) => l.endsWith(` p ${vm2}`))).toBe(true);
    } finally {
      process.kill(bg, 'SIGKILL');
    }
    await cleanupManagers();
  });

  it('a VM that closes its registration loses its leases: verify() and verifyInterval report it and power the VM off', async () => {
    const closer = ['-c', 'for f in $(ls /proc/$$/fd); do [ $f -gt 2 ] && eval "exec $f>&-"; done; exec sleep 1000'];
    const m = manager(1);
    const failures: unknown[] = [];
    m.on('lock-failure', (f) => failures.push(f));
    m.registerResource({ type: 'disk', path: disk, mode: 'exclusive' });
    await m.start('bash', closer);
    const vm = m.getChild().pid;
    await waitUntil(() => !heldOn(1).some((l) => l.endsWith(` p ${vm}`)), 5000, "the daemon to drop the VM's lease");
    const exited = new Promise((r) => m.once('exit', r));
    expect(await m.verify()).toEqual({ lost: [disk] });
    expect(failures).toEqual([{ resource: disk, reason: expect.stringMatching(/no longer held/), action: 'poweroff' }]);
    expect(await exited).toEqual({ code: null, signal: 'SIGKILL' });

    const n = new LockManager({ lockspace: host(1), verifyInterval: 50 });
    managers.push(n);
    n.registerResource({ type: 'disk', path: disk2, mode: 'exclusive' });
    const failed = new Promise((r) => n.once('lock-failure', r));
    const nExited = new Promise((r) => n.once('exit', r));
    await n.start('bash', closer);
    expect(await failed).toMatchObject({ resource: disk2, action: 'poweroff' });
    expect(await nExited).toEqual({ code: null, signal: 'SIGKILL' });
    // A VM that keeps its registration: verify() finds its lease.
    const k = manager(1);
    k.registerResource({ type: 'disk', path: disk, mode: 'exclusive' });
    await k.start('sleep', ['1000']);
    expect(await k.verify()).toEqual({ lost: [] });
    await cleanupManagers();
  });

  it("a join in progress: a start does not wait behind it, and lockspaceJoined() says not yet ('joining')", async () => {
    const lun2 = join(root, 'ls2.img');
    execFileSync('truncate', ['-s', '16M', lun2]);
    const o = { lockspace: 'lmjoin', path: lun2, hostId: 1 };
    await initStorage({ ...o, ioTimeout: 1 });
    let joined = false;
    const joining = joinLockspace({ ...o, ioTimeout: 1 }).then(() => (joined = true));
    try {
      await waitUntil(() => client(1, 'status').includes('lmjoin'), 5000, 'the join to begin');
      const m = manager(1);
      m.registerResource({ type: 'disk', path: disk, mode: 'exclusive' });
      await m.start('sleep', ['1000']);
      expect(joined).toBe(false);
      expect(await lockspaceState(o)).toBe('joining');
      expect(await lockspaceJoined(o)).toBe(false);
      const cli = spawnSync(process.execPath, [bin, 'sanlock', 'joined', '--lockspace', o.lockspace, '--path', lun2, '--host-id', '1'], { encoding: 'utf8' });
      expect(cli.stderr).toBe('');
      expect(cli.stdout).toMatch(/^joining lmjoin as host 1: not joined yet/);
      expect(cli.status).toBe(1);
      expect(joined).toBe(false);
    } finally {
      await joining;
      await leaveLockspace(o);
    }
    expect(await lockspaceState(o)).toBe('not-joined');
    await cleanupManagers();
  });

  it('a lease released before the migration is not in the token: the target hotplugs it later without a false "changed hands"', async () => {
    const src = manager(1);
    src.registerResource({ type: 'disk', path: disk, mode: 'exclusive' });
    await src.start('sleep', ['1000']);
    await src.acquireResource({ type: 'disk', path: disk2, mode: 'exclusive' });
    await src.releaseResource({ type: 'disk', path: disk2 });
    const token = await src.prepareMigrate('host2');
    const p = await host2();
    await p.call('fromInquire', token, { lockspace: host(2), resources: [{ type: 'disk', path: disk, mode: 'exclusive' }] });
    await p.call('start', 'sleep', ['1000']);
    await src.completeMigrateOut('host2');
    await p.call('completeMigrateIn', 'host1', { timeout: 10_000 });
    // Meanwhile another VM uses disk 2 (its lease version moves on) and stops.
    const other = manager(1);
    other.registerResource({ type: 'disk', path: disk2, mode: 'exclusive' });
    await other.start('sleep', ['1000']);
    await other.shutdown({ graceMs: 2000 });
    await p.call('acquire', { type: 'disk', path: disk2, mode: 'exclusive' });
    expect(heldOn(2)).toHaveLength(2);
    await cleanupManagers();
  });

  it('permission denied on the daemon socket: ResourceAccessError saying so, not "no daemon"', () => {
    // As nobody: the socket is root's (the daemon's -U 0 -G 0), in a 0700 directory.
    const r = spawnSync(process.execPath, [bin, 'sanlock', 'joined', '--lockspace', LS, '--path', cluster.loop, '--host-id', '1'], {
      encoding: 'utf8',
      uid: 65534,
      gid: 65534,
      env: { ...process.env, SANLOCK_RUN_DIR: runDir(1) },
    });
    expect(r.stderr).toMatch(/permission denied by the sanlock daemon at .*sanlock\.sock: its socket admits root and the members of the sanlock group/);
    expect(r.stderr).toMatch(/EACCES \(-13/);
    expect(r.status).toBe(66);
  });

  it('leaves no fds or threads behind', async () => {
    await new Promise((r) => setTimeout(r, 1500));
    const fds = fdCount();
    const threads = threadCount();
    for (let i = 0; i < 3; i++) {
      const m = manager(1);
      m.registerResource({ type: 'disk', path: disk, mode: 'exclusive' });
      await m.start('sleep', ['1000']);
      await m.free();
    }
    await cleanupManagers();
    expect(fdCount()).toBe(fds);
    // The sanlock worker threads exit after a second idle.
    await waitUntil(() => threadCount() <= threads, 5000, 'idle sanlock workers to exit');
  });

  it.skipIf(process.env.LOCKMGR_SANLOCK_FAILOVER !== '1')('host death of a shared writer: a reader acquires once that host is dead, its left-over class hold cleared (about 70 s; LOCKMGR_SANLOCK_FAILOVER=1)', async () => {
    const main = diskResourceName(disk2);
    const p = await host2();
    await p.call('create', { lockspace: host(2) });
    await p.call('register', { type: 'disk', path: disk2, mode: 'shared' });
    const vm2 = await p.call<number>('start', 'sleep', ['1000']);
    // Host 2 dies: its daemon stops renewing; its shared holds stay on the storage.
    daemons[1]!.kill('SIGKILL');
    await waitUntil(() => !cluster.daemonAlive(2), 5000, "host 2's daemon to die");
    process.kill(vm2, 'SIGKILL');
    const offset = (await lookupLease(LS, cluster.loop, classResourceName(main, 'shared')))!;
    expect((await leaseOwners({ lockspace: LS, resource: classResourceName(main, 'shared'), path: cluster.loop }, offset)).map((o) => o.hostId)).toEqual([2]);
    const m = manager(1);
    m.registerResource({ type: 'disk', path: disk2, mode: 'readonly' });
    const t0 = Date.now();
    await m.start('sleep', ['1000'], {}, { timeout: 150_000 });
    timings.classFailover = Date.now() - t0;
    // The momentary exclusive acquire cleared the dead host's hold.
    expect(await leaseOwners({ lockspace: LS, resource: classResourceName(main, 'shared'), path: cluster.loop }, offset)).toEqual([]);
    await cleanupManagers();
    await cluster.revive(2);
  }, 200_000);

  it.skipIf(process.env.LOCKMGR_SANLOCK_FAILOVER !== '1')('host death: host 2 acquires once host 1 is dead (about 70 s; LOCKMGR_SANLOCK_FAILOVER=1)', async () => {
    const m = manager(1);
    m.registerResource({ type: 'disk', path: disk, mode: 'exclusive' });
    await m.start('sleep', ['1000']);
    // Host 1 dies: its daemon stops renewing (without a watchdog its VM runs on: see docs/sanlock.md).
    daemons[0]!.kill('SIGKILL');
    const p = await host2();
    await p.call('create', { lockspace: host(2) });
    await p.call('register', { type: 'disk', path: disk, mode: 'exclusive' });
    const t0 = Date.now();
    await p.call('start', 'sleep', ['1000'], {}, { timeout: 150_000 });
    timings.failover = Date.now() - t0;
    await cleanupManagers();
  }, 200_000);
});

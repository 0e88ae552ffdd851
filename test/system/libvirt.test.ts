// Interop with real libvirt (Debian 12: libvirt 9.0, libvirtd and virtlockd
// with lock_manager = "lockd") and QEMU 7.2 (TCG): a private libvirt started by
// the test in its own mount namespace (test/harness/libvirt.ts), transient
// domains with a raw virtio disk, and lockmgr on the same disks, both ways.
// virtlockd in its indirect mode (file_lockspace_dir: sha256 of the path as
// the domain XML spells it) against lockmgr's indirect lockspace on the same
// directory, then in its direct mode (byte 0 of the image) against lockmgr's
// direct lockspace. docs/lockspaces.md, "libvirt and virtlockd", says what is
// observed here.
import { execFile, spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, linkSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, realpathSync, statSync, symlinkSync, truncateSync, unlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { LockManager, ResourceBusyError, type DirectLockspaceConfig, type IndirectLockspaceConfig } from '../../lib/index.js';

type LockspaceConfig = DirectLockspaceConfig | IndirectLockspaceConfig;
import { domainXml, holderCommand, LibvirtHost, libvirtUnavailable, SWEEP_ON_TERM, type Run } from '../harness/libvirt.js';
import { firstJsonLine, openFds, procStat, procState, within, zombieChildren } from '../harness/process-helpers.js';
import { isRoot, waitUntil } from '../helpers.js';

const why = libvirtUnavailable();
if (why !== null) console.warn(`skipping the libvirt interop tests: ${why}`);

const BIN = fileURLToPath(new URL('../../bin/lockmgr.js', import.meta.url));

const sha256 = (text: string): string => createHash('sha256').update(text, 'utf8').digest('hex');

/** Every file under a directory with the sha256 of its content (and every symlink's target): what "untouched" means. */
function treeHash(dir: string): string {
  const h = createHash('sha256');
  const walk = (d: string): void => {
    for (const e of readdirSync(d, { withFileTypes: true }).sort((a, b) => (a.name < b.name ? -1 : 1))) {
      const p = join(d, e.name);
      const st = statSync(p, { throwIfNoEntry: false });
      h.update(`${p}\0${e.isDirectory() ? 'd' : e.isSymbolicLink() ? 'l' : 'f'}\0${st?.mode ?? ''}\0`);
      if (e.isDirectory()) walk(p);
      else if (e.isFile()) h.update(readFileSync(p));
    }
  };
  if (existsSync(dir)) walk(dir);
  return h.digest('hex');
}

/** Pids of every process whose command line names one of this run's domains (QEMU: `-name guest=NAME,...`). */
function qemusOf(prefix: string): number[] {
  const out: number[] = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      if (readFileSync(`/proc/${name}/cmdline`, 'utf8').includes(`guest=${prefix}`)) out.push(Number(name));
    } catch {
      // gone while we looked
    }
  }
  return out;
}

function lockmgr(...args: string[]): Promise<Run> {
  return new Promise((resolve) => {
    execFile(process.execPath, [BIN, ...args], { encoding: 'utf8' }, (err, stdout, stderr) => {
      resolve({ code: err === null ? 0 : typeof err.code === 'number' ? err.code : 1, out: `${stdout}${stderr}` });
    });
  });
}

// Each domain start under TCG takes seconds, more on a loaded machine: a hang guard, never a pass condition.
describe.skipIf(why !== null)('against real libvirt and virtlockd', { timeout: 240_000 }, () => {
  const prefix = `lockmgr-${process.pid}-`;
  const etcBefore = treeHash('/etc/libvirt');
  const runLibvirtBefore = existsSync('/run/libvirt');
  let root: string;
  let lockDir: string;
  let image: string;
  let link: string;
  let host: LibvirtHost;
  const managers: LockManager[] = [];
  let n = 0;
  const domain = (): string => `${prefix}${++n}`;

  let fdsBefore: number[];

  beforeAll(async () => {
    fdsBefore = openFds();
    // Canonical, so that `image` is its own realpath.
    root = realpathSync(mkdtempSync('/tmp/lockmgr-libvirt-'));
    lockDir = join(root, 'lockd-files');
    mkdirSync(lockDir, { mode: 0o700 });
    mkdirSync(join(root, 'images', 'by-name'), { recursive: true });
    image = join(root, 'images', 'vm1.img');
    writeFileSync(image, '');
    truncateSync(image, 4 * 1024 * 1024);
    link = join(root, 'images', 'by-name', 'vm1.img');
    symlinkSync(image, link);
    host = new LibvirtHost(root);
    await host.open();
    await host.start(lockDir);
  }, 180_000);

  afterEach(async () => {
    for (const m of managers.splice(0)) await m.free();
    await host?.clearDomains();
  });

  afterAll(async () => {
    await host?.close();
  }, 120_000);

  /** A manager holding `path` (running `sleep`), in the lockspace of the current libvirt mode. */
  async function hold(path: string, mode: 'exclusive' | 'shared', lockspace: LockspaceConfig, qemuCompatible = false): Promise<LockManager> {
    const m = new LockManager({ lockspace });
    managers.push(m);
    m.registerResource({ type: 'disk', path, mode, qemuCompatible });
    await m.start('sleep', ['1000']);
    return m;
  }

  async function refused(path: string, mode: 'exclusive' | 'shared', lockspace: LockspaceConfig, qemuCompatible = false): Promise<ResourceBusyError> {
    const err = await hold(path, mode, lockspace, qemuCompatible).then(
      () => null,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(ResourceBusyError);
    return err as ResourceBusyError;
  }

  async function created(disk: { path: string; shareable?: boolean }): Promise<string> {
    const name = domain();
    const r = await host.create(name, disk);
    expect(r.code, r.out).toBe(0);
    return name;
  }

  describe('virtlockd in indirect mode (file_lockspace_dir), lockmgr\'s indirect lockspace on the same directory', () => {
    const indirect = (): LockspaceConfig => ({ kind: 'indirect', dir: lockDir });

    it('a running domain holds its disk: lockmgr refuses it (API and CLI) and names virtlockd, its pid and command', async () => {
      await created({ path: image });
      // virtlockd's lock file: sha256 of the path as the XML spells it, byte 0 write-locked (POSIX, its pid).
      expect(readdirSync(lockDir)).toEqual([sha256(image)]);
      const locks = readFileSync('/proc/locks', 'utf8');
      const ino = statSync(join(lockDir, sha256(image))).ino;
      expect(locks).toMatch(new RegExp(`POSIX\\s+ADVISORY\\s+WRITE ${host.virtlockd!.pid} [0-9a-f]+:[0-9a-f]+:${ino} 0 0\\n`));

      for (const mode of ['exclusive', 'shared'] as const) {
        const err = await refused(image, mode, indirect());
        expect(err.holder).toMatchObject({ pid: host.virtlockd!.pid, mode: 'exclusive' });
        expect(err.message).toContain(`held exclusively by pid ${host.virtlockd!.pid} (virtlockd -f /etc/libvirt/virtlockd.conf)`);
      }
      const cli = await lockmgr('run', '--lockspace', lockDir, '--exclusive', image, '--', 'true');
      expect(cli.code).toBe(75);
      expect(cli.out).toMatch(new RegExp(`is busy: an exclusive POSIX lock on byte 0 is held by\\n +pid ${host.virtlockd!.pid} +\\S*virtlockd`));
      console.log(`libvirt: ${cli.out.trim()}`);
      // lockmgr's own lock files were rolled back and deleted; virtlockd's stays.
      expect(readdirSync(lockDir)).toEqual([sha256(image)]);
    });

    it('while lockmgr holds a disk, virsh create and virsh start are refused (resource busy); start --paused is not, until resume', async () => {
      const m = await hold(image, 'exclusive', indirect());
      const c = await host.create(domain(), { path: image });
      expect(c.code).not.toBe(0);
      expect(c.out).toContain(`resource busy: Lockspace resource '${sha256(image)}' is locked`);
      console.log(`libvirt: virsh create: ${c.out}`);

      const name = domain();
      const xml = join(root, `${name}.xml`);
      writeFileSync(xml, domainXml(name, { path: image }));
      expect((await host.virsh('define', xml)).code).toBe(0);
      const s = await host.virsh('start', name);
      expect(s.code).not.toBe(0);
      expect(s.out).toContain('resource busy');
      // libvirt takes leases when vCPUs start: a paused start holds none, and QEMU is running.
      const paused = await host.virsh('start', '--paused', name);
      expect(paused.code, paused.out).toBe(0);
      expect((await host.virsh('domstate', name)).out).toBe('paused');
      expect(qemusOf(`${name},`)).toHaveLength(1);
      const resume = await host.virsh('resume', name);
      expect(resume.code).not.toBe(0);
      expect(resume.out).toContain('resource busy');
      console.log(`libvirt: virsh resume: ${resume.out}`);
      expect((await host.virsh('domstate', name)).out).toBe('paused');
      expect((await host.virsh('destroy', name)).code).toBe(0);

      await m.free();
      const started = await host.virsh('start', name);
      expect(started.code, started.out).toBe(0);
      expect((await host.virsh('domstate', name)).out).toBe('running');
    });

    it('shareable vs shared: a <shareable/> disk and lockmgr --shared share; exclusive is refused either way', async () => {
      await created({ path: image, shareable: true });
      const shared = await hold(image, 'shared', indirect());
      expect(shared.state).toBe('running');
      await shared.free();
      const err = await refused(image, 'exclusive', indirect());
      expect(err.holder).toMatchObject({ pid: host.virtlockd!.pid, mode: 'shared' });
      await host.clearDomains();

      // lockmgr holds shared: virtlockd refuses a domain that does not share the disk, and lets a shareable one in.
      await hold(image, 'shared', indirect());
      const excl = await host.create(domain(), { path: image });
      expect(excl.code).not.toBe(0);
      expect(excl.out).toContain(`resource busy: Lockspace resource '${sha256(image)}' is locked`);
      await created({ path: image, shareable: true });
      // A second, non-shareable domain now meets the first one's QEMU before virtlockd: libvirt starts
      // QEMU (paused) and only then takes the leases, and QEMU's own image locks refuse to share write.
      const third = await host.create(domain(), { path: image });
      expect(third.code).not.toBe(0);
      expect(third.out).toContain('Failed to get shared "write" lock');
      console.log(`libvirt: a non-shareable domain beside a shareable one: ${third.out}`);
    });

    it('a symlink: the domain and lockmgr exclude each other whichever of the link and the realpath each names, except a link lockmgr never saw', async () => {
      const linkFile = sha256(link);
      // The domain names the link: virtlockd locks sha256(link).
      await created({ path: link });
      expect(readdirSync(lockDir)).toEqual([linkFile]);
      const err = await refused(link, 'exclusive', indirect());
      expect(err.holder?.pid).toBe(host.virtlockd!.pid);
      // Given only the realpath, lockmgr cannot know the link: its lease files are not virtlockd's ...
      const blind = await hold(image, 'exclusive', indirect());
      expect(blind.state).toBe('running');
      await blind.free();
      // ... but QEMU's own image locks (--qemu-compatible) still refuse it: the domain's QEMU writes the image.
      await refused(image, 'exclusive', indirect(), true);
      await host.clearDomains();

      // The domain names the realpath: lockmgr given the link takes the realpath's name too (version 1 did already).
      await created({ path: image });
      await refused(link, 'exclusive', indirect());
      await host.clearDomains();

      // lockmgr holds through the link: a domain naming the link, or the realpath, is refused.
      const m = await hold(link, 'exclusive', indirect());
      for (const path of [link, image]) {
        const r = await host.create(domain(), { path });
        expect(r.code).not.toBe(0);
        expect(r.out).toContain(`resource busy: Lockspace resource '${sha256(path)}' is locked`);
      }
      await m.free();

      // lockmgr holds the realpath: a domain naming the link gets past virtlockd (a name lockmgr never saw) ...
      const plain = await hold(image, 'exclusive', indirect());
      const through = await host.create(domain(), { path: link });
      expect(through.code, through.out).toBe(0);
      await host.clearDomains();
      await plain.free();
      // ... and --qemu-compatible stops its QEMU, whose own locks find ours.
      await hold(image, 'exclusive', indirect(), true);
      const r = await host.create(domain(), { path: link });
      expect(r.code).not.toBe(0);
      expect(r.out).toContain('Failed to get "write" lock');
      console.log(`libvirt: a domain through a link lockmgr never saw, lockmgr --qemu-compatible holding: ${r.out}`);
    });

    it('virtlockd hashes the XML\'s spelling byte for byte (\'//\', \'/./\'); lockmgr given the same string meets it', async () => {
      const spelling = `${root}//images/./by-name/vm1.img`;
      await created({ path: spelling });
      expect(readdirSync(lockDir)).toEqual([sha256(spelling)]);
      const err = await refused(spelling, 'exclusive', indirect());
      expect(err.holder?.pid).toBe(host.virtlockd!.pid);
    });

    it('a hard link: the domain on one link and lockmgr given the other do not meet in the directory (virtlockd takes no inode file)', async () => {
      const hard = join(root, 'images', 'vm1-hard.img');
      linkSync(image, hard);
      try {
        await created({ path: hard });
        const m = await hold(image, 'exclusive', indirect());
        expect(m.state).toBe('running');
        await m.free();
        // QEMU's own locks are on the inode, whatever its name.
        await refused(image, 'exclusive', indirect(), true);
      } finally {
        await host.clearDomains();
        unlinkSync(hard);
      }
    });

    it('every lock file is gone once both sides let go', async () => {
      await created({ path: link });
      // Given the realpath, lockmgr's names (realpath, inode) are not virtlockd's (the link): both run.
      const m = await hold(image, 'shared', indirect());
      expect(readdirSync(lockDir)).toHaveLength(3);
      expect(readdirSync(lockDir)).toContain(sha256(link));
      await m.free();
      await host.clearDomains();
      expect(readdirSync(lockDir)).toEqual([]);
    });
  });

  describe('virtlockd in direct mode (byte 0 of the image), lockmgr\'s direct lockspace', () => {
    const direct = (): LockspaceConfig => ({ kind: 'direct' });

    beforeAll(async () => {
      await host.clearDomains();
      await host.stopDaemons();
      await host.start(undefined);
    }, 120_000);

    it('a running domain holds byte 0 of its image: lockmgr refuses it and names virtlockd; QEMU\'s own locks sit beside it', async () => {
      await created({ path: image });
      const locks = readFileSync('/proc/locks', 'utf8');
      const ino = statSync(image).ino;
      expect(locks).toMatch(new RegExp(`POSIX\\s+ADVISORY\\s+WRITE ${host.virtlockd!.pid} [0-9a-f]+:[0-9a-f]+:${ino} 0 0\\n`));
      // The domain's QEMU holds write (101) and refuses to share it (201) on the same image.
      expect(locks).toMatch(new RegExp(`OFDLCK\\s+ADVISORY\\s+READ -1 [0-9a-f]+:[0-9a-f]+:${ino} 201 201\\n`));
      expect(readdirSync(lockDir)).toEqual([]);
      for (const qemuCompatible of [false, true]) {
        const err = await refused(image, 'exclusive', direct(), qemuCompatible);
        expect(err.holder?.pid).toBe(host.virtlockd!.pid);
      }
      const cli = await lockmgr('run', '--exclusive', link, '--', 'true');
      expect(cli.code).toBe(75);
      expect(cli.out).toMatch(new RegExp(`pid ${host.virtlockd!.pid} +\\S*virtlockd`));
    });

    it('while lockmgr holds the image, virsh create is refused: by virtlockd, or with --qemu-compatible by QEMU itself first', async () => {
      for (const qemuCompatible of [false, true]) {
        const m = await hold(link, 'exclusive', direct(), qemuCompatible);
        const r = await host.create(domain(), { path: image });
        expect(r.code).not.toBe(0);
        // libvirt starts QEMU paused, then takes the leases: QEMU's own locks on opening the image come first.
        expect(r.out).toContain(qemuCompatible ? 'Failed to get "write" lock' : 'resource busy');
        console.log(`libvirt: direct, lockmgr${qemuCompatible ? ' --qemu-compatible' : ''} holding: ${r.out}`);
        await m.free();
      }
      await created({ path: image });
    });

    it('shared: lockmgr --shared and a <shareable/> domain run together on one image', async () => {
      await hold(image, 'shared', direct());
      await created({ path: image, shareable: true });
      await refused(image, 'exclusive', direct());
    });
  });

  it('leaves nothing behind: domains, daemons and the namespace gone, /etc/libvirt untouched', async () => {
    const pids = [host.libvirtd!.pid!, host.virtlockd!.pid!, host.ns];
    for (const m of managers.splice(0)) await m.free();
    await host.clearDomains();
    expect(qemusOf(prefix)).toEqual([]);
    await host.close();
    for (const pid of pids) expect(procState(pid)).toBeNull();
    expect(zombieChildren()).toEqual([]);
    expect(qemusOf(prefix)).toEqual([]);
    expect(readFileSync('/proc/self/mountinfo', 'utf8')).not.toMatch(/lockmgr-test-(run|var)/);
    expect(existsSync('/run/libvirt')).toBe(runLibvirtBefore);
    expect(treeHash('/etc/libvirt')).toBe(etcBefore);
    expect(existsSync(root)).toBe(false);
    expect(openFds()).toEqual(fdsBefore);
  });
});

// A runner killed mid-test (a CI timeout, ^C) must not leave libvirtd,
// virtlockd or a QEMU running: the namespace holder gets SIGTERM from the
// kernel when its parent dies and kills everything in its namespace. Shown
// here without libvirt: a stand-in runner starts the holder as LibvirtHost
// does, a "daemon" it spawns into the namespace and a daemonized process
// there (as libvirtd's QEMU is), and is SIGKILLed.
const nsWhy = !isRoot ? 'not root (mount namespaces need root)' : ['unshare', 'nsenter', 'setpriv'].find((b) => spawnSync('sh', ['-c', `command -v ${b}`]).status !== 0);
describe.skipIf(nsWhy !== undefined)('the libvirt namespace after a killed runner', () => {
  if (nsWhy !== undefined) console.warn(`skipping the killed-runner namespace test: ${nsWhy} is missing`);

  it('kills every process in the namespace when the runner dies', async () => {
    const argv = holderCommand(['set -e', 'mount --make-rprivate /', ...SWEEP_ON_TERM].join('\n'));
    const runner = spawn(
      process.execPath,
      [
        '--input-type=module',
        '-e',
        `
import { spawn, execFileSync } from 'node:child_process';
const [bin, ...args] = JSON.parse(process.argv[1]);
const holder = spawn(bin, args, { stdio: ['ignore', 'pipe', 'inherit'] });
holder.stdout.setEncoding('utf8');
let text = '';
holder.stdout.on('data', (d) => {
  text += d;
  if (!text.includes('ready\\n')) return;
  const enter = ['-t', String(holder.pid), '-m', '--'];
  const daemon = spawn('nsenter', [...enter, 'sleep', '1000'], { stdio: 'ignore' });
  const orphan = Number(execFileSync('nsenter', [...enter, 'sh', '-c', 'setsid sleep 1001 </dev/null >/dev/null 2>&1 & echo $!'], { encoding: 'utf8' }));
  console.log(JSON.stringify({ holder: holder.pid, daemon: daemon.pid, orphan }));
});
`,
        JSON.stringify(argv),
      ],
      { stdio: ['ignore', 'pipe', 'inherit'] },
    );
    const exited = new Promise((r) => runner.once('exit', r));
    const pids = await within(firstJsonLine<{ holder: number; daemon: number; orphan: number }>(runner.stdout!), 30_000, 'the stand-in runner to start its namespace');
    const ns = (pid: number): string => readlinkSync(`/proc/${pid}/ns/mnt`);
    await waitUntil(() => procState(pids.daemon) !== null && ns(pids.daemon) === ns(pids.holder), 10_000, 'the daemon to enter the namespace');
    expect(ns(pids.holder)).not.toBe(ns(process.pid));
    expect(ns(pids.orphan)).toBe(ns(pids.holder));
    expect(procStat(pids.orphan)[1]).not.toBe(String(pids.holder));

    runner.kill('SIGKILL');
    await exited;
    // Reparented to init, which reaps them: gone, not zombies of ours.
    for (const [what, pid] of Object.entries(pids)) await waitUntil(() => procState(pid) === null || procState(pid) === 'Z', 30_000, `the ${what} (${pid}) to be killed`);
    await waitUntil(() => Object.values(pids).every((pid) => procState(pid) === null), 30_000, 'init to reap them');
  });
});

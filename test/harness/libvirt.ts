// A private libvirt on this machine (docs/lockspaces.md, "libvirt and
// virtlockd"): virtlockd and libvirtd (Debian 12's libvirt 9.0 has no modular
// virtqemud) started by the test, each by its own pid, inside a private mount
// namespace. A holder process (`unshare --mount`, then `sleep`) owns the
// namespace: tmpfs over /run and /var (libvirt's run, state, cache and log
// dirs), the test's own config dir bound over /etc/libvirt, and, where the
// host lacks them, passwd and group copies with libvirt's default QEMU user
// (Debian's libvirt refuses to start without it, even with user = "root").
// Daemons and virsh enter it with nsenter, which execs: the pid spawned is the
// program's own. Nothing outside the namespace changes; the namespace and its
// mounts go with its last process, and if the test process dies, the holder
// kills every process in the namespace (SWEEP_ON_TERM).
import { execFile, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { isRoot, waitUntil } from '../helpers.js';
import { within } from './process-helpers.js';

const onPath = (bin: string): boolean => spawnSync('sh', ['-c', `command -v ${bin}`]).status === 0;

/** The libvirt modules the tests need, found under any multiarch lib dir. */
function libvirtModule(rel: string): boolean {
  return spawnSync('sh', ['-c', `ls /usr/lib/*/libvirt/${rel} /usr/lib/libvirt/${rel} 2>/dev/null | grep -q .`]).status === 0;
}

/** Why the libvirt tests cannot run here, or null: only what is truly absent. */
export function libvirtUnavailable(): string | null {
  if (!isRoot) return 'not root (libvirtd and mount namespaces need root)';
  const bins: [string, string][] = [
    ['libvirtd', 'libvirt-daemon'],
    ['virtlockd', 'libvirt-daemon'],
    ['virsh', 'libvirt-clients'],
    ['qemu-system-x86_64', 'qemu-system-x86'],
    ['unshare', 'util-linux'],
    ['nsenter', 'util-linux'],
    ['setpriv', 'util-linux'],
  ];
  for (const [bin, pkg] of bins) if (!onPath(bin)) return `${bin} is not installed (apt-get install ${pkg})`;
  if (!libvirtModule('lock-driver/lockd.so')) return "libvirt's lockd lock driver is not installed (apt-get install libvirt-daemon)";
  if (!libvirtModule('connection-driver/libvirt_driver_qemu.so')) return "libvirt's QEMU driver is not installed (apt-get install libvirt-daemon-driver-qemu)";
  return null;
}

export interface DomainDisk {
  /** The path exactly as the domain XML names it (virtlockd hashes this string). */
  path: string;
  shareable?: boolean;
  readonly?: boolean;
}

/** A transient TCG domain: no OS (SeaBIOS finds nothing and waits), minimal memory, no network, one raw virtio disk. */
export function domainXml(name: string, disk: DomainDisk): string {
  return `<domain type='qemu'>
  <name>${name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'${disk.shareable === true ? " cache='none'" : ''}/>
      <source file='${disk.path}'/>
      <target dev='vda' bus='virtio'/>${disk.shareable === true ? '\n      <shareable/>' : ''}${disk.readonly === true ? '\n      <readonly/>' : ''}
    </disk>
    <memballoon model='none'/>
  </devices>
</domain>
`;
}

export interface Run {
  code: number;
  out: string;
}

const alive = (child: ChildProcess | undefined): child is ChildProcess => child !== undefined && child.exitCode === null && child.signalCode === null;

async function stopProcess(child: ChildProcess | undefined, what: string): Promise<void> {
  if (!alive(child)) return;
  const gone = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  const ended = await Promise.race([gone.then(() => true), new Promise((r) => setTimeout(() => r(false), 10_000))]);
  if (!ended) {
    // A hang guard, not a pass condition: the leak checks still see it gone.
    console.warn(`${what} did not stop on SIGTERM within 10 s; SIGKILL`);
    child.kill('SIGKILL');
    await within(gone, 10_000, `${what} to die`);
  }
}

/**
 * The end of the namespace holder's script: on SIGTERM it SIGKILLs every
 * other process in its mount namespace (libvirtd, virtlockd, QEMU, a virsh),
 * twice over against a fork in between, then exits. The kernel sends that
 * SIGTERM when the test process dies (holderCommand), so a killed runner
 * leaves no daemon, domain or mount behind.
 */
export const SWEEP_ON_TERM = [
  'sweep() { me=$(readlink /proc/$$/ns/mnt); for round in 1 2; do for p in /proc/[0-9]*; do pid=${p#/proc/}; [ "$pid" = $$ ] && continue; [ "$(readlink "$p/ns/mnt" 2>/dev/null)" = "$me" ] && kill -KILL "$pid" 2>/dev/null; done; done; exit 0; }',
  'trap sweep TERM',
  'echo ready',
  // A builtin wait, so the trap runs at once.
  'sleep infinity & wait',
];

/** The holder's argv: a parent-death SIGTERM (kept across unshare's exec of sh), then a private mount namespace. */
export function holderCommand(script: string): string[] {
  return ['setpriv', '--pdeathsig', 'TERM', 'unshare', '--mount', 'sh', '-c', script];
}

export class LibvirtHost {
  readonly root: string;
  readonly conf: string;
  holder: ChildProcess | undefined;
  virtlockd: ChildProcess | undefined;
  libvirtd: ChildProcess | undefined;
  /** What the daemons printed, for failure messages. */
  readonly output: string[] = [];

  constructor(root: string) {
    this.root = root;
    this.conf = join(root, 'etc-libvirt');
  }

  /** The holder's pid: the namespace's. */
  get ns(): number {
    return this.holder!.pid!;
  }

  /** A path as the namespace sees it. */
  inside(path: string): string {
    return `/proc/${this.ns}/root${path}`;
  }

  /** Sets up the namespace; starts no daemon. */
  async open(): Promise<void> {
    mkdirSync(join(this.conf, 'qemu'), { recursive: true });
    const binds = [`mount --bind ${this.conf} /etc/libvirt`];
    if (spawnSync('getent', ['passwd', 'libvirt-qemu']).status !== 0) {
      writeFileSync(join(this.root, 'passwd'), `${readFileSync('/etc/passwd', 'utf8')}libvirt-qemu:x:64055:64055:Libvirt Qemu:/var/lib/libvirt:/usr/sbin/nologin\n`);
      let group = readFileSync('/etc/group', 'utf8');
      if (spawnSync('getent', ['group', 'libvirt-qemu']).status !== 0) group += 'libvirt-qemu:x:64055:\n';
      if (spawnSync('getent', ['group', 'kvm']).status !== 0) group += 'kvm:x:64056:\n';
      writeFileSync(join(this.root, 'group'), group);
      binds.push(`mount --bind ${join(this.root, 'passwd')} /etc/passwd`, `mount --bind ${join(this.root, 'group')} /etc/group`);
    }
    const script = [
      'set -e',
      // Nothing mounted here propagates to the host, whatever / is shared as.
      'mount --make-rprivate /',
      'mount -t tmpfs -o mode=0755 lockmgr-test-run /run',
      'mount -t tmpfs -o mode=0755 lockmgr-test-var /var',
      'ln -s /run /var/run',
      'mkdir -p /var/tmp /var/lib/libvirt /var/cache/libvirt /var/log/libvirt',
      ...binds,
      ...SWEEP_ON_TERM,
    ].join('\n');
    const [bin, ...args] = holderCommand(script);
    const holder = spawn(bin!, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    this.holder = holder;
    let text = '';
    holder.stdout.setEncoding('utf8');
    holder.stderr.setEncoding('utf8');
    holder.stderr.on('data', (d: string) => this.output.push(`holder: ${d}`));
    await within(
      new Promise<void>((resolve, reject) => {
        holder.stdout.on('data', (d: string) => {
          text += d;
          if (text.includes('ready\n')) resolve();
        });
        holder.once('exit', (code) => reject(new Error(`the namespace holder exited with ${code}: ${this.output.join('')}`)));
      }),
      30_000,
      'the mount namespace to be set up',
    );
  }

  /**
   * Writes the config and starts virtlockd, then libvirtd. `lockspaceDir`:
   * virtlockd's indirect mode (file_lockspace_dir); undefined: its direct
   * mode (byte 0 of the image itself).
   */
  async start(lockspaceDir: string | undefined): Promise<void> {
    const w = (name: string, text: string): void => writeFileSync(join(this.conf, name), text);
    w(
      'qemu.conf',
      [
        'lock_manager = "lockd"',
        // Plain root QEMU, no per-VM namespace, cgroup or SELinux/AppArmor label: nothing outside the namespace to set up or undo.
        'user = "root"',
        'group = "root"',
        'dynamic_ownership = 0',
        'remember_owner = 0',
        'security_driver = "none"',
        'namespaces = [ ]',
        'cgroup_controllers = [ ]',
        // QEMU's output to a file, not through virtlogd (one daemon fewer).
        'stdio_handler = "file"',
        '',
      ].join('\n'),
    );
    w(
      'qemu-lockd.conf',
      ['auto_disk_leases = 1', 'require_lease_for_disks = 1', ...(lockspaceDir === undefined ? [] : [`file_lockspace_dir = "${lockspaceDir}"`]), ''].join('\n'),
    );
    w('virtlockd.conf', 'log_outputs = "3:stderr"\n');
    w('libvirtd.conf', ['auth_unix_rw = "none"', 'auth_unix_ro = "none"', 'unix_sock_rw_perms = "0700"', 'log_outputs = "3:stderr"', ''].join('\n'));

    this.virtlockd = this.#daemon('virtlockd', ['-f', '/etc/libvirt/virtlockd.conf']);
    await waitUntil(() => existsSync(this.inside('/run/libvirt/virtlockd-sock')) || this.virtlockd!.exitCode !== null, 30_000, 'virtlockd to listen');
    if (this.virtlockd.exitCode !== null) throw new Error(`virtlockd exited with ${this.virtlockd.exitCode}: ${this.output.join('')}`);
    this.libvirtd = this.#daemon('libvirtd', ['-f', '/etc/libvirt/libvirtd.conf']);
    // The socket comes before the drivers are ready: wait until the QEMU driver answers.
    const end = Date.now() + 60_000;
    for (;;) {
      if (this.libvirtd.exitCode !== null) throw new Error(`libvirtd exited with ${this.libvirtd.exitCode}: ${this.output.join('')}`);
      if (existsSync(this.inside('/run/libvirt/libvirt-sock')) && (await this.virsh('list', '--all')).code === 0) break;
      if (Date.now() > end) throw new Error(`libvirtd did not answer within 60 s: ${this.output.join('')}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  #daemon(name: string, args: string[]): ChildProcess {
    // nsenter execs the daemon: its pid is the daemon's.
    const child = spawn('nsenter', ['-t', String(this.ns), '-m', '--', name, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
    child.stderr!.setEncoding('utf8');
    child.stderr!.on('data', (d: string) => this.output.push(`${name}: ${d}`));
    return child;
  }

  /** virsh against this libvirtd, inside the namespace. Never throws for a failing command. */
  virsh(...args: string[]): Promise<Run> {
    return new Promise((resolve) => {
      execFile('nsenter', ['-t', String(this.ns), '-m', '--', 'virsh', '-q', '-c', 'qemu:///system', ...args], { encoding: 'utf8' }, (err, stdout, stderr) => {
        const code = err === null ? 0 : typeof err.code === 'number' ? err.code : 1;
        resolve({ code, out: `${stdout}${stderr}`.trim() });
      });
    });
  }

  /** `virsh create` of a transient domain from XML written to the test dir. */
  async create(name: string, disk: DomainDisk, ...flags: string[]): Promise<Run> {
    const file = join(this.root, `${name}.xml`);
    writeFileSync(file, domainXml(name, disk));
    return this.virsh('create', file, ...flags);
  }

  /** Whether libvirtd runs (and so virsh can be asked). */
  get running(): boolean {
    return alive(this.holder) && alive(this.libvirtd);
  }

  /** Destroys every running domain and undefines every defined one; a no-op without libvirtd. */
  async clearDomains(): Promise<void> {
    if (!this.running) return;
    for (const [list, action] of [[['list', '--name'], 'destroy'], [['list', '--all', '--name'], 'undefine']] as const) {
      const r = await this.virsh(...list);
      if (r.code !== 0) throw new Error(`virsh ${list.join(' ')} failed: ${r.out}`);
      for (const name of r.out.split('\n').filter(Boolean)) {
        const done = await this.virsh(action, name);
        if (done.code !== 0) throw new Error(`virsh ${action} ${name} failed: ${done.out}`);
      }
    }
  }

  /** Stops libvirtd, then virtlockd, each by its pid (domains must be gone first: QEMU outlives libvirtd). */
  async stopDaemons(): Promise<void> {
    await stopProcess(this.libvirtd, 'libvirtd');
    await stopProcess(this.virtlockd, 'virtlockd');
  }

  /** Everything: domains, daemons, the namespace (its mounts go with it), the test dir. */
  async close(): Promise<void> {
    try {
      await this.clearDomains();
    } finally {
      await this.stopDaemons();
    }
    await stopProcess(this.holder, 'the namespace holder');
    rmSync(this.root, { recursive: true, force: true });
  }
}

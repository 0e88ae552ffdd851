// sanlock from TypeScript: every daemon call runs on a native worker thread
// (native/sanlock.cc) and comes back as a Promise; sanlock's negative codes
// become lockmgr's typed errors; and the storage helpers that prepare a
// shared device (docs/sanlock.md).
//
// Storage layout on the shared device or file (one per cluster):
//   offset 0       the lockspace: one delta lease per host id (sanlock direct init -s)
//   offset 8 MiB   the resource index (rindex), then the resource leases it
//                  allocates, one per disk (sanlock client format -x / create -x)
// 8 MiB is the largest area sanlock gives a lockspace by default (4K-sector
// devices, or files), so the same layout works on every kind of storage.
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import {
  InternalError,
  InvalidArgumentError,
  InvalidStateError,
  LockManagerError,
  ResourceAccessError,
  ResourceBusyError,
  UnsupportedError,
  errnoName,
  errnoOf,
} from '../os/errors.js';
import { PendingCalls, addonPath, buildFromSourceHint, constants, native, nativeError, nativeState } from '../os/native.js';
import { describe } from '../os/validate.js';

export const LOCKSPACE_OFFSET = 0;
export const RINDEX_OFFSET = 8 * 1024 * 1024;
/** sanlock's limit for lockspace and resource names. */
export const NAME_MAX = constants.sanlock.NAME_LEN;

/**
 * sanlock's return codes by name: its own (sanlock_rv.h, from the addon) and
 * the -errno ones lockmgr tells apart.
 */
export const RV = {
  ...(constants.sanlock.codes as Readonly<Record<SanlkCode, number>>),
  ENOENT: -errnoOf('ENOENT'),
  ESRCH: -errnoOf('ESRCH'),
  EIO: -errnoOf('EIO'),
  EAGAIN: -errnoOf('EAGAIN'),
  EACCES: -errnoOf('EACCES'),
  EBUSY: -errnoOf('EBUSY'),
  EEXIST: -errnoOf('EEXIST'),
  EINVAL: -errnoOf('EINVAL'),
  ENOSPC: -errnoOf('ENOSPC'),
  ENOSYS: -errnoOf('ENOSYS'),
  ENODATA: -errnoOf('ENODATA'),
  ETIMEDOUT: -errnoOf('ETIMEDOUT'),
  ECONNREFUSED: -errnoOf('ECONNREFUSED'),
  EINPROGRESS: -errnoOf('EINPROGRESS'),
} as const;

type SanlkCode =
  | 'SANLK_ERROR' | 'SANLK_AIO_TIMEOUT' | 'SANLK_WD_ERROR' | 'SANLK_DBLOCK_READ' | 'SANLK_DBLOCK_WRITE' | 'SANLK_DBLOCK_LVER' | 'SANLK_DBLOCK_MBAL'
  | 'SANLK_DBLOCK_CHECKSUM' | 'SANLK_LEADER_READ' | 'SANLK_LEADER_WRITE' | 'SANLK_LEADER_DIFF' | 'SANLK_LEADER_MAGIC' | 'SANLK_LEADER_VERSION'
  | 'SANLK_LEADER_SECTORSIZE' | 'SANLK_LEADER_LOCKSPACE' | 'SANLK_LEADER_RESOURCE' | 'SANLK_LEADER_NUMHOSTS' | 'SANLK_LEADER_CHECKSUM'
  | 'SANLK_ADDLS_INVALID_HOSTID' | 'SANLK_ACQUIRE_LVER' | 'SANLK_ACQUIRE_LOCKSPACE' | 'SANLK_ACQUIRE_IDDISK' | 'SANLK_ACQUIRE_IDLIVE'
  | 'SANLK_ACQUIRE_OWNED' | 'SANLK_ACQUIRE_OTHER' | 'SANLK_ACQUIRE_SHRETRY' | 'SANLK_HOSTID_BUSY';

const codeNames = new Map(Object.entries(constants.sanlock.codes).map(([name, rv]) => [rv, name]));

/** The name of a sanlock return code: SANLK_... for its own, the errno's name for -errno. */
export function codeName(rv: number): string {
  return codeNames.get(rv) ?? (rv < 0 && rv > -4096 ? errnoName(-rv) : `SANLK_${-rv}`);
}

const Op = constants.sanlock.ops;

interface Result {
  rv: number;
  text: string;
  out: Float64Array;
}

interface Registry {
  ready: boolean;
  calls: PendingCalls<[Result]>;
}

const registry = (): Registry => nativeState('sanlock', () => ({ ready: false, calls: new PendingCalls<[Result]>() }));

function deliver(id: number, rv: number, text: string, out: Float64Array): void {
  registry().calls.settle(id, { rv, text, out });
}

/** The client library's dlopen error, or null once it is loaded. */
export function sanlockLibraryError(): string | null {
  const e = native.sanlockLoad();
  return e === '' ? null : e;
}

/** The directory of this process's sanlock daemon socket (the client library reads SANLOCK_RUN_DIR). */
export function runDir(): string {
  return process.env.SANLOCK_RUN_DIR || '/run/sanlock';
}

/** UnsupportedError unless the client library is loaded; it names what is missing. */
export function requireLibrary(): void {
  const e = sanlockLibraryError();
  if (e !== null) {
    throw new UnsupportedError(`sanlock is not available: libsanlock_client.so.1 cannot be loaded (${e}); install it (Debian: apt-get install sanlock libsanlock-client1)`);
  }
}

function run(op: number, strings: string[], numbers: number[]): Promise<Result> {
  requireLibrary();
  const r = registry();
  if (!r.ready) {
    const rv = native.sanlockInit(deliver);
    if (rv < 0) throw nativeError(rv, 'cannot start the sanlock workers');
    r.ready = true;
  }
  const id = native.sanlockCall(op, strings.join('\0'), Float64Array.from(numbers));
  // pthread_create: ResourceExhaustedError.
  if (id < 0) throw nativeError(id, 'cannot start a thread for sanlock calls');
  return new Promise((resolve) => r.calls.add(id, resolve));
}

/** sanlock's name and text for a return code. */
export function describeCode(rv: number): string {
  const name = codeName(rv);
  let text = '';
  try {
    text = native.sanlockStrerror(rv);
  } catch {
    text = '';
  }
  if (text.startsWith('Unknown error')) text = '';
  return text === '' || text === name ? `${name} (${rv})` : `${name} (${rv}: ${text})`;
}

/** The cause of a sanlock failure: what sanlock returned, as a Node-style error with `code` and `errno`. */
export interface SanlockCause extends Error {
  code: string;
  errno: number;
  syscall: string;
}

export function sanlockCause(rv: number, call: string): SanlockCause {
  const err = new Error(`${describeCode(rv)}, ${call}`) as SanlockCause;
  err.code = codeName(rv);
  err.errno = rv;
  err.syscall = call;
  return err;
}

const IO_CODES = new Set<number>([
  RV.SANLK_AIO_TIMEOUT,
  ...Object.entries(RV).filter(([name]) => name.startsWith('SANLK_DBLOCK_') || name.startsWith('SANLK_LEADER_')).map(([, rv]) => rv),
  RV.EIO,
]);
const BUSY_CODES = new Set<number>([RV.SANLK_ACQUIRE_IDLIVE, RV.EAGAIN, RV.EEXIST, RV.SANLK_ACQUIRE_LVER, RV.SANLK_ACQUIRE_OWNED, RV.SANLK_ACQUIRE_OTHER, RV.SANLK_HOSTID_BUSY]);

/**
 * The typed error for a sanlock return code (docs/sanlock.md has the table).
 * Busy codes (SANLK_ACQUIRE_IDLIVE, EAGAIN, EEXIST, SANLK_ACQUIRE_LVER) are
 * left to the caller, who knows whom to name; here they map to a plain
 * ResourceBusyError.
 */
export function errorFor(rv: number, call: string, what: string): LockManagerError {
  const cause = sanlockCause(rv, call);
  const msg = `${what}: ${cause.message}`;
  if (rv === RV.EACCES) {
    const sock = join(runDir(), 'sanlock.sock');
    return new ResourceAccessError(
      `${what}: permission denied by the sanlock daemon at ${sock}: its socket admits root and the members of the sanlock group (the daemon's -U/-G), and the daemon itself must be able to open the lease storage: ${cause.message}`,
      { cause },
    );
  }
  if (rv === RV.ENOENT || rv === RV.ECONNREFUSED) {
    const sock = join(runDir(), 'sanlock.sock');
    if (!existsSync(sock) || rv !== RV.ENOENT) {
      return new UnsupportedError(`${what}: no sanlock daemon answers at ${sock} (start it: sanlock daemon; a test daemon: SANLOCK_RUN_DIR, SANLOCK_PRIVILEGED=0, -w 0): ${cause.message}`, { cause });
    }
    return new ResourceAccessError(`${msg} (not found)`, { cause });
  }
  if (rv === RV.ENOSYS) return new UnsupportedError(`${what}: libsanlock_client.so.1 is not loaded: ${sanlockLibraryError() ?? ''}`, { cause });
  if (rv === RV.SANLK_WD_ERROR) {
    return new UnsupportedError(`${what}: the sanlock daemon has no watchdog (wdmd is not running, or /dev/watchdog is missing); run wdmd, or start sanlock with -w 0 and read docs/sanlock.md on what that leaves unprotected: ${cause.message}`, { cause });
  }
  if (rv === RV.ESRCH) {
    return new InvalidStateError(`${what}: the process is not registered with this host's sanlock daemon (it has exited, or was not started through the sanlock lockspace): ${cause.message}`, { cause });
  }
  if (rv === RV.ENOSPC || rv === RV.SANLK_ACQUIRE_LOCKSPACE) {
    return new InvalidStateError(`${what}: this host has not joined the lockspace (joinLockspace(), or lockmgr sanlock join): ${cause.message}`, { cause });
  }
  if (BUSY_CODES.has(rv)) return new ResourceBusyError(msg, { cause });
  if (rv === RV.EINVAL) return new InvalidArgumentError(msg, { cause });
  if (rv === RV.ETIMEDOUT || IO_CODES.has(rv)) return new ResourceAccessError(msg, { cause });
  return new InternalError(msg, { cause });
}

// ---- names --------------------------------------------------------------

function checkName(value: unknown, what: string): string {
  if (typeof value !== 'string' || value === '' || Buffer.byteLength(value) > NAME_MAX || /[\0:\s]/.test(value)) {
    throw new InvalidArgumentError(`${what} must be a sanlock name: 1 to ${NAME_MAX} bytes, no NUL, ':' or white space, got ${describe(value)}`);
  }
  return value;
}

function checkStoragePath(value: unknown, what: string): string {
  if (typeof value !== 'string' || !value.startsWith('/') || value.includes('\0') || value.includes(':') || Buffer.byteLength(value) >= 1024) {
    throw new InvalidArgumentError(`${what} must be an absolute path without ':' (sanlock's separator), shorter than 1024 bytes, got ${describe(value)}`);
  }
  return value;
}

function checkInt(value: unknown, what: string, min: number, max: number, fallback: number): number {
  if (value === undefined) return fallback;
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
    throw new InvalidArgumentError(`${what} must be an integer from ${min} to ${max}, got ${describe(value)}`);
  }
  return value;
}

/**
 * The sanlock resource name of a disk: 'lm-' and the first 40 hex digits of
 * the SHA-256 of its path. The path is the disk's identity across hosts, so
 * every host must name a shared disk by the same path (/dev/disk/by-id/...,
 * /dev/mapper/..., an NFS path), as libvirt's sanlock plugin requires too.
 * Names on shared storage are a wire format (docs/sanlock.md, "Names"):
 * 1: one resource per disk or named lease. 2: also its two class resources
 * (classResourceName), which readonly and shared leases take beside it; the
 * main names did not change, so a release of version 1 and one of version 2
 * still exclude each other wherever version 1 did.
 */
export const SANLOCK_NAMES_VERSION = 2;

export function diskResourceName(path: string): string {
  return `lm-${createHash('sha256').update(path).digest('hex').slice(0, 40)}`;
}

/**
 * The sanlock resource name of a named lease (libvirt's <lease>): 'lml-' and
 * the first 40 hex digits of the SHA-256 of its file's path,
 * <path>/<lockspace>/<key>, the same name every OFD lockspace gives its lock
 * file.
 */
export function leaseResourceName(file: string): string {
  return `lml-${createHash('sha256').update(file).digest('hex').slice(0, 40)}`;
}

/** The two classes of a non-exclusive lease: readers and shared writers exclude each other (version 2 of the names). */
export type LeaseClass = 'readonly' | 'shared';

/**
 * The class resource that a readonly ('r') or shared ('w') lease takes
 * beside the main one: 'lm-HEX' -> 'lmr-HEX' / 'lmw-HEX', 'lml-HEX' ->
 * 'lmlr-HEX' / 'lmlw-HEX'.
 */
export function classResourceName(resource: string, cls: LeaseClass): string {
  return resource.replace('-', cls === 'readonly' ? 'r-' : 'w-');
}

// ---- storage helpers ------------------------------------------------------

export interface StorageOptions {
  /** The lockspace's name, the same on every host. */
  lockspace: string;
  /** The shared device or file that holds the lockspace and the leases. */
  path: string;
}

export interface InitOptions extends StorageOptions {
  /** Seconds; every host's renewal and failure detection scale with it (sanlock's default 10). */
  ioTimeout?: number;
  /** Host ids 1..maxHosts (0: sanlock's default, 2000 on 512-byte sectors). */
  maxHosts?: number;
}

async function check(p: Promise<Result>, call: string, what: string): Promise<Result> {
  const r = await p;
  if (r.rv < 0) throw errorFor(r.rv, call, what);
  return r;
}

/**
 * Writes a new lockspace and an empty lease index on shared storage. Destroys
 * whatever leases were there: run it once, while no host has joined. Needs a
 * running daemon on this host (it does the I/O), not a joined lockspace.
 */
export async function initStorage(options: InitOptions): Promise<void> {
  const name = checkName(options?.lockspace, 'lockspace');
  const path = checkStoragePath(options.path, 'path');
  const ioTimeout = checkInt(options.ioTimeout, 'ioTimeout', 1, 300, 10);
  const maxHosts = checkInt(options.maxHosts, 'maxHosts', 0, 2000, 0);
  await check(run(Op.WRITE_LOCKSPACE, [name, path], [LOCKSPACE_OFFSET, maxHosts, ioTimeout]), 'sanlock_write_lockspace', `initStorage: writing lockspace ${name} on ${path}`);
  await check(run(Op.FORMAT_RINDEX, [name, path], [RINDEX_OFFSET]), 'sanlock_format_rindex', `initStorage: writing the lease index on ${path}`);
}

export interface JoinOptions extends StorageOptions {
  /** This host's id in the lockspace: 1..maxHosts, unique per host. */
  hostId: number;
  /** Seconds (0: the daemon's default). Use the value the lockspace was initialized with. */
  ioTimeout?: number;
}

/** Joins this host's daemon to the lockspace: takes the host id's delta lease (about 3 io_timeouts: 3 s at io_timeout 1, 21 s at the default 10). Joined already: a no-op. */
export async function joinLockspace(options: JoinOptions): Promise<{ wasJoined: boolean }> {
  const name = checkName(options?.lockspace, 'lockspace');
  const path = checkStoragePath(options.path, 'path');
  const hostId = checkInt(options.hostId, 'hostId', 1, 2000, 0);
  const ioTimeout = checkInt(options.ioTimeout, 'ioTimeout', 0, 300, 0);
  const r = await run(Op.ADD_LOCKSPACE, [name, path], [LOCKSPACE_OFFSET, hostId, ioTimeout]);
  if (r.rv === RV.EEXIST) return { wasJoined: true };
  if (r.rv === RV.SANLK_HOSTID_BUSY) {
    throw new ResourceBusyError(`joinLockspace: host id ${hostId} of lockspace ${name} is in use by another host (${await hostName(path, hostId) ?? 'name unknown'}): ${sanlockCause(r.rv, 'sanlock_add_lockspace').message}`, { cause: sanlockCause(r.rv, 'sanlock_add_lockspace') });
  }
  if (r.rv < 0) throw errorFor(r.rv, 'sanlock_add_lockspace', `joinLockspace: lockspace ${name} as host ${hostId} on ${path}`);
  return { wasJoined: false };
}

/** Leaves the lockspace. sanlock kills every process of this host that holds a lease in it. Not joined: a no-op. */
export async function leaveLockspace(options: JoinOptions): Promise<{ wasJoined: boolean }> {
  const name = checkName(options?.lockspace, 'lockspace');
  const path = checkStoragePath(options.path, 'path');
  const hostId = checkInt(options.hostId, 'hostId', 1, 2000, 0);
  const r = await run(Op.REM_LOCKSPACE, [name, path], [LOCKSPACE_OFFSET, hostId]);
  if (r.rv === RV.ENOENT) return { wasJoined: false };
  if (r.rv < 0) throw errorFor(r.rv, 'sanlock_rem_lockspace', `leaveLockspace: ${name}`);
  return { wasJoined: true };
}

/**
 * This host's daemon and the lockspace: 'joined'; 'joining' while a join is in
 * progress (sanlock's EINPROGRESS: leases cannot be acquired in it yet);
 * 'not-joined'.
 */
export async function lockspaceState(options: JoinOptions): Promise<'joined' | 'joining' | 'not-joined'> {
  return inqLockspace(options, false);
}

/**
 * Whether the lockspace is joined once any join or leave of it in progress
 * has completed (SANLK_INQ_WAIT, on the admin worker: it may wait as long as
 * a join). For the manager's "was the VM killed because the lockspace went?".
 */
export async function lockspaceJoinedSettled(options: JoinOptions): Promise<boolean> {
  return (await inqLockspace(options, true)) === 'joined';
}

async function inqLockspace(options: JoinOptions, settle: boolean): Promise<'joined' | 'joining' | 'not-joined'> {
  const name = checkName(options?.lockspace, 'lockspace');
  const path = checkStoragePath(options.path, 'path');
  const hostId = checkInt(options.hostId, 'hostId', 1, 2000, 0);
  const r = await run(Op.INQ_LOCKSPACE, [name, path], settle ? [LOCKSPACE_OFFSET, hostId, 1] : [LOCKSPACE_OFFSET, hostId]);
  if (r.rv === 0) return 'joined';
  if (r.rv === RV.EINPROGRESS) return 'joining';
  if (r.rv === RV.ENOENT) {
    if (!existsSync(join(runDir(), 'sanlock.sock'))) throw errorFor(RV.ECONNREFUSED, 'sanlock_inq_lockspace', 'lockspaceJoined');
    return 'not-joined';
  }
  throw errorFor(r.rv, 'sanlock_inq_lockspace', `lockspaceJoined: ${name}`);
}

/** Whether this host's daemon holds the lockspace with this host id (false while a join is still in progress). */
export async function lockspaceJoined(options: JoinOptions): Promise<boolean> {
  return (await lockspaceState(options)) === 'joined';
}

/** Where a disk's or named lease's resources are in the lease index, and whether this call created them. */
export interface CreatedLease {
  offset: number;
  created: boolean;
  /** Its class resources (readonly, shared), created with it, or now if the main one predates them. */
  classes: { readonly: number; shared: number; created: boolean };
}

/**
 * Creates the lease of a disk in the lease index (once per disk, from any one
 * host that has joined), with its two class resources. Exists already:
 * returns its offsets (and adds class resources a version 1 add-disk did not create).
 */
export async function createDiskLease(options: StorageOptions & { disk: string }): Promise<CreatedLease> {
  const disk = checkStoragePath(options?.disk, 'disk');
  return createLease(options, diskResourceName(disk), `createDiskLease: ${disk}`);
}

/**
 * Creates the lease of a named lease (libvirt's <lease>) in the lease index,
 * by its file's path `<path>/<lockspace>/<key>` (the name every lockspace
 * gives it), with its two class resources. Exists already: returns its offsets.
 */
export async function createNamedLease(options: StorageOptions & { lease: string }): Promise<CreatedLease> {
  const lease = checkStoragePath(options?.lease, 'lease');
  return createLease(options, leaseResourceName(lease), `createNamedLease: ${lease}`);
}

async function createLease(options: StorageOptions, res: string, what: string): Promise<CreatedLease> {
  const main = await createResource(options, res, what);
  const r = await createResource(options, classResourceName(res, 'readonly'), `${what} (its readonly class)`);
  const w = await createResource(options, classResourceName(res, 'shared'), `${what} (its shared class)`);
  return { ...main, classes: { readonly: r.offset, shared: w.offset, created: r.created || w.created } };
}

async function createResource(options: StorageOptions, res: string, what: string): Promise<{ offset: number; created: boolean }> {
  const name = checkName(options?.lockspace, 'lockspace');
  const path = checkStoragePath(options.path, 'path');
  const found = await lookupLease(name, path, res);
  if (found !== null) return { offset: found, created: false };
  const r = await check(run(Op.CREATE_RESOURCE, [name, path, res], [RINDEX_OFFSET]), 'sanlock_create_resource', `${what} in lockspace ${name}`);
  return { offset: r.out[0]!, created: true };
}

/** The offset of a resource lease in the index, or null. */
export async function lookupLease(lockspace: string, path: string, resource: string): Promise<number | null> {
  const r = await run(Op.LOOKUP, [lockspace, path, resource], [RINDEX_OFFSET]);
  if (r.rv === RV.ENOENT || r.rv === RV.ENODATA) return null;
  if (r.rv < 0) throw errorFor(r.rv, 'sanlock_lookup_rindex', `looking up ${resource} in the lease index of ${path}`);
  return r.out[0]!;
}

// ---- leases ----------------------------------------------------------------

export interface LeaseAddress {
  lockspace: string;
  resource: string;
  path: string;
}

/** Acquires for a registered pid. offset -1: look it up in the index. lver -1: any. Resolves rv, the offset and the pid's inquire state. */
export function acquireFor(pid: number, lease: LeaseAddress, offset: number, shared: boolean, lver: number): Promise<Result> {
  return run(Op.ACQUIRE, [lease.lockspace, lease.resource, lease.path], [pid, offset, RINDEX_OFFSET, shared ? 1 : 0, lver]);
}

export function releaseFor(pid: number, lease: LeaseAddress, offset: number): Promise<Result> {
  return run(Op.RELEASE, [lease.lockspace, lease.resource, lease.path], [pid, offset]);
}

/** sanlock_inquire's raw result: rv -3 (ESRCH) once the daemon no longer knows the pid. */
export function inquireRaw(pid: number): Promise<Result> {
  return run(Op.INQUIRE, [], [pid]);
}

/**
 * Host ids (and generations) that own a resource lease, from the storage: the
 * exclusive owner and every host with a shared hold (sanlock's per-host mode
 * blocks; a host is listed once however many of its processes hold it).
 * Best effort ([] when it cannot be read) unless `strict`: then a read
 * failure throws.
 */
export async function leaseOwners(lease: LeaseAddress, offset: number, strict = false): Promise<Array<{ hostId: number; generation: number }>> {
  const r = await run(Op.READ_OWNERS, [lease.lockspace, lease.resource, lease.path], [offset]);
  if (r.rv < 0 && strict) throw errorFor(r.rv, 'sanlock_read_resource_owners', `reading the owners of ${lease.resource} on ${lease.path}`);
  if (r.rv < 0) return [];
  const owners: Array<{ hostId: number; generation: number }> = [];
  for (let i = 0; i + 1 < r.out.length; i += 2) owners.push({ hostId: r.out[i]!, generation: r.out[i + 1]! });
  return owners;
}

/** sanlock_release(-1, pid, SANLK_REL_ALL): every lease the pid still holds. */
export function releaseAllFor(pid: number): Promise<Result> {
  return run(Op.RELEASE_ALL, [], [pid]);
}

/**
 * The name a host joined with (sanlock daemon -e), read from its delta lease
 * on the storage: sanlock keeps it in the leader record's resource_name
 * (byte 104, 48 bytes; sector size at byte 12). Best effort: null if it
 * cannot be read. A buffered read may be stale by a renewal or two; names only
 * change when a host rejoins.
 */
export async function hostName(path: string, hostId: number): Promise<string | null> {
  // fs/promises: the reads run on libuv's threadpool, never on the event loop (shared storage may be slow).
  let file;
  try {
    file = await open(path, 'r');
    const first = Buffer.alloc(512);
    if ((await file.read(first, 0, 512, LOCKSPACE_OFFSET)).bytesRead !== 512) return null;
    const sector = first.readUInt32LE(12);
    if (sector !== 512 && sector !== 4096) return null;
    const rec = Buffer.alloc(512);
    if ((await file.read(rec, 0, 512, LOCKSPACE_OFFSET + (hostId - 1) * sector)).bytesRead !== 512) return null;
    if (Number(rec.readBigUInt64LE(32)) !== hostId) return null;
    const raw = rec.subarray(104, 152);
    const end = raw.indexOf(0);
    const name = raw.subarray(0, end < 0 ? raw.length : end).toString('utf8');
    return name === '' ? null : name;
  } catch {
    return null;
  } finally {
    await file?.close().catch(() => undefined);
  }
}

/**
 * The exec helper (native/sanlock-exec.c): next to the addon that was loaded,
 * in build/Release for a build from source, in prebuilds/linux-x64/ for the
 * prebuilt binaries (scripts/prebuild.mjs puts it there).
 */
export function execHelperPath(): string {
  const path = join(dirname(addonPath), 'lockmgr-sanlock-exec');
  if (existsSync(path)) return path;
  throw new UnsupportedError(`sanlock: the helper lockmgr-sanlock-exec is missing next to the addon (${addonPath}); ${buildFromSourceHint}`);
}

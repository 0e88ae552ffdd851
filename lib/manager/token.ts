// The inquire() token: what a migration target needs to know of the source's
// lock state (RFC: Inquire, carried in the migration cookie). An opaque,
// versioned string:
//
//   lockmgr.1.<base64url of the JSON state>.<first 16 hex digits of its sha256>
//
// The digest catches truncation and accidental edits; it is not a signature
// (anyone can compute it). The target therefore trusts the token for nothing
// it could not check: it opens only the resources its own configuration names
// (LockManager.fromInquire's `resources`), and the token must list exactly
// those. It checks the manager name, the version, the digest and every field,
// and refuses anything else with InvalidArgumentError.
import { createHash } from 'node:crypto';
import { InvalidArgumentError } from '../os/errors.js';
import type { LockspaceConfig, ResourceMode } from '../lockspaces/driver.js';
import { LOCKSPACE_KINDS } from '../lockspaces/index.js';
import { describe } from '../os/validate.js';

export const TOKEN_MANAGER = 'lockmgr';
export const TOKEN_VERSION = 1;

export interface TokenParams {
  id?: number;
  uuid?: string;
  name?: string;
  uri?: string;
}

export type TokenResource =
  | { type: 'disk'; path: string; mode: ResourceMode; qemuCompatible: boolean }
  | { type: 'lease'; lockspace: string; key: string; path: string; mode: ResourceMode };

export interface TokenState {
  lockspace: LockspaceConfig;
  params: TokenParams;
  resources: TokenResource[];
  /** The lockspace's own state, where it has one (capability migrationState): the lease versions the target acquires with. */
  leaseState?: string;
}

const MODES: readonly ResourceMode[] = ['exclusive', 'shared', 'readonly'];

const digest = (text: string): string => createHash('sha256').update(text).digest('hex').slice(0, 16);

export function encodeToken(state: TokenState): string {
  const body = { manager: TOKEN_MANAGER, version: TOKEN_VERSION, ...state };
  const head = `${TOKEN_MANAGER}.${TOKEN_VERSION}.${Buffer.from(JSON.stringify(body)).toString('base64url')}`;
  return `${head}.${digest(head)}`;
}

function bad(why: string): InvalidArgumentError {
  return new InvalidArgumentError(`invalid migration token: ${why}`);
}

function onlyKeys(o: Record<string, unknown>, allowed: readonly string[], what: string): void {
  for (const k of Object.keys(o)) if (!allowed.includes(k)) throw bad(`${what} has an unknown key '${k.slice(0, 40)}'`);
}

/** Parses and checks a token; the fields it returns still go through the manager's own validation. */
export function decodeToken(token: unknown): TokenState {
  if (typeof token !== 'string') throw bad(`expected a string from inquire(), got ${describe(token)}`);
  const parts = token.split('.');
  if (parts.length !== 4) throw bad('it is not in the form lockmgr.VERSION.STATE.DIGEST (truncated?)');
  const [manager, version, payload, check] = parts as [string, string, string, string];
  // As libvirt refuses "source host lock driver X different from target Y".
  if (manager !== TOKEN_MANAGER) throw bad(`it comes from lock manager '${manager.slice(0, 40)}', and this one is '${TOKEN_MANAGER}'`);
  if (version !== String(TOKEN_VERSION)) throw bad(`it is version ${version.slice(0, 10)}, and this lockmgr reads version ${TOKEN_VERSION} only`);
  if (check !== digest(`${manager}.${version}.${payload}`)) throw bad('its digest does not match: it was truncated or altered');
  let body: unknown;
  try {
    body = JSON.parse(Buffer.from(payload, 'base64url').toString('utf8'));
  } catch {
    throw bad('its state is not valid base64url JSON');
  }
  if (body === null || typeof body !== 'object') throw bad('its state is not an object');
  const b = body as Record<string, unknown>;
  if (b.manager !== TOKEN_MANAGER || b.version !== TOKEN_VERSION) throw bad('its state does not match its header');
  onlyKeys(b, ['manager', 'version', 'lockspace', 'params', 'resources', 'leaseState'], 'its state');
  const lockspace = b.lockspace as LockspaceConfig;
  if (lockspace === null || typeof lockspace !== 'object' || Array.isArray(lockspace) || !(LOCKSPACE_KINDS as readonly string[]).includes(lockspace.kind)) throw bad('it names no known lockspace');
  // The lockspace's own options are compared by the target's lockspace (sameAs): here only their shape.
  for (const [k, v] of Object.entries(lockspace)) {
    if (typeof v !== 'string' && typeof v !== 'number') throw bad(`its lockspace has a malformed option '${k.slice(0, 40)}'`);
  }
  if (b.leaseState !== undefined && typeof b.leaseState !== 'string') throw bad('its lease state is not a string');
  const params = b.params as TokenParams;
  if (params === null || typeof params !== 'object' || Array.isArray(params)) throw bad('its params are not an object');
  if (!Array.isArray(b.resources)) throw bad('its resources are not a list');
  for (const [i, r] of (b.resources as unknown[]).entries()) {
    const res = r as Record<string, unknown>;
    if (res === null || typeof res !== 'object' || (res.type !== 'disk' && res.type !== 'lease') || typeof res.path !== 'string' || typeof res.mode !== 'string') {
      throw bad(`resource ${i} is not a disk or lease with a path and a mode`);
    }
    onlyKeys(res, res.type === 'disk' ? ['type', 'path', 'mode', 'qemuCompatible'] : ['type', 'lockspace', 'key', 'path', 'mode'], `resource ${i}`);
    if (!(MODES as readonly unknown[]).includes(res.mode)) throw bad(`resource ${i} has an unknown mode ${describe(res.mode)}`);
    if (res.type === 'disk' && typeof res.qemuCompatible !== 'boolean') throw bad(`resource ${i} does not say whether it is QEMU-compatible`);
    if (res.type === 'lease' && (typeof res.lockspace !== 'string' || typeof res.key !== 'string')) throw bad(`resource ${i} is a lease without a lockspace and key`);
  }
  return { lockspace, params, resources: b.resources as TokenResource[], leaseState: b.leaseState as string | undefined };
}


// The formats that outlive a process (docs/architecture.md): what lockmgr
// writes where other processes, hosts and releases read it. Each is pinned
// here by a vector computed outside lockmgr (coreutils' sha256sum): a change
// fails this test, and must come with a new version and a test that the old
// and the new version still exclude each other on the same storage.
import { describe, expect, it } from 'vitest';
import { inodeIdentity, LOCK_FILE_NAMES_VERSION, lockFileName } from '../../lib/lockspaces/indirect.js';
import { leaseFilePath } from '../../lib/lockspaces/named-lease.js';
import { GUARD_RANGE, LEASE_RANGE, PIN_RANGE, READONLY_CLASS_RANGE, SHARED_CLASS_RANGE } from '../../lib/lockspaces/ofd.js';
import { classResourceName, diskResourceName, leaseResourceName, SANLOCK_NAMES_VERSION } from '../../lib/lockspaces/sanlock-client.js';
import { STATUS_JSON_VERSION } from '../../lib/cli/status.js';
import { decodeToken, encodeToken, TOKEN_VERSION } from '../../lib/manager/token.js';
import { QEMU_PERM_BASE, QEMU_PERMISSIONS, QEMU_SHARED_BASE } from '../../lib/os/qemu.js';

describe('formats that outlive a process', () => {
  it('lock-file names, version 2: sha256 of the canonical path and of the path as given (virtlockd\'s names), and of the inode identity', () => {
    // Version 1 took the canonical path and the inode names; version 2 adds the
    // path as given when it differs (test/integration/indirect.test.ts, "mixed versions").
    expect(LOCK_FILE_NAMES_VERSION).toBe(2);
    expect(lockFileName('/var/lib/libvirt/images/vm1.img')).toBe('cacb1d80d0c2e8f7d85cf952355b4d1ee04029c48279d034b485725afc5c61d6');
    // A symlink's spelling, hashed as written (what virtlockd does with the domain XML's path).
    expect(lockFileName('/var/lib/libvirt/images/by-name/vm1.img')).toBe('77107f3bd59cda9641c730ab6ee354f7badf61bf2b8c78d6140f179cf11de062');
    const boot = '0b7c2a55-1234-4abc-8def-0123456789ab';
    expect(inodeIdentity(2049n, 1311n, boot)).toBe(`inode:${boot}:2049:1311`);
    expect(lockFileName(inodeIdentity(2049n, 1311n, boot))).toBe('2ca007fa9caaefb3de218a28debd49c6852e171f0893d96f063b7b91c1c22101');
    expect(leaseFilePath({ path: '/var/lib/libvirt/lockd/leases', lockspace: 'cluster', key: 'vm1-disk0' })).toBe('/var/lib/libvirt/lockd/leases/cluster/vm1-disk0');
  });

  it('sanlock resource names, version 2: lm- and lml- with 40 hex digits of sha256, and their class resources lmr-/lmw- and lmlr-/lmlw-', () => {
    // Version 1 had the main names only; version 2 adds the class resources
    // beside them and keeps the main names, so version 1 still excludes all it
    // did (test/system/sanlock.test.ts, "names version 2 beside version 1").
    expect(SANLOCK_NAMES_VERSION).toBe(2);
    const disk = diskResourceName('/dev/disk/by-id/wwn-0x5000c500a1b2c3d4');
    expect(disk).toBe('lm-92b2646d1f6f83fb9047d2a2a35643043a84f469');
    expect([classResourceName(disk, 'readonly'), classResourceName(disk, 'shared')]).toEqual(['lmr-92b2646d1f6f83fb9047d2a2a35643043a84f469', 'lmw-92b2646d1f6f83fb9047d2a2a35643043a84f469']);
    const lease = leaseResourceName('/var/lib/libvirt/lockd/leases/cluster/vm1-disk0');
    expect(lease).toBe('lml-90b36bc8cfa10a005f5b4313e279f8c37a683dfa');
    expect([classResourceName(lease, 'readonly'), classResourceName(lease, 'shared')]).toEqual(['lmlr-90b36bc8cfa10a005f5b4313e279f8c37a683dfa', 'lmlw-90b36bc8cfa10a005f5b4313e279f8c37a683dfa']);
    // sanlock's names have at most 48 bytes.
    for (const name of [disk, lease]) for (const cls of ['readonly', 'shared'] as const) expect(classResourceName(name, cls).length).toBeLessThanOrEqual(48);
  });

  it('the lease file bytes: 0 the lease, 1 the handover guard, 2 the pin, 3 and 4 the shared and readonly classes; QEMU\'s at 100+i and 200+i', () => {
    // Bytes 3 and 4 (issue 14) only add exclusions: byte 0 is unchanged, so a
    // release without them and virtlockd still exclude everything they did.
    expect([LEASE_RANGE, GUARD_RANGE, PIN_RANGE, SHARED_CLASS_RANGE, READONLY_CLASS_RANGE]).toEqual([
      { start: 0, length: 1 },
      { start: 1, length: 1 },
      { start: 2, length: 1 },
      { start: 3, length: 1 },
      { start: 4, length: 1 },
    ]);
    expect([QEMU_PERM_BASE, QEMU_SHARED_BASE]).toEqual([100, 200]);
    expect(QEMU_PERMISSIONS).toEqual(['consistent-read', 'write', 'write-unchanged', 'resize', 'graph-mod']);
  });

  it('the migration token, version 1: lockmgr.1.<base64url JSON>.<16 hex digits of sha256 of the head>', () => {
    expect(TOKEN_VERSION).toBe(1);
    const state = { lockspace: { kind: 'direct' }, params: { name: 'vm1' }, resources: [{ type: 'disk' as const, path: '/images/vm1.img', mode: 'exclusive' as const, qemuCompatible: false }] };
    const token = encodeToken(state);
    const [manager, version, payload, digest] = token.split('.');
    expect([manager, version]).toEqual(['lockmgr', '1']);
    expect(JSON.parse(Buffer.from(payload!, 'base64url').toString('utf8'))).toEqual({ manager: 'lockmgr', version: 1, ...state });
    expect(digest).toMatch(/^[0-9a-f]{16}$/);
    // A token written by this version is read back by it (and by any release that reads version 1).
    expect(decodeToken(token)).toEqual({ ...state, leaseState: undefined });
    // A token of this exact text, as a release of version 1 wrote it, still reads.
    const pinned = 'lockmgr.1.eyJtYW5hZ2VyIjoibG9ja21nciIsInZlcnNpb24iOjEsImxvY2tzcGFjZSI6eyJraW5kIjoiZGlyZWN0In0sInBhcmFtcyI6eyJuYW1lIjoidm0xIn0sInJlc291cmNlcyI6W3sidHlwZSI6ImRpc2siLCJwYXRoIjoiL2ltYWdlcy92bTEuaW1nIiwibW9kZSI6ImV4Y2x1c2l2ZSIsInFlbXVDb21wYXRpYmxlIjpmYWxzZX1dfQ';
    expect(token.startsWith(`${pinned}.`)).toBe(true);
  });

  it('lockmgr status --json, version 1', () => {
    expect(STATUS_JSON_VERSION).toBe(1);
  });
});

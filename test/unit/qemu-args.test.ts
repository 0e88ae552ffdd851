// qemuDiskArgs(): the QEMU arguments that open a disk through an inherited
// descriptor (docs/cli.md). test/system/qemu-system.test.ts runs them in a
// real QEMU; this pins their text and their refusals.
import { describe, expect, it } from 'vitest';
import { InvalidArgumentError, qemuDiskArgs } from '../../lib/index.js';

describe('qemuDiskArgs', () => {
  it('exclusive: -add-fd into set N, a file node on /dev/fdset/N, raw on top, a virtio disk without share-rw', () => {
    expect(qemuDiskArgs(20, { id: 'd0', mode: 'exclusive' })).toEqual([
      '-add-fd',
      'fd=20,set=20',
      '-blockdev',
      'driver=file,filename=/dev/fdset/20,node-name=d0-file',
      '-blockdev',
      'driver=raw,file=d0-file,node-name=d0',
      '-device',
      'virtio-blk-pci,drive=d0',
    ]);
  });

  it('shared adds share-rw=on to the device; readonly read-only=on to both nodes; format and device are the caller\'s', () => {
    expect(qemuDiskArgs(7, { id: 'a', mode: 'shared' }).at(-1)).toBe('virtio-blk-pci,drive=a,share-rw=on');
    expect(qemuDiskArgs(7, { id: 'a', mode: 'readonly', format: 'qcow2', device: 'scsi-hd' })).toEqual([
      '-add-fd',
      'fd=7,set=7',
      '-blockdev',
      'driver=file,filename=/dev/fdset/7,node-name=a-file,read-only=on',
      '-blockdev',
      'driver=qcow2,file=a-file,node-name=a,read-only=on',
      '-device',
      'scsi-hd,drive=a',
    ]);
    expect(qemuDiskArgs(7, { id: 'a', mode: 'exclusive', device: null })).toHaveLength(6);
  });

  it('refuses what QEMU would misread: InvalidArgumentError for a stdio or bad fd, a bad node name, an unknown mode, options smuggled into format or device', () => {
    for (const fd of [2, -1, 3.5, Number.NaN]) expect(() => qemuDiskArgs(fd, { id: 'd0', mode: 'exclusive' })).toThrow(InvalidArgumentError);
    for (const id of ['', '0d', 'd,0', 'd 0']) expect(() => qemuDiskArgs(5, { id, mode: 'exclusive' })).toThrow(InvalidArgumentError);
    expect(() => qemuDiskArgs(5, { id: 'd0', mode: 'write' as 'shared' })).toThrow(/mode must be/);
    expect(() => qemuDiskArgs(5, { id: 'd0', mode: 'shared', format: 'raw,locking=off' })).toThrow(/format must be/);
    expect(() => qemuDiskArgs(5, { id: 'd0', mode: 'shared', device: 'virtio-blk-pci,share-rw=off' })).toThrow(/device must be/);
  });
});

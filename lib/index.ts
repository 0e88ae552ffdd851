// lockmgr: OFD byte-range locks, pidfd supervision and a libvirt-style lock
// manager for Node.js on Linux.
export {
  openLockable,
  LockableFile,
  type Access,
  type ByteRange,
  type LockConflict,
  type LockMode,
  type LockOptions,
  type LockSyncOptions,
  type OpenOptions,
  type ResourceIdentity,
  type ResourceKind,
} from './os/locks.js';
export {
  spawnSupervised,
  attachProcess,
  SupervisedProcess,
  type ExitStatus,
  type SpawnOptions,
  type StdioEntry,
  type StdioKind,
  type StopOptions,
} from './os/supervise.js';
export * from './os/errors.js';
export {
  LockManager,
  type DiskSpec,
  type FromInquireOptions,
  type LeaseSpec,
  type MigrateInOptions,
  type MigrateOutOptions,
  type LockFailure,
  type LockFailureAction,
  type LockLifetime,
  type LockManagerEvents,
  type LockManagerOptions,
  type LockspaceConfig,
  type ManagerParams,
  type ManagerState,
  type ResourceMode,
  type ResourceRef,
  type ResourceSpec,
  type VerifyResult,
  type WaitOptions,
} from './manager/manager.js';
export type { DirectLockspaceConfig, IndirectLockspaceConfig } from './lockspaces/driver.js';
export { locksOn, parseProcLocks, processesWithOpen, type ProcLock, type ProcLockKind } from './os/proc-locks.js';
export { QEMU_PERMISSIONS, qemuLockState, qemuProfile, type QemuLockState, type QemuPermission, type QemuProfile } from './os/qemu.js';
export * as sanlock from './lockspaces/sanlock-client.js';

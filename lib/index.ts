// lockmgr: OFD byte-range locks, pidfd supervision and a libvirt-style lock
// manager for Node.js on Linux. Everything exported here is documented in
// README.md and docs/; nothing else is public.
export {
  openLockable,
  withLock,
  LockableFile,
  HeldLock,
  type Access,
  type ByteRange,
  type LockConflict,
  type LockMode,
  type LockOptions,
  type LockSyncOptions,
  type OpenOptions,
  type WithLockOptions,
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
export {
  LockManagerError,
  InvalidArgumentError,
  ResourceAccessError,
  ResourceBusyError,
  LockTimeoutError,
  AbortError,
  AccessModeError,
  UnsupportedError,
  NoLocksAvailableError,
  ResourceExhaustedError,
  InvalidStateError,
  InternalError,
  SpawnError,
  type LockHolder,
  type LockHolders,
  type LockHolderProcess,
  type FileOpener,
  type UnreadableHolder,
  type LockKind,
  type HoldersOptions,
  type LockTimeoutOptions,
  type ProcessInfo,
  type ResourceBusyOptions,
  type SystemError,
} from './os/errors.js';
export {
  LockManager,
  type DiskSpec,
  type AdoptOptions,
  type FromInquireOptions,
  type LeaseSpec,
  type MigrateInOptions,
  type MigrateOutOptions,
  type LockFailure,
  type LockFailureAction,
  type LockLifetime,
  type LockManagerEvents,
  type LockManagerOptions,
  type LockspaceOptions,
  type ManagerParams,
  type ManagerState,
  type ResourceMode,
  type ResourceRef,
  type ResourceSpec,
  type VerifyResult,
  type WaitOptions,
} from './manager/manager.js';
export type { Capabilities, Capability } from './lockspaces/driver.js';
export type { DirectLockspaceConfig, IndirectLockspaceConfig, SanlockLockspaceConfig } from './lockspaces/index.js';
export { lockHolders, locksOn, parseProcLocks, processesWithOpen, type LockHoldersOptions, type ProcLock, type ProcLockKind } from './os/proc-locks.js';
export { QEMU_PERMISSIONS, qemuDiskArgs, qemuLockState, type QemuDiskOptions, type QemuLockState, type QemuPermission } from './os/qemu.js';
export * as sanlock from './lockspaces/sanlock-public.js';

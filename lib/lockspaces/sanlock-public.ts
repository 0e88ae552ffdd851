// The public `sanlock` namespace (index.ts): preparing shared storage and
// joining or leaving a lockspace (docs/sanlock.md). Acquiring and releasing is
// the LockManager's, through the sanlock lockspace.
export {
  createDiskLease,
  createNamedLease,
  initStorage,
  joinLockspace,
  leaveLockspace,
  lockspaceJoined,
  lockspaceState,
  type CreatedLease,
  type InitOptions,
  type JoinOptions,
  type StorageOptions,
} from './sanlock-client.js';

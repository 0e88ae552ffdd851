// Shared declarations of the addon's native parts. The native layer is mechanical:
// scalars in, errno out. Policy (modes, identity, error classes) lives in lib/.
#pragma once

#include <napi.h>

#include <unordered_set>

namespace lockmgr {

class WaitPool;
struct SpawnState;

// Per-environment state (main thread and each worker thread have their own).
// N-API gives an addon one instance-data slot, so the parts share this struct.
struct AddonData {
  WaitPool* waiters = nullptr;
  SpawnState* spawn = nullptr;
  // Lockable fds opened by this environment and not yet closed. A worker that
  // ends without closing its files must not leave their locks held: the
  // environment's cleanup closes what is left here.
  std::unordered_set<int> lock_fds;
};

inline AddonData* GetAddonData(Napi::Env env) { return env.GetInstanceData<AddonData>(); }

// Keeps the addon mapped for the life of the process (RTLD_NODELETE), for code
// that may run after the last environment is gone: signal handlers, threads.
// Idempotent. Defined in waiters.cc.
void PinModule();

// Each native part adds its functions to the addon's exports.
void InitOfd(Napi::Env env, Napi::Object exports);
void InitWaiters(Napi::Env env, Napi::Object exports);
void InitSpawn(Napi::Env env, Napi::Object exports);

}  // namespace lockmgr

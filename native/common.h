// Shared declarations of the addon's native parts. The native layer is mechanical:
// scalars in, errno out. Policy (modes, identity, error classes) lives in lib/.
#pragma once

#include <napi.h>

#include <initializer_list>
#include <unordered_set>
#include <utility>
#include <vector>

namespace lockmgr {

class WaitPool;
struct SpawnState;
class SanlockState;

// Per-environment state (main thread and each worker thread have their own).
// N-API gives an addon one instance-data slot, so the parts share this struct.
struct AddonData {
  WaitPool* waiters = nullptr;
  SpawnState* spawn = nullptr;
  SanlockState* sanlock = nullptr;
  // Lockable fds opened by this environment and not yet closed. A worker that
  // ends without closing its files must not leave their locks held: the
  // environment's cleanup closes what is left here. Indexed by fd.
  std::vector<bool> lock_fds;
  // lockSync's timer for this environment's thread (waiters.cc), created on
  // the first wait with a timeout and deleted with the environment.
  struct SyncTimer* sync_timer = nullptr;
};

inline AddonData* GetAddonData(Napi::Env env) { return env.GetInstanceData<AddonData>(); }

// Keeps the addon mapped for the life of the process (RTLD_NODELETE), for code
// that may run after the last environment is gone: signal handlers, threads.
// Idempotent. Defined in waiters.cc.
void PinModule();

// Scalar arguments. JS validates every argument before it reaches the addon,
// so these only convert; a wrong type reads as 0.
inline int32_t Int32Arg(const Napi::CallbackInfo& info, size_t i) {
  int32_t v = 0;
  napi_get_value_int32(info.Env(), info[i], &v);
  return v;
}

inline uint32_t Uint32Arg(const Napi::CallbackInfo& info, size_t i) {
  uint32_t v = 0;
  napi_get_value_uint32(info.Env(), info[i], &v);
  return v;
}

inline int64_t Int64Arg(const Napi::CallbackInfo& info, size_t i) {
  int64_t v = 0;
  napi_get_value_int64(info.Env(), info[i], &v);
  return v;
}

// The seam's one return convention: every call that can fail returns a value
// >= 0 (0, an fd, an id) or -errno, and records which system call failed on
// this thread; lib/os/native.ts reads that back (failedSyscall()) and makes
// the typed error in one place. constants.syscalls names them for JS.
#define LOCKMGR_SYSCALLS(X)                                                                          \
  X(None, "") X(Open, "open") X(Fcntl, "fcntl") X(Close, "close") X(Dup3, "dup3")                   \
  X(PthreadCreate, "pthread_create") X(TimerCreate, "timer_create") X(Sigaction, "sigaction")        \
  X(Clone3, "clone3") X(Clone, "clone") X(PidfdOpen, "pidfd_open") X(Mmap, "mmap")                  \
  X(Execve, "execve") X(Chdir, "chdir") X(Dup2, "dup2") X(Setsid, "setsid") X(Prctl, "prctl")       \
  X(CloseRange, "close_range") X(Pipe2, "pipe2") X(PidfdSendSignal, "pidfd_send_signal")            \
  X(UvPollInit, "uv_poll_init") X(NapiInit, "napi_init") X(Fstat, "fstat") X(Fstatfs, "fstatfs")      \
  X(PidfdGetfd, "pidfd_getfd") X(Kcmp, "kcmp") X(Ioctl, "ioctl") X(Dup, "dup")

enum Syscall : int {
#define LOCKMGR_SYSCALL_ENUM(name, text) kSys##name,
  LOCKMGR_SYSCALLS(LOCKMGR_SYSCALL_ENUM)
#undef LOCKMGR_SYSCALL_ENUM
  kSysCount
};

// Records where a call failed and returns -err: `return Fail(kSysOpen, errno);`.
int Fail(Syscall where, int err);

// A result as JS receives it.
inline Napi::Value Result(Napi::Env env, double rv) { return Napi::Number::New(env, rv); }

using NativeFunction = Napi::Value (*)(const Napi::CallbackInfo&);

// Adds functions to the exports, each under its own name.
inline void Export(Napi::Env env, Napi::Object exports, std::initializer_list<std::pair<const char*, NativeFunction>> functions) {
  for (const auto& [name, fn] : functions) exports[name] = Napi::Function::New(env, fn, name);
}

// A frozen object of named numbers: constants JS reads instead of retyping.
inline Napi::Object Constants(Napi::Env env, std::initializer_list<std::pair<const char*, double>> values) {
  Napi::Object o = Napi::Object::New(env);
  for (const auto& [name, value] : values) o[name] = value;
  o.Freeze();
  return o;
}

// Tracks an fd that came from elsewhere (pidfd_getfd) as a lockable fd of this
// environment, closed at its cleanup like the ones openLockable() opens. ofd.cc.
void TrackLockFd(Napi::Env env, int fd);

// Each native part adds its functions (and its constants) to the addon's exports.
void InitOfd(Napi::Env env, Napi::Object exports, Napi::Object constants);
void InitWaiters(Napi::Env env, Napi::Object exports);
void InitSpawn(Napi::Env env, Napi::Object exports, Napi::Object constants);
void InitSanlock(Napi::Env env, Napi::Object exports, Napi::Object constants);

}  // namespace lockmgr

#include "common.h"

namespace lockmgr {

namespace {
thread_local int g_failed_syscall = kSysNone;

const char* const kSyscallNames[] = {
#define LOCKMGR_SYSCALL_NAME(name, text) text,
    LOCKMGR_SYSCALLS(LOCKMGR_SYSCALL_NAME)
#undef LOCKMGR_SYSCALL_NAME
};
static_assert(sizeof kSyscallNames / sizeof kSyscallNames[0] == kSysCount, "one name per syscall");

// failedSyscall() -> index into constants.syscalls of the last failure on this thread.
Napi::Value FailedSyscall(const Napi::CallbackInfo& info) { return Result(info.Env(), g_failed_syscall); }

}  // namespace

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  // Freed when the environment goes away, after every part's cleanup hook has run.
  env.SetInstanceData<AddonData>(new AddonData());
  Napi::Object constants = Napi::Object::New(env);
  Napi::Array syscalls = Napi::Array::New(env, kSysCount);
  for (uint32_t i = 0; i < kSysCount; i++) syscalls.Set(i, Napi::String::New(env, kSyscallNames[i]));
  constants["syscalls"] = syscalls;
  exports["constants"] = constants;
  exports["failedSyscall"] = Napi::Function::New(env, FailedSyscall, "failedSyscall");
  InitOfd(env, exports, constants);
  InitWaiters(env, exports);
  InitSpawn(env, exports, constants);
  InitSanlock(env, exports, constants);
  constants.Freeze();
  return exports;
}

int Fail(Syscall where, int err) {
  g_failed_syscall = where;
  return -err;
}

}  // namespace lockmgr

namespace {
Napi::Object InitAddon(Napi::Env env, Napi::Object exports) { return lockmgr::Init(env, exports); }
}  // namespace

NODE_API_MODULE(lockmgr, InitAddon)

#include "common.h"

namespace {

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  // Freed when the environment goes away, after every part's cleanup hook has run.
  env.SetInstanceData<lockmgr::AddonData>(new lockmgr::AddonData());
  lockmgr::InitOfd(env, exports);
  lockmgr::InitWaiters(env, exports);
  lockmgr::InitSpawn(env, exports);
  lockmgr::InitSanlock(env, exports);
  return exports;
}

}  // namespace

NODE_API_MODULE(lockmgr, Init)

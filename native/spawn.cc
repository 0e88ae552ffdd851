#include "common.h"

namespace lockmgr {

void InitSpawn(Napi::Env, Napi::Object) {}

}  // namespace lockmgr

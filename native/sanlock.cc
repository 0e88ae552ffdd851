// sanlock: calls into the sanlock daemon through libsanlock_client.so.1.
//
// Why dlopen: the addon must load and work on every machine, and only the
// sanlock lockspace needs sanlock. The library is opened at run time by
// sanlockLoad(); without it, lib/lockspaces/sanlock-client.ts reports UnsupportedError with
// dlerror()'s text. The ABI structs are our own copy (sanlock-abi.h), so the
// addon also builds without libsanlock-dev.
//
// Why dedicated threads: every call into the client library is a round trip to
// the daemon, which may block for seconds (joining a lockspace takes about
// 3 io_timeouts; a paxos acquire does disk I/O on shared storage). On the
// event loop that would stall everything; on libuv's threadpool four of them
// would stall every fs call. Each environment has two small worker threads,
// each with a FIFO queue: "lease" for acquire, release and the quick queries
// (inquire, lease owners, whether a lockspace is joined) (FIFO
// matters: a release queued before an acquire of the same lease reaches the
// daemon first), and "admin" for storage set-up and joins, so a 20-second
// join never delays a lease call. (The exec helper's status pipe is read on
// the event loop, lib/lockspaces/sanlock.ts: a join never delays a start.) A
// worker exits after a second without work and is started again on demand.
//
// Results go back to JS through one thread-safe function per environment,
// referenced only while requests are in flight, so an idle addon never keeps
// the process alive. Nothing here throws: every failure is a negative code
// (sanlock's, or -errno) delivered like a result.
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <condition_variable>
#include <deque>
#include <mutex>
#include <string>
#include <vector>

#include "common.h"
#include "sanlock-abi.h"

namespace lockmgr {
namespace {

// The client library's entry points, resolved once per process.
struct Lib {
  int (*acquire)(int, int, uint32_t, int, struct sanlk_resource**, void*);
  int (*release)(int, int, uint32_t, int, struct sanlk_resource**);
  int (*inquire)(int, int, uint32_t, int*, char**);
  int (*write_lockspace)(struct sanlk_lockspace*, int, uint32_t, uint32_t);
  int (*add_lockspace_timeout)(struct sanlk_lockspace*, uint32_t, uint32_t);
  int (*rem_lockspace)(struct sanlk_lockspace*, uint32_t);
  int (*inq_lockspace)(struct sanlk_lockspace*, uint32_t);
  int (*format_rindex)(struct sanlk_rindex*, uint32_t);
  int (*create_resource)(struct sanlk_rindex*, uint32_t, struct sanlk_rentry*, int, int);
  int (*lookup_rindex)(struct sanlk_rindex*, uint32_t, struct sanlk_rentry*);
  int (*read_resource_owners)(struct sanlk_resource*, uint32_t, struct sanlk_host**, int*);
  const char* (*strerror)(int);
};

std::once_flag g_lib_once;
Lib g_lib;
std::string g_lib_error;  // empty once loaded

template <typename F>
bool Sym(void* h, const char* name, F* out) {
  *out = reinterpret_cast<F>(dlsym(h, name));
  if (*out == nullptr) g_lib_error = std::string(name) + " is missing from " LOCKMGR_SANLOCK_LIB;
  return *out != nullptr;
}

void LoadLib() {
  // RTLD_NODELETE: our worker threads may still be inside the library when an
  // environment goes away; it must never be unmapped under them.
  void* h = dlopen(LOCKMGR_SANLOCK_LIB, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
  if (h == nullptr) {
    const char* e = dlerror();
    g_lib_error = e != nullptr ? e : LOCKMGR_SANLOCK_LIB ": cannot be loaded";
    return;
  }
  Lib l;
  bool ok = Sym(h, "sanlock_acquire", &l.acquire) && Sym(h, "sanlock_release", &l.release) &&
            Sym(h, "sanlock_inquire", &l.inquire) && Sym(h, "sanlock_write_lockspace", &l.write_lockspace) &&
            Sym(h, "sanlock_add_lockspace_timeout", &l.add_lockspace_timeout) &&
            Sym(h, "sanlock_rem_lockspace", &l.rem_lockspace) && Sym(h, "sanlock_inq_lockspace", &l.inq_lockspace) &&
            Sym(h, "sanlock_format_rindex", &l.format_rindex) && Sym(h, "sanlock_create_resource", &l.create_resource) &&
            Sym(h, "sanlock_lookup_rindex", &l.lookup_rindex) &&
            Sym(h, "sanlock_read_resource_owners", &l.read_resource_owners) && Sym(h, "sanlock_strerror", &l.strerror);
  if (!ok) return;
  g_lib = l;
  g_lib_error.clear();
}

bool LibReady() {
  std::call_once(g_lib_once, [] {
    g_lib_error = "not loaded";
    LoadLib();
  });
  return g_lib_error.empty();
}

// Operation codes, exported by name (constants.sanlock.ops).
enum Op {
  kAcquire = 1,        // s: ls, res, path; n: pid, offset, rxOffset, shared, lver -> text: inquire state; out: offset
  kRelease = 2,        // s: ls, res, path; n: pid, offset
  kInquire = 3,        // n: pid -> text
  kWriteLockspace = 4, // s: ls, path; n: offset, maxHosts, ioTimeout
  kAddLockspace = 5,   // s: ls, path; n: offset, hostId, ioTimeout
  kRemLockspace = 6,   // s: ls, path; n: offset, hostId
  kInqLockspace = 7,   // s: ls, path; n: offset, hostId[, wait: SANLK_INQ_WAIT, on the admin queue]
  kFormatRindex = 8,   // s: ls, path; n: rxOffset
  kCreateResource = 9, // s: ls, path, res; n: rxOffset -> out: offset
  kLookup = 10,        // s: ls, path, res; n: rxOffset -> out: offset
  kReadOwners = 11,    // s: ls, res, path; n: offset -> out: [host_id, generation, ...]
  kReleaseAll = 13,    // n: pid: every lease the pid holds (SANLK_REL_ALL)
};

struct Request {
  double id = 0;
  int op = 0;
  std::vector<std::string> s;
  std::vector<double> n;
  int rv = 0;
  std::string text;
  std::vector<double> out;
};

void CopyName(char* dst, const std::string& src) {
  memset(dst, 0, SANLK_NAME_LEN);
  memcpy(dst, src.data(), src.size() < SANLK_NAME_LEN ? src.size() : SANLK_NAME_LEN);
}

void CopyPath(char* dst, const std::string& src) {
  memset(dst, 0, SANLK_PATH_LEN);
  memcpy(dst, src.data(), src.size() < SANLK_PATH_LEN - 1 ? src.size() : SANLK_PATH_LEN - 1);
}

void FillResource(sanlk_resource* res, const std::string& ls, const std::string& name, const std::string& path, uint64_t offset) {
  memset(res, 0, sizeof *res);
  CopyName(res->lockspace_name, ls);
  CopyName(res->name, name);
  res->num_disks = 1;
  CopyPath(res->disks[0].path, path);
  res->disks[0].offset = offset;
}

void FillLockspace(sanlk_lockspace* ls, const std::string& name, const std::string& path, uint64_t offset, uint64_t host_id) {
  memset(ls, 0, sizeof *ls);
  CopyName(ls->name, name);
  ls->host_id = host_id;
  CopyPath(ls->host_id_disk.path, path);
  ls->host_id_disk.offset = offset;
}

void FillRindex(sanlk_rindex* rx, const std::string& ls, const std::string& path, uint64_t offset) {
  memset(rx, 0, sizeof *rx);
  CopyName(rx->lockspace_name, ls);
  CopyPath(rx->disk.path, path);
  rx->disk.offset = offset;
}

int Lookup(const std::string& ls, const std::string& path, uint64_t rx_offset, const std::string& name, uint64_t* offset) {
  sanlk_rindex rx;
  FillRindex(&rx, ls, path, rx_offset);
  sanlk_rentry re;
  memset(&re, 0, sizeof re);
  CopyName(re.name, name);
  int rv = g_lib.lookup_rindex(&rx, 0, &re);
  if (rv == 0) *offset = re.offset;
  return rv;
}

void Run(Request* r) {
  if (!LibReady()) {
    r->rv = -ENOSYS;
    return;
  }
  switch (r->op) {
    case kAcquire: {
      int pid = static_cast<int>(r->n[0]);
      double off = r->n[1];
      uint64_t offset = 0;
      if (off < 0) {
        int rv = Lookup(r->s[0], r->s[2], static_cast<uint64_t>(r->n[2]), r->s[1], &offset);
        if (rv < 0) {
          r->rv = rv;
          r->out.push_back(-1);
          return;
        }
      } else {
        offset = static_cast<uint64_t>(off);
      }
      r->out.push_back(static_cast<double>(offset));
      sanlk_resource res;
      FillResource(&res, r->s[0], r->s[1], r->s[2], offset);
      if (r->n[3] != 0) res.flags |= SANLK_RES_SHARED;
      if (r->n[4] >= 0) {
        res.flags |= SANLK_RES_LVER;
        res.lver = static_cast<uint64_t>(r->n[4]);
      }
      sanlk_resource* list[1] = {&res};
      r->rv = g_lib.acquire(-1, pid, 0, 1, list, nullptr);
      if (r->rv < 0) return;
      // The state a migration target needs (its lver), read in the same
      // request so that inquire() never sees a lease without it.
      char* state = nullptr;
      int count = 0;
      if (g_lib.inquire(-1, pid, 0, &count, &state) == 0 && state != nullptr) r->text = state;
      free(state);
      return;
    }
    case kRelease: {
      sanlk_resource res;
      FillResource(&res, r->s[0], r->s[1], r->s[2], static_cast<uint64_t>(r->n[1]));
      sanlk_resource* list[1] = {&res};
      r->rv = g_lib.release(-1, static_cast<int>(r->n[0]), 0, 1, list);
      return;
    }
    case kReleaseAll:
      r->rv = g_lib.release(-1, static_cast<int>(r->n[0]), SANLK_REL_ALL, 0, nullptr);
      return;
    case kInquire: {
      char* state = nullptr;
      int count = 0;
      r->rv = g_lib.inquire(-1, static_cast<int>(r->n[0]), 0, &count, &state);
      if (state != nullptr) r->text = state;
      free(state);
      return;
    }
    case kWriteLockspace: {
      sanlk_lockspace ls;
      FillLockspace(&ls, r->s[0], r->s[1], static_cast<uint64_t>(r->n[0]), 0);
      r->rv = g_lib.write_lockspace(&ls, static_cast<int>(r->n[1]), 0, static_cast<uint32_t>(r->n[2]));
      return;
    }
    case kAddLockspace: {
      sanlk_lockspace ls;
      FillLockspace(&ls, r->s[0], r->s[1], static_cast<uint64_t>(r->n[0]), static_cast<uint64_t>(r->n[1]));
      r->rv = g_lib.add_lockspace_timeout(&ls, 0, static_cast<uint32_t>(r->n[2]));
      return;
    }
    case kRemLockspace:
    case kInqLockspace: {
      sanlk_lockspace ls;
      FillLockspace(&ls, r->s[0], r->s[1], static_cast<uint64_t>(r->n[0]), static_cast<uint64_t>(r->n[1]));
      uint32_t inq_flags = r->n.size() > 2 && r->n[2] != 0 ? SANLK_INQ_WAIT : 0;
      r->rv = r->op == kRemLockspace ? g_lib.rem_lockspace(&ls, 0) : g_lib.inq_lockspace(&ls, inq_flags);
      return;
    }
    case kFormatRindex: {
      sanlk_rindex rx;
      FillRindex(&rx, r->s[0], r->s[1], static_cast<uint64_t>(r->n[0]));
      r->rv = g_lib.format_rindex(&rx, 0);
      return;
    }
    case kCreateResource: {
      sanlk_rindex rx;
      FillRindex(&rx, r->s[0], r->s[1], static_cast<uint64_t>(r->n[0]));
      sanlk_rentry re;
      memset(&re, 0, sizeof re);
      CopyName(re.name, r->s[2]);
      r->rv = g_lib.create_resource(&rx, 0, &re, 0, 0);
      if (r->rv == 0) r->out.push_back(static_cast<double>(re.offset));
      return;
    }
    case kLookup: {
      uint64_t offset = 0;
      r->rv = Lookup(r->s[0], r->s[1], static_cast<uint64_t>(r->n[0]), r->s[2], &offset);
      if (r->rv == 0) r->out.push_back(static_cast<double>(offset));
      return;
    }
    case kReadOwners: {
      sanlk_resource res;
      FillResource(&res, r->s[0], r->s[1], r->s[2], static_cast<uint64_t>(r->n[0]));
      sanlk_host* hosts = nullptr;
      int count = 0;
      r->rv = g_lib.read_resource_owners(&res, 0, &hosts, &count);
      for (int i = 0; r->rv == 0 && hosts != nullptr && i < count; i++) {
        r->out.push_back(static_cast<double>(hosts[i].host_id));
        r->out.push_back(static_cast<double>(hosts[i].generation));
      }
      free(hosts);
      return;
    }
    default:
      r->rv = -EINVAL;
  }
}

constexpr size_t kStackSize = 256 * 1024;  // the client library keeps a few KiB of structs on the stack
constexpr int kIdleMs = 1000;

}  // namespace

class SanlockState;

// One thread and its FIFO queue. Started on demand; exits after kIdleMs idle.
class Worker {
 public:
  explicit Worker(SanlockState* owner) : owner_(owner) {}
  // Returns 0 or the errno of pthread_create. Takes ownership of r on success.
  // 0, or -errno (common.h's convention).
  int Submit(Request* r);
  // Environment teardown: drop what has not started, wait for the thread to leave.
  void Shutdown();

 private:
  static void* Main(void* arg);
  void Loop();

  SanlockState* owner_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::condition_variable exit_cv_;
  std::deque<Request*> queue_;
  bool running_ = false;
  bool stopping_ = false;
};

class SanlockState {
 public:
  SanlockState(Napi::Env env, Napi::Function on_done)
      : env_(env), tsfn_(Napi::ThreadSafeFunction::New(env, on_done, "lockmgr:sanlock", 0, 1)), lease_(this), admin_(this) {
    tsfn_.Unref(env);
  }

  double Submit(bool admin, Request* r) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      r->id = ++next_id_;
      if (in_flight_++ == 0) tsfn_.Ref(env_);
    }
    double id = r->id;
    int rv = (admin ? admin_ : lease_).Submit(r);
    if (rv < 0) {
      delete r;
      Finished();
      return rv;
    }
    return id;
  }

  // On a worker thread, r done: hand it to JS.
  void Deliver(Request* r) {
    napi_status s = tsfn_.NonBlockingCall(r, [](Napi::Env env, Napi::Function fn, Request* req) {
      Call(env, fn, req);
      delete req;
    });
    if (s != napi_ok) delete r;  // the environment is closing; nobody waits for it
  }

  void Shutdown() {
    lease_.Shutdown();
    admin_.Shutdown();
    tsfn_.Release();
  }

 private:
  // On the JS thread. Raw N-API with every status checked, as in waiters.cc:
  // this may run while a worker environment is being torn down.
  static void Call(Napi::Env env, Napi::Function fn, Request* r) {
    if (env == nullptr) return;
    SanlockState* self = GetAddonData(env)->sanlock;
    if (self != nullptr) self->Finished();
    napi_value args[4], result, buffer;
    void* data = nullptr;
    if (napi_create_double(env, r->id, &args[0]) != napi_ok) return;
    if (napi_create_int32(env, r->rv, &args[1]) != napi_ok) return;
    if (napi_create_string_utf8(env, r->text.data(), r->text.size(), &args[2]) != napi_ok) return;
    size_t bytes = r->out.size() * sizeof(double);
    if (napi_create_arraybuffer(env, bytes, &data, &buffer) != napi_ok) return;
    if (bytes > 0) memcpy(data, r->out.data(), bytes);
    if (napi_create_typedarray(env, napi_float64_array, r->out.size(), buffer, 0, &args[3]) != napi_ok) return;
    napi_value global;
    if (napi_get_global(env, &global) != napi_ok) return;
    napi_call_function(env, global, fn, 4, args, &result);
  }

  // On the JS thread: one request fewer in flight; the last one unreferences.
  void Finished() {
    std::lock_guard<std::mutex> lock(mu_);
    if (--in_flight_ == 0) tsfn_.Unref(env_);
  }

  Napi::Env env_;
  Napi::ThreadSafeFunction tsfn_;
  std::mutex mu_;
  double next_id_ = 0;
  int in_flight_ = 0;
  Worker lease_;
  Worker admin_;
};

int Worker::Submit(Request* r) {
  std::unique_lock<std::mutex> lock(mu_);
  if (stopping_) return Fail(kSysNone, ECANCELED);
  if (!running_) {
    // Created with every signal blocked: process-directed signals (SIGINT,
    // SIGCHLD, ...) keep going to the threads that expect them.
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, kStackSize);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_t t;
    int e = pthread_create(&t, &attr, &Worker::Main, this);
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
    pthread_attr_destroy(&attr);
    if (e != 0) return Fail(kSysPthreadCreate, e);
    running_ = true;
  }
  queue_.push_back(r);
  cv_.notify_one();
  return 0;
}

void* Worker::Main(void* arg) {
  static_cast<Worker*>(arg)->Loop();
  return nullptr;
}

void Worker::Loop() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    if (!cv_.wait_for(lock, std::chrono::milliseconds(kIdleMs), [this] { return !queue_.empty() || stopping_; })) break;
    if (stopping_) break;
    Request* r = queue_.front();
    queue_.pop_front();
    lock.unlock();
    Run(r);
    owner_->Deliver(r);
    lock.lock();
  }
  // Detached: Shutdown waits for this flag instead of joining. The module is
  // pinned (PinModule), so the instructions after the unlock stay mapped.
  running_ = false;
  exit_cv_.notify_all();
}

void Worker::Shutdown() {
  std::unique_lock<std::mutex> lock(mu_);
  stopping_ = true;
  for (Request* r : queue_) delete r;
  queue_.clear();
  cv_.notify_all();
  // A call into the daemon cannot be interrupted: teardown waits for it.
  exit_cv_.wait(lock, [this] { return !running_; });
}

namespace {

SanlockState* GetState(Napi::Env env) { return GetAddonData(env)->sanlock; }

// sanlockLoad() -> "" once libsanlock_client.so.1 is loaded, else why not.
Napi::Value SanlockLoad(const Napi::CallbackInfo& info) {
  LibReady();
  return Napi::String::New(info.Env(), g_lib_error);
}

// sanlockInit(onDone(id, rv, text, Float64Array)) -> 0. Started already: 0.
Napi::Value SanlockInit(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  AddonData* data = GetAddonData(env);
  if (data->sanlock != nullptr) return Result(env, 0);
  PinModule();
  SanlockState* state = new SanlockState(env, info[0].As<Napi::Function>());
  data->sanlock = state;
  // Registered after the thread-safe function, so it runs before Node
  // finalizes that function (cleanup hooks run in reverse order).
  env.AddCleanupHook([data, state]() {
    state->Shutdown();
    data->sanlock = nullptr;
    delete state;
  });
  return Result(env, 0);
}

// sanlockCall(op, strings (NUL-separated), numbers) -> id > 0 | -errno.
Napi::Value SanlockCall(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  SanlockState* state = GetState(env);
  if (state == nullptr) return Result(env, Fail(kSysNone, ENOTCONN));
  Request* r = new Request();
  r->op = Int32Arg(info, 0);
  std::string joined = info[1].As<Napi::String>().Utf8Value();
  size_t start = 0;
  for (size_t i = 0; i <= joined.size(); i++) {
    if (i == joined.size() || joined[i] == '\0') {
      r->s.emplace_back(joined, start, i - start);
      start = i + 1;
    }
  }
  Napi::Float64Array nums = info[2].As<Napi::Float64Array>();
  for (size_t i = 0; i < nums.ElementLength(); i++) r->n.push_back(nums[i]);
  bool admin = r->op != kAcquire && r->op != kRelease && r->op != kReleaseAll && r->op != kInquire && r->op != kReadOwners &&
               !(r->op == kInqLockspace && r->n.size() < 3);
  return Napi::Number::New(env, state->Submit(admin, r));
}

// sanlockStrerror(rv) -> sanlock's text for one of its codes.
Napi::Value SanlockStrerror(const Napi::CallbackInfo& info) {
  if (!LibReady()) return Napi::String::New(info.Env(), "");
  const char* text = g_lib.strerror(Int32Arg(info, 0));
  return Napi::String::New(info.Env(), text != nullptr ? text : "");
}

}  // namespace

void InitSanlock(Napi::Env env, Napi::Object exports, Napi::Object constants) {
  Napi::Object ops = Constants(env, {{"ACQUIRE", kAcquire},
                                     {"RELEASE", kRelease},
                                     {"INQUIRE", kInquire},
                                     {"WRITE_LOCKSPACE", kWriteLockspace},
                                     {"ADD_LOCKSPACE", kAddLockspace},
                                     {"REM_LOCKSPACE", kRemLockspace},
                                     {"INQ_LOCKSPACE", kInqLockspace},
                                     {"FORMAT_RINDEX", kFormatRindex},
                                     {"CREATE_RESOURCE", kCreateResource},
                                     {"LOOKUP", kLookup},
                                     {"READ_OWNERS", kReadOwners},
                                     {"RELEASE_ALL", kReleaseAll}});
  // sanlock's own return codes (sanlock_rv.h), by name; the others it returns are -errno.
#define LOCKMGR_SANLK_CODE(name, value) {#name, value},
  Napi::Object codes = Constants(env, {LOCKMGR_SANLK_CODES(LOCKMGR_SANLK_CODE)});
#undef LOCKMGR_SANLK_CODE
  Napi::Object sanlock = Napi::Object::New(env);
  sanlock["ops"] = ops;
  sanlock["codes"] = codes;
  sanlock["NAME_LEN"] = SANLK_NAME_LEN;
  sanlock["PATH_LEN"] = SANLK_PATH_LEN;
  sanlock.Freeze();
  constants["sanlock"] = sanlock;
  Export(env, exports, {{"sanlockLoad", SanlockLoad}, {"sanlockInit", SanlockInit}, {"sanlockCall", SanlockCall}, {"sanlockStrerror", SanlockStrerror}});
}

}  // namespace lockmgr

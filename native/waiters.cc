// Blocking OFD lock waits (F_OFD_SETLKW) on dedicated threads.
//
// Why dedicated threads: a waiter may block for minutes. On libuv's threadpool
// four such waiters would stall every fs call in the process; on the event-loop
// thread one would stall everything.
//
// Why a per-thread POSIX timer: the only way to get a thread out of F_OFD_SETLKW
// is a signal whose handler was installed without SA_RESTART. Each waiter thread
// owns a CLOCK_MONOTONIC timer that delivers the wake-up signal to that thread
// alone (SIGEV_THREAD_ID). A timeout arms it at the deadline; an abort arms it to
// fire at once. Either way it keeps firing every millisecond until the thread
// disarms it, which closes the lost-wake-up race: a signal that lands just
// before the thread enters fcntl is followed by another one that lands inside.
//
// Results go back to JS in batches through one thread-safe function per
// environment, so a release that wakes 1,000 waiters costs a handful of JS calls.
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "common.h"

#ifndef F_OFD_SETLKW
#define F_OFD_SETLKW 38
#endif

#ifndef sigev_notify_thread_id
#define sigev_notify_thread_id _sigev_un._tid
#endif

namespace lockmgr {
namespace {

// Small stacks: a waiter only runs fcntl and an empty signal handler, and
// 1,000 waiters at the default 8 MiB would reserve 8 GiB of address space.
constexpr size_t kStackSize = 64 * 1024;
// An idle thread waits this long for more work before it exits, so bursts reuse
// threads and a quiet process returns to its baseline thread count.
constexpr int kIdleMs = 1000;
constexpr long kRefireNs = 1000 * 1000;

// errno values the pool reports for its own outcomes.
constexpr int kCancelled = ECANCELED;
constexpr int kTimedOut = ETIMEDOUT;
// The wake-up signal already has a handler that is not ours.
constexpr int kSignalTaken = EBUSY;

}  // namespace
}  // namespace lockmgr

// The wake-up handler does nothing: its only job is to exist without
// SA_RESTART, so a blocked fcntl returns EINTR. It has a C name so that another
// copy of this addon in the process (a second version of the package) can
// recognise it through dladdr and share the signal instead of refusing it.
extern "C" __attribute__((visibility("default"))) void lockmgr_wake_handler(int) {}

namespace lockmgr {
namespace {

std::mutex g_signal_mu;
int g_signal = 0;  // installed wake-up signal, 0 until the first wait

bool IsWakeHandler(void* fn) {
  if (fn == reinterpret_cast<void*>(&lockmgr_wake_handler)) return true;
  Dl_info info;
  return dladdr(fn, &info) != 0 && info.dli_sname != nullptr && strcmp(info.dli_sname, "lockmgr_wake_handler") == 0;
}

}  // namespace

// Keeps this shared object mapped for the life of the process. Node unloads an
// addon when the last environment that loaded it ends; our signal handler and
// our threads' code must not vanish under a signal still in flight.
void PinModule() {
  static std::once_flag once;
  std::call_once(once, [] {
    Dl_info info;
    if (dladdr(reinterpret_cast<void*>(&lockmgr_wake_handler), &info) != 0 && info.dli_fname != nullptr) {
      dlopen(info.dli_fname, RTLD_NOW | RTLD_NODELETE | RTLD_NOLOAD);
    }
  });
}

namespace {

// Installs the no-op handler once per process. Every environment (worker
// threads included) shares it. Returns 0 or an errno.
int EnsureWakeSignal(int sig) {
  if (sig < 0) sig = SIGRTMIN + 6;  // default; lib/ documents it
  PinModule();
  std::lock_guard<std::mutex> lock(g_signal_mu);
  if (g_signal != 0) return g_signal == sig ? 0 : kSignalTaken;
  if (sig < SIGRTMIN || sig > SIGRTMAX) return EINVAL;
  struct sigaction old;
  if (sigaction(sig, nullptr, &old) < 0) return errno;
  void* current = (old.sa_flags & SA_SIGINFO) ? reinterpret_cast<void*>(old.sa_sigaction) : reinterpret_cast<void*>(old.sa_handler);
  bool free = current == nullptr || current == reinterpret_cast<void*>(SIG_DFL) || current == reinterpret_cast<void*>(SIG_IGN);
  if (!free && !IsWakeHandler(current)) return kSignalTaken;
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = lockmgr_wake_handler;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;  // no SA_RESTART: the point is to interrupt fcntl
  if (sigaction(sig, &sa, nullptr) < 0) return errno;
  g_signal = sig;
  return 0;
}

timespec Now() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts;
}

bool After(const timespec& a, const timespec& b) {
  return a.tv_sec != b.tv_sec ? a.tv_sec > b.tv_sec : a.tv_nsec >= b.tv_nsec;
}

struct Waiter;

struct Request {
  double id;
  int fd;
  short type;
  int64_t start;
  int64_t len;
  bool has_deadline;
  timespec deadline;
  std::atomic<bool> cancelled{false};
  Waiter* waiter = nullptr;  // guarded by WaitPool::mu_; set while a thread runs it
};

struct Waiter {
  timer_t timer;
  // Whether the timer may be running. A wait without a timeout that nobody
  // cancels never arms it, and then the grant path skips the timer_settime
  // that disarms it: one system call less between the wake-up and JS.
  std::atomic<bool> armed{false};  // set by Kick (under WaitPool::mu_) or by the thread itself
};

void ArmTimer(timer_t timer, int flags, const timespec& first) {
  itimerspec its;
  its.it_value = first;
  its.it_interval.tv_sec = 0;
  its.it_interval.tv_nsec = kRefireNs;
  timer_settime(timer, flags, &its, nullptr);
}

void DisarmTimer(timer_t timer) {
  itimerspec its;
  memset(&its, 0, sizeof its);
  timer_settime(timer, 0, &its, nullptr);
}

void Arm(Waiter* w, int flags, const timespec& first) {
  w->armed = true;
  ArmTimer(w->timer, flags, first);
}

// timeout_ms (>= 0) from now as an absolute CLOCK_MONOTONIC deadline.
timespec DeadlineAfter(double timeout_ms);

// Deadlines beyond this many seconds are clamped: a timeout of 1e300 ms means
// "practically never", and the nanosecond arithmetic must not overflow.
constexpr double kMaxTimeoutSeconds = 1e11;

timespec DeadlineAfter(double timeout_ms) {
  timespec now = Now();
  double secs = timeout_ms / 1000.0;
  if (secs > kMaxTimeoutSeconds) secs = kMaxTimeoutSeconds;
  int64_t whole = static_cast<int64_t>(secs);
  int64_t ns = static_cast<int64_t>((secs - static_cast<double>(whole)) * 1e9);
  timespec deadline;
  deadline.tv_sec = now.tv_sec + whole;
  deadline.tv_nsec = now.tv_nsec + ns;
  if (deadline.tv_nsec >= 1000000000) {
    deadline.tv_sec += 1;
    deadline.tv_nsec -= 1000000000;
  }
  return deadline;
}

}  // namespace

class WaitPool {
 public:
  explicit WaitPool(Napi::Env env) : env_(env) {}

  // Must run on the JS thread before any Submit. Creates the thread-safe function
  // that carries results back; it starts unreferenced so an idle pool never keeps
  // the process alive.
  // `results` is a Float64Array that JS owns and reads: Deliver writes the
  // [id, errno] pairs into it and passes their count, so a delivery allocates
  // no ArrayBuffer (measured: ~2-3 µs of a handoff went to making one).
  void Init(Napi::Function on_done, Napi::Float64Array results) {
    tsfn_ = Napi::ThreadSafeFunction::New(env_, on_done, "lockmgr:lock-wait", 0, 1);
    tsfn_.Unref(env_);
    results_ = Napi::Persistent(results);
  }

  // Returns the request id (> 0), or -errno (pthread_create or timer_create:
  // a thread that started without its timer).
  double Submit(int fd, short type, int64_t start, int64_t len, double timeout_ms) {
    Request* req = new Request();
    req->fd = fd;
    req->type = type;
    req->start = start;
    req->len = len;
    req->has_deadline = timeout_ms >= 0;
    if (req->has_deadline) req->deadline = DeadlineAfter(timeout_ms);
    std::unique_lock<std::mutex> lock(mu_);
    // Idle threads that were notified but have not woken yet still count in
    // idle_, and the requests they will take still count in queue_: a new
    // request is covered only if there are more idle threads than queued ones.
    // Otherwise it gets a thread of its own, or fails now: queued behind waits
    // that may block for hours, it could starve.
    if (idle_ <= static_cast<int>(queue_.size())) {
      int rv = StartThread(lock);
      if (rv < 0) {
        delete req;
        return rv;
      }
    }
    req->id = ++next_id_;
    if (active_.empty()) tsfn_.Ref(env_);
    active_[req->id] = req;
    queue_.push_back(req);
    double id = req->id;
    // Notified after the unlock: a waiter woken while we still hold mu_ would
    // only block on it again.
    lock.unlock();
    work_cv_.notify_one();
    return id;
  }

  // Asks a request to give up. Its completion still arrives, with ECANCELED, or
  // with 0 if the lock was granted before the wake-up reached the thread.
  void Cancel(double id) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = active_.find(id);
    if (it == active_.end()) return;
    Kick(it->second);
  }

  // Environment teardown: cancel everything, wait until every thread has
  // returned, and join them, so no thread of ours runs once this returns.
  void Shutdown() {
    std::unique_lock<std::mutex> lock(mu_);
    stopping_ = true;
    for (const auto& kv : active_) Kick(kv.second);
    work_cv_.notify_all();
    exit_cv_.wait(lock, [this] { return live_ == 0; });
    std::vector<pthread_t> threads;
    threads.swap(threads_);
    for (const auto& kv : active_) delete kv.second;
    active_.clear();
    queue_.clear();
    lock.unlock();
    for (pthread_t t : threads) pthread_join(t, nullptr);
    tsfn_.Release();
  }

  int ThreadCount() {
    std::lock_guard<std::mutex> lock(mu_);
    return live_;
  }

 private:
  // Caller holds mu_.
  void Kick(Request* req) {
    req->cancelled.store(true);
    if (req->waiter != nullptr) {
      timespec now = {0, 1};
      Arm(req->waiter, 0, now);
    }
  }

  // Caller holds mu_ through `lock`. Threads are created with every signal
  // blocked; each then unblocks only the wake-up signal, so process-directed
  // signals (SIGINT, SIGCHLD, ...) keep going to threads that expect them. The
  // new thread reports whether it got its timer before this returns, so a
  // failure is the caller's error, not a poisoned thread's.
  int StartThread(std::unique_lock<std::mutex>& lock) {
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, kStackSize);
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    Start start;
    start.pool = this;
    pthread_t t;
    int e = pthread_create(&t, &attr, &WaitPool::ThreadMain, &start);
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
    pthread_attr_destroy(&attr);
    if (e != 0) return Fail(kSysPthreadCreate, e);
    live_++;
    start_cv_.wait(lock, [&start] { return start.reported; });
    if (start.timer_error != 0) {
      // The thread has already left Run(); it only needs joining.
      lock.unlock();
      pthread_join(t, nullptr);
      lock.lock();
      return Fail(kSysTimerCreate, start.timer_error);
    }
    threads_.push_back(t);
    return 0;
  }

  struct Start {
    WaitPool* pool;
    bool reported = false;
    int timer_error = 0;
  };

  static void* ThreadMain(void* arg) {
    Start* start = static_cast<Start*>(arg);
    start->pool->Run(start);
    return nullptr;
  }

  void Run(Start* start) {
    Waiter w;
    sigevent sev;
    memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = g_signal;
    sev.sigev_notify_thread_id = static_cast<pid_t>(syscall(SYS_gettid));
    int timer_error = timer_create(CLOCK_MONOTONIC, &sev, &w.timer) < 0 ? errno : 0;
    sigset_t wake;
    sigemptyset(&wake);
    sigaddset(&wake, g_signal);
    pthread_sigmask(SIG_UNBLOCK, &wake, nullptr);

    std::unique_lock<std::mutex> lock(mu_);
    start->timer_error = timer_error;
    start->reported = true;
    start_cv_.notify_all();
    // `start` lives on the starting thread's stack: not to be touched again.
    if (timer_error != 0) {
      live_--;
      exit_cv_.notify_all();
      return;
    }
    bool idle_exit = false;
    for (;;) {
      while (queue_.empty() && !stopping_) {
        idle_++;
        bool woke = work_cv_.wait_for(lock, std::chrono::milliseconds(kIdleMs),
                                      [this] { return !queue_.empty() || stopping_; });
        idle_--;
        if (!woke) break;
      }
      if (queue_.empty() || stopping_) {
        idle_exit = !stopping_;
        break;
      }
      Request* req = queue_.front();
      queue_.pop_front();
      req->waiter = &w;
      lock.unlock();

      int result = Wait(&w, req);

      lock.lock();
      // Cleared under the lock before disarming: once it is null no Cancel can
      // re-arm this thread's timer for a request it no longer runs.
      req->waiter = nullptr;
      if (w.armed.load()) {
        // Reported after the disarm, so a timer that keeps firing cannot
        // interrupt this thread's next wait with a stale signal; and only
        // when it was armed: the common grant skips the system call.
        w.armed.store(false);
        lock.unlock();
        DisarmTimer(w.timer);
        lock.lock();
      }
      Complete(req, result);
    }
    timer_delete(w.timer);
    if (idle_exit) {
      // Nobody will join a thread that leaves while the pool lives on: it
      // detaches itself. The module is pinned (PinModule), so the few
      // instructions it runs after the unlock below stay mapped.
      pthread_t self = pthread_self();
      auto it = std::find_if(threads_.begin(), threads_.end(), [self](pthread_t t) { return pthread_equal(t, self) != 0; });
      if (it != threads_.end()) threads_.erase(it);
      pthread_detach(self);
    }
    live_--;
    exit_cv_.notify_all();
    // When stopping, Shutdown joins this thread after the lock is released.
  }

  int Wait(Waiter* w, Request* req) {
    if (req->cancelled.load()) return kCancelled;
    if (req->has_deadline) Arm(w, TIMER_ABSTIME, req->deadline);
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = req->type;
    fl.l_whence = SEEK_SET;
    fl.l_start = req->start;
    fl.l_len = req->len;
    for (;;) {
      if (req->cancelled.load()) return kCancelled;
      if (fcntl(req->fd, F_OFD_SETLKW, &fl) == 0) return 0;
      if (errno != EINTR) return errno;
      if (req->cancelled.load()) return kCancelled;
      if (req->has_deadline && After(Now(), req->deadline)) return kTimedOut;
    }
  }

  // Caller holds mu_.
  void Complete(Request* req, int result) {
    if (stopping_) return;  // Shutdown frees what is left in active_
    done_.push_back(req->id);
    done_.push_back(result);
    active_.erase(req->id);
    delete req;
    if (!delivery_scheduled_) {
      delivery_scheduled_ = true;
      napi_status s = tsfn_.NonBlockingCall(this, &WaitPool::Deliver);
      if (s != napi_ok) delivery_scheduled_ = false;  // environment is closing
    }
  }

  // On the JS thread: hands every finished request to JS. The pairs go into
  // the results array JS gave initWaiters, at most as many as fit at a time,
  // and onDone(count) is called once per chunk. Raw N-API with every status
  // checked: while a worker is being terminated this can still run, and
  // N-API calls then fail; the results no longer matter, and throwing would
  // abort the process.
  static void Deliver(Napi::Env env, Napi::Function on_done, WaitPool* pool) {
    if (env == nullptr) return;
    std::vector<double> batch;
    bool idle;
    {
      std::lock_guard<std::mutex> lock(pool->mu_);
      batch.swap(pool->done_);
      pool->delivery_scheduled_ = false;
      idle = pool->active_.empty();
    }
    if (idle) pool->tsfn_.Unref(env);
    if (batch.empty()) return;
    napi_value results = pool->results_.Value();
    napi_typedarray_type type;
    size_t capacity = 0;
    void* data = nullptr;
    if (results == nullptr || napi_get_typedarray_info(env, results, &type, &capacity, &data, nullptr, nullptr) != napi_ok ||
        type != napi_float64_array || capacity < 2 || data == nullptr) {
      return;
    }
    capacity -= capacity % 2;
    napi_value undefined;
    if (napi_get_undefined(env, &undefined) != napi_ok) return;
    for (size_t at = 0; at < batch.size(); at += capacity) {
      size_t n = std::min(capacity, batch.size() - at);
      memcpy(data, batch.data() + at, n * sizeof(double));
      napi_value count, result;
      if (napi_create_uint32(env, static_cast<uint32_t>(n / 2), &count) != napi_ok) return;
      if (napi_call_function(env, undefined, on_done, 1, &count, &result) != napi_ok) return;
    }
  }

  Napi::Env env_;
  Napi::ThreadSafeFunction tsfn_;
  Napi::Reference<Napi::Float64Array> results_;
  std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable exit_cv_;
  std::condition_variable start_cv_;
  std::deque<Request*> queue_;
  std::unordered_map<double, Request*> active_;
  std::vector<double> done_;
  std::vector<pthread_t> threads_;  // joinable threads, joined by Shutdown
  bool delivery_scheduled_ = false;
  bool stopping_ = false;
  int live_ = 0;
  int idle_ = 0;
  double next_id_ = 0;
};

namespace {

WaitPool* GetPool(Napi::Env env) { return GetAddonData(env)->waiters; }

// initWaiters(onDone, wakeSignal, results) -> 0 | -errno (sigaction: EBUSY,
// the signal has someone else's handler; EINVAL, not a real-time signal).
// Started already: 0. onDone(count): results[0 .. 2 * count) holds count
// [id, errno] pairs, valid until onDone returns.
Napi::Value InitPool(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (GetPool(env) != nullptr) return Result(env, 0);
  int sig = info[1].As<Napi::Number>().Int32Value();
  int e = EnsureWakeSignal(sig);
  if (e != 0) return Result(env, Fail(kSysSigaction, e));
  WaitPool* pool = new WaitPool(env);
  pool->Init(info[0].As<Napi::Function>(), info[2].As<Napi::Float64Array>());
  AddonData* data = GetAddonData(env);
  data->waiters = pool;
  // Registered after the thread-safe function, so it runs before Node closes
  // that function at teardown (cleanup hooks run in reverse order).
  env.AddCleanupHook([data, pool]() {
    pool->Shutdown();
    data->waiters = nullptr;
    delete pool;
  });
  return Napi::Number::New(env, 0);
}

// waitLock(fd, type, start, length, timeoutMs) -> id | -errno. timeoutMs < 0: none.
Napi::Value WaitLock(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  WaitPool* pool = GetPool(env);
  if (pool == nullptr) return Result(env, Fail(kSysNone, ENOTCONN));
  int type = info[1].As<Napi::Number>().Int32Value();
  double id = pool->Submit(info[0].As<Napi::Number>().Int32Value(),
                           type == 1 ? F_WRLCK : F_RDLCK,
                           info[2].As<Napi::Number>().Int64Value(),
                           info[3].As<Napi::Number>().Int64Value(),
                           info[4].As<Napi::Number>().DoubleValue());
  return Napi::Number::New(env, id);
}

Napi::Value CancelWait(const Napi::CallbackInfo& info) {
  WaitPool* pool = GetPool(info.Env());
  if (pool != nullptr) pool->Cancel(info[0].As<Napi::Number>().DoubleValue());
  return info.Env().Undefined();
}

// lockSync's per-thread timer: the same mechanism as a waiter thread's (a
// CLOCK_MONOTONIC timer that sends the wake-up signal to this thread alone),
// for an environment's own thread, which blocks in F_OFD_SETLKW by intent.
}  // namespace

struct SyncTimer {
  timer_t timer;
};

namespace {

// Returns the environment's timer, creating it on first use; null with
// errno set when timer_create fails.
SyncTimer* GetSyncTimer(Napi::Env env, int sig) {
  AddonData* data = GetAddonData(env);
  if (data->sync_timer != nullptr) return data->sync_timer;
  sigevent sev;
  memset(&sev, 0, sizeof sev);
  sev.sigev_notify = SIGEV_THREAD_ID;
  sev.sigev_signo = sig;
  sev.sigev_notify_thread_id = static_cast<pid_t>(syscall(SYS_gettid));
  timer_t timer;
  if (timer_create(CLOCK_MONOTONIC, &sev, &timer) < 0) return nullptr;
  data->sync_timer = new SyncTimer{timer};
  // The environment's thread is the only one that uses the timer, and its
  // cleanup runs on that thread: no wait is in progress then.
  env.AddCleanupHook([data]() {
    timer_delete(data->sync_timer->timer);
    delete data->sync_timer;
    data->sync_timer = nullptr;
  });
  return data->sync_timer;
}

// lockSync(fd, type, start, length, timeoutMs) -> 0 | -errno: F_OFD_SETLKW on
// the calling thread. timeoutMs < 0: no deadline. A timeout ends the wait
// with -ETIMEDOUT (recorded as no syscall); it needs the wake-up signal
// installed (initWaiters) first, else -ENOTCONN.
//
// EINTR is retried unless the deadline has passed: the timer fires at the
// deadline (and every millisecond after, until disarmed, so a signal that
// lands just before fcntl is entered is followed by one inside it), while a
// signal of someone else's, whose handler lacks SA_RESTART, must not end the
// wait early.
Napi::Value LockSync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = Int32Arg(info, 0);
  struct flock fl;
  memset(&fl, 0, sizeof fl);
  fl.l_type = Int32Arg(info, 1) == 1 ? F_WRLCK : F_RDLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = Int64Arg(info, 2);
  fl.l_len = Int64Arg(info, 3);
  double timeout_ms = info[4].As<Napi::Number>().DoubleValue();
  if (timeout_ms < 0) {
    for (;;) {
      if (fcntl(fd, F_OFD_SETLKW, &fl) == 0) return Result(env, 0);
      if (errno != EINTR) return Result(env, Fail(kSysFcntl, errno));
    }
  }
  int sig;
  {
    std::lock_guard<std::mutex> lock(g_signal_mu);
    sig = g_signal;
  }
  if (sig == 0) return Result(env, Fail(kSysNone, ENOTCONN));
  SyncTimer* timer = GetSyncTimer(env, sig);
  if (timer == nullptr) return Result(env, Fail(kSysTimerCreate, errno));
  timespec deadline = DeadlineAfter(timeout_ms);
  // The signal must reach this thread while it waits; the caller's mask is
  // put back afterwards. Unblocked through the disarm, so a signal already
  // generated is delivered (to the no-op handler) before the mask returns.
  sigset_t wake, old;
  sigemptyset(&wake);
  sigaddset(&wake, sig);
  pthread_sigmask(SIG_UNBLOCK, &wake, &old);
  ArmTimer(timer->timer, TIMER_ABSTIME, deadline);
  int rv;
  for (;;) {
    if (fcntl(fd, F_OFD_SETLKW, &fl) == 0) {
      rv = 0;
      break;
    }
    if (errno != EINTR) {
      rv = Fail(kSysFcntl, errno);
      break;
    }
    if (After(Now(), deadline)) {
      rv = Fail(kSysNone, kTimedOut);
      break;
    }
  }
  DisarmTimer(timer->timer);
  if (sigismember(&old, sig) == 1) pthread_sigmask(SIG_SETMASK, &old, nullptr);
  return Result(env, rv);
}

// waiterThreads() -> live waiter threads of this environment (for leak checks).
Napi::Value WaiterThreads(const Napi::CallbackInfo& info) {
  WaitPool* pool = GetPool(info.Env());
  return Napi::Number::New(info.Env(), pool == nullptr ? 0 : pool->ThreadCount());
}

}  // namespace

void InitWaiters(Napi::Env env, Napi::Object exports) {
  Export(env, exports,
         {{"initWaiters", InitPool}, {"waitLock", WaitLock}, {"cancelWait", CancelWait}, {"lockSync", LockSync}, {"waiterThreads", WaiterThreads}});
}

}  // namespace lockmgr

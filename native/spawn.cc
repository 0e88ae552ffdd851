// Supervised processes through pidfds.
//
// Why pidfds: a pid names a process only until it is reaped, after which the
// kernel may hand the number to anyone. A pidfd names one process for as long
// as the fd is open, so a signal sent through it can never reach a stranger that
// inherited the number, and its exit can be polled like any other fd.
//
// How a child starts: clone3(CLONE_VM | CLONE_VFORK | CLONE_PIDFD) on a small
// stack of our own. CLONE_VM: a Node process maps gigabytes (V8 heap reservations,
// code space); fork() would copy all of its page tables for every spawn, and then
// fault every page it touches copy-on-write, only to throw it away at execve. With
// CLONE_VM the child borrows the parent's memory and costs about as much as a
// thread. CLONE_VFORK: the calling thread sleeps until the child has exec'd or
// exited, so the child may report a failure by plain stores into the plan the
// parent reads afterwards, with no pipe and no extra syscalls. The dedicated stack
// is what makes CLONE_VM safe from C++: the child never touches the frames of the
// suspended parent. The pidfd comes from the same syscall as the process, so there
// is no instant in which we know the child only by its pid.
//
// Because the child shares memory (and TLS, and glibc's locks) with a process
// whose other threads keep running, it must not allocate or take any lock: the
// parent prepares everything (argv, envp, candidate paths for the PATH search)
// and the child only makes syscalls through async-signal-safe wrappers. The addon
// is linked with -z now so that not even a lazy PLT resolution runs in the child.
//
// Exit: each child's pidfd is watched by a uv_poll handle on the loop of the
// environment that spawned it (main thread or worker). When it polls readable,
// waitid(P_PIDFD, WEXITED | WNOHANG | __WALL) reaps exactly that child. Nothing
// here ever waits for "any child": libuv reaps its own children by pid, and a
// waitpid(-1) would steal their exit statuses from Node's child_process.
//
// Children are created with exit_signal 0, but execve resets it to SIGCHLD (the
// kernel's de_thread: a new program is an ordinary child). So an exec'd child
// sends SIGCHLD like any other; libuv's handler wakes, finds none of its own
// pids exited and goes back to sleep. A child that fails before execve keeps
// exit_signal 0: it sends nothing, and only __WALL reaps it, hence __WALL.
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <uv.h>

#include <atomic>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "common.h"

// glibc 2.36's <sys/pidfd.h> lacks extern "C" and its wrappers would tie a
// prebuilt binary to glibc >= 2.36: every pidfd call goes through syscall(2).
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif
#ifndef SYS_clone3
#define SYS_clone3 435
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#ifndef CLONE_PIDFD
#define CLONE_PIDFD 0x00001000
#endif
#ifndef P_PIDFD
#define P_PIDFD 3
#endif

#if defined(__x86_64__)
// clone3 with a new stack cannot go through syscall(2): the child would return
// from the wrapper on an empty stack. This trampoline makes the syscall and, in
// the child only, calls fn(arg) on the new stack and exits with its result. The
// parent gets the raw result: a pid, or -errno. Registers other than rax, rcx
// and r11 survive the syscall in both processes, hence fn and arg in r8/r9.
#define LOCKMGR_HAVE_CLONE3_TRAMPOLINE 1
extern "C" long lockmgr_clone3_run(void* args, size_t size, int (*fn)(void*), void* arg);
asm(R"(
    .text
    .globl lockmgr_clone3_run
    .hidden lockmgr_clone3_run
    .type lockmgr_clone3_run,@function
lockmgr_clone3_run:
    movq %rdx, %r8
    movq %rcx, %r9
    movl $435, %eax
    syscall
    testq %rax, %rax
    jnz 1f
    xorl %ebp, %ebp
    andq $-16, %rsp
    movq %r9, %rdi
    callq *%r8
    movl %eax, %edi
    movl $60, %eax
    syscall
    hlt
1:
    ret
    .size lockmgr_clone3_run, .-lockmgr_clone3_run
)");
#endif

namespace lockmgr {
namespace {

// The first eight fields of struct clone_args (CLONE_ARGS_SIZE_VER0): declared
// here so an older <linux/sched.h> cannot change what we pass. The kernel reads
// the fields we never set (they stay 0): they are there for the layout.
struct CloneArgs {
  uint64_t flags;
  uint64_t pidfd;
  uint64_t child_tid;   // cppcheck-suppress unusedStructMember
  uint64_t parent_tid;  // cppcheck-suppress unusedStructMember
  uint64_t exit_signal;
  uint64_t stack;
  uint64_t stack_size;
  uint64_t tls;  // cppcheck-suppress unusedStructMember
};

// Where a spawn failed is a Syscall (common.h): the child records its own,
// the parent's steps are kSysClone3, kSysClone, kSysPidfdOpen and kSysMmap.

// Spawn flags from JS (constants.spawn).
constexpr int kFlagNewSession = 1;
constexpr int kFlagForceFallback = 2;

// How a watched process ended, as reported to JS (constants.exit).
constexpr int kExitUnknown = 0;   // attached process: not our child, status unknowable
constexpr int kExitCode = 1;      // value = exit code
constexpr int kExitSignal = 2;    // value = signal number
constexpr int kExitError = 3;     // value = errno of waitid or poll

// The child's stack. It runs a few syscall wrappers and nothing else; 64 KiB is
// generous, and the guard page below turns an overflow into a crash of the child
// rather than silent corruption of the parent's memory.
constexpr size_t kChildStackSize = 64 * 1024;

// Set when clone3 returned ENOSYS (kernel < 5.3, or a seccomp profile that
// hides it): every later spawn in the process goes straight to the fallback.
std::atomic<bool> g_clone3_missing{false};
// Children started by each path, so tests can prove which one ran.
std::atomic<uint64_t> g_clone3_spawns{0};
std::atomic<uint64_t> g_fallback_spawns{0};

// The child's code (ChildMain and everything it calls) is kept out of
// AddressSanitizer's instrumentation; it matters only to `npm run test:asan`,
// as nothing is instrumented in a normal build. The child runs on our own
// mmap'd stack and shares the parent's memory, so also ASan's shadow and
// state: instrumented frames poison shadow bytes of that stack, and its frames
// never return (execve or _exit end them). ASan cannot clean up after them
// (__asan_handle_no_return refuses a stack it did not create, with a warning),
// so the poison outlived the child; once Teardown had unmapped the stack, V8
// mapped heap pages at the same address and ASan reported its next memcpy
// there as a stack-buffer-overflow in V8. The calls the child makes into libc
// still go through ASan's interceptors, which only check their arguments.
#define LOCKMGR_CHILD_CODE __attribute__((no_sanitize_address))

// Everything the child needs, prepared by the parent. The child reads it and
// writes only err and stage; with CLONE_VFORK the parent reads them once the
// child has exec'd (they stay 0) or exited.
struct ChildPlan {
  char* const* paths;  // candidates for execve, from the PATH search; null-terminated
  char* const* argv;
  char** sh_argv;      // {"/bin/sh", <path>, argv[1], ..., null} for ENOEXEC
  char* const* envp;
  const char* cwd;     // null: stay
  int stdio[3];        // source fd for 0, 1, 2
  const int* keep;     // kept fds, ascending, all >= 3
  int nkeep;
  int pdeathsig;       // 0: none
  pid_t parent_pid;
  bool new_session;
  volatile int err;
  volatile int stage;
};

[[noreturn]] LOCKMGR_CHILD_CODE void ChildFail(ChildPlan* p, int stage, int err) {
  p->stage = stage;
  p->err = err;
  _exit(127);
}

// Closes every open fd in [lo, hi] but `keep`, by walking /proc/self/fd with
// raw getdents64 (no opendir: no malloc in the child). Passes repeat until one
// closes nothing, so closing while listing cannot skip an entry.
LOCKMGR_CHILD_CODE int CloseByListing(unsigned lo, unsigned hi) {
  int dir = open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir < 0) return errno;
  alignas(8) char buf[2048];
  bool closed = true;
  while (closed) {
    closed = false;
    if (lseek(dir, 0, SEEK_SET) < 0) break;
    for (;;) {
      long n = syscall(SYS_getdents64, dir, buf, sizeof buf);
      if (n <= 0) break;
      for (long off = 0; off < n;) {
        // struct linux_dirent64: u64 ino, s64 off, u16 reclen, u8 type, char name[]
        unsigned short reclen;
        memcpy(&reclen, buf + off + 16, sizeof reclen);
        const char* name = buf + off + 19;
        off += reclen;
        unsigned fd = 0;
        bool number = *name != '\0';
        for (const char* c = name; *c != '\0'; c++) {
          if (*c < '0' || *c > '9') number = false;
          else fd = fd * 10 + static_cast<unsigned>(*c - '0');
        }
        if (!number || static_cast<int>(fd) == dir || fd < lo || fd > hi) continue;
        close(static_cast<int>(fd));
        closed = true;
      }
    }
  }
  close(dir);
  return 0;
}

// Closes [lo, hi]. close_range(2) is one syscall. Where it is missing (before
// Linux 5.9: ENOSYS) or refused (seccomp profiles older than it answer EPERM),
// list /proc/self/fd; only without /proc, loop up to the hard fd limit.
LOCKMGR_CHILD_CODE int CloseRange(unsigned lo, unsigned hi) {
  if (lo > hi) return 0;
  if (syscall(SYS_close_range, lo, hi, 0) == 0) return 0;
  if (errno != ENOSYS && errno != EPERM && errno != EINVAL) return errno;
  if (CloseByListing(lo, hi) == 0) return 0;
  struct rlimit rl;
  unsigned limit = 1u << 20;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_max != RLIM_INFINITY && rl.rlim_max < limit) {
    limit = static_cast<unsigned>(rl.rlim_max);
  }
  for (unsigned fd = lo; fd <= hi && fd < limit; fd++) close(static_cast<int>(fd));
  return 0;
}

// Node makes its stdio pipes O_NONBLOCK, and the flag lives on the open file
// description a child shares: left set, a VM writing to a full pipe gets
// EAGAIN instead of blocking (child_process children do not, since libuv
// clears it). Pipes, FIFOs and ttys get a fresh description through
// /proc/self/fd, so the parent's keeps its flag; a socket cannot be reopened,
// so its shared flag is cleared, as libuv does. Regular files ignore
// O_NONBLOCK, and a reopen would lose their offset: they are left alone.
LOCKMGR_CHILD_CODE void MakeStdioBlocking() {
  for (int i = 0; i < 3; i++) {
    int fl = fcntl(i, F_GETFL);
    if (fl < 0 || (fl & O_NONBLOCK) == 0) continue;
    struct stat st;
    if (fstat(i, &st) < 0) continue;
    if (S_ISFIFO(st.st_mode) || S_ISCHR(st.st_mode)) {
      char path[] = "/proc/self/fd/0";
      path[sizeof path - 2] = static_cast<char>('0' + i);
      int fresh = open(path, (fl & (O_ACCMODE | O_APPEND)) | O_NOCTTY);
      if (fresh >= 0) {
        if (fresh != i) {
          dup2(fresh, i);
          close(fresh);
        }
        continue;
      }
    }
    if (S_ISSOCK(st.st_mode) || S_ISFIFO(st.st_mode) || S_ISCHR(st.st_mode)) fcntl(i, F_SETFL, fl & ~O_NONBLOCK);
  }
}

// execvp's search over the candidates the parent built from PATH: a candidate
// that is missing or unreadable does not stop the search; EACCES is remembered
// and wins over ENOENT at the end; any other error ends it. ENOEXEC (a text file
// without #!) runs the file with /bin/sh, as execvp does. Returns the errno.
LOCKMGR_CHILD_CODE int ExecSearch(ChildPlan* p) {
  int err = ENOENT;
  bool saw_eacces = false;
  for (char* const* path = p->paths; *path != nullptr; ++path) {
    execve(*path, p->argv, p->envp);
    int e = errno;
    if (e == ENOEXEC) {
      p->sh_argv[1] = *path;
      execve("/bin/sh", p->sh_argv, p->envp);
      return errno;
    }
    switch (e) {
      case EACCES:
        saw_eacces = true;
        err = e;
        break;
      case ENOENT:
      case ENOTDIR:
      case ESTALE:
      case ENODEV:
      case ETIMEDOUT:
        err = e;
        break;
      default:
        return e;
    }
  }
  return saw_eacces ? EACCES : err;
}

// Runs in the child, on its own stack, every signal blocked (the parent blocked
// them all before clone so that no handler of the parent's can run here on
// shared memory).
LOCKMGR_CHILD_CODE int ChildMain(void* arg) {
  ChildPlan* p = static_cast<ChildPlan*>(arg);

  // Every disposition back to the default: handlers would be reset by execve
  // anyway, but ignored signals would stay ignored (Node ignores SIGPIPE, and a
  // VM that inherits that misbehaves on broken pipes). Done before the mask is
  // cleared, so no parent handler can run in between. glibc refuses its two
  // internal signals with EINVAL; they are only ever sent to its own threads.
  struct sigaction dfl = {};
  dfl.sa_handler = SIG_DFL;
  for (int sig = 1; sig < NSIG; sig++) {
    if (sig != SIGKILL && sig != SIGSTOP) sigaction(sig, &dfl, nullptr);
  }

  if (p->new_session && setsid() < 0) ChildFail(p, kSysSetsid, errno);
  if (p->pdeathsig != 0 && prctl(PR_SET_PDEATHSIG, p->pdeathsig) < 0) ChildFail(p, kSysPrctl, errno);

  // A source that sits in 0..2 but belongs at another number would be clobbered
  // by an earlier dup2: move it above 2 first (F_DUPFD never replaces an open fd).
  int src[3] = {p->stdio[0], p->stdio[1], p->stdio[2]};
  for (int i = 0; i < 3; i++) {
    int s = src[i];
    if (s >= 0 && s < 3 && s != i) {
      int moved = fcntl(s, F_DUPFD_CLOEXEC, 3);
      if (moved < 0) ChildFail(p, kSysDup2, errno);
      for (int j = i; j < 3; j++) {
        if (src[j] == s) src[j] = moved;
      }
    }
  }
  for (int i = 0; i < 3; i++) {
    if (src[i] == i) {
      // dup2 onto itself would keep FD_CLOEXEC; an inherited fd the parent closed
      // stays closed in the child.
      if (fcntl(i, F_SETFD, 0) < 0 && errno != EBADF) ChildFail(p, kSysDup2, errno);
    } else if (src[i] < 0) {
      close(i);
    } else if (dup2(src[i], i) < 0) {
      ChildFail(p, kSysDup2, errno);
    }
  }

  MakeStdioBlocking();

  // Everything but 0..2 and the kept fds goes, whatever its CLOEXEC flag: fds
  // other addons or libraries opened without O_CLOEXEC must not leak into a VM.
  unsigned lo = 3;
  for (int k = 0; k < p->nkeep; k++) {
    unsigned fd = static_cast<unsigned>(p->keep[k]);
    if (fd > lo) {
      int e = CloseRange(lo, fd - 1);
      if (e != 0) ChildFail(p, kSysCloseRange, e);
    }
    if (fcntl(static_cast<int>(fd), F_SETFD, 0) < 0) ChildFail(p, kSysDup2, errno);
    lo = fd + 1;
  }
  int e = CloseRange(lo, ~0U);
  if (e != 0) ChildFail(p, kSysCloseRange, e);

  if (p->cwd != nullptr && chdir(p->cwd) < 0) ChildFail(p, kSysChdir, errno);

  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, nullptr);

  // PR_SET_PDEATHSIG only covers a parent that dies after the prctl. If it died
  // before, we were already reparented: deliver the signal ourselves, now that it
  // is unblocked and at its default action.
  if (p->pdeathsig != 0 && getppid() != p->parent_pid) {
    syscall(SYS_kill, static_cast<pid_t>(syscall(SYS_getpid)), p->pdeathsig);
  }

  ChildFail(p, kSysExecve, ExecSearch(p));
}

// Starts the child. Returns 0 with *pidfd and *pid set, or an errno with *stage.
// After a success, plan->err may still say that the child failed before exec; the
// caller then reaps it.
int StartChild(ChildPlan* plan, bool force_fallback, void* stack, int* pidfd, pid_t* pid, int* stage) {
  // All signals blocked across the clone: the child inherits the full mask and
  // clears it only after resetting every handler (see ChildMain).
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  plan->parent_pid = getpid();
  int result = 0;
  bool done = false;
#ifdef LOCKMGR_HAVE_CLONE3_TRAMPOLINE
  if (!force_fallback && !g_clone3_missing.load(std::memory_order_relaxed)) {
    int fd = -1;
    CloneArgs args = {};
    args.flags = CLONE_VM | CLONE_VFORK | CLONE_PIDFD;
    args.pidfd = reinterpret_cast<uintptr_t>(&fd);
    args.exit_signal = 0;
    args.stack = reinterpret_cast<uintptr_t>(stack);
    args.stack_size = kChildStackSize;
    long r = lockmgr_clone3_run(&args, sizeof args, ChildMain, plan);
    if (r > 0) {
      g_clone3_spawns.fetch_add(1, std::memory_order_relaxed);
      *pid = static_cast<pid_t>(r);
      *pidfd = fd;
      done = true;
    } else if (r == -ENOSYS) {
      g_clone3_missing.store(true, std::memory_order_relaxed);
    } else {
      result = static_cast<int>(-r);
      *stage = kSysClone3;
      done = true;
    }
  }
#else
  (void)force_fallback;
#endif
  if (!done) {
    // Fallback: glibc's clone() knows how to start a child on its own stack on
    // every architecture; the pidfd comes afterwards from pidfd_open. That is
    // still race-free: the child is ours and unreaped (at worst a zombie), so its
    // pid cannot be reused before pidfd_open pins it.
    char* top = static_cast<char*>(stack) + kChildStackSize;
    pid_t child = clone(ChildMain, top, CLONE_VM | CLONE_VFORK, plan);
    if (child < 0) {
      result = errno;
      *stage = kSysClone;
    } else {
      int fd = static_cast<int>(syscall(SYS_pidfd_open, child, 0));
      if (fd < 0) {
        // Without a pidfd we cannot supervise it: kill it and reap it. The wait is
        // for a SIGKILLed child of ours, over in microseconds.
        result = errno;
        *stage = kSysPidfdOpen;
        kill(child, SIGKILL);
        while (waitpid(child, nullptr, __WALL) < 0 && errno == EINTR) {
        }
      } else {
        g_fallback_spawns.fetch_add(1, std::memory_order_relaxed);
        *pid = child;
        *pidfd = fd;
      }
    }
  }
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  return result;
}

}  // namespace

struct SpawnState;

namespace {

// One watched pidfd: a child of ours, or an attached process.
struct Watcher {
  SpawnState* state;
  uv_poll_t poll;
  int pidfd;
  uint32_t id;
  bool own_child;  // ours to reap; false for attach(), which must never reap
};

// Children still running when their environment goes away (a worker thread that
// ends). Nobody else would reap them once they exit, so one process-wide thread
// polls their pidfds and reaps them; it exists only while there are such orphans.
class OrphanReaper {
 public:
  void Adopt(int pidfd) {
    std::lock_guard<std::mutex> lock(mu_);
    fds_.push_back(pidfd);
    if (running_) {
      uint64_t one = 1;
      ssize_t n = write(wake_fd_, &one, sizeof one);
      (void)n;  // the counter cannot overflow with one write per orphan
      return;
    }
    if (wake_fd_ < 0) wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (wake_fd_ < 0) return;  // the pidfds stay open: zombies until process exit, no worse
    // The reaper runs code of this addon after the environment that loaded it is
    // gone; when only workers use the addon, Node unloads it as the last ends.
    PinModule();
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    sigset_t block, old;
    sigfillset(&block);
    pthread_sigmask(SIG_SETMASK, &block, &old);
    pthread_t t;
    if (pthread_create(&t, &attr, &OrphanReaper::Main, this) == 0) running_ = true;
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
    pthread_attr_destroy(&attr);
  }

  int Count() {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int>(fds_.size());
  }

 private:
  static void* Main(void* self) {
    static_cast<OrphanReaper*>(self)->Run();
    return nullptr;
  }

  void Run() {
    std::vector<pollfd> pfds;
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      if (fds_.empty()) {
        running_ = false;
        return;
      }
      pfds.clear();
      pfds.push_back({wake_fd_, POLLIN, 0});
      // A plain loop reads better here than std::transform with a back_inserter.
      for (int fd : fds_) pfds.push_back({fd, POLLIN, 0});  // cppcheck-suppress useStlAlgorithm
      lock.unlock();
      int n = poll(pfds.data(), pfds.size(), -1);
      lock.lock();
      if (n < 0) continue;
      if (pfds[0].revents != 0) {
        uint64_t v;
        ssize_t r = read(wake_fd_, &v, sizeof v);
        (void)r;
      }
      for (size_t i = 1; i < pfds.size(); i++) {
        if (pfds[i].revents == 0) continue;
        siginfo_t si = {};
        int r = waitid(static_cast<idtype_t>(P_PIDFD), static_cast<id_t>(pfds[i].fd), &si,
                       WEXITED | WNOHANG | __WALL);
        if (r == 0 && si.si_pid == 0) continue;  // not exited after all
        close(pfds[i].fd);
        for (size_t j = 0; j < fds_.size(); j++) {
          if (fds_[j] == pfds[i].fd) {
            fds_.erase(fds_.begin() + static_cast<long>(j));
            break;
          }
        }
      }
    }
  }

  std::mutex mu_;
  std::vector<int> fds_;
  int wake_fd_ = -1;
  bool running_ = false;
};

// Leaked on purpose: a detached reaper thread may still run at process exit,
// after static destructors.
OrphanReaper* g_orphans = new OrphanReaper();

}  // namespace

struct SpawnState {
  SpawnState(Napi::Env e, AddonData* d) : env(e), data(d) {}
  Napi::Env env;
  AddonData* data;
  uv_loop_t* loop = nullptr;
  // Why a plain reference called with MakeCallback and not a thread-safe
  // function: exits are noticed by uv_poll on this environment's own loop, so we
  // already are on the JS thread. A thread-safe function would add a mutex and a
  // uv_async hop for nothing. MakeCallback (with this async context) is what makes
  // promise reactions run right after the callback, as for any libuv callback.
  Napi::FunctionReference on_exit;
  napi_async_context context = nullptr;
  std::unordered_map<uint32_t, Watcher*> watchers;
  uint32_t next_id = 0;
  void* stack = nullptr;  // kChildStackSize bytes above a guard page, reused by every spawn
  napi_async_cleanup_hook_handle cleanup = nullptr;
  size_t closing = 0;  // handles teardown still waits for, plus one
};

namespace {

SpawnState* GetState(Napi::Env env) { return GetAddonData(env)->spawn; }

void OnWatcherClosed(uv_handle_t* handle) {
  Watcher* w = static_cast<Watcher*>(handle->data);
  if (w->pidfd >= 0) close(w->pidfd);
  delete w;
}

// Raw N-API rather than node-addon-api's MakeCallback: when a worker is being
// terminated, the call fails and node-addon-api would turn the failure into a
// fatal error (it cannot throw into a terminating isolate). Here a failed call
// is reported as an uncaught exception if the environment can still run JS, and
// dropped if it cannot: the worker is going away and nobody waits for the result.
void Report(SpawnState* s, uint32_t id, int kind, int value) {
  napi_env env = s->env;
  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) return;
  napi_value argv[3];
  napi_value global;
  napi_value fn = s->on_exit.Value();
  napi_create_uint32(env, id, &argv[0]);
  napi_create_int32(env, kind, &argv[1]);
  napi_create_int32(env, value, &argv[2]);
  napi_get_global(env, &global);
  napi_value result;
  if (napi_make_callback(env, s->context, global, fn, 3, argv, &result) != napi_ok) {
    bool pending = false;
    napi_value err;
    if (napi_is_exception_pending(env, &pending) == napi_ok && pending &&
        napi_get_and_clear_last_exception(env, &err) == napi_ok) {
      napi_fatal_exception(env, err);  // fails harmlessly while terminating
    }
  }
  napi_close_handle_scope(env, scope);
}

void OnPoll(uv_poll_t* handle, int status, int) {
  Watcher* w = static_cast<Watcher*>(handle->data);
  int kind = kExitUnknown;
  int value = 0;
  if (w->own_child) {
    siginfo_t si = {};
    int r = waitid(static_cast<idtype_t>(P_PIDFD), static_cast<id_t>(w->pidfd), &si, WEXITED | WNOHANG | __WALL);
    if (r < 0) {
      if (errno == EINTR) return;  // still readable: we come back on the next iteration
      kind = kExitError;
      value = errno;
    } else if (si.si_pid == 0) {
      return;  // not exited yet
    } else if (si.si_code == CLD_EXITED) {
      kind = kExitCode;
      value = si.si_status;
    } else {
      kind = kExitSignal;
      value = si.si_status;
    }
  } else if (status < 0) {
    kind = kExitError;
    value = -status;
  }
  // Not reaped by us (attached): the process has exited, which is all poll says.
  SpawnState* s = w->state;
  s->watchers.erase(w->id);
  uv_poll_stop(handle);
  uv_close(reinterpret_cast<uv_handle_t*>(handle), OnWatcherClosed);
  Report(s, w->id, kind, value);
}

// Returns 0 or an errno. On success the watcher owns pidfd; on failure the
// caller still does.
int Watch(SpawnState* s, int pidfd, bool own_child, uint32_t* id) {
  Watcher* w = new Watcher();
  w->state = s;
  w->pidfd = pidfd;
  w->own_child = own_child;
  w->poll.data = w;
  int r = uv_poll_init(s->loop, &w->poll, pidfd);
  if (r != 0) {
    delete w;
    return -r;
  }
  r = uv_poll_start(&w->poll, UV_READABLE, OnPoll);
  if (r != 0) {
    // The handle is registered with the loop: it has to be closed, not deleted.
    w->pidfd = -1;
    uv_close(reinterpret_cast<uv_handle_t*>(&w->poll), OnWatcherClosed);
    return -r;
  }
  w->id = ++s->next_id;
  if (w->id == 0) w->id = ++s->next_id;
  s->watchers[w->id] = w;
  *id = w->id;
  return 0;
}

void ReleaseTeardown(SpawnState* s) {
  if (--s->closing != 0) return;
  napi_remove_async_cleanup_hook(s->cleanup);
  delete s;
}

void OnTeardownClosed(uv_handle_t* handle) {
  Watcher* w = static_cast<Watcher*>(handle->data);
  SpawnState* s = w->state;
  OnWatcherClosed(handle);
  ReleaseTeardown(s);
}

// Environment teardown. An async cleanup hook because closing uv handles takes a
// loop iteration: Node keeps running the loop until we say we are done, and
// would otherwise find our handles still open when it closes a worker's loop.
// Children still running are handed to the orphan reaper; attached processes
// are simply let go.
void Teardown(napi_async_cleanup_hook_handle handle, void* arg) {
  SpawnState* s = static_cast<SpawnState*>(arg);
  s->cleanup = handle;
  // The instance data and the JS objects may go before our handles have closed:
  // let go of them now.
  s->data->spawn = nullptr;
  s->on_exit.Reset();
  napi_async_destroy(s->env, s->context);
  s->context = nullptr;
  if (s->stack != nullptr) {
    size_t page = static_cast<size_t>(getpagesize());
    munmap(static_cast<char*>(s->stack) - page, kChildStackSize + page);
    s->stack = nullptr;
  }
  s->closing = s->watchers.size() + 1;
  for (auto& kv : s->watchers) {
    Watcher* w = kv.second;
    uv_poll_stop(&w->poll);
    if (w->own_child) {
      siginfo_t si = {};
      int r = waitid(static_cast<idtype_t>(P_PIDFD), static_cast<id_t>(w->pidfd), &si, WEXITED | WNOHANG | __WALL);
      if (r == 0 && si.si_pid == 0) {
        g_orphans->Adopt(w->pidfd);
        w->pidfd = -1;
      }
    }
    uv_close(reinterpret_cast<uv_handle_t*>(&w->poll), OnTeardownClosed);
  }
  s->watchers.clear();
  ReleaseTeardown(s);
}

uint32_t IdArg(const Napi::CallbackInfo& info, size_t i) { return Uint32Arg(info, i); }

// initSpawn(onExit) -> 0 | -errno. Started already: 0. onExit(id, kind, value).
Napi::Value InitSpawnState(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  AddonData* data = GetAddonData(env);
  if (data->spawn != nullptr) return Result(env, 0);
  SpawnState* s = new SpawnState(env, data);
  napi_value name;
  napi_create_string_utf8(env, "lockmgr:supervise", NAPI_AUTO_LENGTH, &name);
  if (napi_get_uv_event_loop(env, &s->loop) != napi_ok ||
      napi_async_init(env, nullptr, name, &s->context) != napi_ok ||
      napi_add_async_cleanup_hook(env, Teardown, s, nullptr) != napi_ok) {
    if (s->context != nullptr) napi_async_destroy(env, s->context);
    delete s;
    return Result(env, Fail(kSysNapiInit, EINVAL));
  }
  s->on_exit = Napi::Persistent(info[0].As<Napi::Function>());
  data->spawn = s;
  return Result(env, 0);
}

// A list from JS arrives as one string of NUL-terminated items (JS has checked
// that no item contains a NUL): one N-API call per list instead of two per item,
// and no napi_get_element, which fails at any moment while a worker is being
// terminated. *ptrs gets pointers into *buf and a final null.
bool ReadList(napi_env env, napi_value v, std::string* buf, std::vector<char*>* ptrs) {
  size_t len = 0;
  if (napi_get_value_string_utf8(env, v, nullptr, 0, &len) != napi_ok) return false;
  buf->assign(len + 1, '\0');
  if (napi_get_value_string_utf8(env, v, &(*buf)[0], len + 1, &len) != napi_ok) return false;
  for (size_t i = 0; i < len;) {
    size_t end = buf->find('\0', i);
    if (end >= len) return false;  // not terminated: a bug in lib/
    ptrs->push_back(&(*buf)[i]);
    i = end + 1;
  }
  ptrs->push_back(nullptr);
  return true;
}

bool ReadInt32Array(napi_env env, napi_value v, int32_t** data, size_t* length) {
  napi_typedarray_type type;
  void* raw = nullptr;
  if (napi_get_typedarray_info(env, v, &type, length, &raw, nullptr, nullptr) != napi_ok || type != napi_int32_array) {
    return false;
  }
  *data = static_cast<int32_t*>(raw);
  return true;
}

// spawn(paths, argv, envp, cwd | null, stdio Int32Array[3], keep Int32Array
//       (ascending, >= 3), flags, pdeathsig, out Float64Array[2]) -> 0 | -errno.
// paths, argv and envp are lists as ReadList reads them. out = [id, pid]. On
// failure, failedSyscall() says which step failed (in the child or here). JS
// has validated everything; fds are not ours to close.
Napi::Value Spawn(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  SpawnState* s = GetState(env);
  Napi::Float64Array out = info[8].As<Napi::Float64Array>();
  if (s == nullptr) return Result(env, Fail(kSysNone, ENOTCONN));

  std::string path_buf, argv_buf, env_buf, cwd;
  std::vector<char*> paths, argv, envp;
  int32_t* stdio = nullptr;
  int32_t* keep = nullptr;
  size_t nstdio = 0, nkeep = 0;
  napi_valuetype cwd_type = napi_undefined;
  bool ok = ReadList(env, info[0], &path_buf, &paths) && ReadList(env, info[1], &argv_buf, &argv) &&
            ReadList(env, info[2], &env_buf, &envp) && napi_typeof(env, info[3], &cwd_type) == napi_ok &&
            ReadInt32Array(env, info[4], &stdio, &nstdio) && nstdio == 3 && ReadInt32Array(env, info[5], &keep, &nkeep);
  if (ok && cwd_type == napi_string) {
    size_t len = 0;
    ok = napi_get_value_string_utf8(env, info[3], nullptr, 0, &len) == napi_ok;
    cwd.assign(len + 1, '\0');
    ok = ok && napi_get_value_string_utf8(env, info[3], &cwd[0], len + 1, &len) == napi_ok;
    cwd.resize(len);
  }
  if (!ok || argv.size() < 2) {
    // Unreadable arguments: a terminating worker, or a bug in lib/. Spawn nothing.
    return Result(env, Fail(kSysNone, ECANCELED));
  }
  bool has_cwd = cwd_type == napi_string;
  std::string sh = "/bin/sh";
  std::vector<char*> sh_argv;
  sh_argv.push_back(&sh[0]);
  sh_argv.push_back(nullptr);  // the script's path, filled in by the child
  for (size_t i = 1; i + 1 < argv.size(); i++) sh_argv.push_back(argv[i]);
  sh_argv.push_back(nullptr);
  int flags = Int32Arg(info, 6);

  if (s->stack == nullptr) {
    size_t page = static_cast<size_t>(getpagesize());
    void* m = mmap(nullptr, kChildStackSize + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (m == MAP_FAILED) return Result(env, Fail(kSysMmap, errno));
    mprotect(m, page, PROT_NONE);
    s->stack = static_cast<char*>(m) + page;
  }

  ChildPlan plan = {};
  plan.paths = paths.data();
  plan.argv = argv.data();
  plan.sh_argv = sh_argv.data();
  plan.envp = envp.data();
  plan.cwd = has_cwd ? cwd.c_str() : nullptr;
  for (int i = 0; i < 3; i++) plan.stdio[i] = stdio[i];
  plan.keep = keep;
  plan.nkeep = static_cast<int>(nkeep);
  plan.pdeathsig = Int32Arg(info, 7);
  plan.new_session = (flags & kFlagNewSession) != 0;

  int pidfd = -1;
  pid_t pid = 0;
  int stage = kSysNone;
  int e = StartChild(&plan, (flags & kFlagForceFallback) != 0, s->stack, &pidfd, &pid, &stage);
  if (e != 0) return Result(env, Fail(static_cast<Syscall>(stage), e));
  uint32_t id = 0;
  if (plan.err != 0) {
    // The child has already called _exit(127) after recording why (the vfork
    // wait ends as it exits): reap it now, in microseconds. Left to the loop, a
    // synchronous loop of failing spawns piles up zombies and pidfds until
    // clone3 itself fails with EMFILE.
    siginfo_t si;
    while (waitid(static_cast<idtype_t>(P_PIDFD), static_cast<id_t>(pidfd), &si, WEXITED | __WALL) < 0 && errno == EINTR) {
    }
    close(pidfd);
    return Result(env, Fail(static_cast<Syscall>(plan.stage), plan.err));
  }
  e = Watch(s, pidfd, true, &id);
  if (e != 0) {
    // Unwatchable, so unsupervisable: kill it, and let the reaper thread reap it.
    syscall(SYS_pidfd_send_signal, pidfd, SIGKILL, nullptr, 0);
    g_orphans->Adopt(pidfd);
    return Result(env, Fail(kSysUvPollInit, e));
  }
  out[0] = id;
  out[1] = pid;
  return Result(env, 0);
}

// attach(pid, out Float64Array[1]) -> 0 | -errno; out[0] = id.
Napi::Value Attach(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  SpawnState* s = GetState(env);
  if (s == nullptr) return Result(env, Fail(kSysNone, ENOTCONN));
  int fd = static_cast<int>(syscall(SYS_pidfd_open, Int32Arg(info, 0), 0));
  if (fd < 0) return Result(env, Fail(kSysPidfdOpen, errno));
  uint32_t id = 0;
  int e = Watch(s, fd, false, &id);
  if (e != 0) {
    close(fd);
    return Result(env, Fail(kSysUvPollInit, e));
  }
  info[1].As<Napi::Float64Array>()[0] = id;
  return Result(env, 0);
}

// sendSignal(id, sig) -> 0 | -errno. ESRCH once the exit has been seen: the
// pidfd is closed by then, and a pid alone is never used.
Napi::Value SendSignal(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  SpawnState* s = GetState(env);
  if (s == nullptr) return Result(env, Fail(kSysPidfdSendSignal, ESRCH));
  auto it = s->watchers.find(IdArg(info, 0));
  if (it == s->watchers.end()) return Result(env, Fail(kSysPidfdSendSignal, ESRCH));
  long r = syscall(SYS_pidfd_send_signal, it->second->pidfd, Int32Arg(info, 1), nullptr, 0);
  return Result(env, r < 0 ? Fail(kSysPidfdSendSignal, errno) : 0);
}

// getFd(id, fd) -> fd | -errno: pidfd_getfd(2) of a watched process's fd,
// through the watch's own pidfd (never a pid: no reuse race). The new fd refers
// to the same open file description, so it holds the same OFD locks; the
// kernel sets FD_CLOEXEC on it. It is tracked as a lockable fd. ESRCH once the
// exit has been seen.
Napi::Value GetFd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  SpawnState* s = GetState(env);
  if (s == nullptr) return Result(env, Fail(kSysPidfdGetfd, ESRCH));
  auto it = s->watchers.find(IdArg(info, 0));
  if (it == s->watchers.end()) return Result(env, Fail(kSysPidfdGetfd, ESRCH));
  long fd = syscall(SYS_pidfd_getfd, it->second->pidfd, Int32Arg(info, 1), 0);
  if (fd < 0) return Result(env, Fail(kSysPidfdGetfd, errno));
  TrackLockFd(env, static_cast<int>(fd));
  return Result(env, static_cast<double>(fd));
}

// unwatch(id) -> 0 | -errno: stops watching an attached process without
// waiting for its exit (an adoption given up): its pidfd is closed and no exit
// is reported. -EINVAL for our own child (it must be reaped), -ESRCH when the
// watch is gone already.
Napi::Value Unwatch(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  SpawnState* s = GetState(env);
  if (s == nullptr) return Result(env, Fail(kSysNone, ESRCH));
  auto it = s->watchers.find(IdArg(info, 0));
  if (it == s->watchers.end()) return Result(env, Fail(kSysNone, ESRCH));
  Watcher* w = it->second;
  if (w->own_child) return Result(env, Fail(kSysNone, EINVAL));
  s->watchers.erase(it);
  uv_poll_stop(&w->poll);
  uv_close(reinterpret_cast<uv_handle_t*>(&w->poll), OnWatcherClosed);
  return Result(env, 0);
}

// setRef(id, ref): whether this watch keeps the loop alive.
Napi::Value SetRef(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  SpawnState* s = GetState(env);
  if (s != nullptr) {
    auto it = s->watchers.find(IdArg(info, 0));
    if (it != s->watchers.end()) {
      uv_handle_t* h = reinterpret_cast<uv_handle_t*>(&it->second->poll);
      if (info[1].As<Napi::Boolean>().Value()) {
        uv_ref(h);
      } else {
        uv_unref(h);
      }
    }
  }
  return env.Undefined();
}

// makePipe(out Int32Array[2]) -> 0 | -errno; out = [read end, write end], both CLOEXEC.
Napi::Value MakePipe(const Napi::CallbackInfo& info) {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) < 0) return Result(info.Env(), Fail(kSysPipe2, errno));
  Napi::Int32Array out = info[0].As<Napi::Int32Array>();
  out[0] = fds[0];
  out[1] = fds[1];
  return Napi::Number::New(info.Env(), 0);
}

// openDevNull() -> fd | -errno, read-write and CLOEXEC.
Napi::Value OpenDevNull(const Napi::CallbackInfo& info) {
  int fd;
  do {
    fd = open("/dev/null", O_RDWR | O_CLOEXEC | O_NOCTTY);
  } while (fd < 0 && errno == EINTR);
  return Result(info.Env(), fd < 0 ? Fail(kSysOpen, errno) : fd);
}

// fdIsOpen(fd) -> boolean: lets JS refuse a closed keepFd before spawning.
Napi::Value FdIsOpen(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), fcntl(Int32Arg(info, 0), F_GETFD) >= 0);
}

// spawnInfo() -> [watched processes in this environment, orphans being reaped,
// 1 if clone3 is known to be missing, children started through clone3, through
// the fallback]. For leak checks, tests and diagnostics.
Napi::Value SpawnInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  SpawnState* s = GetState(env);
  Napi::Array out = Napi::Array::New(env, 5);
  out.Set(0u, Napi::Number::New(env, s == nullptr ? 0 : static_cast<double>(s->watchers.size())));
  out.Set(1u, Napi::Number::New(env, g_orphans->Count()));
  out.Set(2u, Napi::Number::New(env, g_clone3_missing.load() ? 1 : 0));
  out.Set(3u, Napi::Number::New(env, static_cast<double>(g_clone3_spawns.load())));
  out.Set(4u, Napi::Number::New(env, static_cast<double>(g_fallback_spawns.load())));
  return out;
}

}  // namespace

void InitSpawn(Napi::Env env, Napi::Object exports, Napi::Object constants) {
  constants["exit"] = Constants(env, {{"UNKNOWN", kExitUnknown}, {"CODE", kExitCode}, {"SIGNAL", kExitSignal}, {"ERROR", kExitError}});
  constants["spawn"] = Constants(env, {{"NEW_SESSION", kFlagNewSession}, {"FORCE_FALLBACK", kFlagForceFallback}});
  Export(env, exports,
         {{"initSpawn", InitSpawnState}, {"spawn", Spawn}, {"attach", Attach}, {"sendSignal", SendSignal}, {"getFd", GetFd}, {"unwatch", Unwatch}, {"setRef", SetRef},
          {"makePipe", MakePipe}, {"openDevNull", OpenDevNull}, {"fdIsOpen", FdIsOpen}, {"spawnInfo", SpawnInfo}});
}

}  // namespace lockmgr

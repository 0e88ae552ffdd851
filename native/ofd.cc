// OFD byte-range lock primitives: thin wrappers over open(2), fcntl(2) and close(2).
// Every function returns 0 or a positive errno (open returns the fd or -errno);
// nothing here allocates a JS object on the success path, so tryLock costs about
// one syscall plus the N-API call.
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"

#ifndef F_OFD_GETLK
#define F_OFD_GETLK 36
#define F_OFD_SETLK 37
#define F_OFD_SETLKW 38
#endif

namespace lockmgr {
namespace {

// Lock types as JS passes them; kept apart from F_RDLCK/F_WRLCK so lib/ never
// depends on the values of libc's constants.
constexpr int kShared = 0;
constexpr int kExclusive = 1;
constexpr int kUnlock = 2;

short ToLockType(int t) {
  switch (t) {
    case kShared: return F_RDLCK;
    case kExclusive: return F_WRLCK;
    default: return F_UNLCK;
  }
}

int FromLockType(short t) {
  switch (t) {
    case F_RDLCK: return kShared;
    case F_WRLCK: return kExclusive;
    default: return kUnlock;
  }
}

void FillFlock(struct flock* fl, int type, int64_t start, int64_t len) {
  *fl = {};
  fl->l_type = ToLockType(type);
  fl->l_whence = SEEK_SET;
  fl->l_start = start;
  fl->l_len = len;
  fl->l_pid = 0;  // OFD commands reject any other value with EINVAL.
}

Napi::Value Int(Napi::Env env, int32_t v) {
  napi_value out;
  napi_create_int32(env, v, &out);
  return Napi::Value(env, out);
}

#ifdef LOCKMGR_SANITIZER_SELFTEST
// Only in the build scripts/asan.sh makes, which defines the macro; no other
// build has this code. Its self-test sets LOCKMGR_SANITIZER_SELFTEST in a small
// driver to prove that the LeakSanitizer leg still fails on what it must: a
// block of ours that nothing points to ("leak"), a crash ("abort"), an
// AddressSanitizer error ("overflow") and an UndefinedBehaviorSanitizer one
// ("ub"), each from inside openFile.
int* volatile g_selftest_block = nullptr;

void SanitizerSelfTest() {
  const char* what = getenv("LOCKMGR_SANITIZER_SELFTEST");
  if (what == nullptr) return;
  if (strcmp(what, "leak") == 0) {
    g_selftest_block = new int[7];
    g_selftest_block = nullptr;  // the last pointer to it: now a direct leak
  } else if (strcmp(what, "abort") == 0) {
    abort();
  } else if (strcmp(what, "overflow") == 0) {
    // Through a volatile pointer, so that UBSan's object-size check cannot
    // see the size and it is ASan that reports it.
    char* volatile block = new char[8];
    block[0] = 0;
    // cppcheck-suppress arrayIndexOutOfBounds ; deliberate
    volatile char past = block[8];  // heap-buffer-overflow, one past the end
    (void)past;
    delete[] block;
  } else if (strcmp(what, "ub") == 0) {
    volatile int big = INT_MAX;
    volatile int sum = big + 1;  // signed integer overflow: UBSan
    (void)sum;
  }
}
#endif

// openFile(path, writable, create) -> fd | -errno.
// O_NONBLOCK only for the open itself: a FIFO opened for reading would otherwise
// block the event loop until a writer appears, and a file with a lease held by
// someone else would block until the lease breaks. It is cleared afterwards so a
// descriptor handed to a child behaves normally.
// create is for lock files in a shared directory (the indirect lockspace):
// O_CREAT makes the file if it is missing, mode 0600 so that only its owner
// can lock it; O_NOFOLLOW refuses (ELOOP) a symlink planted at the name, which
// would otherwise make us create or lock a file of the planter's choosing.
Napi::Value OpenFile(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
#ifdef LOCKMGR_SANITIZER_SELFTEST
  SanitizerSelfTest();
#endif
  std::string path = info[0].As<Napi::String>().Utf8Value();
  bool writable = info[1].As<Napi::Boolean>().Value();
  bool create = info.Length() > 2 && info[2].IsBoolean() && info[2].As<Napi::Boolean>().Value();
  int flags = (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_NOCTTY | O_NONBLOCK;
  if (create) flags |= O_CREAT | O_NOFOLLOW;
  int fd;
  do {
    fd = create ? open(path.c_str(), flags, 0600) : open(path.c_str(), flags);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) return Int(env, -errno);
  int fl = fcntl(fd, F_GETFL);
  if (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) < 0) {
    int e = errno;
    close(fd);
    return Int(env, -e);
  }
  GetAddonData(env)->lock_fds.insert(fd);
  return Int(env, fd);
}

// setlk(fd, type, start, length) -> 0 | errno. Never waits.
Napi::Value SetLk(const Napi::CallbackInfo& info) {
  struct flock fl;
  FillFlock(&fl, Int32Arg(info, 1), Int64Arg(info, 2), Int64Arg(info, 3));
  int fd = Int32Arg(info, 0);
  int rc;
  do {
    rc = fcntl(fd, F_OFD_SETLK, &fl);
  } while (rc < 0 && errno == EINTR);
  return Int(info.Env(), rc < 0 ? errno : 0);
}

// getlk(fd, type, start, length, out Float64Array[4]) -> 0 | errno.
// out receives [type, start, length, pid]; type kUnlock means no conflict.
Napi::Value GetLk(const Napi::CallbackInfo& info) {
  struct flock fl;
  FillFlock(&fl, Int32Arg(info, 1), Int64Arg(info, 2), Int64Arg(info, 3));
  int rc;
  do {
    rc = fcntl(Int32Arg(info, 0), F_OFD_GETLK, &fl);
  } while (rc < 0 && errno == EINTR);
  if (rc < 0) return Int(info.Env(), errno);
  Napi::Float64Array out = info[4].As<Napi::Float64Array>();
  if (out.ElementLength() >= 4) {
    out[0] = FromLockType(fl.l_type);
    out[1] = static_cast<double>(fl.l_start);
    out[2] = static_cast<double>(fl.l_len);
    out[3] = fl.l_pid;
  }
  return Int(info.Env(), 0);
}

// closeFd(fd) -> 0 | errno. Not retried on EINTR: on Linux the fd is gone either way.
Napi::Value CloseFd(const Napi::CallbackInfo& info) {
  int fd = Int32Arg(info, 0);
  GetAddonData(info.Env())->lock_fds.erase(fd);
  return Int(info.Env(), close(fd) < 0 ? errno : 0);
}

// retireFd(fd) -> 0 | errno. For close() while waiter threads still block on
// the fd: atomically puts an O_PATH descriptor of "/" in its place. That drops
// our reference to the open file description at once, so its locks go as soon
// as no syscall holds it (a grant that lands in a waiter's fcntl after this is
// dropped when that fcntl returns), while the fd number stays taken: a waiter
// that retries gets EBADF instead of locking some file opened meanwhile under
// the same number. closeFd() releases the number once every waiter reported.
Napi::Value RetireFd(const Napi::CallbackInfo& info) {
  int fd = Int32Arg(info, 0);
  int placeholder = open("/", O_PATH | O_CLOEXEC);
  if (placeholder < 0) return Int(info.Env(), errno);
  int rc = dup3(placeholder, fd, O_CLOEXEC);
  int e = rc < 0 ? errno : 0;
  close(placeholder);
  return Int(info.Env(), e);
}

// strerror(errno) -> the C library's description, for the errnos whose text
// libuv does not carry (ENOLCK, ESTALE, EDQUOT, ...). The GNU strerror_r is
// thread-safe and old enough not to tie a prebuilt binary to a new glibc.
Napi::Value StrError(const Napi::CallbackInfo& info) {
  char buf[256];
  const char* text = strerror_r(Int32Arg(info, 0), buf, sizeof buf);
  return Napi::String::New(info.Env(), text);
}

}  // namespace

void InitOfd(Napi::Env env, Napi::Object exports) {
  // Registered before the waiter pool's hook, so it runs after it (hooks run in
  // reverse order): no waiter thread uses these fds any more when they close.
  AddonData* data = GetAddonData(env);
  env.AddCleanupHook([data]() {
    for (int fd : data->lock_fds) close(fd);
    data->lock_fds.clear();
  });
  exports["openFile"] = Napi::Function::New(env, OpenFile, "openFile");
  exports["setlk"] = Napi::Function::New(env, SetLk, "setlk");
  exports["getlk"] = Napi::Function::New(env, GetLk, "getlk");
  exports["closeFd"] = Napi::Function::New(env, CloseFd, "closeFd");
  exports["retireFd"] = Napi::Function::New(env, RetireFd, "retireFd");
  exports["strerror"] = Napi::Function::New(env, StrError, "strerror");
}

}  // namespace lockmgr

// OFD byte-range lock primitives: thin wrappers over open(2), fcntl(2) and close(2).
// Every function returns a value >= 0 or -errno (common.h); nothing here
// allocates a JS object on the success path, so tryLock costs about one syscall
// plus the N-API call.
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/kcmp.h>
#include <linux/loop.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <algorithm>

#include "common.h"

#ifndef F_OFD_GETLK
#define F_OFD_GETLK 36
#define F_OFD_SETLK 37
#define F_OFD_SETLKW 38
#endif

namespace lockmgr {
namespace {

// Lock types as JS passes them (constants.lock); kept apart from F_RDLCK and
// F_WRLCK so lib/ never depends on the values of libc's constants.
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

// The safe open: decide what a path names before opening it for I/O. Opening
// a character device can act (a watchdog arms, a tape rewinds), and an
// implausible lock file must be refused before it is opened for writing.
// openPath gives an O_PATH descriptor, which opens nothing; lib/ fstat()s it
// and decides; reopenFd opens that very inode through /proc/self/fd, so the
// name cannot be swapped between the decision and the open.

// What lib/ needs to decide about a file, in two typed arrays it owns, so a
// probe allocates nothing in JS: `out` (Float64Array) gets the small numbers
// at the constants.stat indices, `ids` (BigUint64Array) the 64-bit identities
// (dev, ino, rdev), which a double could round. fstatfs through the same
// descriptor names the filesystem of the inode itself: no second path lookup.
constexpr int kStatMode = 0;
constexpr int kStatUid = 1;
constexpr int kStatNlink = 2;
constexpr int kStatSize = 3;
constexpr int kStatFsType = 4;
constexpr int kStatFields = 5;
constexpr int kIdDev = 0;
constexpr int kIdIno = 1;
constexpr int kIdRdev = 2;
constexpr int kIdFields = 3;

// Returns 0 or -errno (fstat or fstatfs recorded).
int StatInto(Napi::Env env, int fd, napi_value out, napi_value ids) {
  struct stat st;
  if (fstat(fd, &st) < 0) return Fail(kSysFstat, errno);
  struct statfs sfs;
  if (fstatfs(fd, &sfs) < 0) return Fail(kSysFstatfs, errno);
  void* data = nullptr;
  size_t length = 0;
  napi_typedarray_type type;
  if (napi_get_typedarray_info(env, out, &type, &length, &data, nullptr, nullptr) == napi_ok && type == napi_float64_array &&
      length >= static_cast<size_t>(kStatFields)) {
    double* o = static_cast<double*>(data);
    o[kStatMode] = st.st_mode;
    o[kStatUid] = st.st_uid;
    o[kStatNlink] = static_cast<double>(st.st_nlink);
    o[kStatSize] = static_cast<double>(st.st_size);
    // f_type is a signed word holding a 32-bit magic: keep the magic's bits.
    o[kStatFsType] = static_cast<double>(static_cast<uint32_t>(sfs.f_type));
  }
  if (napi_get_typedarray_info(env, ids, &type, &length, &data, nullptr, nullptr) == napi_ok && type == napi_biguint64_array &&
      length >= static_cast<size_t>(kIdFields)) {
    uint64_t* o = static_cast<uint64_t*>(data);
    o[kIdDev] = st.st_dev;
    o[kIdIno] = st.st_ino;
    o[kIdRdev] = st.st_rdev;
  }
  return 0;
}

#ifdef LOCKMGR_SANITIZER_SELFTEST
// Only in the build scripts/asan.sh makes, which defines the macro; no other
// build has this code. Its self-test sets LOCKMGR_SANITIZER_SELFTEST in a small
// driver to prove that the LeakSanitizer leg still fails on what it must: a
// block of ours that nothing points to ("leak"), a crash ("abort"), an
// AddressSanitizer error ("overflow") and an UndefinedBehaviorSanitizer one
// ("ub"), each from inside openPath.
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

// openPath(path, nofollow, out, ids) -> O_PATH fd | -errno, with the file's
// facts in out/ids. On a failed fstat the descriptor is closed again.
Napi::Value OpenPath(const Napi::CallbackInfo& info) {
#ifdef LOCKMGR_SANITIZER_SELFTEST
  SanitizerSelfTest();
#endif
  std::string path = info[0].As<Napi::String>().Utf8Value();
  int flags = O_PATH | O_CLOEXEC | (info[1].As<Napi::Boolean>().Value() ? O_NOFOLLOW : 0);
  int fd;
  do {
    fd = open(path.c_str(), flags);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) return Int(info.Env(), Fail(kSysOpen, errno));
  int rv = StatInto(info.Env(), fd, info[2], info[3]);
  if (rv < 0) {
    close(fd);
    return Int(info.Env(), rv);
  }
  return Int(info.Env(), fd);
}

// statFd(fd, out, ids) -> 0 | -errno: the same facts for an open descriptor.
Napi::Value StatFd(const Napi::CallbackInfo& info) {
  return Int(info.Env(), StatInto(info.Env(), Int32Arg(info, 0), info[1], info[2]));
}

// Lockable fds are tracked in a bitmap indexed by fd: the numbers are small and
// dense, and a bit costs nothing per held lock where a hash-set node costs ~40 B.
void Track(AddonData* data, int fd) {
  size_t i = static_cast<size_t>(fd);
  if (data->lock_fds.size() <= i) data->lock_fds.resize(std::max<size_t>(i + 1, data->lock_fds.size() * 2), false);
  data->lock_fds[i] = true;
}

void Untrack(AddonData* data, int fd) {
  size_t i = static_cast<size_t>(fd);
  if (fd >= 0 && i < data->lock_fds.size()) data->lock_fds[i] = false;
}

// Clears the O_NONBLOCK the open used and tracks the fd; closes it on failure.
int Adopt(Napi::Env env, int fd) {
  // F_SETFL changes only the status flags: 0 clears O_NONBLOCK, so a
  // descriptor handed to a child behaves normally.
  if (fcntl(fd, F_SETFL, 0) < 0) {
    int e = errno;
    close(fd);
    return Fail(kSysFcntl, e);
  }
  Track(GetAddonData(env), fd);
  return fd;
}

// reopenFd(opath, writable) -> fd | -errno: a new open file description of the
// inode `opath` refers to. O_NONBLOCK for the open itself: a file with a lease
// (F_SETLEASE) held by someone else would otherwise block until it breaks.
// `opath` is closed either way: the caller has no further use for it, and one
// native call instead of two is what keeps openLockable close to C.
Napi::Value ReopenFd(const Napi::CallbackInfo& info) {
  int opath = Int32Arg(info, 0);
  char proc[64];
  snprintf(proc, sizeof proc, "/proc/self/fd/%d", opath);
  int flags = (info[1].As<Napi::Boolean>().Value() ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_NOCTTY | O_NONBLOCK;
  int fd;
  do {
    fd = open(proc, flags);
  } while (fd < 0 && errno == EINTR);
  int rv = fd < 0 ? Fail(kSysOpen, errno) : Adopt(info.Env(), fd);
  close(opath);
  return Int(info.Env(), rv);
}

// dupFd(fd) -> fd | -errno: a new descriptor (F_DUPFD_CLOEXEC) of a caller's
// open file description, whose locks are the caller's too; tracked like ours.
// Its status flags are the caller's and stay untouched.
Napi::Value DupFd(const Napi::CallbackInfo& info) {
  int fd = fcntl(Int32Arg(info, 0), F_DUPFD_CLOEXEC, 0);
  if (fd < 0) return Int(info.Env(), Fail(kSysDup, errno));
  Track(GetAddonData(info.Env()), fd);
  return Int(info.Env(), fd);
}

// statusFlags(fd) -> the F_GETFL flags | -errno: how a caller's fd was opened.
Napi::Value StatusFlags(const Napi::CallbackInfo& info) {
  int fl = fcntl(Int32Arg(info, 0), F_GETFL);
  return Int(info.Env(), fl < 0 ? Fail(kSysFcntl, errno) : fl);
}

// createFile(path) -> fd | -errno: a new lock file, or EEXIST. O_EXCL makes
// "we created it" a fact; O_NOFOLLOW refuses a symlink planted at the name.
Napi::Value CreateFile(const Napi::CallbackInfo& info) {
  std::string path = info[0].As<Napi::String>().Utf8Value();
  int flags = O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY | O_NONBLOCK;
  int fd;
  do {
    fd = open(path.c_str(), flags, 0600);
  } while (fd < 0 && errno == EINTR);
  return Int(info.Env(), fd < 0 ? Fail(kSysOpen, errno) : Adopt(info.Env(), fd));
}

// setlk(fd, type, start, length) -> 0 | -errno. Never waits.
// The hottest call of the library (tryLock, unlock, lock's first try): written
// against the C N-API directly, without node-addon-api's CallbackInfo, which
// saves its argument copies and wrapper objects on every call.
napi_value SetLk(napi_env env, napi_callback_info cbinfo) {
  size_t argc = 4;
  napi_value argv[4];
  napi_get_cb_info(env, cbinfo, &argc, argv, nullptr, nullptr);
  int32_t fd = -1, type = kUnlock;
  int64_t start = 0, len = 0;
  napi_get_value_int32(env, argv[0], &fd);
  napi_get_value_int32(env, argv[1], &type);
  napi_get_value_int64(env, argv[2], &start);
  napi_get_value_int64(env, argv[3], &len);
  struct flock fl;
  FillFlock(&fl, type, start, len);
  int rc;
  do {
    rc = fcntl(fd, F_OFD_SETLK, &fl);
  } while (rc < 0 && errno == EINTR);
  napi_value out;
  napi_create_int32(env, rc < 0 ? Fail(kSysFcntl, errno) : 0, &out);
  return out;
}

// getlk(fd, type, start, length, out Float64Array[4]) -> 0 | -errno.
// out receives [type, start, length, pid]; type kUnlock means no conflict.
Napi::Value GetLk(const Napi::CallbackInfo& info) {
  struct flock fl;
  FillFlock(&fl, Int32Arg(info, 1), Int64Arg(info, 2), Int64Arg(info, 3));
  int rc;
  do {
    rc = fcntl(Int32Arg(info, 0), F_OFD_GETLK, &fl);
  } while (rc < 0 && errno == EINTR);
  if (rc < 0) return Int(info.Env(), Fail(kSysFcntl, errno));
  Napi::Float64Array out = info[4].As<Napi::Float64Array>();
  if (out.ElementLength() >= 4) {
    out[0] = FromLockType(fl.l_type);
    out[1] = static_cast<double>(fl.l_start);
    out[2] = static_cast<double>(fl.l_len);
    out[3] = fl.l_pid;
  }
  return Int(info.Env(), 0);
}

// closeFd(fd) -> 0 | -errno. Not retried on EINTR: on Linux the fd is gone either way.
Napi::Value CloseFd(const Napi::CallbackInfo& info) {
  int fd = Int32Arg(info, 0);
  Untrack(GetAddonData(info.Env()), fd);
  return Int(info.Env(), close(fd) < 0 ? Fail(kSysClose, errno) : 0);
}

// retireFd(fd) -> 0 | -errno. For close() while waiter threads still block on
// the fd: atomically puts an O_PATH descriptor of "/" in its place. That drops
// our reference to the open file description at once, so its locks go as soon
// as no syscall holds it (a grant that lands in a waiter's fcntl after this is
// dropped when that fcntl returns), while the fd number stays taken: a waiter
// that retries gets EBADF instead of locking some file opened meanwhile under
// the same number. closeFd() releases the number once every waiter reported.
Napi::Value RetireFd(const Napi::CallbackInfo& info) {
  int fd = Int32Arg(info, 0);
  int placeholder = open("/", O_PATH | O_CLOEXEC);
  if (placeholder < 0) return Int(info.Env(), Fail(kSysOpen, errno));
  int rc = dup3(placeholder, fd, O_CLOEXEC);
  int e = rc < 0 ? Fail(kSysDup3, errno) : 0;
  close(placeholder);
  return Int(info.Env(), e);
}

// kcmp(pid, fd, otherPid, otherFd) -> 0 same open file description, 1 or 2
// (ordered) different, -errno. KCMP_FILE through syscall(2): glibc has no
// wrapper. Tells a process that shares a lease's description (and so its OFD
// locks) from one that merely has the file open.
Napi::Value Kcmp(const Napi::CallbackInfo& info) {
  long rc = syscall(SYS_kcmp, static_cast<pid_t>(Int32Arg(info, 0)), static_cast<pid_t>(Int32Arg(info, 2)), KCMP_FILE,
                    static_cast<unsigned long>(Int32Arg(info, 1)), static_cast<unsigned long>(Int32Arg(info, 3)));
  if (rc < 0) return Int(info.Env(), Fail(kSysKcmp, errno));
  return Int(info.Env(), rc == 0 ? 0 : static_cast<int>(rc));
}

// loopStatus(fd, out BigUint64Array[4]) -> 0 | -errno: LOOP_GET_STATUS64 of a
// loop device: the backing file's device and inode (the identity its lease
// must cover too), the offset and the size limit. ENXIO: no file bound;
// ENOTTY/EINVAL: not a loop device.
Napi::Value LoopStatus(const Napi::CallbackInfo& info) {
  struct loop_info64 li;
  memset(&li, 0, sizeof li);
  if (ioctl(Int32Arg(info, 0), LOOP_GET_STATUS64, &li) < 0) return Int(info.Env(), Fail(kSysIoctl, errno));
  Napi::BigUint64Array out = info[1].As<Napi::BigUint64Array>();
  if (out.ElementLength() >= 4) {
    out[0] = li.lo_device;
    out[1] = li.lo_inode;
    out[2] = li.lo_offset;
    out[3] = li.lo_sizelimit;
  }
  return Int(info.Env(), 0);
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

void TrackLockFd(Napi::Env env, int fd) { Track(GetAddonData(env), fd); }

void InitOfd(Napi::Env env, Napi::Object exports, Napi::Object constants) {
  constants["lock"] = Constants(env, {{"SHARED", kShared}, {"EXCLUSIVE", kExclusive}, {"UNLOCK", kUnlock}});
  // statusFlags' access bits.
  constants["open"] = Constants(env, {{"O_ACCMODE", O_ACCMODE}, {"O_RDONLY", O_RDONLY}, {"O_WRONLY", O_WRONLY}, {"O_RDWR", O_RDWR}, {"O_PATH", O_PATH}});
  // Where openPath/statFd put each fact, and the file-type bits lib/ decides on.
  constants["stat"] = Constants(env, {{"MODE", kStatMode},
                                      {"UID", kStatUid},
                                      {"NLINK", kStatNlink},
                                      {"SIZE", kStatSize},
                                      {"FS_TYPE", kStatFsType},
                                      {"FIELDS", kStatFields},
                                      {"DEV", kIdDev},
                                      {"INO", kIdIno},
                                      {"RDEV", kIdRdev},
                                      {"ID_FIELDS", kIdFields},
                                      {"S_IFMT", S_IFMT},
                                      {"S_IFREG", S_IFREG},
                                      {"S_IFBLK", S_IFBLK},
                                      {"S_IFCHR", S_IFCHR},
                                      {"S_IFDIR", S_IFDIR},
                                      {"S_IFIFO", S_IFIFO},
                                      {"S_IFSOCK", S_IFSOCK},
                                      {"S_IFLNK", S_IFLNK}});
  // Registered before the waiter pool's hook, so it runs after it (hooks run in
  // reverse order): no waiter thread uses these fds any more when they close.
  AddonData* data = GetAddonData(env);
  env.AddCleanupHook([data]() {
    for (size_t fd = 0; fd < data->lock_fds.size(); fd++) {
      if (data->lock_fds[fd]) close(static_cast<int>(fd));
    }
    data->lock_fds.clear();
  });
  // setlk is the one raw N-API function (the hot path: no node-addon-api wrapper per call).
  napi_value setlk;
  napi_create_function(env, "setlk", NAPI_AUTO_LENGTH, SetLk, nullptr, &setlk);
  exports["setlk"] = setlk;
  Export(env, exports,
         {{"openPath", OpenPath}, {"reopenFd", ReopenFd}, {"createFile", CreateFile}, {"statFd", StatFd}, {"getlk", GetLk}, {"closeFd", CloseFd},
          {"retireFd", RetireFd}, {"kcmp", Kcmp}, {"loopStatus", LoopStatus}, {"dupFd", DupFd}, {"statusFlags", StatusFlags},
          {"strerror", StrError}});
}

}  // namespace lockmgr

/*
 * lockmgr-sanlock-exec: the first program a sanlock-leased child runs.
 *
 *   lockmgr-sanlock-exec STATUS_FD GO_FD COMMAND [ARGS...]
 *
 * Why it exists: sanlock ties leases to a *registered process* (the daemon
 * learns the pid from SO_PEERCRED when that process connects in
 * sanlock_register), kills that process when the lease cannot be renewed, and
 * releases its leases when the registration connection closes, i.e. when the
 * process exits. The supervised VM must therefore be the registered process.
 * lockmgr spawns children with clone3(CLONE_VM | CLONE_VFORK), whose pre-exec
 * code may only make async-signal-safe system calls, so the child cannot call
 * the client library itself; this program, exec'd first with the VM's pid,
 * can. Then:
 *
 *   1. dlopen libsanlock_client.so.1 (the package does not link against it),
 *      sanlock_register(), sanlock_restrict(SANLK_RESTRICT_SIGTERM), and keep
 *      the registration fd open across exec;
 *   2. write "R <fd>\n" to STATUS_FD (or "E <code> <text>\n" and exit 111);
 *   3. block on GO_FD while the supervisor acquires the leases for this pid
 *      (sanlock_acquire(-1, pid, ...) from its own connection);
 *   4. on 'G', exec COMMAND: same pid, same registration, so the leases now
 *      belong to the VM. Both pipes are close-on-exec by then: EOF on STATUS_FD
 *      tells the supervisor that the exec succeeded, "X <errno>\n" that it
 *      failed (as spawnSupervised reports execve errors). On EOF on GO_FD (the
 *      acquire failed, or the supervisor died) exit 112 without ever running
 *      COMMAND: a supervised process never runs without its leases.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sanlock-abi.h"

static void report(int fd, const char *text) {
  size_t len = strlen(text);
  while (len > 0) {
    ssize_t n = write(fd, text, len);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    text += n;
    len -= (size_t)n;
  }
}

int main(int argc, char **argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: lockmgr-sanlock-exec STATUS_FD GO_FD COMMAND [ARGS...]\n");
    return 2;
  }
  int status = atoi(argv[1]);
  int go = atoi(argv[2]);
  char line[512];

  void *lib = dlopen(LOCKMGR_SANLOCK_LIB, RTLD_NOW | RTLD_LOCAL);
  if (lib == NULL) {
    snprintf(line, sizeof line, "E %d %s\n", -ENOENT, dlerror());
    report(status, line);
    return 111;
  }
  int (*reg)(void) = (int (*)(void))dlsym(lib, "sanlock_register");
  if (reg == NULL) {
    snprintf(line, sizeof line, "E %d sanlock_register missing from %s\n", -ENOSYS, LOCKMGR_SANLOCK_LIB);
    report(status, line);
    return 111;
  }
  int sock = reg();
  if (sock < 0) {
    snprintf(line, sizeof line, "E %d sanlock_register failed\n", sock);
    report(status, line);
    return 111;
  }
  /*
   * On lease loss the daemon must SIGKILL, never SIGTERM: a VM that exits
   * cleanly on SIGTERM would look like an ordinary shutdown, and the manager
   * reports a lost lease by the SIGKILL (3.8.5 sends SIGKILL anyway; this makes
   * it certain). Best effort: a daemon without it still kills.
   */
  int (*restrict_)(int, uint32_t) = (int (*)(int, uint32_t))dlsym(lib, "sanlock_restrict");
  if (restrict_ != NULL) restrict_(sock, SANLK_RESTRICT_SIGTERM);
  /* Handed to COMMAND on purpose: the registration must outlive the exec. */
  fcntl(sock, F_SETFD, 0);
  snprintf(line, sizeof line, "R %d\n", sock);
  report(status, line);
  fcntl(status, F_SETFD, FD_CLOEXEC);
  fcntl(go, F_SETFD, FD_CLOEXEC);

  char c = 0;
  ssize_t n;
  do n = read(go, &c, 1);
  while (n < 0 && errno == EINTR);
  if (n != 1 || c != 'G') return 112;
  /* The library stays mapped until exec replaces the image; nothing else of it runs. */
  execvp(argv[3], argv + 3);
  int e = errno;
  snprintf(line, sizeof line, "X %d\n", e);
  report(status, line);
  return e == ENOENT ? 127 : 126;
}

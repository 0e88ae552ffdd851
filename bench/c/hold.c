/* The kernel limit for bench/hold.mjs: one process takes COUNT resources,
 * REPS times over, closing all between reps. Each take is the safe open that
 * openLockable() does, then an F_OFD_SETLK write lock on byte 0:
 *   open(O_PATH) names the inode without opening it; fstat decides its type
 *   (regular file or block device, never a character device, FIFO or
 *   socket); fstatfs refuses pseudo filesystems (proc, sysfs, ...); the very
 *   inode checked is opened through /proc/self/fd/N, read-write, O_NONBLOCK
 *   (a leased file must not block), then F_SETFL clears O_NONBLOCK; the
 *   O_PATH fd is closed. Seven system calls per resource, as ours. Prints "NS_PER_RESOURCE
 * RSS_BYTES_PER_HELD_LOCK": the time over all reps, and VmRSS growth while the
 * first rep's COUNT locks are held, divided by COUNT.
 * usage: hold DIR COUNT REPS */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

static long rss_bytes(void) {
  char buf[4096];
  FILE* f = fopen("/proc/self/status", "r");
  long kb = -1;
  while (f && fgets(buf, sizeof buf, f)) {
    if (strncmp(buf, "VmRSS:", 6) == 0) kb = atol(buf + 6);
  }
  if (f) fclose(f);
  return kb * 1024;
}

/* The pseudo filesystems lib/os/locks.ts refuses (linux/magic.h). */
static int pseudo_fs(unsigned long type) {
  static const unsigned long magic[] = {0x9fa0, 0x62656572, 0x64626720, 0x74726163, 0x73636673, 0x27e0eb, 0x63677270, 0x62656570};
  for (unsigned i = 0; i < sizeof magic / sizeof magic[0]; i++) {
    if (type == magic[i]) return 1;
  }
  return 0;
}

static int safe_open(const char* path) {
  int opath = open(path, O_PATH | O_CLOEXEC);
  if (opath < 0) die("open O_PATH");
  struct stat st;
  struct statfs sfs;
  if (fstat(opath, &st) < 0 || fstatfs(opath, &sfs) < 0) die("fstat");
  if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) die("not a regular file or block device");
  if (S_ISREG(st.st_mode) && pseudo_fs((unsigned long)(unsigned int)sfs.f_type)) die("pseudo filesystem");
  char proc[64];
  snprintf(proc, sizeof proc, "/proc/self/fd/%d", opath);
  int fd = open(proc, O_RDWR | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
  if (fd < 0 || fcntl(fd, F_SETFL, 0) < 0) die("reopen");
  close(opath);
  return fd;
}

int main(int argc, char** argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: %s DIR COUNT REPS\n", argv[0]);
    return 64;
  }
  long count = atol(argv[2]), reps = atol(argv[3]);
  char** paths = calloc(count, sizeof *paths);
  int* fds = calloc(count, sizeof *fds);
  for (long i = 0; i < count; i++) {
    paths[i] = malloc(strlen(argv[1]) + 24);
    sprintf(paths[i], "%s/%ld", argv[1], i);
  }
  struct flock lk = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 1};
  long long spent = 0;
  long before = 0, after = 0;
  for (long r = 0; r < reps; r++) {
    if (r == 0) before = rss_bytes();
    long long t0 = now_ns();
    for (long i = 0; i < count; i++) {
      fds[i] = safe_open(paths[i]);
      if (fcntl(fds[i], F_OFD_SETLK, &lk) < 0) die(paths[i]);
    }
    spent += now_ns() - t0;
    if (r == 0) after = rss_bytes();
    for (long i = 0; i < count; i++) close(fds[i]);
  }
  printf("%.1f %.1f\n", (double)spent / (count * reps), (double)(after - before) / count);
  return 0;
}

/* The kernel limit for bench/acquire.mjs: the same F_OFD_SETLK lock + unlock
 * pair the addon does, in a C loop. Prints one line per round: ns per pair.
 * MODE picks the call for the peers' baselines (bench/peers.mjs): ofd (the
 * default; byte 0), posix (classic F_SETLK on the whole file, as fs-ext
 * does) or flock (flock(2) LOCK_EX|LOCK_NB, then LOCK_UN).
 * usage: acquire PATH ITERATIONS ROUNDS [ofd|posix|flock] */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

int main(int argc, char** argv) {
  if (argc != 4 && argc != 5) {
    fprintf(stderr, "usage: %s PATH ITERATIONS ROUNDS [ofd|posix|flock]\n", argv[0]);
    return 64;
  }
  int fd = open(argv[1], O_RDWR | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) die("open");
  long n = atol(argv[2]);
  int rounds = atoi(argv[3]);
  const char* mode = argc == 5 ? argv[4] : "ofd";
  int posix = strcmp(mode, "posix") == 0, use_flock = strcmp(mode, "flock") == 0;
  if (!posix && !use_flock && strcmp(mode, "ofd") != 0) {
    fprintf(stderr, "unknown mode %s\n", mode);
    return 64;
  }
  long len = posix ? 0 : 1;
  int cmd = posix ? F_SETLK : F_OFD_SETLK;
  struct flock lk = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = len};
  struct flock un = {.l_type = F_UNLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = len};
  for (int r = 0; r < rounds; r++) {
    long long t0 = now_ns();
    for (long i = 0; i < n; i++) {
      int failed = use_flock ? flock(fd, LOCK_EX | LOCK_NB) < 0 || flock(fd, LOCK_UN) < 0
                             : fcntl(fd, cmd, &lk) < 0 || fcntl(fd, cmd, &un) < 0;
      if (failed) die(mode);
    }
    printf("%.1f\n", (double)(now_ns() - t0) / n);
  }
  return 0;
}

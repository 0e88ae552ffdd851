/* The kernel limit for bench/acquire.mjs: the same F_OFD_SETLK lock + unlock
 * pair the addon does, in a C loop. Prints one line per round: ns per pair.
 * usage: acquire PATH ITERATIONS ROUNDS */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(int argc, char** argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: %s PATH ITERATIONS ROUNDS\n", argv[0]);
    return 64;
  }
  int fd = open(argv[1], O_RDWR | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) {
    perror("open");
    return 66;
  }
  long n = atol(argv[2]);
  int rounds = atoi(argv[3]);
  struct flock lk = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 1};
  struct flock un = {.l_type = F_UNLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 1};
  for (int r = 0; r < rounds; r++) {
    double t0 = now_ns();
    for (long i = 0; i < n; i++) {
      if (fcntl(fd, F_OFD_SETLK, &lk) < 0 || fcntl(fd, F_OFD_SETLK, &un) < 0) {
        perror("fcntl");
        return 70;
      }
    }
    printf("%.1f\n", (now_ns() - t0) / n);
  }
  return 0;
}

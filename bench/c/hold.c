/* The kernel limit for bench/hold.mjs: one process takes COUNT resources
 * (open DIR/I read-write, then an F_OFD_SETLK write lock on byte 0), REPS
 * times over, closing all between reps. Prints "NS_PER_RESOURCE
 * RSS_BYTES_PER_HELD_LOCK": the time over all reps, and VmRSS growth while the
 * first rep's COUNT locks are held, divided by COUNT.
 * usage: hold DIR COUNT REPS */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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
      fds[i] = open(paths[i], O_RDWR | O_CLOEXEC | O_NOCTTY);
      if (fds[i] < 0 || fcntl(fds[i], F_OFD_SETLK, &lk) < 0) die(paths[i]);
    }
    spent += now_ns() - t0;
    if (r == 0) after = rss_bytes();
    for (long i = 0; i < count; i++) close(fds[i]);
  }
  printf("%.1f %.1f\n", (double)spent / (count * reps), (double)(after - before) / count);
  return 0;
}

/* What every C baseline in bench/c/ shares: CLOCK_MONOTONIC in ns (the clock
 * process.hrtime reads, system-wide) and dying with the errno's text. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static long long now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char* what) {
  perror(what);
  exit(70);
}

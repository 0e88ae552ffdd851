/* The kernel limit for bench/contend.mjs: N copies of this program contend
 * for one OFD write lock on byte 0, each in a loop of F_OFD_SETLKW, count,
 * unlock, for DURATION_MS. All start together: each first waits for a shared
 * lock on byte 1, which the parent holds exclusively until every copy is
 * blocked on it. Prints "COUNT LONGEST_WAIT_NS START_NS END_NS CPU_NS": the
 * stamps on CLOCK_MONOTONIC, and the CPU time (user + system, all threads)
 * the contest took.
 * With "relay" each acquisition is shaped like the addon's lock(): an
 * F_OFD_SETLK on the main thread first, and only on conflict the wait through
 * a waiter thread and an eventfd (relay.h).
 * Before the gate, each copy runs the same loop WARMUP times on a byte of its
 * own (1000 + INDEX), as the Node child does to let its JIT compile the loop.
 * usage: contend PATH DURATION_MS INDEX WARMUP [relay] */
#define _GNU_SOURCE
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "relay.h"

static long long cpu_ns(void) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000000LL + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1000LL;
}

int main(int argc, char** argv) {
  if (argc != 5 && argc != 6) {
    fprintf(stderr, "usage: %s PATH DURATION_MS INDEX WARMUP [relay]\n", argv[0]);
    return 64;
  }
  int fd = open(argv[1], O_RDWR | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) die("open");
  long long duration = atoll(argv[2]) * 1000000LL;
  struct flock gate = {.l_type = F_RDLCK, .l_whence = SEEK_SET, .l_start = 1, .l_len = 1};
  struct flock lk = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 1};
  struct flock un = {.l_type = F_UNLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 1};
  int relay = argc == 6 && strcmp(argv[5], "relay") == 0;
  long index = atol(argv[3]), warmup = atol(argv[4]);
  struct flock own = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 1000 + index, .l_len = 1};
  struct flock unown = {.l_type = F_UNLCK, .l_whence = SEEK_SET, .l_start = 1000 + index, .l_len = 1};
  for (long i = 0; i < warmup; i++) {
    if (fcntl(fd, F_OFD_SETLK, &own) < 0 || fcntl(fd, F_OFD_SETLK, &unown) < 0) die("warm-up");
  }
  if (relay) relay_init(fd, lk);
  if (fcntl(fd, F_OFD_SETLKW, &gate) < 0) die("gate");
  long long cpu0 = cpu_ns();
  long long start = now_ns(), end = start, longest = 0;
  long count = 0;
  while (end - start < duration) {
    long long asked = now_ns();
    if (!relay) {
      if (fcntl(fd, F_OFD_SETLKW, &lk) < 0) die("F_OFD_SETLKW");
    } else if (fcntl(fd, F_OFD_SETLK, &lk) < 0) {
      if (errno != EAGAIN && errno != EACCES) die("F_OFD_SETLK");
      relay_lock();
    }
    end = now_ns();
    if (end - asked > longest) longest = end - asked;
    count++;
    if (fcntl(fd, F_OFD_SETLK, &un) < 0) die("unlock");
  }
  printf("%ld %lld %lld %lld %lld\n", count, longest, start, end, cpu_ns() - cpu0);
  fflush(stdout);
  _exit(0); /* a relay thread may still be parked */
}

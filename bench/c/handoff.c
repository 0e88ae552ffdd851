/* The kernel limit for bench/handoff.mjs: two processes ping-pong one OFD
 * write lock on byte 0 with F_OFD_SETLKW, in the same protocol as the Node
 * child (bench/handoff.mjs):
 *   holder: wait until the peer is blocked on the lock (/proc/locks shows a
 *           "->" waiter on our inode), take t0, unlock;
 *   waiter: wait until the peer holds the lock (F_OFD_GETLK), F_OFD_SETLKW,
 *           take t1.
 * Handoff i is released by role i % 2 and acquired by the other. Both record
 * CLOCK_MONOTONIC (system-wide, the clock of process.hrtime) and print
 * "r I NS" / "a I NS" lines at the end; the parent subtracts.
 * With "relay" the waiting is done the way the addon does it (relay.h).
 * With TOUCH > 0 (bench/floor.mjs), the waiter reads one word in each of
 * TOUCH distinct pages between the grant and its stamp: what a large process
 * does when it resumes, without any of its code. It shows how the cost of
 * resuming grows with the pages touched on these machines (page-table
 * isolation without PCID: every return from the kernel starts with an empty
 * TLB). The pages are adjacent, or with "scatter" 2 MiB apart, so that each
 * one's page-table entry lies in a page table of its own, as a large
 * process's working set is spread over its address space.
 * usage: handoff PATH ROLE(0|1) HANDOFFS [relay|direct] [TOUCH [scatter]] */
#define _GNU_SOURCE
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>

#include "relay.h"

static void pause_us(long us) {
  struct timespec ts = {0, us * 1000};
  nanosleep(&ts, NULL);
}

/* Polls /proc/locks until a blocked waiter ("->") on inode `ino` shows. */
static void wait_peer_blocked(unsigned long ino) {
  char needle[32];
  snprintf(needle, sizeof needle, ":%lu ", ino);
  static char buf[1 << 16];
  for (;;) {
    int fd = open("/proc/locks", O_RDONLY | O_CLOEXEC);
    if (fd < 0) die("open /proc/locks");
    ssize_t len = 0, k;
    while (len < (ssize_t)sizeof buf - 1 && (k = read(fd, buf + len, sizeof buf - 1 - len)) > 0) len += k;
    close(fd);
    buf[len] = 0;
    for (char* line = buf; line && *line;) {
      char* nl = strchr(line, '\n');
      if (nl) *nl = 0;
      if (strstr(line, "->") && strstr(line, needle)) return;
      line = nl ? nl + 1 : NULL;
    }
    pause_us(50);
  }
}

static void wait_peer_holds(int fd) {
  for (;;) {
    struct flock q = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 1};
    if (fcntl(fd, F_OFD_GETLK, &q) < 0) die("F_OFD_GETLK");
    if (q.l_type != F_UNLCK) return;
    pause_us(50);
  }
}

int main(int argc, char** argv) {
  if (argc < 4 || argc > 7) {
    fprintf(stderr, "usage: %s PATH ROLE HANDOFFS [relay|direct] [TOUCH [scatter]]\n", argv[0]);
    return 64;
  }
  long touch = argc >= 6 ? atol(argv[5]) : 0;
  /* Pages STRIDE apart plus a line offset that changes per page, so the
   * cache sets see no regular stride either. */
  long stride = argc == 7 && strcmp(argv[6], "scatter") == 0 ? 2L << 20 : 4096;
  volatile char* pages = NULL;
  if (touch > 0) {
    void* m = mmap(NULL, (size_t)(touch + 1) * stride, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) die("mmap");
    pages = m;
  }
  for (long p = 0; p < touch; p++) pages[p * stride + (p * 64) % 4096] = 1;
  long sink = 0;
  int fd = open(argv[1], O_RDWR | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) die("open");
  int role = atoi(argv[2]);
  long n = atol(argv[3]);
  struct stat st;
  if (fstat(fd, &st) < 0) die("fstat");
  long long* t = calloc(n, sizeof *t);
  int relay = argc >= 5 && strcmp(argv[4], "relay") == 0;
  struct flock lk = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 1};
  struct flock un = {.l_type = F_UNLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 1};
  if (relay) relay_init(fd, lk);
  if (role == 0 && fcntl(fd, F_OFD_SETLK, &lk) < 0) die("first F_OFD_SETLK");
  for (long i = 0; i < n; i++) {
    if (i % 2 == role) {
      wait_peer_blocked((unsigned long)st.st_ino);
      t[i] = now_ns();
      if (fcntl(fd, F_OFD_SETLK, &un) < 0) die("unlock");
    } else {
      wait_peer_holds(fd);
      if (relay)
        relay_lock();
      else if (fcntl(fd, F_OFD_SETLKW, &lk) < 0)
        die("F_OFD_SETLKW");
      for (long p = 0; p < touch; p++) sink += pages[p * stride + (p * 64) % 4096];
      t[i] = now_ns();
    }
  }
  if (sink < 0) return 1; /* keeps the reads */
  for (long i = 0; i < n; i++) printf("%c %ld %lld\n", i % 2 == role ? 'r' : 'a', i, t[i]);
  fflush(stdout);
  _exit(0); /* the relay thread is still parked */
}

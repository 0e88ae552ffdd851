/* The addon's way of waiting, in C, for the baselines that compare against
 * it: the main thread hands F_OFD_SETLKW to a waiter thread, which reports
 * through an eventfd that the main thread sleeps on in epoll_wait, as an event
 * loop does. Two wake-ups per grant (waiter thread, then main thread) where a
 * plain F_OFD_SETLKW has one. One request at a time. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "common.h"

static pthread_mutex_t relay_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t relay_cv = PTHREAD_COND_INITIALIZER;
static int relay_requested;
static int relay_fd, relay_done, relay_ep;
static struct flock relay_lk;

static void* relay_waiter(void* arg) {
  (void)arg;
  for (;;) {
    pthread_mutex_lock(&relay_mu);
    while (!relay_requested) pthread_cond_wait(&relay_cv, &relay_mu);
    relay_requested = 0;
    pthread_mutex_unlock(&relay_mu);
    struct flock lk = relay_lk;
    if (fcntl(relay_fd, F_OFD_SETLKW, &lk) < 0) die("F_OFD_SETLKW");
    uint64_t one = 1;
    if (write(relay_done, &one, sizeof one) != sizeof one) die("write eventfd");
  }
  return NULL;
}

/* Starts the waiter thread for lock `lk` on `fd`. */
static void relay_init(int fd, struct flock lk) {
  relay_fd = fd;
  relay_lk = lk;
  relay_done = eventfd(0, EFD_CLOEXEC);
  relay_ep = epoll_create1(EPOLL_CLOEXEC);
  struct epoll_event ev = {.events = EPOLLIN};
  if (relay_done < 0 || relay_ep < 0 || epoll_ctl(relay_ep, EPOLL_CTL_ADD, relay_done, &ev) < 0) die("eventfd/epoll");
  pthread_t th;
  if (pthread_create(&th, NULL, relay_waiter, NULL) != 0) die("pthread_create");
}

/* Waits for the lock through the waiter thread; returns once the main thread has been told. */
static void relay_lock(void) {
  pthread_mutex_lock(&relay_mu);
  relay_requested = 1;
  pthread_cond_signal(&relay_cv);
  pthread_mutex_unlock(&relay_mu);
  struct epoll_event ev;
  while (epoll_wait(relay_ep, &ev, 1, -1) != 1) {
  }
  uint64_t count;
  if (read(relay_done, &count, sizeof count) != sizeof count) die("read eventfd");
}

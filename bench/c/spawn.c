/* The C baselines for bench/spawn.mjs: start /bin/true, wait for its pidfd to
 * poll readable, reap it with waitid(P_PIDFD).
 *   fork: clone3(CLONE_PIDFD), fork semantics: the child gets a copy of this
 *         (tiny) process's page tables.
 *   vm:   CLONE_VM | CLONE_VFORK | CLONE_PIDFD on a stack of its own, the flags
 *         the addon uses, through glibc's clone() (clone3 with a new stack needs
 *         the assembly trampoline native/spawn.cc carries).
 * Prints one line per round: microseconds per spawn + exit.
 * usage: spawn fork|vm ITERATIONS ROUNDS */
#define _GNU_SOURCE
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef CLONE_PIDFD
#define CLONE_PIDFD 0x00001000
#endif
#ifndef P_PIDFD
#define P_PIDFD 3
#endif

struct clone_args_v0 {
  uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls;
};

static double now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

extern char** environ;

static char* true_argv[] = {"/bin/true", NULL};
static char child_stack[64 * 1024] __attribute__((aligned(16)));

static int vm_child(void* arg) {
  (void)arg;
  execve("/bin/true", true_argv, environ);
  _exit(127);
}

static int spawn_and_wait(int vm) {
  int pidfd = -1;
  long pid;
  if (vm) {
    pid = clone(vm_child, child_stack + sizeof child_stack, CLONE_VM | CLONE_VFORK | CLONE_PIDFD, NULL, &pidfd);
  } else {
    struct clone_args_v0 args;
    memset(&args, 0, sizeof args);
    args.flags = CLONE_PIDFD;
    args.pidfd = (uintptr_t)&pidfd;
    args.exit_signal = 0;
    pid = syscall(SYS_clone3, &args, sizeof args);
    if (pid == 0) {
      execve("/bin/true", true_argv, environ);
      _exit(127);
    }
  }
  if (pid < 0) return -1;
  struct pollfd p = {pidfd, POLLIN, 0};
  while (poll(&p, 1, -1) < 0) {
  }
  siginfo_t si;
  memset(&si, 0, sizeof si);
  if (waitid(P_PIDFD, (id_t)pidfd, &si, WEXITED | __WALL) < 0) return -1;
  close(pidfd);
  return si.si_status;
}

int main(int argc, char** argv) {
  if (argc != 4 || (strcmp(argv[1], "fork") != 0 && strcmp(argv[1], "vm") != 0)) {
    fprintf(stderr, "usage: %s fork|vm ITERATIONS ROUNDS\n", argv[0]);
    return 64;
  }
  int vm = strcmp(argv[1], "vm") == 0;
  int n = atoi(argv[2]);
  int rounds = atoi(argv[3]);
  for (int r = 0; r < rounds; r++) {
    double t0 = now_us();
    for (int i = 0; i < n; i++) {
      if (spawn_and_wait(vm) != 0) {
        perror("spawn");
        return 1;
      }
    }
    printf("%.2f\n", (now_us() - t0) / n);
  }
  return 0;
}

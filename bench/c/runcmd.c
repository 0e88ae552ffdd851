/* Per-invocation cost of a command, as hyperfine measures it but without a
 * shell: fork, execvp, waitpid, ITERATIONS times in a row. Used for util-linux
 * flock(1) in bench/peers.mjs: `runcmd N flock -x FILE true` against
 * `runcmd N true`. Prints ns per invocation; fails if any run fails.
 * usage: runcmd ITERATIONS COMMAND [ARG...] */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

int main(int argc, char** argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s ITERATIONS COMMAND [ARG...]\n", argv[0]);
    return 64;
  }
  long n = atol(argv[1]);
  long long t0 = now_ns();
  for (long i = 0; i < n; i++) {
    pid_t pid = fork();
    if (pid < 0) die("fork");
    if (pid == 0) {
      execvp(argv[2], argv + 2);
      _exit(127);
    }
    int status;
    if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      fprintf(stderr, "%s failed\n", argv[2]);
      return 70;
    }
  }
  printf("%.1f\n", (double)(now_ns() - t0) / n);
  return 0;
}

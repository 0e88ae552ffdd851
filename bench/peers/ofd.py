"""Peer for bench/peers.mjs: Python's fcntl module taking and releasing an OFD
write lock on byte 0 (F_OFD_SETLK), as bench/c/acquire.c does in C.
Prints one line per round: ns per lock + unlock pair.
usage: python3 ofd.py PATH ITERATIONS ROUNDS"""
import fcntl
import os
import struct
import sys
import time


def main():
    path, n, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if not hasattr(fcntl, "F_OFD_SETLK"):
        sys.exit("this Python's fcntl module has no F_OFD_SETLK")
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    # struct flock on 64-bit Linux: short l_type, short l_whence, off_t
    # l_start, off_t l_len, pid_t l_pid (0 for OFD locks), padded to 32 bytes.
    lock = struct.pack("@hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
    unlock = struct.pack("@hhqqi4x", fcntl.F_UNLCK, os.SEEK_SET, 0, 1, 0)
    setlk = fcntl.F_OFD_SETLK
    for _ in range(rounds):
        t0 = time.monotonic_ns()
        for _ in range(n):
            fcntl.fcntl(fd, setlk, lock)
            fcntl.fcntl(fd, setlk, unlock)
        print((time.monotonic_ns() - t0) / n, flush=True)
    os.close(fd)


main()

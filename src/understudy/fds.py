"""Keep the files that announce a process's death at the top of its fd table.

When a process dies, the kernel releases its files highest number first. A CUDA process's driver
files, opened when CUDA starts, take 50-200 ms to release: that is when the driver tears the GPU
context down. A socket or lock numbered above them is released at once; one below them only after
that teardown (bench/kill_teardown.py measured 0.2 ms against 50-95 ms on an H100). So the files
whose release tells the rest of the node that we died — the failover lock, the memory-service
sessions, a tensor-parallel group's control channels — are moved to the top, whenever opened.
"""

from __future__ import annotations

import fcntl
import os
import resource
import socket

# Lifted files take the lowest free numbers of [ceiling - TOP_SPAN, ceiling); numbers above 4096 would
# grow every process's fd table (and CRIU's) for nothing.
TOP_SPAN = 64
MAX_CEILING = 4096


def lift(fd: int) -> int:
    """Move `fd` near the top of the fd table; return its new number (the old one is closed). Whether
    it is inherited by exec'd children stays as it was. If the top is full, `fd` stays where it is."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = MAX_CEILING if soft == resource.RLIM_INFINITY else min(soft, MAX_CEILING)
    if fd >= ceiling - TOP_SPAN:
        return fd
    command = fcntl.F_DUPFD if os.get_inheritable(fd) else fcntl.F_DUPFD_CLOEXEC
    try:
        new = fcntl.fcntl(fd, command, max(3, ceiling - TOP_SPAN))
    except OSError:  # no free number up there (EMFILE): where it is still works, only later
        return fd
    os.close(fd)
    return new


def lift_socket(sock: socket.socket) -> socket.socket:
    """`sock` moved near the top of the fd table (the same socket; its timeout kept)."""
    timeout = sock.gettimeout()
    lifted = socket.socket(fileno=lift(sock.detach()))
    lifted.settimeout(timeout)
    return lifted

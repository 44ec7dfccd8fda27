"""fds.lift: the files that announce our death sit at the top of the fd table (see fds.py for why)."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys

from understudy.fds import MAX_CEILING, TOP_SPAN, lift, lift_socket


def ceiling() -> int:
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return MAX_CEILING if soft == resource.RLIM_INFINITY else min(soft, MAX_CEILING)


def test_lift_moves_a_file_to_the_top_and_keeps_it_what_it_was(tmp_path):
    path = tmp_path / "lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
    fcntl.flock(fd, fcntl.LOCK_EX)
    high = lift(fd)
    try:
        assert ceiling() - TOP_SPAN <= high < ceiling()
        assert not os.get_inheritable(high)
        try:
            os.fstat(fd)
            raise AssertionError("the old number is still open")
        except OSError:
            pass
        # The flock went with it: another open file description cannot take it.
        other = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            raise AssertionError("the lock was lost in the move")
        except BlockingIOError:
            pass
        finally:
            os.close(other)
        assert lift(high) == high  # already at the top
    finally:
        os.close(high)
    inheritable = os.open(path, os.O_RDONLY)
    os.set_inheritable(inheritable, True)
    moved = lift(inheritable)
    assert os.get_inheritable(moved)
    os.close(moved)


def test_a_lifted_socket_still_talks_and_keeps_its_timeout():
    a, b = socket.socketpair()
    a.settimeout(3.5)
    a = lift_socket(a)
    try:
        assert a.fileno() >= ceiling() - TOP_SPAN and a.gettimeout() == 3.5
        b.sendall(b"x")
        assert a.recv(1) == b"x"
        b.close()
        assert a.recv(1) == b""  # the peer's close still reads as EOF
    finally:
        a.close()


def test_with_no_room_at_the_top_the_file_stays_where_it_is():
    # A child whose fd limit is 200 and whose top numbers (136..199) are all taken.
    code = ("import os, resource; from understudy.fds import lift; "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (200, resource.getrlimit(resource.RLIMIT_NOFILE)[1])); "
            "fd = os.open('/dev/null', os.O_RDONLY); [os.dup2(fd, n) for n in range(136, 200)]; "
            "print(fd, lift(fd)); os.fstat(fd)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    before, after = map(int, out.stdout.split())
    assert after == before < 136

"""The failover lock's file: its holder's pid, at a fixed size (CRIU restores a parked shadow only if the
open lock file has the size it had at the dump)."""

from __future__ import annotations

import subprocess
import sys

from understudy.failover.lock import HOLDER_WIDTH, FailoverLock, LockHeld


def test_the_lock_file_names_its_holder_at_the_same_size_whoever_holds_it(tmp_path):
    path = tmp_path / "failover-x.lock"
    sizes = set()
    # Holders with pids of any length: this process, then a child taking it after we let go.
    lock = FailoverLock(path)
    lock.try_acquire()
    sizes.add(path.stat().st_size)
    assert lock.holder() == str(__import__("os").getpid())
    try:
        FailoverLock(path).try_acquire()
        raise AssertionError("a second holder got the lock")
    except LockHeld as e:
        assert lock.holder() in str(e)
    lock.release()
    path.write_text("1\n")  # as if the last holder had pid 1 (an older file format): the next holder fixes it
    child = ("import os, sys; from understudy.failover.lock import FailoverLock; "
             "l = FailoverLock(sys.argv[1]); l.try_acquire(); print(os.getpid(), l.holder())")
    out = subprocess.run([sys.executable, "-c", child, str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    pid, holder = out.stdout.split()
    assert holder == pid
    sizes.add(path.stat().st_size)
    assert sizes == {HOLDER_WIDTH}

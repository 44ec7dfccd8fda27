"""Processes dying at the worst moments: the service cleans up and loses nothing committed."""

from __future__ import annotations

import json
import signal

import pytest

from understudy.memory import MemoryClient, MemoryServiceError, read_status

from tests.helpers.procs import ServerProcess, actor

MiB = 1 << 20


def _payload(line: str) -> dict:
    return json.loads(line.split(" ", 1)[1])


def test_writer_killed_mid_publish_aborts_and_next_writer_succeeds(server):
    w = actor("writer", str(server.path), "--allocations", "3", "--hang-before-commit")
    w.wait_line("allocated")
    assert read_status(server.path)["pools"]["weights"]["state"] == "RW"
    w.kill(signal.SIGKILL)
    server.wait_event("aborted", pool="weights", allocations=3)
    status = read_status(server.path)
    assert status["pools"]["weights"]["state"] == "EMPTY"
    assert status["bytes_in_use"] == 0

    w2 = actor("writer", str(server.path), "--fill", "3")
    w2.wait_line("committed")
    r = actor("reader", str(server.path))
    got = _payload(r.wait_line("mapped"))
    assert got["sum"] == 3 * 4 * MiB
    for p in (w2, r):
        p.kill()


def test_writer_killed_mid_republish_keeps_previous_commit(server):
    first = actor("writer", str(server.path), "--fill", "5")
    first_hash = first.wait_line("committed").split()[1]
    first.kill()
    server.wait_event("released", pool="weights")
    second = actor("writer", str(server.path), "--fill", "9", "--size", str(8 * MiB), "--hang-before-commit")
    second.wait_line("allocated")
    second.kill()
    server.wait_event("aborted", pool="weights")
    pool = read_status(server.path)["pools"]["weights"]
    assert pool["state"] == "COMMITTED" and pool["committed_hash"] == first_hash
    r = actor("reader", str(server.path))
    assert _payload(r.wait_line("mapped"))["sum"] == 5 * 4 * MiB
    r.kill()


def test_killed_readers_release_their_locks(server):
    w = actor("writer", str(server.path))
    w.wait_line("committed")
    readers = [actor("reader", str(server.path)) for _ in range(3)]
    for r in readers:
        r.wait_line("mapped")
    w.kill()
    server.wait_event("released", pool="weights")
    assert len(read_status(server.path)["pools"]["weights"]["readers"]) == 3
    for r in readers:
        r.kill(signal.SIGKILL)
    for _ in readers:
        server.wait_event("released", pool="weights")
    assert read_status(server.path)["pools"]["weights"]["state"] == "COMMITTED"
    # With the readers gone a new writer gets the lock at once.
    with MemoryClient(server.path, "weights", "rw", timeout=0) as c:
        assert c.session is not None


def test_waiting_writer_blocks_new_readers_and_gets_the_lock_when_readers_leave(server):
    w = actor("writer", str(server.path))
    w.wait_line("committed")  # the writer now holds a reader lock
    second = actor("writer", str(server.path), "--fill", "1")
    server.wait_event("waiting", pool="weights", mode="rw")
    assert read_status(server.path)["pools"]["weights"]["waiting_writers"] == 1
    with pytest.raises(MemoryServiceError) as e:
        MemoryClient(server.path, "weights", "ro", timeout=0)
    assert e.value.code == "timeout"
    w.kill()
    second.wait_line("committed")
    second.kill()


def test_memory_outlives_its_creator_and_the_server(socket_dir, backend_name):
    srv = ServerProcess.start(backend_name, socket_dir)
    w = actor("writer", str(srv.path), "--fill", "4")
    w.wait_line("committed")
    r = actor("reader", str(srv.path))
    assert _payload(r.wait_line("mapped"))["sum"] == 4 * 4 * MiB
    w.kill(signal.SIGKILL)  # the process that wrote the bytes is gone
    srv.kill(signal.SIGKILL)  # and so is the server that created them
    r.send()
    assert _payload(r.wait_line("read"))["sum"] == 4 * 4 * MiB
    r.kill()


def test_write_through_read_only_mapping_kills_only_that_process(server):
    w = actor("writer", str(server.path), "--fill", "6")
    w.wait_line("committed")
    bad = actor("ro-write", str(server.path))
    bad.wait_line("writing")
    rc = bad.wait()
    assert rc != 0 and "wrote" not in bad.lines
    r = actor("reader", str(server.path))
    assert _payload(r.wait_line("mapped"))["sum"] == 6 * 4 * MiB  # nothing was written
    assert read_status(server.path)["pools"]["weights"]["state"] == "RO"
    for p in (w, r):
        p.kill()


def test_allocation_waits_for_memory_and_gives_up_when_requester_leaves(socket_dir, backend_name):
    srv = ServerProcess.start(backend_name, socket_dir, "--max-bytes", "8MiB")
    kv = MemoryClient(srv.path, "kv", "rw", name="kv-owner")
    kv.allocate(6 * MiB)
    with MemoryClient(srv.path, "weights", "rw") as w:
        with pytest.raises(MemoryServiceError) as e:
            w.allocate(4 * MiB, timeout=0.2)
        assert e.value.code == "out_of_memory"
    srv.wait_event("oom_retry", pool="weights")

    # A writer waiting for memory gets it as soon as the kv layout is reset.
    waiter = actor("writer", str(srv.path), "--size", str(4 * MiB))
    waiter.wait_line("granted")
    srv.wait_event("oom_retry", pool="weights")
    kv.reset()
    waiter.wait_line("committed")
    waiter.kill()
    srv.wait_event("released", pool="weights")

    # A requester that dies while waiting for memory abandons its request: nothing leaks.
    kv.allocate(4 * MiB)  # 4 MiB of weights + 4 MiB of kv: the budget is full
    doomed = actor("writer", str(srv.path), "--size", str(4 * MiB), "--fill", "2")
    doomed.wait_line("granted")
    srv.wait_event("oom_retry", pool="weights")
    doomed.kill(signal.SIGKILL)
    srv.wait_event("aborted", pool="weights", allocations=0)
    kv.reset()
    assert read_status(srv.path)["bytes_in_use"] == 4 * MiB  # just the committed weights
    assert read_status(srv.path)["pools"]["weights"]["state"] == "COMMITTED"
    kv.close()
    srv.stop()


def test_waiting_writers_are_served_in_order_and_a_newcomer_cannot_overtake(server):
    import threading

    holder = MemoryClient(server.path, "kv", "rw", name="holder")
    got: list = []
    first = threading.Thread(target=lambda: got.append(MemoryClient(server.path, "kv", "rw", timeout=60,
                                                                    name="queued")))
    first.start()
    server.wait_event("waiting", pool="kv", mode="rw")
    holder.close()  # the lock frees ...
    with pytest.raises(MemoryServiceError) as e:  # ... and a try-lock arriving at that moment does not get it
        MemoryClient(server.path, "kv", "rw", timeout=0, name="newcomer")
    assert e.value.code == "timeout"
    first.join(timeout=60)
    assert got and read_status(server.path)["pools"]["kv"]["writer"]["name"] == "queued"
    got[0].close()

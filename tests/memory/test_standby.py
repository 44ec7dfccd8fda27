"""A standby memory service (`understudy memory-server --standby`) takes over the socket the moment the live
one dies, already started up; clients hand it their memory back as they would a restarted one.

    1. a live service and a standby; a writer publishes weights, a reader maps them, a third client owns
       the kv pool; the live service is SIGKILLed: the standby logs standby_took_over and listens on the
       same path (mode 600, its pid in the lock file), and the clients restore weights and kv into it
       without anyone writing the bytes again;
    2. the lock file is replaced while a standby waits (and a second live service locks the new one): when
       the first live one dies, the standby does not take over from the second, it waits for it; when
       that one stops cleanly (SIGTERM), the standby takes over;
    3. with no live service a standby serves at once; a standby stopped while it waits leaves the live
       service's socket alone.
Everything is awaited as log lines of the real processes.
"""

from __future__ import annotations

import os
import signal
import stat
import sys
from pathlib import Path

import torch

from understudy.memory import MemoryClient, read_status

from tests.helpers.procs import BACKEND, ServerProcess
from tests.memory.test_restore import KV_BYTES, W_BYTES, fill, own_kv, publish, total


def standby(socket_dir: Path) -> ServerProcess:
    """`memory-server --standby`, once it waits on the live service's lock."""
    srv = ServerProcess([sys.executable, "-m", "understudy", "memory-server", "--backend", BACKEND, "--socket-dir",
                         str(socket_dir), "--log-format", "json", "--standby"], stream="stderr")
    srv.path = Path(srv.wait_event("standby_waiting")["socket"])
    return srv


def test_standby_takes_over_a_killed_service_and_gets_the_memory_back(socket_dir):
    live = ServerProcess.start(BACKEND, socket_dir)
    spare = standby(socket_dir)
    try:
        assert spare.events("standby_waiting")[0]["active_pid"] == str(live.pid)
        assert spare.path == live.path and read_status(live.path)["pid"] == live.pid
        writer, digest = publish(live.path, 7)
        reader = MemoryClient(live.path, "weights", "ro", name="reader")
        reader.map_all()
        kv = own_kv(live.path, 3)
        before = reader.tensor("w")

        assert live.kill(signal.SIGKILL) == -signal.SIGKILL
        took = spare.wait_event("standby_took_over")
        assert took["previous_pid"] == str(live.pid), took
        spare.wait_event("listening")
        status = read_status(spare.path)
        assert status["pid"] == spare.pid and status["pools"]["weights"]["state"] == "EMPTY"
        assert stat.S_IMODE(os.stat(spare.path).st_mode) == 0o600
        assert spare.path.with_suffix(".lock").read_text().strip() == str(spare.pid)

        assert reader.restore() is True and writer.restore() is False and kv.restore() is True
        status = read_status(spare.path)
        weights, pool_kv = status["pools"]["weights"], status["pools"]["kv"]
        assert (weights["state"], weights["committed_hash"], len(weights["readers"])) == ("RO", digest, 2)
        assert (pool_kv["state"], pool_kv["extra"]) == ("RW", {"kv_spec": {"blocks": 7}})
        assert status["bytes_in_use"] == W_BYTES + KV_BYTES
        # The same bytes: a newcomer reads what the first writer wrote; the kv owner's writes land in the pool.
        with MemoryClient(spare.path, "weights", "ro") as fresh:
            fresh.map_all()
            assert int(fresh.tensor("w").to(torch.int64).sum()) == 7 * W_BYTES
        assert int(before.to(torch.int64).sum()) == 7 * W_BYTES
        fill(kv, 0, 5)
        kv.close()
        with MemoryClient(spare.path, "kv", "rw") as nxt:
            nxt.map_all()
            assert total(nxt, 0) == 5 * KV_BYTES
        for c in (writer, reader):
            c.close()
    finally:
        for srv in (live, spare):
            if srv.proc.poll() is None:
                srv.stop()


def test_standby_follows_a_replaced_lock_file_and_takes_over_a_stopped_service(socket_dir):
    first = ServerProcess.start(BACKEND, socket_dir)
    spare = standby(socket_dir)
    second = None
    try:
        spare.path.with_suffix(".lock").unlink()  # someone removes the lock file...
        second = ServerProcess.start(BACKEND, socket_dir)  # ...and a second service locks a new one
        assert read_status(second.path)["pid"] == second.pid
        assert first.kill(signal.SIGKILL) == -signal.SIGKILL
        # The lock the standby gets is the removed file's: it guards nothing, the standby waits for the second.
        waiting = spare.wait_event("standby_waiting", active_pid=str(second.pid))
        assert not spare.events("standby_took_over") and read_status(second.path)["pid"] == second.pid, waiting
        assert second.stop() == 0  # a clean stop hands over just the same
        assert spare.wait_event("standby_took_over")["previous_pid"] == str(second.pid)
        spare.wait_event("listening")
        assert read_status(spare.path)["pid"] == spare.pid
    finally:
        for srv in (first, second, spare):
            if srv is not None and srv.proc.poll() is None:
                srv.stop()


def test_standby_without_a_live_service_serves_and_one_stopped_while_waiting_leaves_it_alone(socket_dir):
    live = ServerProcess.start(BACKEND, socket_dir, "--standby")  # no live one: it listens at once
    try:
        assert not live.events("standby_waiting") and read_status(live.path)["pid"] == live.pid
        spare = standby(socket_dir)
        assert spare.stop() == -signal.SIGTERM
        status = read_status(live.path)
        assert status["pid"] == live.pid and live.path.with_suffix(".lock").read_text().strip() == str(live.pid)
    finally:
        live.stop()

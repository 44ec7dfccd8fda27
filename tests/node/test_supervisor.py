"""`understudy up` runs a node and keeps it whole; `understudy status` shows it.

One real supervisor process on the CPU (host backend) with an active engine and one shadow.
Its children are SIGKILLed one after the other:
    1. the active engine: the shadow takes over, the supervisor starts a replacement that parks
       as the new shadow, and the same greedy request gives the same tokens from the cache;
    2. the memory service: the supervisor restarts it and the engines give it back the weights
       and the KV they map;
and SIGTERM then stops everything with exit code 0 and removes node.json.
The supervisor tags every child's JSON log line with "child", which is what the test awaits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.node import Node, logged
from tests.helpers.streams import event_of as _event  # noqa: F401  (tests/snapshot/test_up_snapshot.py imports it)


@pytest.fixture(scope="module")
def node():
    n = Node()
    try:
        n.wait(logged("node_up"))
        yield n
    finally:
        n.close()


def test_status_shows_the_node(node):
    kids = node.status()
    assert set(kids) == {"memory", "engine-0", "engine-1"}
    assert all(k["alive"] for k in kids.values()), kids
    assert (kids["engine-0"]["health"]["state"], kids["engine-0"]["health"]["routable"]) == ("ACTIVE", True)
    assert (kids["engine-1"]["health"]["state"], kids["engine-1"]["health"]["routable"]) == ("STANDBY", False)
    text = subprocess.run([sys.executable, "-m", "understudy", "status", "--socket-dir", str(node.dir)],
                          capture_output=True, text=True, timeout=60).stdout
    assert "engine-1" in text and "STANDBY" in text and "ACTIVE" in text


def test_killed_active_engine_is_replaced_by_a_parked_shadow(node):
    reference, _ = node.generate("engine-0")
    old_pid = node.status()["engine-0"]["pid"]
    os.kill(old_pid, signal.SIGKILL)
    node.wait(logged("state", "engine-1", new="ACTIVE"))
    node.wait(logged("child_exited", child="engine-0", returncode=-signal.SIGKILL))
    node.wait(logged("child_started", child="engine-0", role="shadow"))
    node.wait(logged("waiting_for_failover_lock", "engine-0"))
    kids = node.status()
    assert kids["engine-0"]["pid"] != old_pid and kids["engine-0"]["starts"] == 2
    assert kids["engine-0"]["health"]["state"] == "STANDBY" and kids["engine-0"]["health"]["weights"] == "imported"
    assert kids["engine-1"]["health"]["state"] == "ACTIVE" and kids["engine-1"]["health"]["failovers"] == 1
    tokens, cached = node.generate("engine-1")
    assert tokens == reference and cached == 48  # the dead engine's blocks, adopted with the kv pool


def test_killed_memory_service_is_restarted_and_given_the_memory_back(node):
    kids = node.status()
    active = next(n for n, k in kids.items() if k.get("health", {}).get("state") == "ACTIVE")
    shadow = next(n for n, k in kids.items() if k.get("health", {}).get("state") == "STANDBY")
    reference, _ = node.generate(active)
    os.kill(kids["memory"]["pid"], signal.SIGKILL)
    node.wait(logged("child_exited", child="memory", returncode=-signal.SIGKILL))
    node.wait(logged("child_started", child="memory"))
    by_active = node.wait(logged("memory_service_recovered", active))
    by_shadow = node.wait(logged("memory_service_recovered", shadow))
    assert by_active["kv"] == "restored" and "kv" not in by_shadow, (by_active, by_shadow)
    assert {by_active["weights"], by_shadow["weights"]} == {"restored", "attached"}, (by_active, by_shadow)
    assert node.generate(active) == (reference, 48)


def test_sigterm_stops_the_node_cleanly(node):
    pids = [k["pid"] for k in node.status().values()]
    node.proc.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(timeout=120) == 0
    assert any(logged("node_stopped")(l) for l in node.proc.lines)
    assert all(not Path(f"/proc/{pid}").exists() for pid in pids), pids
    assert not (node.dir / "node.json").exists()

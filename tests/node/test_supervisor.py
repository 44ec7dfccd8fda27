"""`understudy up` runs a node and keeps it whole; `understudy status` shows it.

One real supervisor process on the CPU (host backend) with an active engine and one shadow, a memory
service and its twin standing by. Its children are SIGKILLed one after the other:
    1. the active engine: the shadow takes over, the supervisor starts a replacement that parks
       as the new shadow, and the same greedy request gives the same tokens from the cache;
    2. the memory service, twice: its standby twin takes over, the engines give it back the weights
       and the KV they map, and the dead one is restarted as the new standby; then that one takes
       over from the twin the same way;
and SIGTERM then stops everything with exit code 0 and removes node.json.
The supervisor tags every child's JSON log line with "child", which is what the test awaits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.node import Node, logged
from tests.helpers.streams import event_of as _event  # (tests/snapshot/test_up_snapshot.py imports it too)


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
    assert set(kids) == {"memory", "memory-twin", "engine-0", "engine-1"}
    assert all(k["alive"] for k in kids.values()), kids
    assert (kids["memory"]["role"], kids["memory"]["health"]["state"]) == ("active", "SERVING"), kids["memory"]
    assert (kids["memory-twin"]["role"], kids["memory-twin"]["health"]["state"]) == ("standby", "STANDBY")
    assert (kids["engine-0"]["health"]["state"], kids["engine-0"]["health"]["routable"]) == ("ACTIVE", True)
    assert (kids["engine-1"]["health"]["state"], kids["engine-1"]["health"]["routable"]) == ("STANDBY", False)
    text = subprocess.run([sys.executable, "-m", "understudy", "status", "--socket-dir", str(node.dir)],
                          capture_output=True, text=True, timeout=60).stdout
    assert "engine-1" in text and "STANDBY" in text and "ACTIVE" in text and "memory-twin" in text


def test_killed_active_engine_is_replaced_by_a_parked_shadow(node):
    reference, _ = node.generate("engine-0")
    old_pid = node.status()["engine-0"]["pid"]
    os.kill(old_pid, signal.SIGKILL)
    node.wait(logged("state", "engine-1", new="ACTIVE"))
    node.wait(logged("child_exited", child="engine-0", returncode=-signal.SIGKILL))
    restarted = node.wait(logged("child_started", child="engine-0", role="shadow"))
    node.wait(logged("waiting_for_failover_lock", "engine-0", child_pid=restarted["pid"]))  # parked, and listening
    kids = node.status()
    assert kids["engine-0"]["pid"] != old_pid and kids["engine-0"]["starts"] == 2
    assert kids["engine-0"]["health"]["state"] == "STANDBY" and kids["engine-0"]["health"]["weights"] == "imported"
    assert kids["engine-1"]["health"]["state"] == "ACTIVE" and kids["engine-1"]["health"]["failovers"] == 1
    tokens, cached = node.generate("engine-1")
    assert tokens == reference and cached == 48  # the dead engine's blocks, adopted with the kv pool


def since(t: float, predicate):
    """predicate, for lines logged at or after t (time.time())."""
    return lambda line: predicate(line) and _event(line).get("ts", 0) >= t


def test_killed_memory_service_is_taken_over_by_its_standby_and_given_the_memory_back(node):
    kids = node.status()
    active = next(n for n, k in kids.items() if k.get("health", {}).get("state") == "ACTIVE")
    shadow = next(n for n, k in kids.items() if k.get("health", {}).get("state") == "STANDBY"
                  and n.startswith("engine"))
    reference, _ = node.generate(active)
    for serving, spare, start in (("memory", "memory-twin", 2), ("memory-twin", "memory", 2)):
        kids = node.status()
        assert (kids[serving]["health"]["state"], kids[spare]["health"]["state"]) == ("SERVING", "STANDBY"), kids
        t = time.time()
        os.kill(kids[serving]["pid"], signal.SIGKILL)
        took = node.wait(since(t, logged("standby_took_over", spare)))
        assert took["previous_pid"] == str(kids[serving]["pid"]), took
        by_active = node.wait(since(t, logged("memory_service_recovered", active)))
        by_shadow = node.wait(since(t, logged("memory_service_recovered", shadow)))
        assert by_active["kv"] == "restored" and "kv" not in by_shadow, (by_active, by_shadow)
        assert {by_active["weights"], by_shadow["weights"]} == {"restored", "attached"}, (by_active, by_shadow)
        # The dead one comes back as the new standby.
        node.wait(since(t, logged("child_exited", child=serving, returncode=-signal.SIGKILL)))
        node.wait(since(t, logged("child_started", child=serving, role="standby", start=start)))
        node.wait(since(t, logged("standby_waiting", serving)))
        assert node.generate(active) == (reference, 48)
    kids = node.status()
    assert kids["memory"]["health"]["state"] == "SERVING" and kids["memory-twin"]["health"]["state"] == "STANDBY"


def test_sigterm_stops_the_node_cleanly(node):
    pids = [k["pid"] for k in node.status().values()]
    node.proc.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(timeout=120) == 0
    assert any(logged("node_stopped")(l) for l in node.proc.lines)
    assert all(not Path(f"/proc/{pid}").exists() for pid in pids), pids
    assert not (node.dir / "node.json").exists()

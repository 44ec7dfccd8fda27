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

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from tests.helpers.procs import LineProcess, two_free_ports
from tests.helpers.streams import event_of as _event

ENGINE_ARGS = ["--kv-cache-memory", "64MiB", "--max-model-len", "512", "--no-progress"]
PROMPT = list(range(300, 364))  # 64 token ids: four full blocks of 16
MAX_TOKENS = 12


def logged(event: str, child: str | None = None, **fields):
    def test(line: str) -> bool:
        e = _event(line)
        return e.get("event") == event and (child is None or e.get("child") == child) and all(
            e.get(k) == v for k, v in fields.items())
    return test


class Node:
    def __init__(self, shadows: int = 1):
        self.dir = Path(tempfile.mkdtemp(prefix="us-up-", dir="/tmp"))
        self.port = two_free_ports()  # engine-i listens on port + i
        self.proc = LineProcess([sys.executable, "-m", "understudy", "up", "--backend", "host", "--socket-dir",
                                 str(self.dir), "--port", str(self.port), "--shadows", str(shadows), "--",
                                 *ENGINE_ARGS], env={"OMP_NUM_THREADS": "1"}, stream="stderr")

    def wait(self, predicate, timeout: float = 180) -> dict:
        """The first line (already printed or still to come) satisfying predicate, as JSON: children
        log concurrently, so the lines a test awaits may come in any order."""
        for line in list(self.proc.lines):
            if predicate(line):
                return _event(line)
        return _event(self.proc.wait_line(predicate, timeout=timeout))

    def status(self) -> dict:
        out = subprocess.run([sys.executable, "-m", "understudy", "status", "--socket-dir", str(self.dir), "--json"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return {c["name"]: c for c in json.loads(out.stdout)["children"]}

    def generate(self, child: str) -> tuple[list[int], int]:
        port = self.status()[child]["port"]
        r = httpx.post(f"http://127.0.0.1:{port}/engine/generate", timeout=120, json={
            "token_ids": PROMPT, "sampling": {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}})
        assert r.status_code == 200, r.text
        lines = [json.loads(l) for l in r.text.splitlines() if l]
        assert lines[-1]["finish_reason"] == "length", lines
        return [t for l in lines for t in l["token_ids"]], lines[-1]["cached_tokens"]

    def close(self) -> None:
        if self.proc.proc.poll() is None:
            self.proc.kill(signal.SIGTERM)
        shutil.rmtree(self.dir, ignore_errors=True)


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

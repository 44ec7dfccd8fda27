"""Manual control of an engine: POST /engine/control/sleep and /engine/control/wake_up, end to end.

Real processes on the CPU (host backend): one memory server and one primary engine for the module,
run in file order. Sleeping unmaps the weights and the KV cache at kept addresses and leaves both
pools (visible in the memory service's status); waking maps them back at the same addresses, so
greedy output and the prefix cache are what they were. Last, the weights are republished with another
layout while the engine sleeps: wake_up must refuse (409) and the process exit non-zero.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import httpx
import pytest
import torch

from understudy.memory import MemoryClient, read_status
from understudy.memory.tensors import publish_state_dict

from tests.helpers.procs import ServerProcess

from .test_failover import BACKEND, Engine, _event, body, full_blocks, is_state, tokens_of

STANDBY_WAIT = 0.3  # seconds a request waits for a sleeping engine before its 503
PROMPT = [504, 3575, 282, 4649, 314] * 12  # 60 tokens: 3 full blocks of 16 for the prefix cache
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def node():
    d = Path(tempfile.mkdtemp(prefix="us-sw-", dir="/tmp"))  # short: unix socket paths are limited
    mem = ServerProcess.start(BACKEND, d)
    engine = Engine(d, "--role", "primary", "--standby-wait", str(STANDBY_WAIT))
    try:
        engine.wait_serving()
        yield mem, engine
    finally:
        engine.close()
        if mem.proc.poll() is None:
            mem.stop()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def shadow(node) -> Engine:
    """A parked shadow, started with the module (awaited by its test) so that its start overlaps."""
    mem, _ = node
    return Engine(mem.path.parent, "--role", "shadow")


@pytest.fixture(scope="module")
def reference(node) -> list[int]:
    """The engine's greedy output for PROMPT, before any sleep (run twice: the second hits the cache)."""
    _, engine = node
    first, _ = engine.generate(PROMPT, MAX_TOKENS)
    again, cached = engine.generate(PROMPT, MAX_TOKENS)
    assert again == first and cached == full_blocks(len(PROMPT)), cached
    return first


def sessions_of(mem: ServerProcess, pid: int) -> list[tuple[str, str]]:
    """(pool, mode) of every memory-service session of the process that holds a pool (its memory
    watch's connection holds none: engine/memory_watch.py)."""
    return sorted((s["pool"], s["mode"]) for s in read_status(mem.path)["sessions"]
                  if s["pid"] == pid and s["pool"] is not None)


def control(engine: Engine, action: str) -> httpx.Response:
    return engine.http.post(f"/engine/control/{action}")


def test_sleep_is_refused_while_a_request_runs(node, shadow):
    """Requests in flight are not aborted: 409, and the engine stays active."""
    _, engine = node
    with engine.http.stream("POST", "/engine/generate", json=body(PROMPT[:20], 24)) as r:
        lines = r.iter_lines()
        first = json.loads(next(lines))  # the request is running
        refused = control(engine, "sleep")
        rest = [json.loads(line) for line in lines if line]
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["type"] == "conflict_error"
    assert "in flight" in refused.json()["error"]["message"]
    assert len(tokens_of([first, *rest])) == 24  # finished undisturbed
    assert engine.health()["state"] == "ACTIVE"


def test_a_standby_neither_sleeps_nor_wakes_up(node, shadow):
    mem, _ = node
    shadow.wait_serving()
    shadow.wait_for(lambda l: _event(l).get("event") == "waiting_for_failover_lock")
    for action in ("sleep", "wake_up"):
        r = control(shadow, action)
        assert r.status_code == 409 and "STANDBY" in r.json()["error"]["message"], (action, r.text)
    assert shadow.health()["state"] == "STANDBY"
    # Gone before the next tests: its weights session would count as a reader.
    shadow.kill()
    mem.wait_event("released", pool="weights", pid=shadow.pid)


def test_sleep_releases_weights_and_kv_then_wake_up_restores_them(node, reference):
    mem, engine = node
    assert sessions_of(mem, engine.pid) == [("kv", "rw"), ("weights", "ro")]

    r = control(engine, "sleep")
    assert r.status_code == 200 and r.json()["state"] == "SLEEPING" and r.json()["changed"], r.text
    h = engine.health()
    assert (h["status"], h["state"], h["routable"]) == ("ok", "SLEEPING", False), h
    # Both pools let go of: no reader holds the weights, the kv pool has no owner (its blocks stay).
    assert sessions_of(mem, engine.pid) == []
    pools = read_status(mem.path)["pools"]
    assert (pools["weights"]["state"], pools["weights"]["readers"]) == ("COMMITTED", []), pools["weights"]
    assert (pools["kv"]["state"], pools["kv"]["writer"]) == ("COMMITTED", None), pools["kv"]
    # Nothing is admitted: a request waits --standby-wait, then 503 + Retry-After.
    r = engine.http.post("/engine/generate", json=body(PROMPT, MAX_TOKENS))
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert "SLEEPING" in r.json()["error"]["message"]
    assert 'understudy_engine_state{state="SLEEPING"} 1.0' in engine.http.get("/metrics").text
    # Idempotent.
    r = control(engine, "sleep")
    assert r.status_code == 200 and r.json() == {"state": "SLEEPING", "changed": False}, r.text

    r = control(engine, "wake_up")
    assert r.status_code == 200, r.text
    woke = r.json()
    assert (woke["state"], woke["changed"], woke["kv_adopted"]) == ("ACTIVE", True, True), woke
    assert woke["restored_blocks"] >= full_blocks(len(PROMPT)) // 16, woke
    assert sessions_of(mem, engine.pid) == [("kv", "rw"), ("weights", "ro")]
    h = engine.health()
    assert (h["state"], h["routable"]) == ("ACTIVE", True), h
    # Same weights at the same addresses, and the prefix cache rebuilt from the kv pool's index.
    tokens, cached = engine.generate(PROMPT, MAX_TOKENS)
    assert tokens == reference
    assert cached == full_blocks(len(PROMPT)), cached
    r = control(engine, "wake_up")
    assert r.status_code == 200 and r.json() == {"state": "ACTIVE", "changed": False}, r.text
    states = [(e["old"], e["new"]) for e in map(_event, engine.proc.lines) if e.get("event") == "state"]
    assert states == [("ACTIVE", "SLEEPING"), ("SLEEPING", "ACTIVE")]
    engine.assert_clean_log()


def test_wake_up_after_the_weights_changed_exits_nonzero(node):
    """Last (the engine exits): another layout was published while it slept."""
    mem, engine = node
    assert control(engine, "sleep").status_code == 200
    with MemoryClient(mem.path, "weights", "rw", timeout=10, name="test-republish") as writer:
        writer.reset()
        publish_state_dict(writer, {"other.weight": torch.ones(8, 8)}, progress=False)

    r = control(engine, "wake_up")
    assert r.status_code == 409, r.text
    assert r.json()["error"]["type"] == "conflict_error"
    assert "layout" in r.json()["error"]["message"]
    assert engine.proc.wait(timeout=30) == 3
    assert engine.seen(is_state("DEAD"))
    assert engine.seen(lambda l: _event(l).get("event") == "wake_up_failed"
                       and _event(l).get("reason") == "layout_changed")
    # It never took the kv pool back; it stays with its blocks for the next owner.
    assert read_status(mem.path)["pools"]["kv"]["state"] == "COMMITTED"

"""Tensor-parallel groups across nodes (parallel/nodes.py): two "nodes" on one machine, each with its own
socket directory and memory service (host backend), a TP=2 group with one rank on each, gloo over
127.0.0.1. Real `understudy serve` processes: `--node-rank 0` (the leader, HTTP, the failover lock) on node
A and `--node-rank 1` (the member: one rank, no HTTP) on node B for every group.

    1. under 6 streams the active group's rank on node B is SIGKILLed: the group ends on both nodes (the
       leader exits 4, the member on B exits 4), the standby group (its leader waited on node A's lock)
       takes over with both ranks adopting their node's kv pool, and the resent streams end exactly as the
       undisturbed run did;
    2. a third group forms on the freed master port; the new active group's leader on node A is SIGKILLed
       under load: its rank on node B reads EOF and its member exits 4; the third group takes over, same
       outputs;
    3. a connection to the leader's control listener without the group token is refused unread.

Greedy decoding with ignore_eos, so "no token lost, none duplicated" is list equality.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import shutil
import signal
import socket
import struct
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from understudy.common.auth import admin_headers
from understudy.memory import read_status

from tests.helpers.procs import LineProcess, ServerProcess, free_port, gone, serve_process, two_free_ports
from tests.helpers.streams import body, event_of, ndjson, streams_across, tokens_of
from tests.helpers.tiny_model import make_tiny_llama

BLOCK = 16
MAX_TOKENS = 24
FEW = 3
STREAMS = 6
TOKEN = "test-group-token"
ENGINE_ARGS = ["--tensor-parallel", "2", "--nnodes", "2", "--master-addr", "127.0.0.1", "--kv-cache-memory", "16MiB",
               "--max-model-len", "512", "--block-size", str(BLOCK), "--max-num-seqs", "16", "--dtype", "float32"]
ENV = {"OMP_NUM_THREADS": "1", "UNDERSTUDY_GROUP_TOKEN": TOKEN}
EXIT_GROUP_LOST = 4


def logged(name: str):
    return lambda line: event_of(line).get("event") == name


def leader_state(new: str):
    return lambda line: (e := event_of(line)).get("event") == "state" and e.get("new") == new and "tp_rank" not in e


class SpanningGroup:
    """One group across the two nodes: its leader on node A and its member on node B."""

    def __init__(self, nodes: "Nodes", master_port: int, role: str):
        self.port, self.master_port = free_port(), master_port
        self.url = f"http://127.0.0.1:{self.port}"
        common = [*ENGINE_ARGS, "--master-port", str(master_port), "--model", str(nodes.model)]
        self.leader = serve_process(nodes.a, self.port, *common, "--node-rank", "0", "--role", role, env=ENV)
        self.member = LineProcess([sys.executable, "-m", "understudy", "serve", "--backend", "host",
                                   "--memory-service", "connect", "--socket-dir", str(nodes.b), "--log-format",
                                   "json", "--no-progress", *common, "--node-rank", "1"], env=ENV, stream="stderr")
        self.http = httpx.Client(base_url=self.url, timeout=120, headers=admin_headers())

    def wait_for(self, proc: LineProcess, predicate, timeout: float = 240.0) -> dict:
        for line in list(proc.lines):
            if predicate(line):
                return event_of(line)
        return event_of(proc.wait_line(predicate, timeout=timeout))

    @property
    def remote_rank_pid(self) -> int:
        return int(self.wait_for(self.member, logged("tp_node_started"))["ranks"]["1"])

    def wait_serving(self) -> "SpanningGroup":
        joined = self.wait_for(self.leader, logged("tp_remote_rank_joined"))
        assert (joined["rank"], joined["pid"], joined["node_rank"]) == (1, self.remote_rank_pid, 1), joined
        self.wait_for(self.leader, logged("serving"))
        return self

    def generate(self, token_ids: list[int]) -> list[int]:
        return tokens_of(ndjson(self.http.post("/engine/generate", json=body(token_ids, MAX_TOKENS))))

    def close(self) -> None:
        for proc in (self.leader, self.member):
            if proc.proc.poll() is None:
                proc.kill(signal.SIGKILL)
        self.http.close()


class Nodes:
    def __init__(self, root: Path, model: Path):
        self.a, self.b, self.model = root / "a", root / "b", model
        self.a.mkdir()
        self.b.mkdir()
        self.mems = [ServerProcess.start("host", d, "--device", "0") for d in (self.a, self.b)]
        self.groups: list[SpanningGroup] = []

    def start(self, master_port: int, role: str) -> SpanningGroup:
        g = SpanningGroup(self, master_port, role)
        self.groups.append(g)
        return g

    def kv_owner(self, i: int) -> int | None:
        status = read_status(self.mems[i].path)
        writer = status["pools"]["kv"]["writer"]
        return None if writer is None else {s["id"]: s["pid"] for s in status["sessions"]}[writer["id"]]


@pytest.fixture(scope="module")
def nodes():
    root = Path(tempfile.mkdtemp(prefix="us-mn-", dir="/tmp"))  # short: unix socket paths are limited
    n = Nodes(root, make_tiny_llama(root / "model"))
    n.ports = [free_port(), free_port()]  # the two group slots' master ports
    try:
        n.active = n.start(n.ports[0], "primary")
        n.parked = n.start(n.ports[1], "shadow")
        yield n
    finally:
        for g in n.groups:
            g.close()
        for mem in n.mems:
            if mem.proc.poll() is None:
                mem.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(11)
    return [[rng.randrange(256) for _ in range(40 + 7 * i)] for i in range(STREAMS)]


@pytest.fixture(scope="module")
def reference(nodes, prompts) -> list[list[int]]:
    group = nodes.active.wait_serving()
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        outs = list(pool.map(group.generate, prompts))
    assert all(len(o) == MAX_TOKENS for o in outs)
    return outs


def kill_under_load(nodes: Nodes, prompts, reference, victim_pid: int) -> None:
    """STREAMS streams on the active group; SIGKILL `victim_pid` once each has FEW tokens; every broken stream is
    resent to the standby group and must end as the undisturbed run did, the standby group promoted with both
    ranks owning their node's kv pool."""
    active, standby = nodes.active, nodes.parked
    got, resent = streams_across(active.url, dict(enumerate(prompts)), MAX_TOKENS,
                                 lambda: os.kill(victim_pid, signal.SIGKILL), started=FEW, resend_to=standby.url,
                                 context=lambda: ("standby leader:", standby.leader.lines[-30:],
                                                  "standby member:", standby.member.lines[-20:]))
    assert sorted(resent) == list(range(len(prompts)))
    for i in range(len(prompts)):
        assert FEW <= len(got[i]) < MAX_TOKENS
        assert got[i] + resent[i]["tokens"] == reference[i], i
    assert any(r["cached"] > 0 for r in resent.values())  # the prefixes came from the adopted caches
    standby.wait_for(standby.leader, leader_state("ACTIVE"))
    adopted = standby.wait_for(standby.leader, logged("tp_group_adopted"))
    assert adopted["adopted"] == [True, True], adopted
    # Both parts of the dead group are gone, on both nodes.
    assert active.member.wait(timeout=60) == EXIT_GROUP_LOST
    assert gone(active.remote_rank_pid)
    # Each node's kv pool is owned by the promoted group's rank on that node.
    assert (nodes.kv_owner(0), nodes.kv_owner(1)) == (standby.leader.pid, standby.remote_rank_pid)
    nodes.active, nodes.parked = standby, None


def test_rank_on_the_second_node_killed_under_load(nodes, prompts, reference):
    dead = nodes.active
    nodes.parked.wait_serving().wait_for(nodes.parked.leader, logged("waiting_for_failover_lock"))
    kill_under_load(nodes, prompts, reference, victim_pid=dead.remote_rank_pid)
    assert dead.leader.wait(timeout=60) == EXIT_GROUP_LOST
    lost = dead.wait_for(dead.leader, logged("tp_rank_lost"))
    assert (lost["rank"], lost["remote"]) == (1, True), lost
    ended = dead.wait_for(dead.member, logged("tp_node_group_ended"))
    assert ended["rank"] == 1 and ended["returncode"] == -signal.SIGKILL, ended


def test_leader_on_the_first_node_killed_under_load(nodes, prompts, reference):
    dead = nodes.active
    freed = nodes.ports[0] if dead.master_port == nodes.ports[1] else nodes.ports[1]  # the first group's slot
    nodes.parked = nodes.start(freed, "shadow")
    nodes.parked.wait_serving().wait_for(nodes.parked.leader, logged("waiting_for_failover_lock"))
    kill_under_load(nodes, prompts, reference, victim_pid=dead.leader.pid)
    assert dead.leader.wait(timeout=60) == -signal.SIGKILL
    ended = dead.wait_for(dead.member, logged("tp_node_group_ended"))
    assert ended["returncode"] == 0, ended  # its rank read EOF from the dead leader and left


def test_a_connection_without_the_group_token_is_refused_unread():
    """A process that is not one of the group's ranks cannot join (nothing it sends is unpickled)."""
    from datetime import timedelta

    from understudy.engine.parallel.comm import make_store
    from understudy.engine.parallel.nodes import RemoteRanks

    store = make_store(0, 2, free_port(), timeout=timedelta(seconds=10))
    remote = RemoteRanks(store, "127.0.0.1")
    host, port = remote.address.rsplit(":", 1)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        accepting = pool.submit(remote.accept, {1}, 5.0)
        intruder = socket.create_connection((host, int(port)))
        assert len(intruder.recv(16)) == 16  # the challenge
        hello = json.dumps({"rank": 1, "pid": os.getpid(), "mac": "0" * 64}).encode()
        intruder.sendall(struct.pack("<I", len(hello)) + hello)
        assert intruder.recv(1) == b""  # closed on it, unread
        with pytest.raises(RuntimeError, match=r"ranks \[1\] of other nodes did not join"):
            accepting.result(timeout=30)


# -- 4. `understudy up` on each node ---------------------------------------------------------------------------

def up_node(root: Path, name: str, model: Path, node_rank: int, master_port: int, port: int | None) -> LineProcess:
    sock = root / name
    sock.mkdir()
    argv = [sys.executable, "-m", "understudy", "up", "--backend", "host", "--socket-dir", str(sock), "--shadows", "1",
            "--tensor-parallel", "2", "--nnodes", "2", "--node-rank", str(node_rank), "--master-addr", "127.0.0.1",
            "--master-port", str(master_port), "--probe-interval", "0", "--restart-delay", "0.2", "--log-format",
            "json", *(["--port", str(port)] if port else []), "--", "--model", str(model), *ENGINE_ARGS[6:]]
    return LineProcess(argv, env=ENV, stream="stderr")


def test_up_on_each_node_relaunches_its_part_of_a_standby_group(tmp_path):
    """Both nodes run `up`; the active group's rank on node B is SIGKILLed: the standby group takes over, and
    each node's `up` restarts its part of the dead group's slot, which parks as the next standby group."""
    root = Path(tempfile.mkdtemp(prefix="us-up-", dir="/tmp"))
    model = make_tiny_llama(root / "model")
    # slot i meets at master + i and serves on port + i: both pairs free, and apart
    port = two_free_ports()
    while (master := two_free_ports()) in range(port - 1, port + 2):
        pass
    a = up_node(root, "a", model, 0, master, port)
    b = up_node(root, "b", model, 1, master, None)

    def event(proc: LineProcess, name: str, child: str, after: int = 0) -> dict:
        pred = lambda l: (e := event_of(l)).get("event") == name and e.get("child") == child  # noqa: E731
        lines = list(proc.lines)
        for line in lines[after:]:
            if pred(line):
                return event_of(line)
        return event_of(proc.wait_line(pred, timeout=120))  # under the test's timeout: a miss prints the output

    try:
        a.wait_line(logged("node_up"), timeout=300)
        b.wait_line(logged("node_up"), timeout=300)
        event(a, "waiting_for_failover_lock", "engine-1")
        victim = int(event(b, "tp_node_started", "engine-0")["ranks"]["1"])
        mark_a, mark_b = len(a.lines), len(b.lines)
        os.kill(victim, signal.SIGKILL)
        # Slot 1's group takes over; slot 0's leader exits (group lost) and both nodes restart their parts of it.
        event(a, "tp_group_adopted", "engine-1", mark_a)
        exited = event(a, "child_exited", "engine-0", mark_a)
        assert exited["returncode"] == EXIT_GROUP_LOST, exited
        assert event(b, "child_exited", "engine-0", mark_b)["returncode"] == EXIT_GROUP_LOST
        event(b, "tp_node_started", "engine-0", mark_b)
        event(a, "waiting_for_failover_lock", "engine-0", mark_a)  # the new standby group has formed, parked
        with httpx.Client(base_url=f"http://127.0.0.1:{port + 1}", timeout=60, headers=admin_headers()) as http:
            assert http.get("/health").json()["state"] == "ACTIVE"
            assert len(tokens_of(ndjson(http.post("/engine/generate", json=body([5, 6, 7], 4))))) == 4
    except BaseException:  # both nodes' logs, to see which side stalled
        for name, proc in (("a", a), ("b", b)):
            print(f"--- node {name} ---", *proc.lines[-80:], *proc.other[-20:], sep="\n")
        raise
    finally:
        for proc in (a, b):
            if proc.proc.poll() is None:
                proc.kill(signal.SIGTERM)
                proc.wait(timeout=120)
        shutil.rmtree(root, ignore_errors=True)

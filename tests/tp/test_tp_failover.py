"""Tensor-parallel groups and whole-group failover: real `understudy serve --tensor-parallel 2` process trees
on the CPU (host backend, gloo), killed with SIGKILL.

Two host "devices" (memory services host-0 and host-1); a tiny random Llama whose 4 heads / 2 KV heads
divide by 2. The tests run in file order and hand the node on:

    1. the active group's greedy outputs equal a TP=1 engine's on the same checkpoint (parity), and each
       rank publishes its own shard into its own device's memory service;
    2. under 6 streams, the active group's non-leader rank is SIGKILLed: the whole group exits, the
       parked standby group takes over (both ranks adopt their device's kv pool), and the broken streams,
       resent with prompt + tokens so far, finish exactly as the undisturbed run did, from the adopted
       prefix cache;
    3. the same with the new active group's leader SIGKILLed (its worker dies with it), and a third group;
    4. two standby groups wait; the one that gets the lock loses its worker while it wakes: it ends, and
       the other one takes over;
    5. the memory service of device 1 is SIGKILLed under load: streams finish; restarted, it gets rank 1's
       shard and kv pool back from the worker, and a new standby group imports and adopts from it;
    6. a TP=1 engine refuses to import a rank's shard;
    7. `understudy up --tensor-parallel 2 --shadows 1`: after a kill a new standby group is started and
       parks on the failover lock.

Each test also runs alone (`-k`), from the fixture's node: an active group and the standby group
started with it. A test that needs no standby group but its own ends that one first (Node.retire_parked):
left parked, it would race the test's groups for the failover lock and for giving a restarted memory
service its shard back.

Greedy decoding with ignore_eos: "no token lost, none duplicated" is list equality. Nothing waits on
fixed sleeps: processes are awaited through their JSON log lines.

UNDERSTUDY_TEST_BACKEND=cuda runs the same tests on two GPUs (NCCL, CUDA graphs for decode steps,
float32 so that TP=1 and TP=2 agree token for token); skipped with fewer than two.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from understudy.common.auth import admin_headers
from understudy.fds import MAX_CEILING, TOP_SPAN
from understudy.memory import read_status

from tests.helpers.procs import LineProcess, ServerProcess, free_port, gone, serve_process
from tests.helpers.streams import body, ndjson, streams_across, tokens_of
from tests.helpers.streams import event_of as _event
from tests.helpers.tiny_model import make_tiny_llama

BACKEND = os.environ.get("UNDERSTUDY_TEST_BACKEND", "host")
if BACKEND == "cuda":
    import torch

    pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
BLOCK = 16
MAX_TOKENS = 48 if BACKEND == "host" else 400  # none is over before the kill lands (24 were, once, on 2 busy cores)
FEW = 3  # tokens every stream has received before the kill
STREAMS = 6
# --overlap-decode on: on the CPU too, so that the decode steps queued ahead send their ids to the worker by
# broadcast (parallel/group.py), which the parity and kill tests then cover
ENGINE_ARGS = ["--kv-cache-memory", "16MiB", "--max-model-len", "512", "--block-size", str(BLOCK),
               "--max-num-seqs", "16", "--dtype", "float32", "--overlap-decode", "on"]
ENGINE_ENV = {"OMP_NUM_THREADS": "1"}
EXIT_GROUP_LOST = 4


def logged(name: str, **fields):
    return lambda line: (e := _event(line)).get("event") == name and all(e.get(k) == v for k, v in fields.items())


def leader_state(new: str):
    """A state line of the group's leader (workers' lines carry tp_rank)."""
    return lambda line: (e := _event(line)).get("event") == "state" and e.get("new") == new and "tp_rank" not in e


def await_line(proc: LineProcess, predicate, start: int = 0, timeout: float = 120.0) -> tuple[int, dict]:
    """(index, event) of the first line at or after `start` satisfying predicate, printed or still to come."""
    deadline = time.monotonic() + timeout
    while True:
        lines = list(proc.lines)
        for i in range(start, len(lines)):
            if predicate(lines[i]):
                return i, _event(lines[i])
        start = len(lines)
        proc.wait_line(lambda _: True, timeout=max(0.1, deadline - time.monotonic()))  # any new line


def wait_until(cond, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)  # polling /proc or the memory service's status


class Group:
    """One `understudy serve --tensor-parallel 2` process tree: the leader's stderr carries every rank's lines."""

    def __init__(self, socket_dir: Path, model: Path, *extra: str, tp: int = 2, connect: bool = True):
        self.port, self.tp = free_port(), tp
        self.url = f"http://127.0.0.1:{self.port}"
        args = ["--model", str(model), "--tensor-parallel", str(tp), *ENGINE_ARGS, *extra]
        if connect:
            self.proc = serve_process(socket_dir, self.port, *args, env=ENGINE_ENV, backend=BACKEND)
        else:  # its own memory services, started by the engine (--memory-service auto)
            self.proc = LineProcess([sys.executable, "-m", "understudy", "serve", "--backend", BACKEND,
                                     "--socket-dir", str(socket_dir), "--port", str(self.port), "--log-format",
                                     "json", "--no-progress", *args], env=ENGINE_ENV, stream="stderr")
        self.http = httpx.Client(base_url=self.url, timeout=120, headers=admin_headers())
        self.ranks: list[int] = []
        self.started_with_active = False  # raced the active group to publish each shard (see test 1)

    @property
    def leader(self) -> int:
        return self.proc.pid

    def wait_for(self, predicate, timeout: float = 60.0) -> dict:
        for line in list(self.proc.lines):
            if predicate(line):
                return _event(line)
        return _event(self.proc.wait_line(predicate, timeout=timeout))

    def seen(self, predicate) -> bool:
        return any(predicate(l) for l in list(self.proc.lines))

    def wait_serving(self) -> "Group":
        if self.tp > 1:
            started = self.wait_for(logged("tp_group_started"), timeout=180)
            self.ranks = [started["ranks"][str(r)] for r in range(len(started["ranks"]))]
        self.wait_for(logged("serving"), timeout=240)
        return self

    def wait_parked(self, imported: bool = True) -> "Group":
        """Wait until parked on the failover lock; `imported`: every rank mapped its shard, none read the disk."""
        self.wait_serving()
        self.wait_for(logged("waiting_for_failover_lock"))
        self.parked_health = h = self.health()
        assert (h["state"], h["routable"], h["role"], h["tensor_parallel"]) == ("STANDBY", False, "shadow", 2), h
        assert not h["kv_adopted"] and (not imported or h["rank_weights"] == ["imported", "imported"]), h
        return self

    def health(self) -> dict:
        return self.http.get("/health").json()

    def generate(self, token_ids: list[int], max_tokens: int = MAX_TOKENS) -> tuple[list[int], int]:
        lines = ndjson(self.http.post("/engine/generate", json=body(token_ids, max_tokens)))
        return tokens_of(lines), lines[-1]["cached_tokens"]

    def promoted(self) -> dict:
        self.wait_for(leader_state("WAKING"))
        active = self.wait_for(leader_state("ACTIVE"))
        assert active["restored_blocks"] > 0, active
        adopted = self.wait_for(logged("tp_group_adopted"))
        assert adopted["adopted"] == [True, True], adopted
        h = self.health()
        assert (h["state"], h["routable"], h["kv_adopted"], h["failovers"]) == ("ACTIVE", True, True, 1), h
        return active

    def assert_clean_log(self) -> None:
        bad = [l for l in self.proc.lines if "Traceback" in l or '"level": "error"' in l]
        assert not bad, "group logged errors:\n" + "\n".join(self.proc.lines[-60:])

    def close(self) -> None:
        if self.proc.proc.poll() is None:
            self.proc.kill(signal.SIGKILL)
        for pid in self.ranks[1:]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.http.close()


class Node:
    def __init__(self, socket_dir: Path, model: Path, mems: list[ServerProcess]):
        self.dir, self.model, self.mems = socket_dir, model, mems
        self.groups: list[Group] = []
        self.active: Group | None = None
        self.parked: Group | None = None

    def start(self, *extra: str, **kw) -> Group:
        g = Group(self.dir, self.model, *extra, **kw)
        self.groups.append(g)
        return g

    def retire_parked(self) -> None:
        """SIGKILL the parked standby group, if any, once it is parked (so no shard is half published), and
        wait until every rank of it is gone."""
        g, self.parked = self.parked, None
        if g is None:
            return
        g.wait_parked(imported=False)
        g.close()
        wait_until(lambda: all(gone(pid) for pid in [g.leader, *g.ranks]), "a rank of the retired group lived on")

    def kv_owners(self) -> list[int | None]:
        """The pid owning each device's kv pool."""
        out = []
        for mem in self.mems:
            status = read_status(mem.path)
            writer = status["pools"]["kv"]["writer"]
            out.append(None if writer is None else {s["id"]: s["pid"] for s in status["sessions"]}[writer["id"]])
        return out


# -- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir():
    d = Path(tempfile.mkdtemp(prefix="us-tp-", dir="/tmp"))  # short: unix socket paths are limited
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def model_dir(workdir) -> Path:
    return make_tiny_llama(workdir / "model")


@pytest.fixture(scope="module")
def node(workdir, model_dir):
    sock = workdir / "s"
    sock.mkdir()
    (workdir / "s1").mkdir()
    mems = [ServerProcess.start(BACKEND, sock, "--device", str(d)) for d in (0, 1)]
    n = Node(sock, model_dir, mems)
    try:
        # The TP=1 reference engine (its own memory service, in another directory), the active group and
        # the standby group start together.
        n.tp1 = Group(workdir / "s1", model_dir, tp=1, connect=False)
        n.active = n.start("--role", "primary")
        n.parked = n.start("--role", "shadow")
        n.parked.started_with_active = True
        yield n
    finally:
        for g in [*n.groups, n.tp1]:
            g.close()
        for mem in mems:
            if mem.proc.poll() is None:
                mem.stop()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(256) for _ in range(40 + 7 * i)] for i in range(STREAMS)]


@pytest.fixture(scope="module")
def reference(node, prompts) -> list[list[int]]:
    """The undisturbed greedy outputs, computed on the active group (all at once)."""
    group = node.active.wait_serving()
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        outs = list(pool.map(lambda p: group.generate(p)[0], prompts))
    assert all(len(o) == MAX_TOKENS for o in outs)
    return outs


# -- 1. parity and shards ------------------------------------------------------------------------------

def test_tp2_group_matches_tp1_and_each_rank_holds_its_shard(node, prompts, reference):
    group = node.active
    h = group.health()
    assert (h["state"], h["routable"], h["tensor_parallel"], h["kv_adopted"]) == ("ACTIVE", True, 2, False), h
    assert h["rank_pids"] == group.ranks and len(set(group.ranks)) == 2
    tp1 = node.tp1.wait_serving()
    assert tp1.health().get("tensor_parallel") is None
    assert [tp1.generate(p)[0] for p in prompts] == reference
    # Each device's memory service holds one rank's shard (not the whole model), owned kv pool included.
    for rank, mem in enumerate(node.mems):
        status = read_status(mem.path)
        weights = status["pools"]["weights"]
        assert weights["state"] == "RO" and weights["extra"]["tensor_parallel"] == [rank, 2], weights
    assert node.kv_owners() == group.ranks
    # What tells the node that a rank died sits at the top of its fd table (released first, fds.py): the
    # leader's failover lock, and on every rank its control channel and its memory-service sessions.
    for rank, pid in enumerate(group.ranks):
        top = top_fds(pid)
        assert sum(t.startswith("socket:") for t in top) >= 2, (rank, top)
        assert any(t.endswith(".lock") for t in top) == (rank == 0), (rank, top)
    # The standby group started with it: for each rank one of the two groups published the shard (whichever
    # got there first), the other imported it.
    standby = node.parked.wait_parked(imported=False)
    for rank in (0, 1):
        assert sorted([h["rank_weights"][rank], standby.parked_health["rank_weights"][rank]]) == [
            "imported", "published"], (h, standby.parked_health)


def top_fds(pid: int) -> list[str]:
    """What process `pid` has open in the top span of its fd table (fds.py)."""
    soft = next(int(line.split()[3]) for line in Path(f"/proc/{pid}/limits").read_text().splitlines()
                if line.startswith("Max open files"))
    low = min(soft, MAX_CEILING) - TOP_SPAN
    return [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd") if int(fd) >= low]


# -- 2. a non-leader rank of the active group dies under load -----------------------------------------------

def run_streams_and_kill(node: Node, prompts, victim_pid: int) -> tuple[list[list[int]], list[dict]]:
    """STREAMS streams on the active group; SIGKILL `victim_pid` once each has FEW tokens; every broken
    stream is resent (prompt + tokens so far) to the parked group. Returns (tokens before, resent results)."""
    active, standby = node.active, node.parked
    got, resent = streams_across(active.url, dict(enumerate(prompts)), MAX_TOKENS,
                                 lambda: os.kill(victim_pid, signal.SIGKILL), started=FEW, resend_to=standby.url,
                                 context=lambda: ("standby group's log:", standby.proc.lines[-40:]))
    assert sorted(resent) == list(range(len(prompts))), sorted(resent)  # every stream broke off part-way
    return [got[i] for i in range(len(prompts))], [resent[i] for i in range(len(prompts))]


def check_takeover(node: Node, prompts, reference, got, resent, dead: Group) -> None:
    standby = node.parked
    # The whole dead group is gone, and its leader said why (unless it was the one killed).
    wait_until(lambda: all(gone(pid) for pid in dead.ranks), "a rank of the dead group outlived it")
    # No stream could finish before the kill; every one ends, resumed elsewhere, as the undisturbed run did.
    assert all(FEW <= len(g) < MAX_TOKENS for g in got), [len(g) for g in got]
    for i in range(len(prompts)):
        assert got[i] + resent[i]["tokens"] == reference[i], i
    promoted = standby.promoted()
    cached = [r["cached"] for r in resent]
    # The resent prefixes came from the caches both ranks adopted (a rank's garbage KV would have changed
    # the tokens above): every full block of them, but for a stream whose last block was completed by the
    # step the kill interrupted.
    assert all(c > 0 for c in cached), cached
    exact = sum(r["cached"] == (r["len"] - 1) // BLOCK * BLOCK for r in resent)
    assert exact >= len(resent) - 2, [(r["cached"], r["len"]) for r in resent]
    assert promoted["restored_blocks"] >= max(r["len"] for r in resent) // BLOCK
    # Each rank of the promoted group owns its device's kv pool.
    assert node.kv_owners() == standby.ranks
    standby.assert_clean_log()
    node.active, node.parked = standby, None


def test_kill_non_leader_rank_of_active_group_under_load(node, prompts, reference):
    dead = node.active
    standby = node.parked.wait_parked(imported=False)  # started with the active group (test 1 checks it)
    got, resent = run_streams_and_kill(node, prompts, victim_pid=dead.ranks[1])
    assert dead.proc.wait(timeout=60) == EXIT_GROUP_LOST
    lost = dead.wait_for(logged("tp_rank_lost"))
    # Seen through the control channel's hang-up, before waitpid could say how it ended.
    assert (lost["rank"], lost["pid"]) == (1, dead.ranks[1]) and lost["returncode"] in (None, -signal.SIGKILL), lost
    check_takeover(node, prompts, reference, got, resent, dead)
    assert node.active is standby
    node.parked = node.start("--role", "shadow")  # the next test's standby starts now


# -- 3. the leader of the active group dies under load --------------------------------------------------------

def test_kill_leader_of_active_group_under_load(node, prompts, reference):
    dead = node.active
    if node.parked.started_with_active:  # run alone: that group may have published a shard, not imported it
        node.retire_parked()
        node.parked = node.start("--role", "shadow")
    standby = node.parked.wait_parked()
    got, resent = run_streams_and_kill(node, prompts, victim_pid=dead.leader)
    assert dead.proc.wait(timeout=60) == -signal.SIGKILL
    check_takeover(node, prompts, reference, got, resent, dead)  # its worker died with it
    assert node.active is standby
    # Still serving, from the cache both ranks adopted.
    tokens, cached = standby.generate(prompts[0])
    assert tokens == reference[0] and cached == (len(prompts[0]) - 1) // BLOCK * BLOCK


# -- 4. a rank of the standby group dies while it wakes ---------------------------------------------------------

def test_worker_killed_while_its_group_wakes_the_next_standby_group_takes_over(node, prompts, reference):
    """Two standby groups wait; the active group dies and one of them gets the lock. To catch it mid-wake
    deterministically, the test queues for device 1's kv pool before the kill, so it owns that pool when
    the group wakes: the waking group's worker stays blocked in its adoption until it is SIGKILLed. The
    waking group ends (its leader sees the worker die), the other standby group gets the lock, and once
    the test lets go of the pool it takes over with the KV and the prefix cache."""
    from understudy.memory import MemoryClient

    node.retire_parked()  # run alone: the fixture's standby group would be a third in line for the lock
    s1, s2 = node.start("--role", "shadow"), node.start("--role", "shadow")
    s1.wait_parked()
    s2.wait_parked()
    kv1 = lambda: read_status(node.mems[1].path)["pools"]["kv"]  # noqa: E731
    holder: list = []
    queued = threading.Thread(target=lambda: holder.append(
        MemoryClient(node.mems[1].path, "kv", "rw", timeout=60, name="test-holder")), daemon=True)
    queued.start()
    wait_until(lambda: kv1()["waiting_writers"] == 1, "the test never queued for the kv pool")
    dead = node.active
    os.kill(dead.leader, signal.SIGKILL)
    queued.join(timeout=60)
    assert holder, "the kv pool was not handed to the first waiting writer"
    try:
        waking = leader_state("WAKING")
        wait_until(lambda: s1.seen(waking) or s2.seen(waking), "no standby group woke up")
        first, survivor = (s1, s2) if s1.seen(waking) else (s2, s1)
        wait_until(lambda: kv1()["waiting_writers"] == 1, "the waking group's worker never asked for its pool")
        assert first.health()["state"] == "WAKING" and not survivor.seen(waking)
        os.kill(first.ranks[1], signal.SIGKILL)
        assert first.proc.wait(timeout=60) == EXIT_GROUP_LOST
        assert not first.seen(leader_state("ACTIVE"))
        survivor.wait_for(waking)

        def only_survivor_waits() -> bool:
            status = read_status(node.mems[1].path)
            pids = {s["pid"] for s in status["sessions"]}
            return status["pools"]["kv"]["waiting_writers"] == 1 and first.ranks[1] not in pids \
                and survivor.ranks[1] in pids

        wait_until(only_survivor_waits, "the dead worker's place in the kv queue stayed")
    finally:
        for c in holder:
            c.close()
    survivor.promoted()
    wait_until(lambda: all(gone(pid) for pid in [*dead.ranks, *first.ranks]), "a rank of a dead group lived on")
    assert node.kv_owners() == survivor.ranks
    for i in (4, 5):
        tokens, cached = survivor.generate(prompts[i])
        assert tokens == reference[i] and cached == (len(prompts[i]) - 1) // BLOCK * BLOCK, i
    survivor.assert_clean_log()
    node.active = survivor


# -- 5. the memory service of one device dies under load, and comes back ---------------------------------------

def test_memory_service_of_one_device_killed_and_restarted(node, prompts, reference):
    """The group serves on from its mappings; the restarted service gets rank 1's shard and kv pool back from
    the worker that maps them (no disk read), so a new standby group imports from it and later adopts the
    KV with its prefix cache."""
    # Run alone: the fixture's standby group would map rank 1's shard too (so it, not the active group,
    # might give it back to the restarted service) and would be first in line for the lock.
    node.retire_parked()
    active = node.active
    picks = [1, 2, 3]
    got, _ = streams_across(active.url, {i: prompts[i] for i in picks}, MAX_TOKENS,
                            lambda: node.mems[1].kill(signal.SIGKILL))
    assert node.mems[1].proc.returncode == -signal.SIGKILL
    assert all(got[i] == reference[i] for i in picks)
    node.mems[1] = ServerProcess.start(BACKEND, node.dir, "--device", "1")
    recovered = active.wait_for(lambda l: logged("memory_service_recovered")(l) and _event(l).get("tp_rank") == 1)
    assert (recovered["weights"], recovered["kv"]) == ("restored", "restored"), recovered
    status = read_status(node.mems[1].path)
    assert status["pools"]["weights"]["extra"]["tensor_parallel"] == [1, 2]
    assert node.kv_owners() == active.ranks
    # A new standby group maps rank 1's shard from the restarted service, then takes over with the KV.
    standby = node.parked = node.start("--role", "shadow").wait_parked()
    os.kill(active.leader, signal.SIGKILL)
    standby.promoted()
    wait_until(lambda: all(gone(pid) for pid in active.ranks), "a rank of the dead group outlived it")
    assert node.kv_owners() == standby.ranks
    for i in picks:
        tokens, cached = standby.generate(prompts[i])
        assert tokens == reference[i] and cached == (len(prompts[i]) - 1) // BLOCK * BLOCK, i
    standby.assert_clean_log()
    node.active, node.parked = standby, None


# -- 6. a TP=1 engine and a shard ---------------------------------------------------------------------------

def test_tp1_engine_refuses_a_shard(node, workdir):
    """A TP=1 engine never imports a rank's shard: the weights identity names rank and group size."""
    # Run alone, the shards may not be published yet: this engine would publish the whole model first.
    node.active.wait_serving()
    eng = Group(node.dir, node.model, "--role", "shadow", tp=1)
    try:
        rc = eng.proc.wait(timeout=120)
        out = "\n".join(eng.proc.lines + eng.proc.other)
        assert rc != 0 and "rank 0's shard of a --tensor-parallel 2 group" in out, out
    finally:
        eng.close()


def test_a_group_that_cannot_start_says_why_and_leaves_no_rank(node):
    """A group refused after its workers started (a KV budget that holds no block) exits with the reason and
    takes its workers with it; as a shadow it takes no lock, so the node's groups are not disturbed."""
    eng = Group(node.dir, node.model, "--role", "shadow", "--kv-cache-memory", "1KiB")
    try:
        started = eng.wait_for(logged("tp_group_started"), timeout=120)
        rc = eng.proc.wait(timeout=120)
        out = "\n".join(eng.proc.lines + eng.proc.other)
        assert rc == 1 and "holds no block" in out and "raise --kv-cache-memory" in out, out
        assert "Traceback" not in out, out
        wait_until(lambda: all(gone(pid) for pid in started["ranks"].values()), "a rank outlived its group")
    finally:
        eng.close()


# -- 7. understudy up --tensor-parallel 2 --shadows 1 ------------------------------------------------------

def test_up_relaunches_a_standby_group_after_a_kill(workdir, model_dir, prompts):
    sock = workdir / "up"
    port = free_port()
    while True:  # the shadow group listens on port + 1
        try:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            break
        except OSError:
            port = free_port()
    sup = LineProcess([sys.executable, "-m", "understudy", "up", "--tensor-parallel", "2", "--shadows", "1",
                       "--backend", BACKEND, "--socket-dir", str(sock), "--port", str(port), "--",
                       "--model", str(model_dir), "--no-progress", *ENGINE_ARGS], env=ENGINE_ENV, stream="stderr")

    def child_event(name: str, child: str, **fields):
        return lambda l: (e := _event(l)).get("event") == name and e.get("child") == child and "tp_rank" not in e \
            and all(e.get(k) == v for k, v in fields.items())

    try:
        await_line(sup, logged("node_up"), timeout=400)
        _, started = await_line(sup, child_event("tp_group_started", "engine-0"))
        await_line(sup, child_event("waiting_for_failover_lock", "engine-1"), timeout=240)
        state = json.loads((sock / "node.json").read_text())
        assert [c["name"] for c in state["children"]][:2] == ["memory", "memory-1"], state
        url0, url1 = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"
        first = ndjson(httpx.post(f"{url0}/engine/generate", json=body(prompts[1], 8), timeout=120, headers=admin_headers()))
        # SIGKILL the active group's worker: the group exits, the standby group takes over and a new
        # standby group is started on the dead group's port, where it parks.
        worker = started["ranks"]["1"]
        os.kill(worker, signal.SIGKILL)
        await_line(sup, child_event("state", "engine-1", new="ACTIVE"))
        i, exited = await_line(sup, child_event("child_exited", "engine-0"))
        assert exited["returncode"] == EXIT_GROUP_LOST, exited
        i, restarted = await_line(sup, child_event("child_started", "engine-0"), start=i)
        assert restarted["role"] == "shadow"
        _, parked = await_line(sup, child_event("waiting_for_failover_lock", "engine-0"), start=i, timeout=240)
        assert parked["child_pid"] == restarted["pid"] != started["child_pid"]
        _, regroup = await_line(sup, child_event("tp_group_started", "engine-0", child_pid=restarted["pid"]), start=i)
        # the group starts before its HTTP listener: /health answers once "serving" is logged
        await_line(sup, child_event("serving", "engine-0"), start=i)
        h = httpx.get(f"{url0}/health", timeout=10).json()
        assert (h["state"], h["tensor_parallel"], h["rank_pids"]) == (
            "STANDBY", 2, [regroup["ranks"]["0"], regroup["ranks"]["1"]]), h
        again = ndjson(httpx.post(f"{url1}/engine/generate", json=body(prompts[1], 8), timeout=120, headers=admin_headers()))
        assert tokens_of(again) == tokens_of(first)
        sup.proc.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=120) == 0
        wait_until(lambda: all(gone(pid) for pid in regroup["ranks"].values()), "a rank outlived the node")
        # Every group left on SIGTERM by itself (drained, then out without the interpreter's teardown).
        assert not [l for l in sup.lines if _event(l).get("event") == "child_stop_timeout"], sup.lines[-20:]
    finally:
        if sup.proc.poll() is None:  # failed: leave no process of the node behind (each has its own group)
            sup.kill(signal.SIGKILL)
            for line in sup.lines:
                e = _event(line)
                if e.get("event") == "child_started":
                    try:
                        os.killpg(e["pid"], signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass

"""Failover end to end: real `understudy serve` processes on the CPU (host backend), killed with SIGKILL.

One memory server for the module and one "cluster" of engines on it: an active engine (which holds
the device's failover lock and owns the kv pool) and parked shadows (STANDBY, blocked on the lock).
The tests run in file order and hand the cluster on: each one kills the active engine (or the memory
server, last) and leaves the promoted shadow active for the next.

    1. 16 streams run on the primary; it is SIGKILLed; every broken stream is resent (prompt + tokens
       received so far) to the shadow, which must finish it exactly as the undisturbed run did, from
       the prefix cache it adopted with the kv pool.
    2. kill the active engine, promote the next shadow, four more times (five kills in a row).
    3. a request held by a standby is answered once it is promoted; a standby that is never promoted
       answers 503 + Retry-After after --standby-wait.
    4. the active engine and the shadow that wakes first are both killed: the other shadow takes over.
    5. a second --role primary is refused while one is active.
    6. the memory server is SIGKILLed under load: the active engine keeps serving from its mappings.
    7. a new memory server starts: the engines give it back the weights and the KV they map; a new
       shadow imports them and takes over with the prefix cache, nothing read from disk.

Greedy decoding with ignore_eos, so every answer is a fixed-length token list: "no token lost, none
duplicated" is list equality with the undisturbed run. Nothing waits on fixed sleeps: processes are
awaited through their JSON log lines, streams through events.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from understudy.common.auth import admin_headers
from understudy.memory import read_status

from tests.helpers.procs import ServerProcess, free_port, serve_process
from tests.helpers.streams import body, ndjson, streams_across, tokens_of
from tests.helpers.streams import event_of as _event

BACKEND = "host"  # CPU by design: the sizes below assume float32
# 182 blocks of 16 tokens: the 16 streams' blocks and the cached blocks of the undisturbed run fit
# together, so nothing the failover should find in the prefix cache gets evicted first.
KV_MEMORY = "128MiB"
BLOCK = 16
MAX_TOKENS = 24
FEW = 3  # tokens every stream must have received before the kill
ENGINE_ARGS = ["--kv-cache-memory", KV_MEMORY, "--max-model-len", "512", "--block-size", str(BLOCK)]
ENGINE_ENV = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
STORY = ("in a quiet village by the sea, where an old fisherman mended his nets every morning and told "
         "stories to the children every evening about storms, whales and lighthouses.")
TOPICS = ["a red kite", "the last train", "a lost key", "two rival bakers", "a clockmaker", "a snowy pass",
          "a talking crow", "the lighthouse keeper", "a violin", "a stolen map", "a desert well", "a paper boat",
          "an old library", "a broken compass", "the harvest fair", "a sleepy dragon"]


def is_state(new: str):
    return lambda line: (e := _event(line)).get("event") == "state" and e.get("new") == new


def full_blocks(n_tokens: int) -> int:
    """Tokens a request of n_tokens can find in the prefix cache: every full block but the last token's."""
    return (n_tokens - 1) // BLOCK * BLOCK


class Engine:
    """An `understudy serve` process with JSON logs on stderr."""

    def __init__(self, socket_dir: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = serve_process(socket_dir, self.port, *ENGINE_ARGS, *extra, env=ENGINE_ENV, backend=BACKEND)
        self.http = httpx.Client(base_url=self.url, timeout=120, headers=admin_headers())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def seen(self, predicate) -> bool:
        return any(predicate(l) for l in list(self.proc.lines))

    def wait_for(self, predicate, timeout: float = 60.0) -> dict:
        """The first line (already printed or still to come) satisfying predicate, as JSON."""
        for line in list(self.proc.lines):
            if predicate(line):
                return _event(line)
        return _event(self.proc.wait_line(predicate, timeout=timeout))

    def wait_serving(self) -> "Engine":
        self.serving = self.wait_for(lambda l: _event(l).get("event") == "serving", timeout=180)
        return self

    def health(self) -> dict:
        return self.http.get("/health").json()

    def generate(self, token_ids: list[int], max_tokens: int = MAX_TOKENS) -> tuple[list[int], int]:
        """(tokens, cached_tokens) of one greedy request."""
        lines = ndjson(self.http.post("/engine/generate", json=body(token_ids, max_tokens)))
        return tokens_of(lines), lines[-1]["cached_tokens"]

    def kill(self) -> None:
        self.proc.kill(signal.SIGKILL)

    def assert_clean_log(self) -> None:
        bad = [l for l in self.proc.lines if "Traceback" in l or "promotion_failed" in l or '"level": "error"' in l]
        assert not bad, "engine logged errors:\n" + "\n".join(self.proc.lines[-60:])

    def close(self) -> None:
        if self.proc.proc.poll() is None:
            self.proc.kill(signal.SIGKILL)
        self.http.close()


class Cluster:
    """The memory server, the active engine and the parked shadows of one device."""

    def __init__(self, mem: ServerProcess, socket_dir: Path):
        self.mem, self.dir = mem, socket_dir
        self.active: Engine | None = None
        self.parked: list[Engine] = []
        self.engines: list[Engine] = []
        self.kills = 0  # SIGKILLs of the active engine so far

    def start(self, *extra: str) -> Engine:
        eng = Engine(self.dir, *extra)
        self.engines.append(eng)
        return eng

    def park(self, *extra: str) -> Engine:
        """Start a shadow and wait until it is parked on the failover lock."""
        return self.parked_ok(self.start("--role", "shadow", *extra))

    def parked_ok(self, shadow: Engine) -> Engine:
        shadow.wait_serving()
        shadow.wait_for(lambda l: _event(l).get("event") == "waiting_for_failover_lock")
        h = shadow.health()
        assert (h["status"], h["state"], h["routable"], h["role"]) == ("ok", "STANDBY", False, "shadow"), h
        assert (h["weights"], h["kv_adopted"], h["failovers"]) == ("imported", False, 0), h
        self.parked.append(shadow)
        return shadow

    def kill_active(self) -> None:
        self.active.kill()
        self.kills += 1

    def promoted(self, shadow: Engine, timeout: float = 60.0) -> dict:
        """Wait for `shadow` to become ACTIVE; it is now the active engine. Returns its ACTIVE event."""
        shadow.wait_for(is_state("WAKING"), timeout=timeout)
        active = shadow.wait_for(is_state("ACTIVE"), timeout=timeout)
        assert active["switch_s"] >= 0 and active["restored_blocks"] > 0, active
        h = shadow.health()
        assert (h["status"], h["state"], h["routable"], h["kv_adopted"], h["failovers"]) == (
            "ok", "ACTIVE", True, True, 1), h
        assert h["last_switch_s"] is not None and h["last_switch_s"] < 10, h
        self.parked.remove(shadow)
        self.active = shadow
        return active


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(_tokenizer_future):
    d = Path(tempfile.mkdtemp(prefix="us-fo-", dir="/tmp"))  # short: unix socket paths are limited
    mem = ServerProcess.start(BACKEND, d)
    c = Cluster(mem, d)
    try:
        c.active = c.start("--role", "primary").wait_serving()
        h = c.active.health()
        assert (h["state"], h["routable"], h["weights"], h["kv_adopted"]) == ("ACTIVE", True, "published", False)
        yield c
    finally:
        for eng in c.engines:
            eng.close()
        for server in {mem, c.mem}:  # test 7 starts a new memory server
            if server.proc.poll() is None:
                server.stop()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def prompts(_tokenizer_future) -> list[list[int]]:
    tok = _tokenizer_future.result(timeout=180)
    out = [tok.encode(f"Write a short story about {topic}, set {STORY}") for topic in TOPICS]
    assert all(len(p) >= 40 for p in out) and len({tuple(p[:BLOCK]) for p in out}) == len(out)
    return out


@pytest.fixture(scope="module")
def first_shadow(cluster) -> Engine:
    """Started (not yet awaited) before the reference run, so that the two overlap."""
    return cluster.start("--role", "shadow")


@pytest.fixture(scope="module")
def reference(cluster, prompts) -> list[list[int]]:
    """The undisturbed greedy outputs of the 16 prompts, computed on the primary (all at once)."""
    primary = cluster.active
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        outs = list(pool.map(lambda p: primary.generate(p)[0], prompts))
    assert all(len(o) == MAX_TOKENS for o in outs)
    return outs


# -- 1. the active engine dies under 16 streams ----------------------------------------------------

def test_kill_active_engine_under_16_streams_and_resume_on_shadow(cluster, first_shadow, prompts, reference):
    primary = cluster.active
    shadow = cluster.parked_ok(first_shadow)
    n = len(prompts)
    # The client-side retry of a broken stream: the prompt and the tokens received so far, to the shadow
    # (which holds the request until it is active).
    got, resent = streams_across(primary.url, dict(enumerate(prompts)), MAX_TOKENS, cluster.kill_active,
                                 started=FEW, resend_to=shadow.url)
    # Every stream broke off part-way (none could finish: all were mid-way at the kill)...
    assert sorted(resent) == list(range(n)), sorted(resent)
    got, resent = [got[i] for i in range(n)], [resent[i] for i in range(n)]
    assert all(FEW <= len(g) < MAX_TOKENS for g in got), [len(g) for g in got]
    # ...and, resumed on the shadow, ends exactly as the undisturbed run: no token lost or duplicated.
    for i in range(n):
        final = got[i] + resent[i]["tokens"]
        assert final == reference[i], (i, len(got[i]), final, reference[i])
        assert resent[i]["prompt_tokens"] == resent[i]["len"]
    # The shadow took over: ACTIVE, with the kv pool's blocks and their prefix cache.
    promoted = cluster.promoted(shadow)
    # The resent prefixes (prompt + tokens generated by the dead engine) came from the adopted cache:
    # every full block of them.
    cached = [r["cached"] for r in resent]
    assert all(c > 0 for c in cached), cached
    exact = sum(r["cached"] == full_blocks(r["len"]) for r in resent)
    print(f"tokens before the kill: {[len(g) for g in got]}; cached on resend: {cached}; "
          f"every full block cached: {exact}/{n}; restored blocks: {promoted['restored_blocks']}")
    assert exact >= n - 2, [(r["cached"], full_blocks(r["len"])) for r in resent]
    assert promoted["restored_blocks"] >= max(full_blocks(r["len"]) for r in resent) // BLOCK
    # No request reached the engine before it was active; it logged no error.
    states = [(e["old"], e["new"]) for e in map(_event, shadow.proc.lines) if e.get("event") == "state"]
    assert states == [("STANDBY", "WAKING"), ("WAKING", "ACTIVE")]
    shadow.assert_clean_log()
    assert primary.proc.proc.returncode == -signal.SIGKILL


# -- 2. kill after kill --------------------------------------------------------------------------

def test_five_kills_in_a_row(cluster, prompts, reference):
    """Each round: a new shadow parks, the active engine is SIGKILLed, the shadow answers as before."""
    rounds = 5 - cluster.kills  # the first kill was test 1's (all five here when run alone)
    for r in range(rounds):
        shadow = cluster.park()
        assert cluster.active.health()["state"] == "ACTIVE"
        cluster.kill_active()
        cluster.promoted(shadow)
        i = r % len(prompts)
        tokens, cached = shadow.generate(prompts[i])
        assert tokens == reference[i], r
        assert cached == full_blocks(len(prompts[i])), r  # still the first engine's blocks
        shadow.assert_clean_log()
    assert cluster.kills >= 5


# -- 3. requests sent to a standby ------------------------------------------------------------------

def test_request_held_by_standby_is_answered_after_promotion(cluster, prompts, reference):
    shadow = cluster.park()
    i = 5
    result: dict = {}
    done = threading.Event()

    def send():
        try:
            t0 = time.monotonic()
            result["lines"] = ndjson(httpx.post(f"{shadow.url}/engine/generate", json=body(prompts[i], MAX_TOKENS),
                                                timeout=120, headers=admin_headers()))
            result["t"] = time.monotonic() - t0
        except BaseException as e:  # noqa: BLE001
            result["error"] = e
        finally:
            done.set()

    threading.Thread(target=send, daemon=True).start()
    # Held: no answer while the engine is STANDBY (default --standby-wait 30s).
    assert not done.wait(timeout=1.5), result
    assert shadow.health()["state"] == "STANDBY"
    cluster.kill_active()
    cluster.promoted(shadow)
    assert done.wait(timeout=60)
    assert "error" not in result, result
    assert tokens_of(result["lines"]) == reference[i]
    assert result["lines"][-1]["cached_tokens"] == full_blocks(len(prompts[i]))


def test_standby_never_promoted_answers_503_with_retry_after(cluster, prompts):
    shadow = cluster.park("--standby-wait", "1")
    t0 = time.monotonic()
    r = shadow.http.post("/engine/generate", json=body(prompts[0], 4))
    waited = time.monotonic() - t0
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert r.json()["error"]["type"] == "unavailable_error" and "STANDBY" in r.json()["error"]["message"]
    assert 1.0 <= waited < 15, waited
    r = shadow.http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    h = shadow.health()
    assert (h["state"], h["routable"], h["running"], h["waiting"]) == ("STANDBY", False, 0, 0)
    assert cluster.active.health()["state"] == "ACTIVE"  # it stays parked, for the next test


# -- 4. a shadow dies while waking ----------------------------------------------------------------

def test_shadow_killed_while_waking_other_shadow_takes_over(cluster, prompts, reference):
    """Two shadows wait on the lock; the active engine dies and the kernel hands the lock to one of them,
    which is SIGKILLed while WAKING: the other must take over.

    To catch it mid-wake deterministically (a promotion takes milliseconds), the test itself queues for
    the kv pool before the kill, so it owns the pool when the first shadow wakes: that shadow stays
    WAKING, blocked in the adoption, until it is killed. The test then lets go of the pool."""
    from understudy.memory import MemoryClient

    starting = [cluster.start("--role", "shadow") for _ in range(2 - len(cluster.parked))]
    for s in starting:
        cluster.parked_ok(s)
    s1, s2 = cluster.parked[-2:]
    kv_status = lambda: read_status(cluster.mem.path)["pools"]["kv"]  # noqa: E731

    def wait_until(cond, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, what
            time.sleep(0.01)  # polling the memory service's status / the engines' log lines

    holder: list = []
    queued = threading.Thread(target=lambda: holder.append(
        MemoryClient(cluster.mem.path, "kv", "rw", timeout=60, name="test-holder")), daemon=True)
    queued.start()
    wait_until(lambda: kv_status()["waiting_writers"] == 1, "the test never queued for the kv pool")
    cluster.kill_active()
    queued.join(timeout=60)
    assert holder, "the kv pool was not handed to the first waiting writer"
    try:
        waking = is_state("WAKING")
        wait_until(lambda: s1.seen(waking) or s2.seen(waking), "no shadow woke up")
        first, survivor = (s1, s2) if s1.seen(waking) else (s2, s1)
        # It holds the failover lock and waits in the adoption for the kv pool.
        wait_until(lambda: kv_status()["waiting_writers"] == 1, "the waking shadow never asked for the kv pool")
        assert first.health()["state"] == "WAKING" and not survivor.seen(waking)
        first.kill()
        cluster.parked.remove(first)
        assert not first.seen(is_state("ACTIVE"))
        # The lock goes on to the other shadow, which waits for the kv pool in turn.
        survivor.wait_for(waking)
        def only_survivor_waits() -> bool:
            status = read_status(cluster.mem.path)
            pids = {s["pid"] for s in status["sessions"]}
            return status["pools"]["kv"]["waiting_writers"] == 1 and first.pid not in pids and survivor.pid in pids

        wait_until(only_survivor_waits, "the dead shadow's place in the kv queue stayed")
    finally:
        for c in holder:
            c.close()
    cluster.promoted(survivor)
    survivor.assert_clean_log()
    for i in (6, 7):
        tokens, cached = survivor.generate(prompts[i])
        assert tokens == reference[i]
        assert cached == full_blocks(len(prompts[i]))  # the blocks written by the first engine, still there
    # The kv pool has exactly one owner: the survivor (neither the test's nor the dead shadow's session).
    status = read_status(cluster.mem.path)
    kv = status["pools"]["kv"]
    assert kv["state"] == "RW" and kv["writer"]["pid"] == survivor.pid and kv["waiting_writers"] == 0, kv
    assert [s["pid"] for s in status["sessions"] if s["pool"] == "kv"] == [survivor.pid], status["sessions"]


# -- 5. one primary per device -----------------------------------------------------------------------

def test_second_primary_is_refused_while_one_is_active(cluster):
    eng = cluster.start("--role", "primary")
    rc = eng.proc.wait(timeout=120)
    out = "\n".join(eng.proc.lines + eng.proc.other)
    assert rc != 0, out
    assert "held" in out and f"pid {cluster.active.pid}" in out and "--role shadow" in out, out
    assert not eng.seen(lambda l: _event(l).get("event") in ("weights_ready", "serving"))
    assert cluster.active.health()["state"] == "ACTIVE"


# -- 6. the memory service dies under load (last: it is not restarted) ------------------------------

def test_memory_service_killed_under_load_engine_keeps_serving(cluster, prompts, reference):
    active = cluster.active
    picks = [8, 9, 10, 11, 12, 13]
    got, _ = streams_across(active.url, {i: prompts[i] for i in picks}, MAX_TOKENS,
                            lambda: cluster.mem.kill(signal.SIGKILL))
    assert cluster.mem.proc.returncode == -signal.SIGKILL
    for i in picks:
        assert got[i] == reference[i], i
    # New requests, after the memory service is gone.
    for i in (14, 15):
        assert active.generate(prompts[i])[0] == reference[i]
    h = active.health()
    assert (h["state"], h["routable"]) == ("ACTIVE", True)
    active.assert_clean_log()


# -- 7. the restarted memory service gets the engines' memory back ------------------------------------

def recovered(line: str) -> bool:
    return _event(line).get("event") == "memory_service_recovered"


def test_restarted_memory_service_gets_weights_and_kv_back_without_disk(cluster, prompts, reference):
    """After test 6's kill: a new memory service starts (as `understudy up` does). The engines hand it
    what they map: the weights (restored by one, attached by the others) and, from the active engine,
    the kv pool. A new shadow then imports the weights from it, and after the active engine is killed
    adopts the KV with its prefix cache: nothing was read from disk, no prefix recomputed."""
    if cluster.mem.proc.poll() is None:  # run alone: kill it here
        assert cluster.mem.kill(signal.SIGKILL) == -signal.SIGKILL
    cluster.mem = ServerProcess.start(BACKEND, cluster.dir)
    active = cluster.active
    rec = active.wait_for(recovered, timeout=60)
    assert rec["weights"] in ("restored", "attached") and rec["kv"] == "restored", rec
    outcomes = [rec["weights"]]
    for shadow in cluster.parked:
        got = shadow.wait_for(recovered, timeout=60)
        assert got["weights"] in ("restored", "attached") and "kv" not in got, got
        outcomes.append(got["weights"])
    assert outcomes.count("restored") == 1, outcomes  # one engine gave the pool its layout
    status = read_status(cluster.mem.path)
    weights, kv = status["pools"]["weights"], status["pools"]["kv"]
    assert weights["state"] == "RO" and len(weights["readers"]) == 1 + len(cluster.parked), weights
    owner = {s["id"]: s["pid"] for s in status["sessions"]}[kv["writer"]["id"]]
    assert (kv["state"], owner, bool(kv["extra"].get("kv_spec"))) == ("RW", active.pid, True), kv
    assert active.generate(prompts[14])[0] == reference[14]  # still serving, through it all

    for old in list(cluster.parked):  # only the new shadow below may take over
        old.kill()
        cluster.parked.remove(old)
    shadow = cluster.park()  # asserts weights == "imported": from the restored pool, not from disk
    cluster.kill_active()
    cluster.promoted(shadow)
    for i in (14, 15):
        tokens, cached = shadow.generate(prompts[i])
        assert tokens == reference[i] and cached == full_blocks(len(prompts[i])), i
    active.assert_clean_log()
    shadow.assert_clean_log()

"""Chaos on one node: streaming load through two frontends while faults of every kind hit the node.

    python bench/chaos.py                       # 100 faults, tiny random Llama, CPU
    python bench/chaos.py --faults 18 --kinds kill_active stop_active

What runs (all real processes, on the CPU):
  * a 3-member etcd cluster on 127.0.0.1 (tests/helpers/etcd_cluster.py);
  * `understudy up --shadows 1` (memory service, an active engine, a parked shadow) whose engines register
    with etcd through a relay this script can cut (a partition: packets to etcd vanish, no reset), with
    UNDERSTUDY_FAULT_INJECTION=1 so that signals inject step errors and hangs (docs/failover.md);
  * two `understudy frontend --discovery etcd://...` on the same cluster;
  * N clients (the official `openai` client) streaming greedy completions of fixed prompts; a client whose
    frontend fails retries the request on the other one (what a client with two endpoints does).

Faults, one at a time, each once the node is whole again (one ACTIVE engine, one parked shadow, both
frontends healthy, every etcd member healthy, the engines registered, a probe request answered right):
  kill_active, kill_shadow, kill_memory, kill_frontend   SIGKILL of that process (group)
  stop_active     SIGSTOP of the active engine (a hang of the whole process: `up` must notice and kill it)
  step_error      the active engine's next step raises (SIGUSR1: it must fail fast, the shadow takes over)
  hang_step       the active engine's next step hangs in its engine thread (SIGURG: /live says so, `up` kills)
  etcd_member     SIGKILL of an etcd follower (restarted once the cluster has a leader again)
  etcd_leader     SIGKILL of the etcd leader (restarted likewise)
  partition       the engines cut from etcd for 2 x the registration TTL, then healed

Prints per fault kind: count, requests that overlapped it, failed client requests (after retries on the
other frontend), changed greedy outputs, retries, and the time from the fault to a whole node (p50 / max).
The baseline, measured in the same run: the same load with no fault, for the requests' p50 latency.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import PY, Proc, free_port  # noqa: E402  (bench/common.py puts the repository root on the path)

import httpx  # noqa: E402
import openai  # noqa: E402

from tests.helpers.etcd_cluster import EtcdCluster  # noqa: E402
from tests.helpers.tiny_model import make_tiny_llama  # noqa: E402

KINDS = ("kill_active", "kill_shadow", "kill_memory", "kill_frontend", "stop_active", "step_error", "hang_step",
         "etcd_member", "etcd_leader", "partition")
PROMPTS = ["The quick brown fox", "Once upon a time", "In the beginning", "Hello, world", "1 2 3 4 5",
           "To be or not to be", "A long time ago", "It was a dark and stormy night"]
ACTIVE_FAULTS = ("kill_active", "stop_active", "step_error", "hang_step")  # the shadow must take over
TTL = 2.0  # the engines' --registration-ttl


# -- a relay the engines reach etcd through; cutting it is a partition ------------------------------------

class Relay:
    """TCP relay 127.0.0.1:port -> target. `cut()` blackholes it: open connections stop carrying bytes and
    new ones are accepted and never answered (as a partition looks to the engines: timeouts, no reset);
    `heal()` drops the blackholed connections and relays again."""

    def __init__(self, target_port: int):
        self.target = target_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.open = threading.Event()
        self.open.set()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.server.accept()
            with self.lock:
                self.conns.append(client)
            if not self.open.is_set():
                continue  # a blackhole: accepted, never answered
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=2)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self.lock:
                self.conns.append(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                self.open.wait()  # cut: the bytes go nowhere until healed (then the connection is dropped)
                if not self.open.is_set():
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        self.open.clear()

    def heal(self) -> None:
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:  # what was blackholed is gone for good, as after a real partition's timeouts
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass
        self.open.set()


# -- the client load -----------------------------------------------------------------------------------

@dataclass
class Outcome:
    start: float
    end: float
    ok: bool
    changed: bool
    retries: int
    error: str | None = None


@dataclass
class Load:
    frontends: list[str]
    model: str
    expected: dict[str, str]
    max_tokens: int
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def clients(self) -> list[openai.OpenAI]:
        return [openai.OpenAI(base_url=f"{u}/v1", api_key="-", max_retries=0, timeout=60) for u in self.frontends]

    def one(self, clients: list[openai.OpenAI], prompt: str, first: int, attempts: int = 8) -> Outcome:
        t0 = time.monotonic()
        error = None
        for attempt in range(attempts):
            client = clients[(first + attempt) % len(clients)]
            try:
                text = "".join(c.choices[0].text for c in client.completions.create(
                    model=self.model, prompt=prompt, max_tokens=self.max_tokens, temperature=0, stream=True)
                    if c.choices)
                expected = self.expected.get(prompt)
                return Outcome(t0, time.monotonic(), True, expected is not None and text != expected, attempt)
            except (openai.APIError, httpx.HTTPError) as e:
                error = f"{type(e).__name__}: {e}"
                time.sleep(0.2 * (attempt + 1))  # the other frontend next; a dead one is being restarted
        return Outcome(t0, time.monotonic(), False, False, attempts - 1, error)

    def run_client(self, k: int) -> None:
        clients = self.clients()
        rng = random.Random(k)
        while not self.stop.is_set():
            out = self.one(clients, rng.choice(PROMPTS), first=k)
            self.outcomes.append(out)


# -- the node -----------------------------------------------------------------------------------------

class Node:
    def __init__(self, model: Path, etcd: EtcdCluster):
        self.socket_dir = Path(tempfile.mkdtemp(prefix="us-chaos-", dir="/tmp"))
        self.etcd = etcd
        self.relays = [Relay(m.client_port) for m in etcd.members]
        register = "etcd://" + ",".join(f"127.0.0.1:{r.port}" for r in self.relays)
        self.port = free_port()
        while True:  # engine i listens on port + i
            try:
                socket.create_server(("127.0.0.1", self.port + 1)).close()
                break
            except OSError:
                self.port = free_port()
        self.model = model
        engine_args = ["--model", str(model), "--kv-cache-memory", "32MiB", "--max-model-len", "512",
                       "--no-progress", "--register", register, "--registration-ttl", str(TTL),
                       "--standby-wait", "30"]
        # Chaos kills what was just restarted, on purpose: that is not a crash loop, so no back-off grows.
        self.up = Proc([*PY, "up", "--shadows", "1", "--port", str(self.port), "--socket-dir",
                        str(self.socket_dir), "--restart-reset-after", "0.5", "--log-format", "json", "--",
                        *engine_args],
                       env={"UNDERSTUDY_FAULT_INJECTION": "1"})
        self.frontend_ports = [free_port(), free_port()]
        self.frontends: list[Proc | None] = [None, None]
        for i in range(2):
            self.start_frontend(i)

    def start_frontend(self, i: int) -> None:
        self.frontends[i] = Proc([*PY, "frontend", "--port", str(self.frontend_ports[i]), "--model",
                                  str(self.model), "--discovery", self.etcd.url, "--health-interval", "0.2",
                                  "--log-format", "json"])
        self.frontends[i].wait_event("serving", timeout=120)

    @property
    def frontend_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.frontend_ports]

    def status(self) -> dict:
        from understudy.node.supervisor import node_status

        return node_status(self.socket_dir)

    def engines(self) -> dict[str, dict]:
        """{state: child} of the engines that are alive (ACTIVE, STANDBY, ...)."""
        out = {}
        for c in self.status()["children"]:
            if c["name"].startswith("engine") and c.get("alive"):
                out.setdefault(c.get("health", {}).get("state", "?"), c)
        return out

    def pid_of(self, name: str) -> int:
        return next(c["pid"] for c in self.status()["children"] if c["name"] == name)

    def serving_memory_pid(self) -> int:
        """The memory service that serves (after a takeover that may be the twin; the other stands by)."""
        return next(c["pid"] for c in self.status()["children"]
                    if c["name"].startswith("memory") and c.get("state") == "SERVING")

    def whole(self, probe) -> str | None:
        """None when the node is whole, else what is missing."""
        try:
            st = self.status()
        except (OSError, ValueError) as e:
            return f"node.json: {e}"
        states = sorted(c.get("health", {}).get("state", "-") for c in st["children"]
                        if c["name"].startswith("engine"))
        if not all(c.get("alive") for c in st["children"]):
            return "a child is not running"
        if states != ["ACTIVE", "STANDBY"]:
            return f"engines {states}"
        for url in self.frontend_urls:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code != 200:
                    return f"{url} not healthy"
            except httpx.HTTPError:
                return f"{url} unreachable"
        if not all(m.alive for m in self.etcd.members) or self.etcd.leader() is None:
            return "etcd not whole"
        try:
            if len(self.etcd.keys()) < 2:
                return "engines not registered"
        except AssertionError:
            return "etcd not answering"
        if not probe():
            return "probe request failed"
        return None

    def close(self) -> None:
        for f in self.frontends:
            if f is not None:
                f.stop()
        self.up.stop()
        shutil.rmtree(self.socket_dir, ignore_errors=True)


# -- faults -------------------------------------------------------------------------------------------

def inject(node: Node, kind: str, rng: random.Random) -> callable:
    """Do the fault; returns what to do once it has been noticed (restart etcd, heal), or None."""
    engines = node.engines()
    if kind in ("kill_active", "stop_active", "step_error", "hang_step"):
        pid = engines["ACTIVE"]["pid"]
        sig = {"kill_active": signal.SIGKILL, "stop_active": signal.SIGSTOP, "step_error": signal.SIGUSR1,
               "hang_step": signal.SIGURG}[kind]
        os.kill(pid, sig) if kind in ("step_error", "hang_step") else os.killpg(pid, sig)
        return None
    if kind == "kill_shadow":
        os.killpg(engines["STANDBY"]["pid"], signal.SIGKILL)
        return None
    if kind == "kill_memory":
        os.killpg(node.serving_memory_pid(), signal.SIGKILL)
        return None
    if kind == "kill_frontend":
        i = rng.randrange(2)
        node.frontends[i].kill()
        return lambda: node.start_frontend(i)
    if kind in ("etcd_member", "etcd_leader"):
        lead = node.etcd.leader()
        i = lead if kind == "etcd_leader" else rng.choice([j for j in range(3) if j != lead])
        node.etcd.kill(i)

        def back():
            node.etcd.wait_healthy(60)  # the two left elect a leader (if it was the leader)
            node.etcd.restart(i)
        return back
    if kind == "partition":
        for r in node.relays:
            r.cut()

        def heal():
            time.sleep(2 * TTL)  # long enough for the engines' leases to run out
            for r in node.relays:
                r.heal()
        return heal
    raise ValueError(kind)


def wait_whole(node: Node, probe, timeout: float) -> float:
    t0 = time.monotonic()
    why = None
    while time.monotonic() - t0 < timeout:
        why = node.whole(probe)
        if why is None:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise RuntimeError(f"the node was not whole {timeout:.0f} s after the fault: {why}")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faults", type=int, default=100, help="faults to inject, round robin over --kinds")
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    ap.add_argument("--clients", type=int, default=4, help="concurrent streaming clients")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--baseline-s", type=float, default=10.0, help="seconds of load with no fault, first")
    ap.add_argument("--recover-timeout", type=float, default=180.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write every number to this file")
    args = ap.parse_args()
    rng = random.Random(args.seed)

    workdir = Path(tempfile.mkdtemp(prefix="us-chaos-model-"))
    model = make_tiny_llama(workdir / "tiny")
    etcd = EtcdCluster(3)
    node = None
    try:
        node = Node(model, etcd)
        node.up.wait_event("waiting_for_failover_lock", timeout=300)  # the shadow parked
        probe_client = openai.OpenAI(base_url=f"{node.frontend_urls[0]}/v1", api_key="-", max_retries=0,
                                     timeout=30)
        name = model.name
        deadline = time.monotonic() + 300
        while node.whole(lambda: True) is not None:
            assert time.monotonic() < deadline, node.whole(lambda: True)
            time.sleep(0.2)
        load = Load(node.frontend_urls, name, {}, args.max_tokens)
        undisturbed = load.clients()[0]  # the greedy answers before any fault
        load.expected = {p: "".join(c.choices[0].text for c in undisturbed.completions.create(
            model=name, prompt=p, max_tokens=args.max_tokens, temperature=0, stream=True) if c.choices)
            for p in PROMPTS}

        def probe() -> bool:
            try:
                r = probe_client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=args.max_tokens,
                                                    temperature=0)
                return r.choices[0].text == load.expected[PROMPTS[0]]
            except (openai.APIError, httpx.HTTPError):
                return False

        threads = [threading.Thread(target=load.run_client, args=(k,), daemon=True) for k in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(args.baseline_s)  # the no-fault baseline: a stretch of plain load, measured below
        baseline_end = time.monotonic()
        faults = []
        for n in range(args.faults):
            kind = args.kinds[n % len(args.kinds)]
            deadline = time.monotonic() + args.recover_timeout
            while (why := node.whole(probe)) is not None:  # each fault hits a whole node
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not whole before fault {n + 1}: {why}")
                time.sleep(0.1)
            victim = node.engines().get("ACTIVE", {}).get("pid")
            seen = len(node.up.events)
            t0, wall0 = time.monotonic(), time.time()
            after = inject(node, kind, rng)
            if after is not None:
                after()
            wait_whole(node, probe, args.recover_timeout)
            t1 = time.monotonic()
            # Served again: another engine went ACTIVE (its own log line's clock), for faults of the active one.
            promoted = [e["ts"] - wall0 for e in node.up.events[seen:] if e.get("event") == "state"
                        and e.get("new") == "ACTIVE" and e.get("child_pid") != victim]
            active_s = min(promoted) if kind in ACTIVE_FAULTS and promoted else None
            faults.append({"kind": kind, "t0": t0, "t1": t1, "recover_s": t1 - t0, "active_s": active_s})
            print(f"fault {n + 1:3d} {kind:14s} whole again after {t1 - t0:6.2f} s"
                  + (f", another engine ACTIVE after {active_s * 1000:7.1f} ms" if active_s is not None else ""),
                  flush=True)
        load.stop.set()
        for t in threads:
            t.join(timeout=120)
    finally:
        if node is not None:
            node.close()
        etcd.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    base = [o for o in load.outcomes if o.end <= baseline_end]
    print(f"\nbaseline (no fault, {args.baseline_s:.0f} s): {len(base)} requests, "
          f"latency p50 {pct([o.end - o.start for o in base], 0.5) * 1000:.0f} ms, "
          f"failed {sum(not o.ok for o in base)}, changed {sum(o.changed for o in base)}")
    print("requests: those that overlapped a fault; retried: answered after a retryable error (a 503 +")
    print("Retry-After, a dead frontend) on the other frontend; whole: fault -> node whole again (a new parked")
    print("shadow included); active: fault -> another engine ACTIVE (the shadow took over)")
    print(f"{'fault':14s} {'count':>5s} {'requests':>8s} {'failed':>6s} {'changed':>7s} {'retried':>7s} "
          f"{'whole p50':>9s} {'max':>7s} {'active p50':>10s} {'max':>9s}")
    rows = {}
    for kind in args.kinds:
        fs = [f for f in faults if f["kind"] == kind]
        hit = [o for o in load.outcomes if any(o.start < f["t1"] and o.end > f["t0"] for f in fs)]
        row = {"count": len(fs), "requests": len(hit), "failed": sum(not o.ok for o in hit),
               "changed": sum(o.changed for o in hit), "retried": sum(o.retries > 0 for o in hit),
               "whole_p50_s": pct([f["recover_s"] for f in fs], 0.5),
               "whole_max_s": max((f["recover_s"] for f in fs), default=float("nan")),
               "active_p50_ms": pct([f["active_s"] * 1000 for f in fs if f["active_s"] is not None], 0.5),
               "active_max_ms": max((f["active_s"] * 1000 for f in fs if f["active_s"] is not None),
                                    default=float("nan"))}
        rows[kind] = row
        print(f"{kind:14s} {row['count']:5d} {row['requests']:8d} {row['failed']:6d} {row['changed']:7d} "
              f"{row['retried']:7d} {row['whole_p50_s']:8.2f}s {row['whole_max_s']:6.2f}s "
              f"{row['active_p50_ms']:8.0f}ms {row['active_max_ms']:7.0f}ms")
    total = load.outcomes
    failed = [o for o in total if not o.ok]
    print(f"all: {len(faults)} faults, {len(total)} requests, {len(failed)} failed, "
          f"{sum(o.changed for o in total)} changed outputs")
    for o in failed[:5]:
        print(f"  failed: {o.error}")
    if args.json:
        Path(args.json).write_text(json.dumps({"faults": faults, "rows": rows, "requests": len(total),
                                               "failed": len(failed)}, indent=1))
    return 0 if not failed and not any(o.changed for o in total) else 1


if __name__ == "__main__":
    sys.exit(main())

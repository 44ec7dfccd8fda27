"""A real etcd cluster of real processes on 127.0.0.1, for the infrastructure-fault tests.

    cluster = EtcdCluster(3)              # 3 members, free client and peer ports, own data dirs
    cluster.url                           # etcd://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3
    cluster.leader()                      # index of the member that leads now
    cluster.kill(i)                       # SIGKILL one member (its data dir stays)
    cluster.restart(i)                    # the same member again, from its data dir: it rejoins
    cluster.kill_all(); cluster.fresh()   # a new, empty cluster on the same client ports
    cluster.wait_healthy()                # every running member has a leader and answers
    cluster.keys(), cluster.lease_ttl(id), cluster.metric(i, name)   # what etcd holds, through its HTTP API

Readiness is awaited as an event: each member's own /health endpoint saying "true" (etcd 3.4 answers
"true" only once the member sees a leader) and the members agreeing on one leader; never a sleep.
Members may also listen on extra addresses (`extra_hosts`), e.g. one that a network namespace reaches.
"""

from __future__ import annotations

import base64
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.helpers.procs import free_port


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    proc: subprocess.Popen | None = None

    @property
    def client(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class EtcdCluster:
    def __init__(self, size: int = 3, extra_hosts: tuple[str, ...] = (), timeout: float = 60.0):
        self.exe = shutil.which("etcd")
        assert self.exe, "etcd is not installed: apt-get install etcd-server (the CI script installs it)"
        self.root = Path(tempfile.mkdtemp(prefix="us-etcdc-"))
        self.extra_hosts = extra_hosts
        self.members = [Member(f"m{i}", free_port(), free_port()) for i in range(size)]
        self.generation = 0  # a new one per fresh(): its own data dirs and cluster token
        self.http = httpx.Client(timeout=2.0)
        for i in range(size):
            self._start(i, new=True)
        self.wait_healthy(timeout)

    # -- addresses ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self.url_on("127.0.0.1")

    def url_on(self, host: str) -> str:
        """etcd://HOST:P1,HOST:P2,... (host: 127.0.0.1 or one of extra_hosts)."""
        return "etcd://" + ",".join(f"{host}:{m.client_port}" for m in self.members)

    # -- processes ---------------------------------------------------------------------------------

    def _data_dir(self, i: int) -> Path:
        return self.root / f"g{self.generation}" / self.members[i].name

    def _start(self, i: int, new: bool) -> None:
        m = self.members[i]
        assert not m.alive, f"{m.name} runs already"
        listen = ",".join(f"http://{h}:{m.client_port}" for h in ("127.0.0.1", *self.extra_hosts))
        initial = ",".join(f"{x.name}={x.peer}" for x in self.members)
        data = self._data_dir(i)
        data.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.root / f"{m.name}.log", "a")
        log.write(f"--- start (generation {self.generation}, {'new' if new else 'existing'})\n")
        log.flush()
        m.proc = subprocess.Popen(
            [self.exe, "--name", m.name, "--data-dir", str(data),
             "--listen-client-urls", listen, "--advertise-client-urls", m.client,
             "--listen-peer-urls", m.peer, "--initial-advertise-peer-urls", m.peer,
             "--initial-cluster", initial, "--initial-cluster-token", f"us-{self.root.name}-g{self.generation}",
             "--initial-cluster-state", "new",  # ignored once the data dir holds a member (a restart)
             "--heartbeat-interval", "100", "--election-timeout", "1000",
             "--logger", "zap", "--log-outputs", "stderr"],
            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        log.close()

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        m = self.members[i]
        if m.alive:
            m.proc.send_signal(sig)
            m.proc.wait(timeout=30)

    def restart(self, i: int) -> None:
        """The same member from its data dir: it rejoins the cluster (its leases come back with it)."""
        self._start(i, new=False)

    def kill_all(self) -> None:
        for i in range(len(self.members)):
            self.kill(i)

    def start_all(self) -> None:
        for i, m in enumerate(self.members):
            if not m.alive:
                self._start(i, new=False)

    def fresh(self) -> None:
        """A brand-new, empty cluster on the same client ports (etcd replaced, nothing remembered)."""
        assert not any(m.alive for m in self.members), "kill_all() first"
        self.generation += 1
        for i in range(len(self.members)):
            self._start(i, new=True)

    def stop(self) -> None:
        for m in self.members:
            if m.alive:
                m.proc.terminate()
                try:
                    m.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    m.proc.kill()
                    m.proc.wait()
        self.http.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self, i: int) -> str:
        return (self.root / f"{self.members[i].name}.log").read_text(errors="replace")

    # -- state -------------------------------------------------------------------------------------

    def _post(self, i: int, path: str, body: dict) -> dict | None:
        try:
            r = self.http.post(self.members[i].client + path, json=body)
            return r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def _status(self, i: int) -> tuple[str, str] | None:
        """(this member's id, the leader's id as it sees it), or None when it does not answer."""
        s = self._post(i, "/v3/maintenance/status", {})
        if not s or not s.get("leader"):
            return None
        return s["header"]["member_id"], s["leader"]

    def _healthy(self, i: int) -> bool:
        try:
            return self.http.get(self.members[i].client + "/health").json().get("health") == "true"
        except (httpx.HTTPError, ValueError):
            return False

    def leader(self) -> int | None:
        """The index of the running member the running members agree leads, or None."""
        seen = {i: self._status(i) for i, m in enumerate(self.members) if m.alive}
        leaders = {s[1] for s in seen.values() if s}
        if len(leaders) != 1 or None in seen.values():
            return None
        [lead] = leaders
        return next((i for i, s in seen.items() if s[0] == lead), None)

    def wait_healthy(self, timeout: float = 60.0) -> int:
        """Until every running member says healthy and all agree on a leader; returns the leader's index."""
        deadline = time.monotonic() + timeout
        while True:
            for i, m in enumerate(self.members):
                if m.proc is not None and m.proc.poll() is not None and m.proc.returncode not in (-9, -15):
                    raise AssertionError(f"etcd {m.name} exited {m.proc.returncode}:\n{self.log(i)[-3000:]}")
            alive = [i for i, m in enumerate(self.members) if m.alive]
            if alive and all(self._healthy(i) for i in alive):
                lead = self.leader()
                if lead is not None:
                    return lead
            assert time.monotonic() < deadline, "the etcd cluster did not become healthy:\n" + "\n".join(
                self.log(i)[-1500:] for i in alive)
            time.sleep(0.05)

    def keys(self, prefix: str = "/understudy/engines/") -> dict[str, int]:
        """{key without the prefix: its lease id} now, read through any running member."""
        enc = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        for i, m in enumerate(self.members):
            if m.alive:
                got = self._post(i, "/v3/kv/range", {"key": enc(prefix), "range_end": enc(end)})
                if got is not None:
                    return {base64.b64decode(kv["key"]).decode()[len(prefix):]: int(kv.get("lease", 0))
                            for kv in got.get("kvs", [])}
        raise AssertionError("no etcd member answers")

    def lease_ttl(self, lease: int) -> int | None:
        """Whole seconds left on a lease (-1: etcd does not know it), or None when no member answers."""
        for i, m in enumerate(self.members):
            if m.alive:
                got = self._post(i, "/v3/lease/timetolive", {"ID": str(lease)})
                if got is not None:
                    return int(got.get("TTL", -1))
        return None

    def metric(self, i: int, name: str) -> float:
        """One of member i's Prometheus metrics (0 when it does not answer or lacks it)."""
        try:
            text = self.http.get(self.members[i].client + "/metrics").text
        except httpx.HTTPError:
            return 0.0
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

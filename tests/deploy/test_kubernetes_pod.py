"""The engine pod of deploy/kubernetes/base run as kubelet would run it, on the CPU: the containers' own
commands, hooks and probes, taken from the rendered manifest (host backend, a tiny model, free ports and
temporary paths for /run/understudy and each container's /tmp/memory.pid; nothing else changed). The memory
sidecars' startup probes gate the engines (memory serves, memory-standby parks), engine-a's postStart hook
gates engine-b, engine-b parks as the shadow; after engine-a's SIGKILL the shadow is active and engine-a,
restarted with the same command, comes back as the shadow (the role script); after the serving memory
service's SIGKILL memory-standby serves the socket, the engines hand it their memory and keep answering, and
memory, restarted, parks as the new standby; SIGTERM to the containers, then to the sidecars (kubelet's order:
the later one first) ends everything with exit code 0. The memory probes tell serving, parked and hung apart."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from tests.deploy.test_kubernetes import TARGETS, by_kind, engine_pod, env_of, expand, render
from tests.helpers.frontend import wait_until
from tests.helpers.procs import free_port, two_free_ports
from tests.helpers.tiny_model import make_tiny_llama


class Pod:
    """The pod's containers as processes with the manifest's commands, a few words swapped for the CPU."""

    def __init__(self, tmp: Path):
        docs = by_kind(render(TARGETS["base"]))
        self.spec = engine_pod(docs)
        [self.frontend] = docs["Deployment", "understudy-frontend"]["spec"]["template"]["spec"]["containers"]
        self.run = Path(tempfile.mkdtemp(prefix="us-pod-", dir="/tmp"))  # socket paths must stay short
        self.model = make_tiny_llama(tmp / "tiny")
        port, self.fport = two_free_ports(), free_port()
        self.ports = {"engine-a": port, "engine-b": port + 1}
        self.mports = {"memory": free_port(), "memory-standby": free_port()}
        self.swap = {"cuda": "host", "/run/understudy": str(self.run), "8GiB": "16MiB", "8080": str(self.fport)}
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                    "OMP_NUM_THREADS": "1", "POD_IP": "127.0.0.1", "UNDERSTUDY_ADMIN_TOKEN": "pod-test-token",
                    "UNDERSTUDY_REGISTER": f"http://127.0.0.1:{self.fport}"}
        self.logs = tmp
        self.procs: dict[str, subprocess.Popen] = {}

    def words(self, container: dict, words: list[str]) -> tuple[list[str], dict]:
        env = {**{k: v for k, v in env_of(container).items() if v is not None}, **self.env_for(container)}
        # Each container has a /tmp of its own; these processes share one.
        swap = {**self.swap, "/tmp/memory.pid": str(self.logs / f"{container['name']}.pid")}
        out = []
        for w in words:
            w = expand(w, env)
            for old, new in swap.items():
                w = w.replace(old, new) if old.startswith("/") else (new if w == old else w)
            out.append(w)
        return out, {**self.env, **env}

    def env_for(self, container: dict) -> dict:
        if container["name"] in self.ports:
            return {"UNDERSTUDY_PORT": str(self.ports[container["name"]]),
                    "UNDERSTUDY_REGISTER": self.env["UNDERSTUDY_REGISTER"], "POD_IP": "127.0.0.1"}
        if container["name"] in self.mports:
            return {"UNDERSTUDY_METRICS_PORT": str(self.mports[container["name"]])}
        return {}

    def start(self, container: dict) -> None:
        extra = ["--model", str(self.model)] if container["name"] not in self.mports else []
        if container["name"] in self.ports:
            extra += ["--max-model-len", "256"]
        argv, env = self.words(container, container["command"] + container["args"] + extra)
        log = open(self.logs / f"{container['name']}.log", "a")
        self.procs[container["name"]] = subprocess.Popen(argv, env=env, stdout=log, stderr=log,
                                                         stdin=subprocess.DEVNULL)

    def exec_(self, container: dict, command: list[str]) -> int:
        """A probe or hook's exec command, in the container's environment."""
        argv, env = self.words(container, command)
        return subprocess.run(argv, env=env, timeout=620).returncode

    def container(self, name: str) -> dict:
        return next(c for c in self.spec["initContainers"] + self.spec["containers"] if c["name"] == name)

    def probe(self, name: str, probe: str) -> int:
        container = self.container(name)
        return self.exec_(container, container[probe]["exec"]["command"])

    def serving_pid(self) -> int | None:
        """The pid of the memory service that answers on the device's socket."""
        from understudy.memory.client import read_status

        try:
            [path] = self.run.glob("memory-*.sock")
            return read_status(path, timeout=5)["pid"]
        except (ValueError, OSError):
            return None

    def start_memory(self) -> None:
        """The two sidecars in kubelet's order: each once the one before passed its startup probe."""
        for name in self.mports:
            assert self.probe(name, "startupProbe") != 0  # not before it runs (no pid file, no lock)
            self.start(self.container(name))
            wait_until(lambda: self.probe(name, "startupProbe") == 0, f"{name}'s startup probe\n{self.log()}", 60,
                       every=0.2)

    def log(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.logs.glob("*.log")))


def get(port: int, path: str) -> httpx.Response | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)
    except httpx.HTTPError:
        return None


def test_memory_probes_tell_serving_parked_and_hung(tmp_path):
    """Both sidecars run `memory-server --standby`: the first serves, the second parks. Startup probe: true for
    both once started (the lock held or waited on). Liveness: the serving one must answer /metrics (a stopped
    process fails it), the parked one passes without listening anywhere."""
    pod = Pod(tmp_path)
    try:
        pod.start_memory()
        serving, parked = pod.procs["memory"], pod.procs["memory-standby"]
        assert pod.serving_pid() == serving.pid
        assert get(pod.mports["memory"], "/metrics").status_code == 200
        assert get(pod.mports["memory-standby"], "/metrics") is None  # parked: no listener yet
        assert pod.probe("memory", "livenessProbe") == 0 and pod.probe("memory-standby", "livenessProbe") == 0
        serving.send_signal(signal.SIGSTOP)  # hung: holds the lock, answers nothing
        try:
            assert pod.probe("memory", "livenessProbe") != 0
            assert pod.probe("memory-standby", "livenessProbe") == 0
        finally:
            serving.send_signal(signal.SIGCONT)
        assert pod.probe("memory", "livenessProbe") == 0
        assert parked.poll() is None and serving.poll() is None
    finally:
        _tear_down(pod)


def test_the_engine_pod_as_kubelet_runs_it(tmp_path):
    pod = Pod(tmp_path)
    memory, engine_a, engine_b = (pod.container(n) for n in ("memory", "engine-a", "engine-b"))
    try:
        pod.start(pod.frontend)
        pod.start_memory()  # the native sidecars first; the engines once their startup probes pass
        assert pod.serving_pid() == pod.procs["memory"].pid  # and memory-standby parked
        pod.start(engine_a)
        assert pod.exec_(engine_a, engine_a["lifecycle"]["postStart"]["exec"]["command"]) == 0, pod.log()
        pod.start(engine_b)

        def engines() -> dict[int, dict]:
            r = get(pod.fport, "/health")
            return {int(e["url"].rsplit(":", 1)[1]): e for e in r.json()["engines"]} if r is not None else {}

        a, b = pod.ports["engine-a"], pod.ports["engine-b"]
        wait_until(lambda: {p: e["status"] for p, e in engines().items()} == {a: "ACTIVE", b: "STANDBY"},
                   f"engine-a ACTIVE and engine-b parked, seen by the frontend\n{pod.log()}", 180, every=0.2)
        # Through the frontend: /engine/generate on the engine with the pod's admin token (the Secret's env).
        r = httpx.post(f"http://127.0.0.1:{pod.fport}/v1/completions", timeout=60,
                       json={"prompt": "pods", "max_tokens": 4, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
        for c in (engine_a, engine_b):  # the probes' paths, as kubelet sends them (on this test's ports)
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                r = get(pod.ports[c["name"]], c[probe]["httpGet"]["path"])
                assert r is not None and r.status_code == 200, (c["name"], probe)

        # engine-a dies; the shadow takes over; kubelet restarts engine-a with the same command: a shadow now.
        pod.procs["engine-a"].send_signal(signal.SIGKILL)
        pod.procs["engine-a"].wait()
        wait_until(lambda: engines().get(b, {}).get("status") == "ACTIVE", "engine-b ACTIVE", 60, every=0.1)
        pod.start(engine_a)
        restarted = wait_until(lambda: (e := engines().get(a)) and e["pid"] == pod.procs["engine-a"].pid and e,
                               f"the restarted engine-a registered\n{pod.log()}", 120, every=0.2)
        assert restarted["role"] == "shadow"
        wait_until(lambda: engines().get(a, {}).get("status") == "STANDBY", "engine-a parked", 60, every=0.2)
        assert pod.procs["engine-b"].poll() is None  # not a second primary: nobody was refused or killed

        # The serving memory service dies: memory-standby serves the socket, the engines hand it their memory
        # and go on answering; kubelet restarts memory with the same command: it parks as the new standby.
        pod.procs["memory"].send_signal(signal.SIGKILL)
        pod.procs["memory"].wait()
        standby = pod.procs["memory-standby"]
        wait_until(lambda: pod.serving_pid() == standby.pid, f"memory-standby serving\n{pod.log()}", 30, every=0.05)

        def weights_back() -> bool:
            from understudy.memory.client import read_status

            [path] = pod.run.glob("memory-*.sock")
            return read_status(path)["pools"]["weights"]["state"] != "EMPTY"

        wait_until(weights_back, f"the engines' weights handed to memory-standby\n{pod.log()}", 60, every=0.1)
        r = httpx.post(f"http://127.0.0.1:{pod.fport}/v1/completions", timeout=60,
                       json={"prompt": "sidecars", "max_tokens": 4, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
        pod.start(memory)
        wait_until(lambda: pod.probe("memory", "startupProbe") == 0, f"memory parked\n{pod.log()}", 60, every=0.2)
        assert pod.serving_pid() == standby.pid and pod.procs["memory"].poll() is None
        assert get(pod.mports["memory-standby"], "/metrics").status_code == 200
        assert pod.probe("memory", "livenessProbe") == 0 and pod.probe("memory-standby", "livenessProbe") == 0
        assert {p: e["status"] for p, e in engines().items()} == {a: "STANDBY", b: "ACTIVE"}

        # Pod deletion: SIGTERM to the containers together, then to the sidecars once they have exited, the
        # later one first: memory-standby (serving) stops and memory takes over until its own SIGTERM.
        for name in ("frontend", "engine-a", "engine-b"):
            pod.procs[name].send_signal(signal.SIGTERM)
        codes = {name: pod.procs[name].wait(timeout=45) for name in ("frontend", "engine-a", "engine-b")}
        standby.send_signal(signal.SIGTERM)
        codes["memory-standby"] = standby.wait(timeout=30)
        wait_until(lambda: pod.serving_pid() == pod.procs["memory"].pid, f"memory took over\n{pod.log()}", 30)
        pod.procs["memory"].send_signal(signal.SIGTERM)
        codes["memory"] = pod.procs["memory"].wait(timeout=30)
        assert codes == {"frontend": 0, "engine-a": 0, "engine-b": 0, "memory-standby": 0, "memory": 0}, pod.log()
    finally:
        _tear_down(pod)


def _tear_down(pod) -> None:
    """Whatever of the pod still runs is killed, and its run directory removed."""
    for p in pod.procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()
    shutil.rmtree(pod.run, ignore_errors=True)

"""The engine pod of deploy/kubernetes/base run as kubelet would run it, on the CPU: the containers' own
commands, hooks and probes, taken from the rendered manifest (host backend, a tiny model, free ports and a
temporary directory for /run/understudy; nothing else changed). The sidecar's startup probe gates the
engines, engine-a's postStart hook gates engine-b, engine-b parks as the shadow; after engine-a's SIGKILL the
shadow is active and engine-a, restarted with the same command, comes back as the shadow (the role script);
SIGTERM to the containers, then to the sidecar (kubelet's order), ends everything with exit code 0."""

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
        port, self.fport, self.mport = two_free_ports(), free_port(), free_port()
        self.ports = {"engine-a": port, "engine-b": port + 1}
        self.swap = {"cuda": "host", "/run/understudy": str(self.run), "8GiB": "16MiB", "9400": str(self.mport),
                     "8080": str(self.fport)}
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                    "OMP_NUM_THREADS": "1", "POD_IP": "127.0.0.1", "UNDERSTUDY_ADMIN_TOKEN": "pod-test-token",
                    "UNDERSTUDY_REGISTER": f"http://127.0.0.1:{self.fport}"}
        self.logs = tmp
        self.procs: dict[str, subprocess.Popen] = {}

    def words(self, container: dict, words: list[str]) -> tuple[list[str], dict]:
        env = {**{k: v for k, v in env_of(container).items() if v is not None}, **self.env_for(container)}
        out = []
        for w in words:
            w = expand(w, env)
            for old, new in self.swap.items():
                w = w.replace(old, new) if old.startswith("/") else (new if w == old else w)
            out.append(w)
        return out, {**self.env, **env}

    def env_for(self, container: dict) -> dict:
        if container["name"] in self.ports:
            return {"UNDERSTUDY_PORT": str(self.ports[container["name"]]),
                    "UNDERSTUDY_REGISTER": self.env["UNDERSTUDY_REGISTER"], "POD_IP": "127.0.0.1"}
        return {}

    def start(self, container: dict) -> None:
        extra = ["--model", str(self.model)] if container["name"] != "memory" else []
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

    def log(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.logs.glob("*.log")))


def get(port: int, path: str) -> httpx.Response | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)
    except httpx.HTTPError:
        return None


def test_the_engine_pod_as_kubelet_runs_it(tmp_path):
    pod = Pod(tmp_path)
    memory, engine_a, engine_b = (pod.container(n) for n in ("memory", "engine-a", "engine-b"))
    try:
        pod.start(pod.frontend)
        pod.start(memory)  # the native sidecar first; the engines once its startup probe passes
        wait_until(lambda: pod.exec_(memory, memory["startupProbe"]["exec"]["command"]) == 0,
                   "the sidecar's startup probe", 60, every=0.2)
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

        # Pod deletion: SIGTERM to the containers together, then to the sidecar once they have exited.
        for name in ("frontend", "engine-a", "engine-b"):
            pod.procs[name].send_signal(signal.SIGTERM)
        codes = {name: pod.procs[name].wait(timeout=45) for name in ("frontend", "engine-a", "engine-b")}
        pod.procs["memory"].send_signal(signal.SIGTERM)
        codes["memory"] = pod.procs["memory"].wait(timeout=30)
        assert codes == {"frontend": 0, "engine-a": 0, "engine-b": 0, "memory": 0}, pod.log()
    finally:
        for p in pod.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(pod.run, ignore_errors=True)

"""Real processes for the frontend tests: engines, frontends, etcd; and a stub engine in-process.

Everything is awaited through events: JSON log lines of the processes, etcd's health endpoint,
the frontend's /health. Polling loops have deadlines and only poll state, never sleep to wait for time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai

from understudy.common.auth import admin_headers

from tests.helpers.procs import LineProcess, ServerProcess, free_port, serve_process  # noqa: F401  (ServerProcess: for the tests)
from tests.helpers.streams import event_of as event  # noqa: F401  (event: for the tests)

BACKEND = "host"  # CPU by design: the sizes assume float32 SmolLM2-135M
ENGINE_ARGS = ["--kv-cache-memory", "64MiB", "--max-model-len", "512"]
ENGINE_ENV = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
REGISTRATION_TTL = "2"  # seconds: a SIGKILLed engine leaves the registries this long after its death
MAX_REQUEST_BYTES = 32768


def is_event(name: str, **fields):
    return lambda line: (e := event(line)).get("event") == name and all(e.get(k) == v for k, v in fields.items())


def wait_until(cond, what: str, timeout: float = 60.0, every: float = 0.05):
    """Poll a condition (state, not time) until it holds; its value is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(every)


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


class Proc:
    """A process with JSON logs on stderr, awaited through its log lines."""

    proc: LineProcess

    def seen(self, predicate) -> bool:
        return any(predicate(l) for l in list(self.proc.lines))

    def wait_for(self, predicate, timeout: float = 120.0) -> dict:
        """The first line (already printed or still to come) satisfying predicate, as JSON."""
        for line in list(self.proc.lines):
            if predicate(line):
                return event(line)
        return event(self.proc.wait_line(predicate, timeout=timeout))

    def events(self, name: str) -> list[dict]:
        return [e for e in map(event, list(self.proc.lines)) if e.get("event") == name]

    def assert_clean_log(self) -> None:
        bad = [l for l in self.proc.lines if "Traceback" in l or "Exception in ASGI" in l or '"level": "error"' in l]
        assert not bad, "errors logged:\n" + "\n".join(bad[:5] + self.proc.lines[-40:])

    def kill(self, sig: int = signal.SIGKILL) -> int:
        return self.proc.kill(sig)

    @property
    def alive(self) -> bool:
        return self.proc.proc.poll() is None


class Engine(Proc):
    """`understudy serve` on the CPU, registering with the given targets."""

    def __init__(self, socket_dir: Path, *extra: str, register: tuple[str, ...] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        reg = [a for url in register for a in ("--register", url)]
        self.proc = serve_process(socket_dir, self.port, *ENGINE_ARGS, *reg, "--registration-ttl", REGISTRATION_TTL,
                                  *extra, env=ENGINE_ENV, backend=BACKEND)
        self.http = httpx.Client(base_url=self.url, timeout=60, headers=admin_headers())

    def wait_serving(self) -> "Engine":
        self.serving = self.wait_for(is_event("serving"), timeout=240)
        self.model = self.serving["model"]
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)
        return self

    @property
    def id(self) -> str:
        return self.wait_for(is_event("registered"))["id"]

    def health(self) -> dict:
        return self.http.get("/health").json()

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.http.get("/metrics").text)

    def close(self) -> None:
        if self.alive:
            self.proc.kill(signal.SIGKILL)
        self.http.close()


class Frontend(Proc):
    """`understudy frontend` with JSON logs on stderr."""

    def __init__(self, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = LineProcess([sys.executable, "-m", "understudy", "frontend", "--port", str(self.port),
                                 "--health-interval", "0.2", "--max-request-bytes", str(MAX_REQUEST_BYTES),
                                 "--log-format", "json", *extra], stream="stderr")
        self.wait_for(is_event("serving"), timeout=60)
        self.http = httpx.Client(base_url=self.url, timeout=60, headers=admin_headers())
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def health(self) -> tuple[int, dict]:
        r = self.http.get("/health")
        return r.status_code, r.json()

    def engines(self) -> dict[str, dict]:
        return {e["id"]: e for e in self.health()[1]["engines"]}

    def wait_ready(self, timeout: float = 240.0) -> dict:
        return wait_until(lambda: (h := self.health())[0] == 200 and h[1], "the frontend to be ready", timeout)

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.http.get("/metrics").text)

    def close(self) -> None:
        if self.alive:
            self.proc.kill(signal.SIGKILL)
        self.http.close()
        self.client.close()


def metric(m: dict[str, float], name: str, **labels) -> float:
    key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    return m.get(key, 0.0)


class Etcd:
    """A real etcd server on 127.0.0.1 (free ports, a temporary data dir), ready once /health says so."""

    def __init__(self):
        exe = shutil.which("etcd")
        assert exe, "etcd is not installed: apt-get install etcd-server (the CI script installs it)"
        self.dir = Path(tempfile.mkdtemp(prefix="us-etcd-"))
        self.port, peer = free_port(), free_port()
        self.url = f"etcd://127.0.0.1:{self.port}"
        client, peer_url = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{peer}"
        self.proc = subprocess.Popen(
            [exe, "--name", "test", "--data-dir", str(self.dir / "data"), "--listen-client-urls", client,
             "--advertise-client-urls", client, "--listen-peer-urls", peer_url,
             "--initial-advertise-peer-urls", peer_url, "--initial-cluster", f"test={peer_url}",
             "--log-outputs", "stderr", "--logger", "zap"],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "log", "w"))
        deadline = time.monotonic() + 60
        while True:  # etcd's own readiness endpoint
            assert self.proc.poll() is None, (self.dir / "log").read_text()[-3000:]
            try:
                if httpx.get(f"{client}/health", timeout=2).json().get("health") == "true":
                    break
            except (httpx.HTTPError, ValueError):
                pass
            assert time.monotonic() < deadline, "etcd did not become healthy"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


class StubEngine:
    """An engine that is not one: /health says what the test wants; /engine/generate fails or answers
    one token. For canaries and load shedding, where a real engine cannot be told what to report."""

    def __init__(self, model: str, generate_ok: bool = True, **health):
        self.health = {"status": "ok", "state": "ACTIVE", "routable": True, "running": 0, "waiting": 0,
                       "kv_cache_usage": 0.0, **health}
        self.generate_ok = generate_ok
        self.generate_calls = 0
        self.model = model
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes, ctype: str = "application/json"):
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/health":
                    self._send(200, json.dumps(stub.health).encode())
                else:
                    self._send(404, b"{}")

            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path != "/engine/generate":
                    return self._send(404, b"{}")
                stub.generate_calls += 1
                if not stub.generate_ok:
                    return self._send(500, b'{"error": "stub failure"}')
                line = {"token_ids": [1], "finish_reason": "length", "prompt_tokens": 1, "cached_tokens": 0,
                        "error": None}
                self._send(200, (json.dumps(line) + "\n").encode(), "application/x-ndjson")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def record(self, engine_id: str, node: str = "stub-node") -> dict:
        return {"id": engine_id, "url": self.url, "model": self.model, "node": node, "role": "primary",
                "state": self.health["state"], "routable": self.health["routable"], "max_model_len": 512}

    def register(self, frontend: Frontend, engine_id: str, ttl: float = 300) -> None:
        r = frontend.http.post("/registry/engines", json={"record": self.record(engine_id), "ttl": ttl})
        assert r.status_code == 200, r.text

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class EtcdWatch:
    """The events under the engines' prefix, as etcd sends them (a thread runs aetcd's watch).

    One per test process: grpc's asyncio support does not like several event loops in one process."""

    PREFIX = "/understudy/engines/"

    def __init__(self, etcd: Etcd):
        import queue

        self.etcd = etcd
        self.events: queue.Queue = queue.Queue()
        self._ready = threading.Event()
        self._error: list[BaseException] = []
        threading.Thread(target=self._run, daemon=True).start()
        assert self._ready.wait(30) and not self._error, self._error

    def _run(self) -> None:
        import asyncio

        import aetcd

        async def main():
            async with aetcd.Client("127.0.0.1", self.etcd.port) as client:
                watch = await client.watch_prefix(self.PREFIX.encode())
                self._ready.set()
                async for e in watch:
                    self.events.put((getattr(e.kind, "value", e.kind), e.kv.key.decode()[len(self.PREFIX):]))

        try:
            asyncio.run(main())
        except BaseException as e:  # noqa: BLE001 - reported to the waiting test
            self._error.append(e)
            self._ready.set()

    def wait_for(self, kind: str, engine_id: str, timeout: float = 60.0) -> None:
        import queue

        deadline = time.monotonic() + timeout
        while True:
            try:
                got = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no etcd {kind} event for {engine_id} within {timeout}s") from None
            if got == (kind, engine_id):
                return

    def keys(self) -> list[str]:
        """The engine ids under the prefix now (etcd's JSON gateway)."""
        import base64

        enc = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
        end = self.PREFIX[:-1] + chr(ord(self.PREFIX[-1]) + 1)
        r = httpx.post(f"http://127.0.0.1:{self.etcd.port}/v3/kv/range",
                       json={"key": enc(self.PREFIX), "range_end": enc(end), "keys_only": True}, timeout=10)
        return sorted(base64.b64decode(kv["key"]).decode()[len(self.PREFIX):] for kv in r.json().get("kvs", []))

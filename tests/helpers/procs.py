"""Real processes for the tests: a memory server, and client actors (actors.py).

Each process reports progress as lines on stdout/stderr; the tests wait for
those lines (events), never for fixed sleeps.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).parent
# UNDERSTUDY_TEST_BACKEND=cuda runs the memory suite on a GPU; `host` runs everywhere.
BACKEND = os.environ.get("UNDERSTUDY_TEST_BACKEND", "host")
READY_TIMEOUT = 60.0


class LineProcess:
    """A child process whose output lines are collected by a thread and can be awaited."""

    def __init__(self, argv: list[str], env: dict | None = None, stream: str = "stdout"):
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True,  # as `understudy up` starts them
                                     env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self.other: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        self._threads = [
            threading.Thread(target=self._pump, args=(getattr(self.proc, stream), True), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr if stream == "stdout" else self.proc.stdout,
                                                      False), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _pump(self, pipe, main: bool) -> None:
        for line in pipe:
            (self.lines if main else self.other).append(line.rstrip("\n"))
            if main:
                self._q.put(line.rstrip("\n"))
        if main:
            self._q.put(None)

    def wait_line(self, predicate, timeout: float = READY_TIMEOUT) -> str:
        """The first new line satisfying predicate (a substring or a callable)."""
        test = predicate if callable(predicate) else (lambda line: predicate in line)
        while True:
            try:
                line = self._q.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no line matching {predicate!r} from {self.argv} within {timeout}s; "
                                   f"output so far:\n" + "\n".join(self.lines[-30:] + self.other[-30:])) from None
            if line is None:
                raise EOFError(f"{self.argv} exited ({self.proc.wait()}) before printing {predicate!r}:\n"
                               + "\n".join(self.lines[-30:] + self.other[-30:]))
            if test(line):
                return line

    def send(self, line: str = "") -> None:
        """Write a line to the process's stdin (actors take it as 'go on')."""
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def kill(self, sig: int = signal.SIGKILL) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)

    def wait(self, timeout: float = 60.0) -> int:
        rc = self.proc.wait(timeout=timeout)
        for t in self._threads:
            t.join(timeout=5)
        return rc

    @property
    def pid(self) -> int:
        return self.proc.pid


class ServerProcess(LineProcess):
    """`understudy memory-server` with JSON logs on stderr."""

    @classmethod
    def start(cls, backend: str, socket_dir: Path, *extra: str) -> "ServerProcess":
        srv = cls([sys.executable, "-m", "understudy", "memory-server", "--backend", backend,
                   "--socket-dir", str(socket_dir), "--log-format", "json", *extra], stream="stderr")
        line = srv.wait_line(lambda l: '"event": "listening"' in l)
        srv.path = Path(json.loads(line)["socket"])
        return srv

    def events(self, name: str) -> list[dict]:
        out = []
        for line in list(self.lines):
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("event") == name:
                out.append(e)
        return out

    def wait_event(self, name: str, timeout: float = READY_TIMEOUT, **fields) -> dict:
        line = self.wait_line(lambda l: f'"event": "{name}"' in l and all(
            json.loads(l).get(k) == v for k, v in fields.items()), timeout)
        return json.loads(line)

    def stop(self) -> int:
        return self.kill(signal.SIGTERM)


def actor(*args: str) -> LineProcess:
    """Start tests/helpers/actors.py with these arguments."""
    return LineProcess([sys.executable, str(HERE / "actors.py"), *args])


def gone(pid: int) -> bool:
    """Dead (or a zombie nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_free_ports() -> int:
    """A free port P whose neighbour P+1 is free too (`understudy up` puts engine i on port + i)."""
    import socket

    while True:
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue


def serve_process(socket_dir: Path, port: int, *extra: str, env: dict | None = None,
                  backend: str = BACKEND) -> LineProcess:
    """`understudy serve` against an existing memory service, JSON logs on stderr."""
    return LineProcess([sys.executable, "-m", "understudy", "serve", "--backend", backend,
                        "--memory-service", "connect", "--socket-dir", str(socket_dir),
                        "--port", str(port), "--log-format", "json", "--no-progress", *extra],
                       env=env, stream="stderr")


@contextmanager
def tp2_group(model: Path, token: str, *extra: str):
    """`understudy serve --tensor-parallel 2` of `model` in float32 on gloo (host backend, each rank with its own
    memory service), serving: an httpx client to it carrying the admin token `token` (the /engine/* routes are
    the operator's). The group is killed and its sockets removed afterwards."""
    import httpx

    from tests.helpers.streams import event_of

    port, socket_dir = free_port(), tempfile.mkdtemp(prefix="us-tp2-", dir="/tmp")  # short socket paths
    group = LineProcess([sys.executable, "-m", "understudy", "serve", "--backend", "host", "--socket-dir",
                         socket_dir, "--port", str(port), "--log-format", "json", "--no-progress",
                         "--model", str(model), "--tensor-parallel", "2", "--dtype", "float32",
                         "--kv-cache-memory", "16MiB", "--max-num-seqs", "4", *extra],
                        env={"OMP_NUM_THREADS": "1", "UNDERSTUDY_ADMIN_TOKEN": token}, stream="stderr")
    try:
        group.wait_line(lambda line: event_of(line).get("event") == "serving", timeout=240)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120,
                          headers={"Authorization": f"Bearer {token}"}) as http:
            yield http
    finally:
        group.kill()
        shutil.rmtree(socket_dir, ignore_errors=True)


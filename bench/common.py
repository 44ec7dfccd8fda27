"""What the benchmarks share: a baseline, and children whose JSON log lines can be awaited."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

PY = [sys.executable, "-m", "understudy"]

# The repository root, once for every bench script that imports this module: `python bench/x.py` puts only
# bench/ on sys.path, and the scripts take the tests' helpers as the tests do (`from tests.helpers.tiny_model
# import ...`).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(1, ROOT)


class Proc:
    """A child in a process group of its own whose JSON log lines (stderr) are kept: `events` has them
    all, `wait_event` blocks until one matches; other lines (tracebacks) go to `other`, stdout to `stdout`."""

    def __init__(self, argv: list[str], env: dict | None = None):
        self.t0 = time.time()
        self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, start_new_session=True, env={**os.environ, **(env or {})})
        self.lines: queue.Queue = queue.Queue()
        self.events: list[dict] = []
        self.other: list[str] = []
        self.stdout: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=lambda: self.stdout.extend(self.p.stdout), daemon=True).start()

    def _pump(self) -> None:
        for line in self.p.stderr:
            try:
                e = json.loads(line)
            except ValueError:
                e = None
            if not isinstance(e, dict):
                self.other.append(line)
                continue
            self.events.append(e)
            self.lines.put(e)
        self.lines.put(None)

    def wait_event(self, name: str, timeout: float = 900, **fields) -> dict:
        deadline = time.time() + timeout
        while True:
            e = self.lines.get(timeout=max(0.1, deadline - time.time()))
            if e is None:
                raise RuntimeError(f"{self.p.args[:5]} exited ({self.p.wait()}) before {name}:\n"
                                   + "".join(self.other[-30:]))
            if e.get("event") == name and all(e.get(k) == v for k, v in fields.items()):
                return e

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group and reap the child."""
        if self.p.poll() is None:
            os.killpg(self.p.pid, sig)
        self.p.wait()

    def stop(self) -> None:
        """SIGTERM (a clean stop), SIGKILL after 60 s."""
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned_h2d_seconds(nbytes: int) -> float:
    """Seconds to copy `nbytes` from pinned host memory to the GPU (after one warm-up copy)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return time.perf_counter() - t0

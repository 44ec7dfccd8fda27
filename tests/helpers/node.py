"""A real `understudy up` on the CPU for the node tests, awaited through its children's JSON log lines
(the supervisor tags each with "child")."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from understudy.common.auth import admin_headers

from tests.helpers.procs import LineProcess, two_free_ports
from tests.helpers.streams import event_of

ENGINE_ARGS = ["--kv-cache-memory", "64MiB", "--max-model-len", "512", "--no-progress"]
PROMPT = list(range(300, 364))  # 64 token ids: four full blocks of 16
MAX_TOKENS = 12


def logged(event: str, child: str | None = None, **fields):
    def test(line: str) -> bool:
        e = event_of(line)
        return e.get("event") == event and (child is None or e.get("child") == child) and all(
            e.get(k) == v for k, v in fields.items())
    return test


class Node:
    def __init__(self, shadows: int = 1, up_args: tuple[str, ...] = (), engine_args: tuple[str, ...] = tuple(ENGINE_ARGS),
                 env: dict | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="us-up-", dir="/tmp"))
        self.port = two_free_ports()  # engine-i listens on port + i
        self.proc = LineProcess([sys.executable, "-m", "understudy", "up", "--backend", "host", "--socket-dir",
                                 str(self.dir), "--port", str(self.port), "--shadows", str(shadows), *up_args, "--",
                                 *engine_args], env={"OMP_NUM_THREADS": "1", **(env or {})}, stream="stderr")

    def wait(self, predicate, timeout: float = 180) -> dict:
        """The first line (already printed or still to come) satisfying predicate, as JSON: children
        log concurrently, so the lines a test awaits may come in any order."""
        for line in list(self.proc.lines):
            if predicate(line):
                return event_of(line)
        return event_of(self.proc.wait_line(predicate, timeout=timeout))

    def events(self, predicate) -> list[dict]:
        return [event_of(line) for line in list(self.proc.lines) if predicate(line)]

    def status(self, raw: bool = False) -> dict:
        out = subprocess.run([sys.executable, "-m", "understudy", "status", "--socket-dir", str(self.dir), "--json"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        state = json.loads(out.stdout)
        return state if raw else {c["name"]: c for c in state["children"]}

    def status_text(self) -> str:
        out = subprocess.run([sys.executable, "-m", "understudy", "status", "--socket-dir", str(self.dir)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def generate(self, child: str) -> tuple[list[int], int]:
        port = self.status()[child]["port"]
        r = httpx.post(f"http://127.0.0.1:{port}/engine/generate", timeout=120, headers=admin_headers(), json={
            "token_ids": PROMPT, "sampling": {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}})
        assert r.status_code == 200, r.text
        lines = [json.loads(l) for l in r.text.splitlines() if l]
        assert lines[-1]["finish_reason"] == "length", lines
        return [t for l in lines for t in l["token_ids"]], lines[-1]["cached_tokens"]

    def close(self) -> None:
        if self.proc.proc.poll() is None:
            self.proc.kill(signal.SIGTERM)
        shutil.rmtree(self.dir, ignore_errors=True)

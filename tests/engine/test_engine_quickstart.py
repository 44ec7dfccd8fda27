"""The quick start's path: `serve` with no memory service running starts one tied to itself."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import httpx

from understudy.memory import read_status

from tests.helpers.procs import LineProcess, free_port


def test_serve_starts_its_own_memory_service_and_stops_it():
    socket_dir = Path(tempfile.mkdtemp(prefix="us-qs-", dir="/tmp"))
    port = free_port()
    proc = LineProcess([sys.executable, "-m", "understudy", "serve", "--socket-dir", str(socket_dir), "--port",
                        str(port), "--kv-cache-memory", "32MiB", "--no-progress"], env={"OMP_NUM_THREADS": "1"},
                       stream="stderr")
    started = json.loads(proc.wait_line(lambda l: '"event": "memory_service_started"' in l, timeout=120))
    proc.wait_line(lambda l: '"event": "serving"' in l, timeout=180)
    status = read_status(started["socket"])
    assert status["pools"]["weights"]["state"] == "RO" and status["pools"]["kv"]["state"] == "RW"
    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                   json={"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0})
    assert "Paris" in r.json()["choices"][0]["text"]
    assert proc.kill(15) == 0  # SIGTERM: drained, exit 0 ...
    assert not Path(f"/proc/{started['pid']}").exists()  # ... and the memory service it started is gone (reaped)
    assert not Path(started["socket"]).exists()

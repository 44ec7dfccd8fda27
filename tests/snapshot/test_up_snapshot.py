"""`understudy up --snapshot-dir D`: shadows and replacements restored from images, end to end.

A real supervisor on the CPU (host backend, real CRIU) with an active engine (engine-0, port P) and a
shadow (engine-1, port P+1). The shadow parks cold and is checkpointed into D/<identity>-<P+1>; it goes
on parked. SIGKILL engine-0: engine-1 takes over, engine-0's replacement starts cold (there is no image
for port P yet) and is checkpointed in turn. SIGKILL engine-1: its replacement is *restored* from the
image of port P+1 (the same pid as the engine that was imaged, now dead and reaped), parked. SIGKILL
engine-0: the restored engine takes over with the outputs of the undisturbed run. SIGTERM stops the
node (the restored engine too) with exit code 0.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

from understudy.common.auth import admin_headers
from understudy.snapshot.manifest import Manifest

from tests.helpers.procs import LineProcess
from tests.helpers.procs import two_free_ports
from tests.node.test_supervisor import _event, logged

ENGINE_ARGS = ["--kv-cache-memory", "64MiB", "--max-model-len", "512", "--no-progress"]
PROMPT = list(range(300, 364))
MAX_TOKENS = 12


def generate(port: int) -> list[int]:
    r = httpx.post(f"http://127.0.0.1:{port}/engine/generate", timeout=120, headers=admin_headers(), json={
        "token_ids": PROMPT, "sampling": {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}})
    assert r.status_code == 200, r.text
    return [t for line in r.text.splitlines() if line for t in json.loads(line)["token_ids"]]


def checkpoint_ready(port: int):
    return lambda line: _event(line).get("event") == "checkpoint_ready" and _event(line)["dir"].endswith(f"-{port}")


def test_up_restores_a_replacement_from_the_image_of_its_port():
    d = Path(tempfile.mkdtemp(prefix="us-ups-", dir="/tmp"))
    images = d / "images"
    port = two_free_ports()
    up = LineProcess([sys.executable, "-m", "understudy", "up", "--backend", "host", "--socket-dir", str(d),
                      "--port", str(port), "--shadows", "1", "--snapshot-dir", str(images), "--", *ENGINE_ARGS],
                     env={"OMP_NUM_THREADS": "1"}, stream="stderr")
    seen: list[str] = []

    def wait(predicate, timeout: float = 240) -> dict:
        for line in seen:
            if predicate(line):
                seen.remove(line)
                return _event(line)
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = up.wait_line(lambda _: True, timeout=max(0.1, deadline - time.monotonic()))
            except Exception:  # say what the node did instead
                raise AssertionError("up logged:\n" + "\n".join(up.lines[-80:] + up.other[-20:])) from None
            if predicate(line):
                return _event(line)
            seen.append(line)

    def pids() -> dict[str, int]:
        return {c["name"]: c["pid"] for c in json.loads((d / "node.json").read_text())["children"]}

    try:
        wait(logged("node_up"))
        reference = generate(port)
        ready = wait(checkpoint_ready(port + 1))  # the cold shadow, imaged; it parks again
        imaged_pid = ready["pid"]
        m = Manifest.read(ready["dir"])
        assert (m.phase, m.engine["port"], m.engine["shell_job"]) == ("Ready", port + 1, False), m
        assert pids()["engine-1"] == imaged_pid

        # 1. engine-0 dies: engine-1 takes over, engine-0's replacement starts cold and is imaged.
        os.kill(pids()["engine-0"], signal.SIGKILL)
        wait(logged("state", "engine-1", new="ACTIVE"))
        wait(checkpoint_ready(port))
        assert generate(port + 1) == reference

        # 2. engine-1 dies: its replacement is restored from the image of port + 1, with the imaged pid.
        os.kill(imaged_pid, signal.SIGKILL)
        wait(logged("state", "engine-0", new="ACTIVE"))
        restored = wait(logged("restored", "engine-1"))
        assert (restored["pid"], restored["state"]) == (imaged_pid, "STANDBY"), restored
        assert pids()["engine-1"] == imaged_pid
        h = httpx.get(f"http://127.0.0.1:{port + 1}/health", timeout=30).json()
        assert (h["state"], h["role"], h["weights"], h["pid"]) == ("STANDBY", "shadow", "imported", imaged_pid), h

        # 3. engine-0 dies: the restored engine takes over.
        os.kill(pids()["engine-0"], signal.SIGKILL)
        wait(logged("state", "engine-1", new="ACTIVE"))
        assert generate(port + 1) == reference

        up.proc.send_signal(signal.SIGTERM)
        assert up.proc.wait(timeout=120) == 0
        assert not Path(f"/proc/{imaged_pid}").exists()
    finally:
        if up.proc.poll() is None:
            up.proc.kill()
            up.proc.wait()
        for name, pid in (pids().items() if (d / "node.json").exists() else []):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        shutil.rmtree(d, ignore_errors=True)

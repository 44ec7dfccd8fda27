"""The memory service as a user meets it: CLI, status, metrics."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request

import torch

from understudy.memory import MemoryClient, publish_state_dict

from tests.helpers.procs import ServerProcess


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "understudy", *args], capture_output=True, text=True, timeout=60)


def test_memory_status_prints_pools_sessions_and_events(server, socket_dir, backend_name):
    with MemoryClient(server.path, "weights", "rw", name="publisher") as w:
        h = publish_state_dict(w, {"x": torch.zeros(1000)}, progress=False)
        out = _cli("memory-status", "--backend", backend_name, "--socket-dir", str(socket_dir))
        assert out.returncode == 0, out.stderr
        assert "pool weights  RO" in out.stdout and h in out.stdout
        assert "publisher" in out.stdout and "committed" in out.stdout
        js = _cli("memory-status", "--socket", str(server.path), "--json")
        assert '"state": "RO"' in js.stdout


def test_memory_status_without_a_server_says_so(socket_dir):
    out = _cli("memory-status", "--socket", str(socket_dir / "nothing.sock"))
    assert out.returncode == 1 and "no memory service" in out.stderr


def test_metrics_endpoint_reports_pools_and_events(socket_dir, backend_name):
    port = _free_port()
    srv = ServerProcess.start(backend_name, socket_dir, "--metrics-port", str(port))
    try:
        with MemoryClient(srv.path, "weights", "rw") as w:
            publish_state_dict(w, {"x": torch.zeros(1000)}, progress=False)
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'understudy_memory_pool_state{backend="%s"' % backend_name in text
        assert 'pool="weights",state="RO"} 1.0' in text
        assert 'event="committed"' in text
        assert "understudy_memory_bytes_in_use" in text
    finally:
        srv.stop()


def test_help_explains_every_flag():
    out = _cli("memory-server", "--help")
    for flag in ("--backend", "--device", "--socket-dir", "--standby", "--socket-mode", "--socket-group", "--max-bytes",
                 "--metrics-port", "--log-format", "--log-level"):
        assert flag in out.stdout
    assert out.stdout.count("default") >= 6

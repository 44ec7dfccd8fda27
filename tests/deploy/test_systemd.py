"""deploy/systemd: the units pass `systemd-analyze verify` (run on copies whose ExecStart names this checkout's
`understudy`, as docs/deploy.md installs them), restart what dies, stop with a drain, and use only flags that
`understudy <cmd> --help` lists."""

from __future__ import annotations

import configparser
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.cli_flags import invocations, shell_words, unknown_flags
from tests.helpers.frontend import is_event
from tests.helpers.procs import LineProcess, free_port
from tests.helpers.tiny_model import make_tiny_llama

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
INSTALLED = "/usr/local/bin/understudy"
# CI (root) installs the `systemd` package (.ci/run): there the check must run; a user's machine may lack it.
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None and os.geteuid() != 0,
                                   reason="systemd-analyze not installed (apt-get install systemd)")


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str
    parser.read_string((UNITS / name).read_text())
    return parser


def verify(tmp_path: Path, units: list[str]) -> subprocess.CompletedProcess:
    understudy = Path(sys.executable).with_name("understudy")
    for path in UNITS.glob("*.service"):
        (tmp_path / path.name).write_text(path.read_text().replace(INSTALLED, str(understudy)))
    return subprocess.run(["systemd-analyze", "verify", *[str(tmp_path / u) for u in units]],
                          capture_output=True, text=True, cwd=tmp_path)


@needs_analyze
def test_units_verify(tmp_path):
    names = sorted(p.name for p in UNITS.glob("*.service"))
    assert names == ["understudy-frontend.service", "understudy-memory@.service", "understudy-up@.service"]
    r = verify(tmp_path, ["understudy-memory@0.service", "understudy-up@0.service", "understudy-frontend.service"])
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr


@needs_analyze
def test_verify_catches_a_broken_unit(tmp_path):
    """The check above can fail: a misspelt key and a relative ExecStart are reported."""
    broken = UNITS / "understudy-frontend.service"
    (tmp_path / "bad.service").write_text(broken.read_text().replace("Restart=", "Restrat=")
                                          .replace(INSTALLED, "understudy-nowhere"))
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "bad.service")], capture_output=True, text=True)
    assert "Restrat" in r.stderr and r.returncode != 0


def test_restart_and_stop_policies():
    memory, up, frontend = (unit(n) for n in ("understudy-memory@.service", "understudy-up@.service",
                                              "understudy-frontend.service"))
    for u in (memory, up, frontend):
        assert u["Service"]["Restart"] == "always"
    # `up` gets SIGTERM alone and drains its engines (each within --drain-timeout, 30 s) before systemd's
    # SIGKILL of what is left; the memory service stops after the engines (ordering).
    assert up["Service"]["KillMode"] == "mixed" and int(up["Service"]["TimeoutStopSec"]) > 60
    assert "understudy-memory@%i.service" in up["Unit"]["After"]
    assert "understudy-memory@%i.service" in up["Unit"]["Wants"]
    assert int(frontend["Service"]["TimeoutStopSec"]) > 30
    # Both sides agree on where the sockets and the failover locks are.
    for u in (memory, up):
        words = shell_words(u["Service"]["ExecStart"])
        assert words[words.index("--socket-dir") + 1] == "/run/understudy"
    assert memory["Service"]["RuntimeDirectory"] == "understudy"
    assert memory["Service"]["RuntimeDirectoryPreserve"] == "yes"
    # Engines and the frontend share the admin token of the operator routes (/engine/generate, /registry/*).
    tokens = set()
    for u in (up, frontend):
        words = shell_words(u["Service"]["ExecStart"])
        tokens.add(words[words.index("--admin-token-file") + 1])
        assert u["Service"]["StateDirectory"] == "understudy"
    assert tokens == {"/var/lib/understudy/admin-token"}


def test_only_flags_that_help_lists():
    checked = []
    for path in UNITS.glob("*.service"):
        words = shell_words(unit(path.name)["Service"]["ExecStart"])
        assert unknown_flags(words) == [], path.name
        checked += [cmd for cmd, _ in invocations(words)]
    env = {}
    for line in (UNITS / "up.env").read_text().splitlines():
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            env[key] = shlex.split(shlex.split(value)[0])  # systemd unquotes, $VAR in ExecStart splits
    assert unknown_flags(["understudy", "up", *env["UNDERSTUDY_UP_ARGS"], "--", *env["UNDERSTUDY_SERVE_ARGS"]]) == []
    assert sorted(checked) == ["frontend", "memory-server", "serve", "up"]


def test_up_with_a_memory_service_it_does_not_own(server, socket_dir, tmp_path):
    """What understudy-up@N does: `up --memory-service connect` starts no memory service of its own and uses
    the running one (understudy-memory@N's); stopping `up` leaves it, with the weights, to the next `up`."""
    from understudy.memory.client import read_status

    model = make_tiny_llama(tmp_path / "tiny")
    port = free_port()
    up = LineProcess([sys.executable, "-m", "understudy", "up", "--memory-service", "connect", "--backend", "host",
                      "--socket-dir", str(socket_dir), "--port", str(port), "--shadows", "0", "--",
                      "--model", str(model), "--kv-cache-memory", "16MiB", "--max-model-len", "256", "--no-progress"],
                     env={"OMP_NUM_THREADS": "1"}, stream="stderr")
    try:
        up.wait_line(is_event("serving", child="engine-0", state="ACTIVE"), timeout=120)
        up.wait_line(is_event("node_up"))
        node = json.loads((socket_dir / "node.json").read_text())
        assert [c["name"] for c in node["children"]] == ["engine-0"]
        assert read_status(server.path)["pools"]["weights"]["state"] != "EMPTY"
        up.proc.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
        assert server.proc.poll() is None  # not ours to stop
        assert read_status(server.path)["pools"]["weights"]["state"] != "EMPTY"  # resident for the next `up`
    finally:
        if up.proc.poll() is None:
            up.kill(signal.SIGTERM)

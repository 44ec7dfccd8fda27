"""deploy/systemd: the units pass `systemd-analyze verify` (run on copies whose ExecStart names this checkout's
`understudy`, as docs/deploy.md installs them), restart what dies, stop with a drain, and use only flags that
`understudy <cmd> --help` lists. The two memory units of a GPU, both `--standby`, take turns (run here as
processes with the units' commands): whichever dies, the other serves the socket and the engines of `up`
keep answering; the restarted one parks."""

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
MEMORY_UNITS = ("understudy-memory@.service", "understudy-memory-standby@.service")
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
    assert names == ["understudy-frontend.service", "understudy-memory-standby@.service",
                     "understudy-memory@.service", "understudy-up@.service"]
    r = verify(tmp_path, ["understudy-memory@0.service", "understudy-memory-standby@0.service",
                          "understudy-up@0.service", "understudy-frontend.service"])
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
    memory, standby, up, frontend = (unit(n) for n in MEMORY_UNITS + ("understudy-up@.service",
                                                                      "understudy-frontend.service"))
    for u in (memory, standby, up, frontend):
        assert u["Service"]["Restart"] == "always"
    # `up` gets SIGTERM alone and drains its engines (each within --drain-timeout, 30 s) before systemd's
    # SIGKILL of what is left; the memory services stop after the engines (ordering), the standby unit before
    # the other one (no takeover at shutdown).
    assert up["Service"]["KillMode"] == "mixed" and int(up["Service"]["TimeoutStopSec"]) > 60
    for name in MEMORY_UNITS:
        assert name.replace("@", "@%i") in up["Unit"]["After"].split()
        assert name.replace("@", "@%i") in up["Unit"]["Wants"].split()
    assert "understudy-memory@%i.service" in standby["Unit"]["After"].split()
    assert int(frontend["Service"]["TimeoutStopSec"]) > 30
    # Both sides agree on where the sockets and the failover locks are.
    for u in (memory, standby, up):
        words = shell_words(u["Service"]["ExecStart"])
        assert words[words.index("--socket-dir") + 1] == "/run/understudy"
    # `up` starts no memory service (so no standby either): the pair of units is the device's.
    words = shell_words(up["Service"]["ExecStart"])
    assert words[words.index("--memory-service") + 1] == "connect"
    # The pair: both `--standby` (a restarted one parks instead of exiting), the same command but for the
    # metrics port, distinct on every GPU; both keep the shared runtime directory when they stop.
    memory_words, standby_words = (shell_words(u["Service"]["ExecStart"]) for u in (memory, standby))
    assert "--standby" in memory_words and "--standby" in standby_words
    port = memory_words.index("--metrics-port") + 1
    assert memory_words[:port] + memory_words[port + 1:] == standby_words[:port] + standby_words[port + 1:]
    ports = [w[port].replace("%i", str(gpu)) for w in (memory_words, standby_words) for gpu in range(10)]
    assert len(set(ports)) == 20, ports
    for u in (memory, standby):
        assert u["Service"]["RuntimeDirectory"] == "understudy"
        assert u["Service"]["RuntimeDirectoryPreserve"] == "yes"
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
    assert sorted(checked) == ["frontend", "memory-server", "memory-server", "serve", "up"]


def unit_process(name: str, socket_dir: Path, metrics_port: int) -> LineProcess:
    """A memory unit's ExecStart for GPU 0 as a process, as systemd runs it (JSON logs on stderr), with the host
    backend, `socket_dir` for /run/understudy and a free metrics port."""
    words = shlex.split(unit(name)["Service"]["ExecStart"].replace("%i", "0"))
    swap = {INSTALLED: str(Path(sys.executable).with_name("understudy")), "cuda": "host",
            "/run/understudy": str(socket_dir)}
    words = [swap.get(w, w) for w in words]
    words[words.index("--metrics-port") + 1] = str(metrics_port)
    return LineProcess(words, env={"OMP_NUM_THREADS": "1"}, stream="stderr")


def test_up_over_the_memory_pair_that_takes_turns(socket_dir, tmp_path):
    """What understudy-up@N does: `up --memory-service connect` starts no memory service (nor a standby) of its
    own and uses the pair's. SIGKILL the serving one: the other serves the socket, the engine hands it its
    memory and keeps answering; systemd's restart of the dead one parks it; SIGKILL again: it serves. Stopping
    `up` leaves the serving one, with the weights, to the next `up`."""
    import httpx

    from understudy.memory.client import read_status

    ports = {name: free_port() for name in MEMORY_UNITS}
    procs = {}

    def start(name: str, event: str) -> None:  # (re)started by systemd (Restart=always)
        procs[name] = unit_process(name, socket_dir, ports[name])
        procs[name].wait_line(is_event(event), timeout=60)

    def status() -> dict:
        [path] = socket_dir.glob("memory-*.sock")
        return read_status(path)

    model = make_tiny_llama(tmp_path / "tiny")
    port = free_port()
    up = None
    try:
        first, second = MEMORY_UNITS
        start(first, "listening")  # nobody serves: a --standby service takes the lock at once
        start(second, "standby_waiting")
        assert status()["pid"] == procs[first].pid
        up = LineProcess([sys.executable, "-m", "understudy", "up", "--memory-service", "connect", "--backend",
                          "host", "--socket-dir", str(socket_dir), "--port", str(port), "--shadows", "0", "--",
                          "--model", str(model), "--kv-cache-memory", "16MiB", "--max-model-len", "256",
                          "--no-progress"], env={"OMP_NUM_THREADS": "1"}, stream="stderr")
        up.wait_line(is_event("serving", child="engine-0", state="ACTIVE"), timeout=120)
        up.wait_line(is_event("node_up"))
        node = json.loads((socket_dir / "node.json").read_text())
        assert [c["name"] for c in node["children"]] == ["engine-0"]
        assert status()["pools"]["weights"]["state"] != "EMPTY"

        for dying, taking_over in ((first, second), (second, first)):
            procs[dying].kill(signal.SIGKILL)
            procs[taking_over].wait_line(is_event("standby_took_over"), timeout=30)
            procs[taking_over].wait_line(is_event("listening"))
            up.wait_line(is_event("memory_service_recovered"), timeout=60)
            assert status()["pid"] == procs[taking_over].pid
            assert status()["pools"]["weights"]["state"] != "EMPTY"  # handed back by the engine
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                           json={"prompt": "turns", "max_tokens": 4, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
            # The metrics port of whichever serves answers; a parked one listens nowhere.
            assert httpx.get(f"http://127.0.0.1:{ports[taking_over]}/metrics").status_code == 200
            start(dying, "standby_waiting")
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://127.0.0.1:{ports[dying]}/metrics")

        up.proc.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
        assert all(p.proc.poll() is None for p in procs.values())  # not ours to stop
        assert status()["pid"] == procs[first].pid
        assert status()["pools"]["weights"]["state"] != "EMPTY"  # resident for the next `up`
    finally:
        if up is not None and up.proc.poll() is None:
            up.kill(signal.SIGTERM)
        for name in reversed(MEMORY_UNITS):  # systemd's stop order: the standby unit first
            if name in procs:
                procs[name].kill(signal.SIGTERM)

"""Snapshot and restore of engines, end to end: real `understudy serve` processes on the CPU (host
backend), real CRIU dumps and restores (scripts/install-criu.sh puts CRIU >= 4.2 in ./.criu), SIGKILL.

One memory server, an active engine and a parked shadow for the module; the tests run in file order
and hand the node on (one shadow waits on the failover lock at each kill, so which one takes over is
known):

    1. identity and manifest, without processes; a process CRIU cannot dump (its session leader is in
       another pid namespace, as under `docker exec`) is refused before anything is written;
    2. the active engine refuses to be quiesced, and a checkpoint of it fails cleanly (it serves on);
    3. a checkpoint that fails halfway (CRIU froze the shadow and wrote its image, then failed) leaves
       the shadow parked and serving; the active engine is SIGKILLed and that shadow takes over;
    4. a new shadow is checkpointed (it goes on), SIGKILLed and reaped; restores that ask for another
       engine are refused; the restore brings it back parked; the active engine is SIGKILLed and the
       restored shadow takes over with outputs identical to an undisturbed run.

Greedy decoding with ignore_eos: identical outputs are list equality. Processes are awaited through
their JSON log lines and exit codes, never through sleeps.
"""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from understudy.common.auth import admin_headers
from understudy.memory import read_status
from understudy.snapshot import criu
from understudy.snapshot.identity import (
    differences, identity, params_from_serve_argv, serve_argv_of)
from understudy.snapshot.manifest import Manifest, criu_dir, find_ready, list_images

from tests.helpers.procs import LineProcess, ServerProcess
from tests.failover.test_failover import BACKEND, Engine, _event, body, is_state, tokens_of

PR_SET_CHILD_SUBREAPER = 36
MAX_TOKENS = 16
PROMPTS = [[504, 3575, 282, 4649, 314] * 8, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 3, [9502, 28, 438, 2213] * 5]


def snapshot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "understudy", "snapshot", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=600)


def generate_all(engine_url: str) -> list[list[int]]:
    with httpx.Client(base_url=engine_url, timeout=120, headers=admin_headers()) as http:
        out = []
        for p in PROMPTS:
            r = http.post("/engine/generate", json=body(p, MAX_TOKENS))
            assert r.status_code == 200, r.text
            out.append(tokens_of([json.loads(line) for line in r.text.splitlines() if line]))
        return out


def parked(line: str) -> bool:
    return _event(line).get("event") == "waiting_for_failover_lock"


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=30).json()


class Restored:
    """An engine brought back by `understudy snapshot restore`: its logs arrive on the restore command's
    stderr (CRIU gave it that pipe), its pid is the image's; this test process reaps it (subreaper)."""

    def __init__(self, image: Path, *extra: str):
        self.cmd = LineProcess([sys.executable, "-m", "understudy", "snapshot", "restore", "--dir", str(image),
                                *extra], stream="stderr")
        self.rc = self.cmd.proc.wait(timeout=600)
        self.result = json.loads(self.cmd.other[-1]) if self.rc == 0 else None

    @property
    def pid(self) -> int:
        return self.result["pid"]

    def wait_for(self, predicate, timeout: float = 120) -> dict:
        for line in list(self.cmd.lines):
            if predicate(line):
                return _event(line)
        return _event(self.cmd.wait_line(predicate, timeout=timeout))

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)  # reaped: its pids are free again


@pytest.fixture(scope="module")
def node(_tokenizer_future):
    libc = ctypes.CDLL(None, use_errno=True)
    # Restored engines are orphaned when criu (restore --restore-detached) exits: as a subreaper this
    # process becomes their parent and can reap them.
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    d = Path(tempfile.mkdtemp(prefix="us-sn-", dir="/tmp"))  # short: unix socket paths are limited
    mem = ServerProcess.start(BACKEND, d)
    engines: list[Engine] = []
    restored: list[Restored] = []
    try:
        active = Engine(d, "--role", "primary")
        engines.append(active)
        active.wait_serving()
        shadow = Engine(d, "--role", "shadow")
        engines.append(shadow)
        reference = generate_all(active.url)
        shadow.wait_for(parked, timeout=300)
        yield {"dir": d, "mem": mem, "active": active, "shadow": shadow, "reference": reference,
               "start": lambda *a: engines.append(Engine(d, *a)) or engines[-1], "restored": restored}
    finally:
        for e in engines:
            e.close()
        for r in restored:
            if r.rc == 0 and Path(f"/proc/{r.pid}").exists():
                r.kill()
        if mem.proc.poll() is None:
            mem.stop()
        shutil.rmtree(d, ignore_errors=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


# -- 1. identity and manifest ----------------------------------------------------------------------

def test_identity_covers_the_engine_not_its_placement():
    base = ["--dtype", "float32", "--max-model-len", "512", "--block-size", "16"]
    ident = identity(params_from_serve_argv(base))
    assert len(ident) == 16 and int(ident, 16) >= 0
    # Replicas / roles, placement and resources are not part of it.
    for other in (["--role", "shadow"], ["--port", "8123", "--host", "0.0.0.0"], ["--device", "3"],
                  ["--kv-cache-memory", "8GiB"], ["--gpu-memory-utilization", "0.5"], ["--socket-dir", "/x"]):
        assert identity(params_from_serve_argv(base + other)) == ident, other
    # The model, dtype, max model length and extra parameters are.
    for other in (["--dtype", "bfloat16"], ["--max-model-len", "256"], ["--block-size", "32"],
                  ["--enforce-eager"], ["--model", "/models/other"]):
        changed = params_from_serve_argv(base + other)
        assert identity(changed) != ident, other
        assert differences(params_from_serve_argv(base), changed), other
    params = params_from_serve_argv(base)
    assert (params["tensor_parallel_size"], params["pipeline_parallel_size"]) == (1, 1)
    assert params["engine_version"].startswith("understudy ")


def test_manifest_phases_are_written_whole_and_listed(tmp_path):
    params = params_from_serve_argv([])
    m = Manifest(identity(params), params, engine={"port": 8001})
    m.write(tmp_path / "a")
    assert Manifest.read(tmp_path / "a").phase == "Pending"
    for phase in ("Creating", "Ready"):
        m.set_phase(tmp_path / "a", phase, f"now {phase}")
        again = Manifest.read(tmp_path / "a")
        assert (again.phase, again.message, again.identity) == (phase, f"now {phase}", m.identity)
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["manifest.json"]  # no temporary file left
    Manifest("0" * 16, {}).set_phase(tmp_path / "b", "Failed", "criu dump failed")
    assert [(d.name, x.phase) for d, x in list_images(tmp_path)] == [("a", "Ready"), ("b", "Failed")]
    assert find_ready(tmp_path, m.identity) == tmp_path / "a"
    assert find_ready(tmp_path, m.identity, port=8001) == tmp_path / "a"
    assert find_ready(tmp_path, m.identity, port=8002) is None
    assert find_ready(tmp_path, "0" * 16) is None  # Failed images are never restored
    listing = snapshot("list", "--dir", str(tmp_path))
    assert listing.returncode == 0 and "Ready" in listing.stdout and "criu dump failed" in listing.stdout


def test_a_process_whose_session_leader_is_in_another_pid_namespace_is_refused_untouched(tmp_path):
    # As under `docker exec`: a new pid namespace whose processes keep a session leader outside it
    # (getsid answers 0 there). CRIU cannot dump them; the command says so and writes nothing.
    image = tmp_path / "img"
    script = (f"sleep 60 & {shlex.quote(sys.executable)} -m understudy snapshot checkpoint --pid $! "
              f"--dir {shlex.quote(str(image))}; rc=$?; kill $!; exit $rc")
    out = subprocess.run(["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc",
                          "sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "session leader is outside its pid namespace" in out.stderr, out.stderr
    assert not image.exists()


# -- 2. an active engine is not snapshotted --------------------------------------------------------

def test_checkpoint_of_the_active_engine_is_refused_and_it_serves_on(node):
    active, d = node["active"], node["dir"]
    r = active.http.post("/engine/control/quiesce")
    assert r.status_code == 409 and "only a parked (STANDBY) or sleeping engine" in r.text, r.text
    out = snapshot("checkpoint", "--engine", active.url, "--dir", str(d / "img-active"))
    assert out.returncode == 1 and "could not be quiesced" in out.stderr, out.stderr
    m = Manifest.read(d / "img-active")
    assert m.phase == "Failed" and "only a parked (STANDBY) or sleeping engine" in m.message, m
    assert health(active.url)["state"] == "ACTIVE"
    assert generate_all(active.url) == node["reference"]


# -- 3. a checkpoint that fails halfway ------------------------------------------------------------

def test_checkpoint_failing_halfway_leaves_the_shadow_serving_and_it_takes_over(node, tmp_path):
    second, d = node["shadow"], node["dir"]
    # A criu whose dump fails at the end: the engine was frozen and its image written, then the
    # post-dump action script fails (CRIU then lets the process run on).
    fail = tmp_path / "fail-post-dump.sh"
    fail.write_text('#!/bin/sh\n[ "$CRTOOLS_SCRIPT_ACTION" = post-dump ] && exit 1\nexit 0\n')
    wrapper = tmp_path / "criu"
    wrapper.write_text(f'#!/bin/sh\nif [ "$1" = dump ]; then exec {criu.find_criu()} "$@" --action-script {fail}; fi\n'
                       f'exec {criu.find_criu()} "$@"\n')
    fail.chmod(0o755)
    wrapper.chmod(0o755)
    image = d / "img-failed"
    out = snapshot("checkpoint", "--engine", second.url, "--dir", str(image), "--criu", str(wrapper))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "criu dump failed" in out.stderr and "the engine resumed (STANDBY) and serves" in out.stderr, out.stderr
    m = Manifest.read(image)
    assert m.phase == "Failed" and "criu dump failed" in m.message, m
    assert "post-dump" in (criu_dir(image) / "dump.log").read_text()  # it did get that far
    # Quiesced and resumed: unmapped, disconnected, reconnected, parked again.
    states = [(e["old"], e["new"]) for e in map(_event, second.proc.lines) if e.get("event") == "state"]
    assert states[-2:] == [("STANDBY", "QUIESCED"), ("QUIESCED", "STANDBY")], states
    h = health(second.url)
    assert (h["status"], h["state"], h["routable"], h["weights"]) == ("ok", "STANDBY", False, "imported"), h
    # The memory service sees its weights session again.
    sessions = read_status(node["mem"].path)["sessions"]
    assert ("weights", "ro") in [(x["pool"], x["mode"]) for x in sessions if x["pid"] == second.pid], sessions

    # It can still be promoted: the active engine dies, it takes over with the same outputs.
    node["next"] = node["start"]("--role", "shadow")  # the next test's shadow, parked after the kill
    node["active"].kill()
    second.wait_for(is_state("WAKING"))
    assert second.wait_for(is_state("ACTIVE"))["restored_blocks"] > 0
    node["active"] = second
    assert generate_all(second.url) == node["reference"]
    second.assert_clean_log()


# -- 4. checkpoint, kill, restore, fail over -------------------------------------------------------

def test_checkpoint_kill_restore_and_the_restored_shadow_takes_over(node):
    shadow, active, d = node["next"], node["active"], node["dir"]
    shadow.wait_for(parked, timeout=300)
    image = d / "img"
    out = snapshot("checkpoint", "--engine", shadow.url, "--dir", str(image))
    assert out.returncode == 0, out.stderr
    m = Manifest.read(image)
    argv = serve_argv_of(shadow.pid)
    assert (m.phase, m.identity, m.engine["pid"], m.engine["state"]) == (
        "Ready", identity(params_from_serve_argv(argv)), shadow.pid, "STANDBY"), m
    assert m.image["bytes"] > 0 and (criu_dir(image) / "dump.log").is_file()
    assert not m.engine["shell_job"] and not m.engine["cuda"]  # a session leader, as `understudy up` starts it
    # The checkpointed shadow goes on: parked again.
    assert shadow.wait_for(lambda l: _event(l).get("event") == "resumed")["state"] == "STANDBY"
    assert health(shadow.url)["state"] == "STANDBY"

    # Kill it and wait until it is reaped (the image's pids must be free).
    shadow.kill()
    assert shadow.proc.proc.returncode == -signal.SIGKILL

    # An image is refused for another engine, with the fields that differ; nothing is restored.
    other = argv[:] + ["--max-model-len", "128"]
    refused = Restored(image, "--", *other)
    assert refused.rc == 2, refused.cmd.other + refused.cmd.lines
    message = "\n".join(refused.cmd.lines)
    assert "refused" in message and "max_model_len: image 512 != requested 128" in message, message
    assert not Path(f"/proc/{shadow.pid}").exists()
    refused = Restored(image, "--identity", "0123456789abcdef")
    assert refused.rc == 2 and "not the requested 0123456789abcdef" in "\n".join(refused.cmd.lines)

    # Restored as the engine it was (its own serve flags: the identity matches), parked.
    restored = Restored(image, "--", *argv)
    node["restored"].append(restored)
    assert restored.rc == 0, "\n".join(restored.cmd.lines[-30:])
    assert (restored.pid, restored.result["state"]) == (shadow.pid, "STANDBY"), restored.result
    h = health(shadow.url)
    assert (h["status"], h["state"], h["routable"], h["role"], h["weights"], h["pid"]) == (
        "ok", "STANDBY", False, "shadow", "imported", shadow.pid), h

    # The active engine dies: the restored shadow (its flock wait restarted by CRIU) takes over.
    active.kill()
    restored.wait_for(is_state("WAKING"))
    promoted = restored.wait_for(is_state("ACTIVE"))
    assert promoted["restored_blocks"] > 0, promoted  # the KV cache of the dead engine, adopted
    assert health(shadow.url)["state"] == "ACTIVE"
    assert generate_all(shadow.url) == node["reference"]


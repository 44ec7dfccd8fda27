"""Faults that are not a kill: a step that raises, a step that hangs, a broken device. Real `understudy serve`
processes on the CPU (host backend), faults injected with signals (UNDERSTUDY_FAULT_INJECTION=1:
SIGUSR1 a step error, SIGUSR2 a device fault, SIGURG a hang; engine/serving/faults.py), an
`understudy frontend` and the official openai client.

One memory server (one "device"), a frontend, a primary and one parked shadow at a time (the next one starts
when the last one is promoted), all registered with the frontend. The tests run in file order and hand the
device on:

    1. step error on the active engine under four streams through the frontend: it goes DEAD (/health 503
       with the reason), releases the failover lock at once, ends its streams so that the frontend
       migrates them, and exits 5; the first shadow takes over and every stream ends exactly as the
       undisturbed run did;
    2. a step hangs on the new active engine (--step-timeout 3): /live says it is stuck (503); once the
       watchdog ends the process (exit 6, the stuck stack logged) a request queued behind the step gets a
       503 marked as a failure, and the request whose step hung, sent through the frontend, is answered
       by the next shadow, as the undisturbed run answered it;
    3. device fault on the third active engine: exit 7, the device's fault marker is written next to the
       failover lock; the last shadow gets the lock, refuses to go ACTIVE (DEAD "device fault", /health
       503) and exits 7; an engine started on the device refuses at once (exit 7, naming the marker);
    4. (its own device pair) a step error inside a tensor-parallel group's step: the leader kills its worker,
       releases the lock and exits 5;
    5. (no processes) which error messages are device faults, the fault marker, /live's bound.

Greedy decoding with ignore_eos. Nothing waits on fixed sleeps: processes are awaited through their JSON
log lines and health states; exit statuses are asserted, not timings.
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import signal
import tempfile
from pathlib import Path

import httpx
import openai
import pytest

from understudy.common.auth import admin_headers
from understudy.failover import exit_codes
from understudy.failover.faults import marker_path, read_marker
from understudy.failover.lock import FailoverLock

from tests.helpers.frontend import (BACKEND, ENGINE_ARGS, ENGINE_ENV, REGISTRATION_TTL, Frontend, Proc, ServerProcess,
                                    is_event, wait_until)
from tests.helpers.procs import free_port, gone, serve_process
from tests.helpers.streams import Streams, body

STORY = "set in a quiet village by the sea, where an old fisherman mended his nets every morning."
TOPICS = ["a red kite", "the last train", "a lost key", "two rival bakers"]
MAX_TOKENS = 24
FEW = 3  # tokens every stream has before the fault
LINGER = "3"  # seconds a failed engine stays DEAD before it exits (fault injection only): /health is read then


class Engine(Proc):
    """`understudy serve` with fault injection on, registered with the frontend."""

    def __init__(self, socket_dir: Path, frontend: Frontend, *extra: str, linger: str = "0"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**ENGINE_ENV, "UNDERSTUDY_FAULT_INJECTION": "1", "UNDERSTUDY_FAULT_LINGER_S": linger}
        self.proc = serve_process(socket_dir, self.port, *ENGINE_ARGS, "--register", frontend.url,
                                  "--registration-ttl", REGISTRATION_TTL, *extra, env=env, backend=BACKEND)
        self.http = httpx.Client(base_url=self.url, timeout=60, headers=admin_headers())

    def wait_serving(self) -> "Engine":
        self.model = self.wait_for(is_event("serving"), timeout=240)["model"]
        return self

    def health(self) -> httpx.Response:
        return self.http.get("/health")

    def inject(self, sig: signal.Signals) -> None:
        self.proc.proc.send_signal(sig)
        self.wait_for(is_event("fault_armed", signal=sig.name))  # armed: the next step takes it

    def state_is(self, new: str) -> dict:
        return self.wait_for(is_event("state", new=new))

    def exit_code(self) -> int:
        return self.proc.wait(timeout=60)

    def close(self) -> None:
        if self.alive:
            self.proc.kill(signal.SIGKILL)
        self.http.close()


class Device:
    """The memory server, the engines of the device (active first, then the parked shadows) and the lock."""

    def __init__(self, frontend: Frontend):
        self.dir = Path(tempfile.mkdtemp(prefix="us-ft-", dir="/tmp"))  # short: unix socket paths are limited
        self.frontend = frontend
        self.mem = ServerProcess.start(BACKEND, self.dir)
        self.engines: list[Engine] = []

    def start(self, *extra: str, linger: str = "0") -> Engine:
        e = Engine(self.dir, self.frontend, *extra, linger=linger)
        self.engines.append(e)
        return e

    @property
    def lock(self) -> FailoverLock:
        return FailoverLock(next(self.dir.glob("failover-*.lock")))

    def close(self) -> None:
        for e in self.engines:
            e.close()
        if self.mem.proc.poll() is None:
            self.mem.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def frontend():
    f = Frontend()
    yield f
    f.close()


@pytest.fixture(scope="module")
def device(frontend):
    d = Device(frontend)
    try:
        d.primary = d.start("--role", "primary", linger=LINGER)
        d.primary.wait_for(is_event("weights_ready"), timeout=240)  # it holds the failover lock by now
        d.shadows = [d.start("--role", "shadow", "--step-timeout", "3")]  # 2. hangs: the watchdog ends it
        for e in d.engines:
            e.wait_serving()
            e.wait_for(is_event("registered"))
        d.shadows[0].wait_for(is_event("waiting_for_failover_lock"))
        yield d
    finally:
        d.close()


def park_next(device: Device, *extra: str, linger: str = "0") -> Engine:
    """Start the next shadow once the previous one is active: with one parked shadow per failover, the one
    that takes over is known (flock wakes no waiter in particular) and so is the frontend's migration
    target (the node's only standby)."""
    shadow = device.start("--role", "shadow", *extra, linger=linger)
    device.shadows.append(shadow)
    return shadow


def parked(shadow: Engine) -> Engine:
    shadow.wait_serving()
    shadow.wait_for(is_event("waiting_for_failover_lock"))
    assert shadow.health().json()["state"] == "STANDBY"
    return shadow


@pytest.fixture(scope="module")
def reference(frontend, device) -> list[str]:
    """The undisturbed greedy answers, through the frontend (all on the primary)."""
    frontend.wait_ready()
    with concurrent.futures.ThreadPoolExecutor(len(TOPICS)) as pool:
        return list(pool.map(lambda t: create(frontend.client, device.primary.model, prompt(t)).choices[0].text,
                             TOPICS))


def prompt(topic: str) -> str:
    return f"Write a short story about {topic}, {STORY}"


def create(client: openai.OpenAI, model: str, text: str, **kw):
    return client.completions.create(model=model, prompt=text, max_tokens=MAX_TOKENS, temperature=0,
                                     extra_body={"ignore_eos": True}, **kw)


# -- 1. a step error under four streams ------------------------------------------------------------------

def test_step_error_fails_fast_and_streams_migrate_to_the_shadow(frontend, device, reference):
    active, shadow = device.primary, device.shadows[0]
    streams = Streams([lambda t=t: create(frontend.client, active.model, prompt(t), stream=True) for t in TOPICS],
                      few=FEW)
    got, finish = streams.got, streams.finish
    assert all(len(g) < MAX_TOKENS for g in got), [len(g) for g in got]
    active.inject(signal.SIGUSR1)  # the next step raises

    # DEAD with the reason, said by /health while the process lingers (the lock is released already).
    dead = active.state_is("DEAD")
    assert dead["reason"].startswith("step error: RuntimeError: injected step error"), dead
    r = active.health()
    assert r.status_code == 503 and r.json()["state"] == "DEAD" and "step error" in r.json()["reason"], r.text
    assert active.http.get("/live").json()["status"] == "exiting"  # live: it leaves by itself
    failed = active.wait_for(is_event("engine_failed"))
    assert (failed["exit"], failed["exit_code"]) == ("step_error", exit_codes.STEP_ERROR), failed
    assert "Traceback" in failed["exc"] and "_inject" in failed["exc"]
    assert active.exit_code() == exit_codes.STEP_ERROR
    exiting = active.wait_for(is_event("exiting"))
    print(f"step error -> lock released {active.wait_for(is_event('failover_lock_released'))['after_s']} s, "
          f"exit after {exiting['after_s']} s (of which {LINGER} s lingering)")

    # The shadow took over; every stream went on there and ended as the undisturbed run did.
    shadow.state_is("ACTIVE")
    park_next(device)  # for test 2 (it warms up meanwhile)
    streams.join()
    for i in range(len(TOPICS)):
        assert "".join(got[i]) == reference[i], (i, got[i], reference[i])
        assert finish[i] == "length"
    moves = frontend.events("migrating")
    assert len(moves) == len(TOPICS) and all(m["target_state"] in ("STANDBY", "WAKING", "ACTIVE") for m in moves), moves
    assert device.lock.holder() == str(shadow.proc.pid)
    assert read_marker(device.lock.path) is None  # a process fault: the device is fine
    shadow.assert_clean_log()


# -- 2. a step hangs: /live, then the watchdog --------------------------------------------------------------

def test_hung_step_fails_live_then_the_watchdog_exits_6(frontend, device, reference):
    hung, shadow = device.shadows[0], parked(device.shadows[1])
    assert hung.health().json()["state"] == "ACTIVE"
    hung.inject(signal.SIGURG)  # the next step hangs in the engine thread; the process and its loop go on
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        # Through the frontend: this request's first step hangs; once the watchdog ends the engine it gets
        # a 503 marked as a failure, and the frontend sends it to the node's shadow instead.
        via = pool.submit(lambda: create(frontend.client, hung.model, prompt(TOPICS[0])).choices[0].text)
        hung.wait_for(is_event("fault_injected", kind="hang"))
        # Straight to the hung engine: queued behind the stuck step, then refused (503) when it fails.
        sent = pool.submit(lambda: hung.http.post("/engine/generate", json=body([1, 2, 3, 4], 4)))
        stuck = wait_until(lambda: (r := hung.http.get("/live", timeout=5)).status_code == 503 and r.json(),
                           "/live to say the engine is stuck", timeout=30)
        assert stuck["status"] == "stuck" and stuck["bound_s"] == 1.5 and stuck["step_s"] > 1.5, stuck
        refused = sent.result(timeout=60)
        assert via.result(timeout=120) == reference[0]
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
    assert refused.headers["x-understudy-failure"] == "watchdog", refused.headers
    assert refused.json()["error"]["message"].startswith("engine failed: watchdog: a step has run for"), refused.text
    failed = hung.wait_for(is_event("engine_failed"))
    assert failed["exit"] == "watchdog" and failed["step_s"] > 3, failed
    assert "_inject" in failed["engine_stack"], failed["engine_stack"]  # where it hung
    assert hung.exit_code() == exit_codes.WATCHDOG
    retried = [e for e in frontend.events("retry") if e["engine"] == hung.wait_for(is_event("registered"))["id"]]
    assert [e["reason"] for e in retried] == ["engine_failed"], retried

    shadow.state_is("ACTIVE")
    park_next(device, linger=LINGER)  # for test 3
    assert device.lock.holder() == str(shadow.proc.pid)
    shadow.assert_clean_log()


# -- 3. a device fault: the shadow of the same device cannot help ---------------------------------------------

def test_device_fault_marks_the_device_and_its_shadow_refuses_it(device):
    broken, last = device.shadows[1], parked(device.shadows[2])
    assert broken.health().json()["state"] == "ACTIVE"
    broken.inject(signal.SIGUSR2)
    r = broken.http.post("/engine/generate", json=body([1, 2, 3, 4], 4))
    assert r.status_code == 503 and "device fault" in r.json()["error"]["message"], r.text
    assert r.headers["x-understudy-failure"] == "device_fault", r.headers
    failed = broken.wait_for(is_event("engine_failed"))
    assert failed["exit"] == "device_fault" and "uncorrectable ECC error" in failed["reason"], failed
    assert broken.exit_code() == exit_codes.DEVICE_FAULT
    marker = read_marker(device.lock.path)
    assert marker is not None and marker["pid"] == broken.proc.pid and "ECC" in marker["reason"], marker
    assert Path(marker["path"]) == marker_path(device.lock.path) and marker_path(device.lock.path).parent == device.dir

    # The last shadow gets the lock but does not wake: DEAD, "device fault" on /health, exit 7.
    dead = last.state_is("DEAD")
    assert dead["reason"].startswith("device fault: uncorrectable ECC error"), dead
    h = last.health()
    assert h.status_code == 503 and h.json()["reason"] == dead["reason"], h.text
    held = last.http.post("/engine/generate", json=body([1, 2, 3, 4], 4))  # refused at once, marked
    assert held.status_code == 503 and held.headers["x-understudy-failure"] == "device_fault", held.text
    assert not last.seen(is_event("state", new="WAKING")) and not last.seen(is_event("kv_adopt_timing"))
    assert last.exit_code() == exit_codes.DEVICE_FAULT

    # A new engine on the device refuses at start, before it loads anything, and says how to clear it.
    late = device.start("--role", "shadow")
    assert late.exit_code() == exit_codes.DEVICE_FAULT
    assert any(marker["path"] in line and "remove" in line for line in late.proc.lines), late.proc.lines[-5:]
    assert not late.seen(is_event("weights_ready"))
    assert json.loads(Path(marker["path"]).read_text())["exit_code"] == exit_codes.DEVICE_FAULT


# -- 4. a tensor-parallel group: a step error on the leader ends the group ------------------------------------

def test_step_error_inside_a_group_step_ends_every_rank_with_exit_5(tmp_path_factory):
    """The leader fails in the middle of a forward its worker is running too (the fault is injected after
    the step's inputs went out): it kills its worker, releases the lock and exits 5."""
    from tests.helpers.tiny_model import make_tiny_llama

    d = Path(tempfile.mkdtemp(prefix="us-ftp-", dir="/tmp"))
    model = make_tiny_llama(tmp_path_factory.mktemp("tp") / "model")
    mems = [ServerProcess.start(BACKEND, d, "--device", str(i)) for i in (0, 1)]
    port = free_port()
    env = {**ENGINE_ENV, "UNDERSTUDY_FAULT_INJECTION": "1"}
    group = serve_process(d, port, "--model", str(model), "--tensor-parallel", "2", "--kv-cache-memory", "16MiB",
                          "--max-model-len", "512", "--dtype", "float32", "--role", "primary", env=env,
                          backend=BACKEND)
    try:
        worker = json.loads(group.wait_line(is_event("tp_group_started"), timeout=180))["ranks"]["1"]
        group.wait_line(is_event("serving"), timeout=180)
        group.proc.send_signal(signal.SIGUSR1)
        group.wait_line(is_event("fault_armed"))
        r = httpx.post(f"http://127.0.0.1:{port}/engine/generate", json=body([1, 2, 3, 4], 8), timeout=60,
                       headers=admin_headers())
        assert r.status_code == 503 and r.headers["x-understudy-failure"] == "step_error", r.text
        assert group.wait() == exit_codes.STEP_ERROR
        lines = [json.loads(l) for l in group.lines if l.startswith("{")]
        events = [e["event"] for e in lines if "tp_rank" not in e]
        # In step (the worker was inside the same forward), then failed as one engine fails; no GROUP_LOST.
        assert events.index("tp_step_failed") < events.index("engine_failed") < events.index("exiting"), events
        assert "tp_rank_lost" not in events
        wait_until(lambda: gone(worker), "the worker rank to be gone", timeout=30)
        lock = FailoverLock(next(d.glob("failover-*.lock")))
        lock.try_acquire()  # free: nobody holds it
        lock.release()
    finally:
        if group.proc.poll() is None:
            group.kill()
        for m in mems:
            m.stop()
        shutil.rmtree(d, ignore_errors=True)


# -- 5. the rules, without processes ------------------------------------------------------------------------------

def test_which_errors_are_device_faults_and_the_marker(tmp_path):
    from understudy.engine.serving.faults import live_bound
    from understudy.failover.faults import exit_code_for, write_marker

    device = ["CUDA error: uncorrectable ECC error encountered",
              "Triton Error [CUDA]: uncorrectable NVLink error detected during the execution",
              "CUDA error: Invalid access of peer GPU memory over nvlink or a hardware error",
              "CUDA error: hardware stack error", "NVRM: GPU at PCI:0000:41:00: GPU has fallen off the bus.",
              "CUDA error: no CUDA-capable device is detected", "CUDA error: system not yet initialized"]
    process = ["CUDA error: an illegal memory access was encountered", "CUDA error: unspecified launch failure",
               "CUDA error: device-side assert triggered", "CUDA error: misaligned address",
               "CUDA out of memory. Tried to allocate 2.00 GiB", "CUDA error: unknown error",
               "NCCL error: unhandled system error", "index 5 is out of bounds for dimension 0 with size 4"]
    assert [exit_code_for(RuntimeError(m)) for m in device] == [exit_codes.DEVICE_FAULT] * len(device)
    assert [exit_code_for(RuntimeError(m)) for m in process] == [exit_codes.STEP_ERROR] * len(process)

    lock = tmp_path / "failover-GPU-abc.lock"
    assert read_marker(lock) is None
    path = write_marker(lock, "uncorrectable ECC error", exit_code=7)
    assert path == tmp_path / "device-GPU-abc.fault" == marker_path(lock)
    marker = read_marker(lock)
    assert (marker["reason"], marker["exit_code"], marker["path"]) == ("uncorrectable ECC error", 7, str(path))
    path.write_text("not json")
    assert read_marker(lock)["reason"].startswith("malformed fault marker")

    # /live's bound: the floor, 20 x the slowest step, at most half the step timeout (none when it is off).
    assert live_bound(60, 0.004) == 5 and live_bound(600, 3.0) == 60 and live_bound(3, 0.004) == 1.5
    assert live_bound(0, 10.0) == 200

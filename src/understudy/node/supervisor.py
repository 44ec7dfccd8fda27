"""`understudy up`: one node's memory service, an active engine and N parked shadows.

Each child runs in a process group of its own. When an engine dies, a
replacement is started on the same port and parks as the new shadow (one of
the existing shadows has already taken over through the failover lock). Each
device's memory service has a twin started with `--standby` (`--no-memory-standby`: none):
started up and blocked on the service's lock, it takes the socket over the moment the
service dies, and the engines, which go on serving from their mappings meanwhile, hand it
their memory back; the dead one is restarted as the new standby (or, with no twin alive,
as the service). SIGTERM stops the engines (they drain), then the standbys, then the memory
services. The node's children are written to `node.json` for `understudy status`.

Hangs: every engine that serves is probed (`GET /live`, a few times a second, short timeout); one that
answers no probe with 200 for --hang-timeout seconds (a SIGSTOPped process, a blocked event loop, an
engine thread stuck in a step when /live says so) is SIGKILLed with its process group, so the shadow
parked on the failover lock takes over and the normal relaunch follows. Engines that are starting,
draining, or paused for a snapshot (QUIESCED, a checkpoint running) are not probed.

Crash loops: a child that dies soon after it started is restarted after a growing delay
(--restart-delay doubling up to --restart-delay-max; back to the first delay once a child stayed up
--restart-reset-after seconds). An engine that exits with DEVICE_FAULT marks the device unhealthy:
no engine is restarted on it any more; the memory service stays up. node.json says all of it.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from understudy.engine.options import parse_serve_args
from understudy.failover import exit_codes
from understudy.logs import log

logger = logging.getLogger("understudy.node.supervisor")


@dataclass
class Child:
    name: str  # memory, memory-twin, engine-0, engine-1, ...
    argv: list[str]
    port: int | None = None
    role: str | None = None  # the role it was started with: primary/shadow (engines), active/standby (memory)
    pid: int | None = None
    starts: int = 0
    started_at: float = 0.0
    proc: subprocess.Popen | None = field(default=None, repr=False)
    # How its last incarnation ended, and what comes next (node.json, `understudy status`).
    last_exit: str | None = None  # exit_codes.describe of its return code
    last_returncode: int | None = None
    last_exit_at: float | None = None
    last_error: str | None = None  # the last error line it logged (any incarnation)
    failures: int = 0  # deaths in a row, each soon after its start: the restart delay grows with them
    next_restart_at: float | None = None  # wall clock; None: not scheduled
    not_restarted: str | None = None  # why it is not restarted (an unhealthy device)
    # The running incarnation, from its log lines.
    state: str | None = None  # its lifecycle state (engines), SERVING or STANDBY (memory services)
    serving: bool = False  # its HTTP listener is up: probed from here on
    pump: threading.Thread | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        return {"name": self.name, "pid": self.pid, "port": self.port, "role": self.role, "starts": self.starts,
                "started_at": self.started_at, "last_exit": self.last_exit, "last_returncode": self.last_returncode,
                "last_exit_at": self.last_exit_at, "last_error": self.last_error, "failures": self.failures,
                "next_restart_at": self.next_restart_at, "not_restarted": self.not_restarted, "state": self.state}


@dataclass
class Probing:
    """How engines are probed for hangs (`understudy up --probe-interval / --probe-timeout / --hang-timeout`)."""

    interval: float = 0.25  # seconds between the starts of two probes of one engine
    timeout: float = 0.5  # the longest one probe waits (cut so that it ends by the hang deadline)
    hang_timeout: float = 1.0  # no 200 from /live for this long (and two probes missed): SIGKILL
    history: int = 12  # probes kept for the engine_unresponsive log line


@dataclass
class Backoff:
    """Restart delays: first, doubling up to most, back to first once a child stayed up reset_after seconds."""

    first: float = 0.5
    most: float = 30.0
    reset_after: float = 10.0

    def delay(self, failures: int) -> float:
        return min(self.most, self.first * 2 ** max(0, failures - 1))


class LiveProber:
    """GET /live of one engine, judged by the node's rule: hung when no probe got a 200 for
    `hang_timeout` seconds and at least two were missed (timed out, refused, non-200). A probe's timeout
    is cut so that it ends by that deadline. bench/liveness.py measures this prober."""

    def __init__(self, port: int, probing: Probing):
        self.port, self.p = port, probing
        self.conn: http.client.HTTPConnection | None = None
        self.history: deque = deque(maxlen=probing.history)
        self.t_start = time.monotonic()
        self.last_ok: float | None = None  # when the last probe that got a 200 was sent
        self.misses = 0

    def reset(self) -> None:
        self.last_ok, self.misses = None, 0

    def probe(self) -> bool:
        """One probe; True when the engine is hung by the rule."""
        t0 = time.monotonic()
        if self.last_ok is None:
            self.last_ok, self.misses = t0, 0
        timeout = max(0.05, min(self.p.timeout, self.last_ok + self.p.hang_timeout - t0))
        result, self.conn = _get_live(self.conn, self.port, timeout)
        t1 = time.monotonic()
        self.history.append({"at_s": round(t0 - self.t_start, 3), "result": result, "ms": round((t1 - t0) * 1e3, 1)})
        if result in ("ok", "busy"):
            self.last_ok, self.misses = t0, 0
        else:
            self.misses += 1
        return self.misses >= 2 and t1 - self.last_ok >= self.p.hang_timeout

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


@dataclass(frozen=True)
class Spanning:
    """Groups across nodes (engine/parallel/nodes.py): this node's place, and where slot i's group meets
    (the leader's store at master_addr:master_port + i, the same on every node)."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0

    @property
    def member(self) -> bool:
        """This node only runs ranks of groups led from node 0: no HTTP, no lock, no frontend."""
        return self.node_rank > 0

    def flags(self, slot: int) -> list[str]:
        if self.nnodes == 1:
            return []
        return ["--nnodes", str(self.nnodes), "--node-rank", str(self.node_rank), "--master-addr", self.master_addr,
                "--master-port", str(self.master_port + slot)]


MEMBER_STARTED = '"tp_node_started"'  # a member node's slot has started its ranks (engine/parallel/nodes.py)
# A memory service's log events that say its state (memory/server.py): a standby logs standby_waiting, then
# standby_took_over and listening once the live one is gone; a standby with no live one listens at once.
MEMORY_STATES = {"standby_waiting": "STANDBY", "listening": "SERVING"}
MEMORY_READY = ('"standby_waiting"', '"listening"')


class Supervisor:
    def __init__(self, *, socket_dir: Path, backend: str, device: int, port: int, shadows: int,
                 engine_args: list[str], restart_delay: float = 0.5, snapshot_dir: Path | None = None,
                 frontend_port: int | None = None, tensor_parallel: int = 1, backoff: Backoff | None = None,
                 probing: Probing | None = None, own_memory: bool = True, spanning: Spanning | None = None,
                 memory_standby: bool = True):
        self.socket_dir = socket_dir
        self.engine_args = engine_args
        self.backoff = backoff or Backoff(first=restart_delay)
        self.probing = probing or Probing()  # interval 0: engines are not probed
        self.events: queue.Queue = queue.Queue()
        self.spanning = spanning = spanning or Spanning()
        local = tensor_parallel // spanning.nnodes  # this node's devices of each group
        self.stopping = False
        self._state_lock = threading.Lock()
        # The device(s) the engines run on; an engine's DEVICE_FAULT exit marks them unhealthy.
        self.device = {"devices": list(range(device, device + local)), "healthy": True, "reason": None,
                       "since": None}
        py = [sys.executable, "-m", "understudy"]
        # --tensor-parallel N: a memory service per device of the group; each engine is a group's leader
        # (one process tree: its ranks die with it), so a child entry is a whole group (docs/tensor-parallel.md).
        # --memory-service connect: none; someone else (systemd) runs and restarts them.
        # Each has a twin (memory-twin, memory-1-twin, ...) started as its standby: the two take turns.
        self.memories = [
            Child("memory" if k == 0 else f"memory-{k}",
                  py + ["memory-server", "--backend", backend, "--device", str(device + k), "--socket-dir",
                        str(socket_dir)], role="active") for k in range(local)] if own_memory else []
        twins = [Child(f"{m.name}-twin", m.argv, role="standby") for m in self.memories] if memory_standby else []
        self.twin_of = {**{m.name: t for m, t in zip(self.memories, twins)},
                        **{t.name: m for m, t in zip(self.memories, twins)}}
        self.memories += twins  # started after the services they stand by for
        if tensor_parallel > 1:
            if snapshot_dir is not None:
                raise SystemExit("understudy up: --snapshot-dir is not supported with --tensor-parallel (a group "
                                 "is several processes)")
            engine_args = [*engine_args, "--tensor-parallel", str(tensor_parallel)]
        if spanning.member and (frontend_port is not None or snapshot_dir is not None):
            raise SystemExit("understudy up: --frontend-port and --snapshot-dir belong on the leaders' node "
                             "(--node-rank 0)")
        # A member node's slot i runs its ranks of the group whose leader is node 0's slot i: no port, no role.
        self.engines = [
            Child(f"engine-{i}", py + ["serve", "--backend", backend, "--device", str(device), "--socket-dir",
                                       str(socket_dir), "--memory-service", "connect",
                                       *([] if spanning.member else ["--port", str(port + i)]),
                                       *spanning.flags(i), *engine_args],
                  port=None if spanning.member else port + i,
                  role=None if spanning.member else "primary" if i == 0 else "shadow")
            for i in range(1 + shadows)
        ]
        # Flags that cannot work (a bad value, a missing optional package) stop `up` now, with serve's
        # `understudy serve: error: ...` and exit 2, rather than making every engine fail at its start.
        config = parse_serve_args(self.engines[0].argv[len(py) + 1:])
        self.failover_dir = Path(config.failover.failover_dir or socket_dir)  # where device-fault markers go
        self.frontend = None
        if frontend_port is not None:  # an OpenAI frontend the engines register with (docs/frontend.md)
            self.frontend = Child("frontend", py + ["frontend", "--port", str(frontend_port),
                                                    *frontend_flags(engine_args)], port=frontend_port)
            for engine in self.engines:
                engine.argv += ["--register", f"http://127.0.0.1:{frontend_port}"]
        self.snapshots = None
        if snapshot_dir is not None:  # shadows restored from images where they can be (snapshot/node.py)
            from understudy.node.snapshots import NodeSnapshots

            argv = self.engines[0].argv
            self.snapshots = NodeSnapshots(snapshot_dir, argv[argv.index("serve") + 1:])

    @property
    def state_file(self) -> Path:
        return self.socket_dir / "node.json"

    @property
    def children(self) -> list[Child]:
        return [*self.memories, *self.engines, *([self.frontend] if self.frontend else [])]

    def _write_state(self) -> None:
        data = {"supervisor_pid": os.getpid(), "socket_dir": str(self.socket_dir), "device": self.device,
                "children": [c.as_dict() for c in self.children]}
        with self._state_lock:  # the main loop and the probers write it
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=2))
            tmp.replace(self.state_file)

    def _start(self, child: Child, role: str | None = None, wait_for: str | tuple[str, ...] | None = None,
               image: Path | None = None) -> None:
        """Start `child` (as `role`); wait for a log line with `wait_for` (or any of them) in it."""
        if role is None:
            flags = []
        elif child in self.memories:
            flags = ["--standby"] if role == "standby" else []
        else:
            flags = ["--role", role]
        argv = child.argv + flags
        child.role = role or child.role
        wait_for = (wait_for,) if isinstance(wait_for, str) else wait_for
        if image is not None:  # restored from a snapshot image: a process group of its own too
            child.proc = self.snapshots.restore(image)
        else:
            child.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                          start_new_session=True)  # its own process group
        child.pid, child.starts, child.started_at = child.proc.pid, child.starts + 1, time.time()
        child.next_restart_at, child.state, child.serving = None, None, image is not None
        ready = threading.Event()
        child.pump = threading.Thread(target=self._pump, args=(child, child.proc, wait_for, ready), daemon=True)
        child.pump.start()
        threading.Thread(target=self._watch, args=(child, child.proc), daemon=True).start()
        if child in self.engines and self.probing.interval > 0 and child.port is not None:
            threading.Thread(target=self._probe, args=(child, child.proc), name=f"probe-{child.name}",
                             daemon=True).start()
        log(logger, "child_started", child=child.name, pid=child.pid, role=child.role, port=child.port,
            start=child.starts)
        self._write_state()
        if wait_for and not ready.wait(timeout=600):
            raise RuntimeError(f"{child.name} did not become ready")

    def _pump(self, child: Child, proc: subprocess.Popen, wait_for: tuple[str, ...] | None,
              ready: threading.Event) -> None:
        """Forward a child's log lines, saying which child wrote them; notice when it is ready, when it
        serves HTTP, its lifecycle state and its errors."""
        for line in proc.stderr:
            tagged, record = _tagged(line, child.name, proc.pid)
            sys.stderr.write(tagged)
            if wait_for and any(w in line for w in wait_for):
                ready.set()
            if record is not None:
                if proc is child.proc:
                    if record.get("event") == "serving":
                        child.serving = True
                    elif record.get("event") == "state" and isinstance(record.get("new"), str):
                        child.state = record["new"]
                    elif child in self.memories and record.get("event") in MEMORY_STATES:
                        child.state = MEMORY_STATES[record["event"]]
                        if not self.stopping:  # (stop() removes node.json)
                            self._write_state()  # `understudy status` shows which one serves
                error = _error_of(record)
            else:
                error = _error_line(line)
            if error:
                child.last_error = error[:500]
        ready.set()

    def _start_shadow(self, child: Child) -> None:
        """A shadow: restored from its port's image if one can be (--snapshot-dir), else started cold (and,
        once parked, checkpointed into an image for the next time)."""
        image = self.snapshots.image_for(child.port) if self.snapshots else None
        if image is not None:
            # A failed restore exits like a dead child: the next start is cold (the image is not retried).
            self._start(child, role="shadow", wait_for='"restored"', image=image)
        elif self.snapshots:
            self._start(child, role="shadow", wait_for='"waiting_for_failover_lock"')
            self.snapshots.after_parked(child.port, child.pid)
        else:
            self._start(child, role="shadow", wait_for='"serving"')

    def _watch(self, child: Child, proc: subprocess.Popen) -> None:
        rc = proc.wait()
        pump = child.pump if proc is child.proc else None
        if pump is not None:
            pump.join(timeout=2)  # its last lines (the error it died of) first
        self.events.put((child, proc, rc))

    # -- hangs -------------------------------------------------------------------------------------------

    def _probe_exempt(self, child: Child) -> str | None:
        """Why an engine must not be judged by its probes now, or None."""
        if self.stopping:
            return "stopping"
        if not child.serving:
            return "starting"
        if child.state in ("DRAINING", "QUIESCED"):  # the listener is closed / a snapshot may freeze it
            return child.state
        if self.snapshots is not None and child.port in self.snapshots.making:
            return "checkpointing"
        return None

    def _probe(self, child: Child, proc) -> None:
        """Probe one incarnation of an engine until it ends; SIGKILL its process group when it hangs."""
        prober = LiveProber(child.port, self.probing)
        try:
            while proc is child.proc and proc.poll() is None:
                t0 = time.monotonic()
                if self._probe_exempt(child) is not None:
                    prober.reset()  # judged afresh once it may be
                elif prober.probe() and proc is child.proc and proc.poll() is None \
                        and self._probe_exempt(child) is None:
                    silent_s = time.monotonic() - prober.last_ok
                    log(logger, "engine_unresponsive", logging.ERROR, child=child.name, pid=proc.pid,
                        port=child.port, state=child.state, silent_s=round(silent_s, 3), misses=prober.misses,
                        probes=list(prober.history), action="SIGKILL of its process group")
                    child.last_error = (f"engine_unresponsive: no 200 from /live for {silent_s:.2f} s "
                                        f"({prober.history[-1]['result']})")
                    _kill_group(proc.pid)
                    return
                time.sleep(max(0.0, t0 + self.probing.interval - time.monotonic()))
        finally:
            prober.close()

    def run(self) -> int:
        self.socket_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.events.put(None))
        if self.frontend is not None:  # first: the engines register with it as they come up
            self._start(self.frontend, wait_for='"serving"')
        for memory in self.memories:  # the services, then their twins standing by for them
            self._start(memory, role=memory.role,
                        wait_for=MEMORY_READY if memory.role == "standby" else '"listening"')
        if self.spanning.member:  # each slot's ranks find their leader on node 0 (which may come up later)
            for engine in self.engines:
                self._start(engine, wait_for=MEMBER_STARTED)
        else:
            self._start(self.engines[0], role="primary", wait_for='"serving"')  # it publishes the weights first
            for shadow in self.engines[1:]:
                self._start_shadow(shadow)
        log(logger, "node_up", engines=len(self.engines), state_file=str(self.state_file))
        due: dict[str, tuple[float, Child]] = {}  # child name -> (monotonic time of its restart, child)
        while True:
            wait = max(0.0, min(t for t, _ in due.values()) - time.monotonic()) if due else None
            try:
                event = self.events.get(timeout=wait)
            except queue.Empty:
                event = ()
            if event is None:
                return self.stop()
            if event:
                child, proc, rc = event
                if proc is not child.proc:
                    continue  # an old incarnation
                delay = self._exited(child, proc, rc)
                if delay is not None:
                    due[child.name] = (time.monotonic() + delay, child)
                self._write_state()
            now = time.monotonic()
            for name, (t, child) in sorted(due.items(), key=lambda kv: kv[1][0]):
                if t <= now and not self.stopping:
                    del due[name]
                    self._restart(child)

    def _exited(self, child: Child, proc, rc: int) -> float | None:
        """Record how a child ended; the delay before its restart, or None when it is not restarted."""
        now = time.time()
        up_s = now - child.started_at
        child.last_returncode, child.last_exit, child.last_exit_at = rc, exit_codes.describe(rc), now
        child.failures = 1 if up_s >= self.backoff.reset_after else child.failures + 1
        log(logger, "child_exited", level=logging.WARNING, child=child.name, pid=proc.pid, returncode=rc,
            exit=child.last_exit, up_s=round(up_s, 3), last_error=child.last_error)
        if child in self.engines and rc == exit_codes.DEVICE_FAULT and self.device["healthy"]:
            self.device.update(healthy=False, since=now,
                               reason=f"{child.name} (pid {proc.pid}) exited with device_fault"
                                      + (f": {child.last_error}" if child.last_error else ""),
                               markers=[str(m) for m in sorted(self.failover_dir.glob("device-*.fault"))])
            log(logger, "device_unhealthy", logging.ERROR, devices=self.device["devices"],
                reason=self.device["reason"], markers=self.device["markers"],
                note="no engine is restarted on it; the memory service stays up; once the device is reset or "
                     "replaced, remove the markers and restart the node")
        if child in self.engines and not self.device["healthy"]:
            child.not_restarted, child.next_restart_at = f"device unhealthy: {self.device['reason']}", None
            log(logger, "engine_not_restarted", logging.WARNING, child=child.name, reason=child.not_restarted)
            return None
        delay = self.backoff.delay(child.failures)
        child.next_restart_at = now + delay
        log(logger, "child_restart_scheduled", child=child.name, delay_s=delay, failures=child.failures,
            exit=child.last_exit)
        return delay

    def _restart(self, child: Child) -> None:
        if child in self.memories:
            twin = self.twin_of.get(child.name)
            if twin is not None and twin.proc is not None and twin.proc.poll() is None:
                # Its twin serves (it took over) or stands by: this one stands by for it.
                self._start(child, role="standby", wait_for=MEMORY_READY)
            else:
                self._start(child, role="active", wait_for='"listening"')
        elif child is self.frontend:  # the engines' next keep-alive registers them again
            self._start(child, wait_for='"serving"')
        elif self.spanning.member:  # this node's part of the slot's next group (a standby: node 0 decides)
            self._start(child, wait_for=MEMBER_STARTED)
        elif any(e.proc is not None and e.proc.poll() is None for e in self.engines if e is not child):
            # Another engine took over through the lock; the replacement parks as a shadow.
            self._start_shadow(child)
        else:
            # No engine is left (the first primary failed at its start, or all died): a shadow would park
            # on a lock nobody holds, over weights nobody published. A primary imports the weights if the
            # memory service holds them and adopts the kv pool if its layout is ours.
            log(logger, "restarting_as_primary", child=child.name, reason="no other engine is running")
            self._start(child, role="primary", wait_for='"serving"')

    def stop(self) -> int:
        self.stopping = True  # probers stand down: draining engines close their listeners
        log(logger, "node_stopping")
        # The frontend drains first (its clients' answers need the engines), the memory service goes last,
        # after its standby (which would otherwise take over from it).
        memories = sorted(self.memories, key=lambda c: c.state != "STANDBY")
        for child in [*([self.frontend] if self.frontend else []), *self.engines, *memories]:
            if child.proc and child.proc.poll() is None:
                os.killpg(child.proc.pid, signal.SIGTERM)
                try:
                    child.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    log(logger, "child_stop_timeout", level=logging.WARNING, child=child.name, pid=child.proc.pid,
                        note="no exit 60 s after SIGTERM: killed")
                    os.killpg(child.proc.pid, signal.SIGKILL)
                    child.proc.wait()
        self.state_file.unlink(missing_ok=True)
        log(logger, "node_stopped")
        return 0


def frontend_flags(engine_args: list[str]) -> list[str]:
    """The engines' flags that the frontend needs too: the model (same tokenizer, same names, same context),
    what the OpenAI routes do (chat template, sampling defaults, parsers) and access (the same API keys
    and admin token, CORS)."""
    config = parse_serve_args(engine_args)
    model, api, access = config.model, config.api, config.access
    out = []
    if model.model is not None:
        out += ["--model", model.model]
    if model.served_model_name:
        out += ["--served-model-name", *model.served_model_name]
    for flag, number in (("--max-model-len", model.max_model_len), ("--seed", model.seed)):
        if number is not None:
            out += [flag, str(number)]
    for flag, value in (("--chat-template", api.chat_template), ("--tool-call-parser", api.tool_call_parser),
                        ("--reasoning-parser", api.reasoning_parser),
                        ("--admin-token-file", access.admin_token_file)):
        if value is not None:
            out += [flag, value]
    if api.generation_config != "auto":
        out += ["--generation-config", api.generation_config]
    if api.enable_auto_tool_choice:
        out += ["--enable-auto-tool-choice"]
    for flag, values in (("--api-key", access.api_key), ("--allowed-origins", access.allowed_origins),
                         ("--allowed-methods", access.allowed_methods),
                         ("--allowed-headers", access.allowed_headers)):
        for value in values:
            out += [flag, value]
    return out


def _tagged(line: str, name: str, pid: int) -> tuple[str, dict | None]:
    """A JSON log line gets "child" and "child_pid" keys; any other line a "[name] " prefix. Also the
    line's JSON record (None for other lines)."""
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if isinstance(record, dict):
        return json.dumps({**record, "child": name, "child_pid": pid}) + "\n", record
    return f"[{name}] {line}", None


def _error_of(record: dict) -> str | None:
    """A JSON log record at level error or above, in one line: its event and what it says."""
    if record.get("level") not in ("error", "critical"):
        return None
    detail = next((str(record[k]) for k in ("reason", "message", "error", "device") if record.get(k)), None)
    if detail is None and record.get("exc"):
        detail = str(record["exc"]).strip().splitlines()[-1]
    return f"{record.get('event')}: {detail}" if detail else str(record.get("event"))


# The last line of a traceback ("FileNotFoundError: ..."), an argparse refusal ("understudy serve: error: ...").
_ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)\b|understudy[\w -]*: error:|"
                         r"Fatal Python error)")


def _error_line(line: str) -> str | None:
    line = line.strip()
    return line if _ERROR_LINE.match(line) else None


def _get_live(conn: http.client.HTTPConnection | None, port: int,
              timeout: float) -> tuple[str, http.client.HTTPConnection | None]:
    """One GET /live on 127.0.0.1:port over a kept-alive connection: "ok" or what went wrong."""
    for attempt in (0, 1):
        fresh = conn is None
        if fresh:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            conn.request("GET", "/live")
            r = conn.getresponse()
            body = r.read()
            if r.status == 200:
                return "ok", conn
            if r.status == 503 and body == b"Service Unavailable":
                return "busy", conn  # uvicorn's --limit-concurrency refusal: its loop answers, so it is alive
            return f"HTTP {r.status}", conn
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
            conn.close()
            conn = None
            if fresh or attempt:  # a kept-alive connection the server closed: once more on a new one
                return type(e).__name__, None
        except TimeoutError:
            conn.close()
            return "timeout", None
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            return ("refused" if isinstance(e, ConnectionRefusedError) else type(e).__name__), None
    return "unreachable", None


def _kill_group(pid: int) -> None:
    """SIGKILL a child's process group (its ranks, a memory service it started) or, failing that, it."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def node_status(socket_dir: Path) -> dict:
    """The node's children (from node.json) with each engine's /health."""
    import httpx

    state = json.loads((socket_dir / "node.json").read_text())
    for child in state["children"]:
        alive = child["pid"] is not None and Path(f"/proc/{child['pid']}").exists()
        child["alive"] = alive
        if alive and child["name"].startswith("memory") and child.get("state"):  # serving or standing by
            child["health"] = {"state": child["state"]}
        if child.get("port") and alive:
            try:
                child["health"] = httpx.get(f"http://127.0.0.1:{child['port']}/health", timeout=5).json()
            except (httpx.HTTPError, ValueError) as e:
                child["health"] = {"state": "unreachable", "error": str(e)}
    return state

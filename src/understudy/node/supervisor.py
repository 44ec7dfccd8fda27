"""`understudy up`: one node's memory service, an active engine and N parked shadows.

Each child runs in a process group of its own. When an engine dies, a
replacement is started on the same port and parks as the new shadow (one of
the existing shadows has already taken over through the failover lock). When
the memory service dies, it is restarted; engines go on serving from their
mappings meanwhile. SIGTERM stops the engines (they drain), then the memory
service. The node's children are written to `node.json` for `understudy status`.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from understudy.engine.options import parse_serve_args
from understudy.logs import log

logger = logging.getLogger("understudy.node.supervisor")


@dataclass
class Child:
    name: str  # memory, engine-0, engine-1, ...
    argv: list[str]
    port: int | None = None
    role: str | None = None  # the role it was started with
    pid: int | None = None
    starts: int = 0
    started_at: float = 0.0
    proc: subprocess.Popen | None = field(default=None, repr=False)


class Supervisor:
    def __init__(self, *, socket_dir: Path, backend: str, device: int, port: int, shadows: int,
                 engine_args: list[str], restart_delay: float = 0.5, snapshot_dir: Path | None = None,
                 frontend_port: int | None = None, tensor_parallel: int = 1):
        self.socket_dir = socket_dir
        self.engine_args = engine_args
        self.restart_delay = restart_delay
        self.events: queue.Queue = queue.Queue()
        self.stopping = False
        py = [sys.executable, "-m", "understudy"]
        self.memory = Child("memory", py + ["memory-server", "--backend", backend, "--device", str(device),
                                            "--socket-dir", str(socket_dir)])
        # --tensor-parallel N: a memory service per device of the group; each engine is a group's leader
        # (one process tree: its ranks die with it), so a child entry is a whole group (docs/tensor-parallel.md).
        self.memories = [self.memory] + [
            Child(f"memory-{k}", py + ["memory-server", "--backend", backend, "--device", str(device + k),
                                       "--socket-dir", str(socket_dir)]) for k in range(1, tensor_parallel)]
        if tensor_parallel > 1:
            if snapshot_dir is not None:
                raise SystemExit("understudy up: --snapshot-dir is not supported with --tensor-parallel (a group "
                                 "is several processes)")
            engine_args = [*engine_args, "--tensor-parallel", str(tensor_parallel)]
        self.engines = [
            Child(f"engine-{i}", py + ["serve", "--backend", backend, "--device", str(device), "--socket-dir",
                                       str(socket_dir), "--memory-service", "connect", "--port", str(port + i),
                                       *engine_args],
                  port=port + i, role="primary" if i == 0 else "shadow")
            for i in range(1 + shadows)
        ]
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

    def _write_state(self) -> None:
        data = {"supervisor_pid": os.getpid(), "socket_dir": str(self.socket_dir),
                "children": [{"name": c.name, "pid": c.pid, "port": c.port, "role": c.role, "starts": c.starts,
                              "started_at": c.started_at}
                             for c in [*self.memories, *self.engines, *([self.frontend] if self.frontend else [])]]}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.state_file)

    def _start(self, child: Child, role: str | None = None, wait_for: str | None = None,
               image: Path | None = None) -> None:
        argv = child.argv + (["--role", role] if role else [])
        child.role = role or child.role
        if image is not None:  # restored from a snapshot image: a process group of its own too
            child.proc = self.snapshots.restore(image)
        else:
            child.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                          start_new_session=True)  # its own process group
        child.pid, child.starts, child.started_at = child.proc.pid, child.starts + 1, time.time()
        ready = threading.Event()
        threading.Thread(target=self._pump, args=(child, child.proc, wait_for, ready), daemon=True).start()
        threading.Thread(target=self._watch, args=(child, child.proc), daemon=True).start()
        log(logger, "child_started", child=child.name, pid=child.pid, role=child.role, port=child.port)
        if wait_for and not ready.wait(timeout=600):
            raise RuntimeError(f"{child.name} did not become ready")
        self._write_state()

    def _pump(self, child: Child, proc: subprocess.Popen, wait_for: str | None, ready: threading.Event) -> None:
        """Forward a child's log lines, saying which child wrote them, and notice when it is ready."""
        for line in proc.stderr:
            sys.stderr.write(_tagged(line, child.name, proc.pid))
            if wait_for and wait_for in line:
                ready.set()
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
        self.events.put((child, proc, proc.wait()))

    def run(self) -> int:
        self.socket_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.events.put(None))
        if self.frontend is not None:  # first: the engines register with it as they come up
            self._start(self.frontend, wait_for='"serving"')
        for memory in self.memories:
            self._start(memory, wait_for='"listening"')
        self._start(self.engines[0], role="primary", wait_for='"serving"')  # it publishes the weights first
        for shadow in self.engines[1:]:
            self._start_shadow(shadow)
        log(logger, "node_up", engines=len(self.engines), state_file=str(self.state_file))
        while True:
            event = self.events.get()
            if event is None:
                return self.stop()
            child, proc, rc = event
            if proc is not child.proc:
                continue  # an old incarnation
            log(logger, "child_exited", level=logging.WARNING, child=child.name, pid=proc.pid, returncode=rc)
            time.sleep(self.restart_delay)  # don't spin if a child dies at once, every time
            if child in self.memories:
                self._start(child, wait_for='"listening"')
            elif child is self.frontend:  # the engines' next keep-alive registers them again
                self._start(child, wait_for='"serving"')
            else:
                # Another engine took over through the lock; the replacement parks as a shadow.
                self._start_shadow(child)

    def stop(self) -> int:
        log(logger, "node_stopping")
        # The frontend drains first (its clients' answers need the engines), the memory service goes last.
        for child in [*([self.frontend] if self.frontend else []), *self.engines, *self.memories]:
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
    """The engines' --model / --served-model-name, for the frontend (same tokenizer, same model name)."""
    model = parse_serve_args(engine_args).model
    out = []
    if model.model is not None:
        out += ["--model", model.model]
    if model.served_model_name is not None:
        out += ["--served-model-name", model.served_model_name]
    return out


def _tagged(line: str, name: str, pid: int) -> str:
    """A JSON log line gets "child" and "child_pid" keys; any other line a "[name] " prefix."""
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if isinstance(record, dict):
        return json.dumps({**record, "child": name, "child_pid": pid}) + "\n"
    return f"[{name}] {line}"


def node_status(socket_dir: Path) -> dict:
    """The node's children (from node.json) with each engine's /health."""
    import httpx

    state = json.loads((socket_dir / "node.json").read_text())
    for child in state["children"]:
        alive = child["pid"] is not None and Path(f"/proc/{child['pid']}").exists()
        child["alive"] = alive
        if child.get("port") and alive:
            try:
                child["health"] = httpx.get(f"http://127.0.0.1:{child['port']}/health", timeout=2).json()
            except (httpx.HTTPError, ValueError) as e:
                child["health"] = {"state": "unreachable", "error": str(e)}
    return state

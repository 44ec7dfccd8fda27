"""Checkpoint a parked (or sleeping) engine into an image directory.

    Pending   the manifest is written: identity of the engine (from its command line), nothing touched
    Creating  POST /engine/control/quiesce (weights unmapped, memory-service connections closed),
              CUDA lock + checkpoint (cuda_checkpoint; a no-op without CUDA), CRIU dump --leave-running,
              CUDA restore + unlock
    Ready     POST /engine/control/resume: the engine parks (or sleeps) again and goes on serving
    Failed    whatever failed after the quiesce is undone (CUDA restored, the engine resumed): a failed
              checkpoint leaves the engine running and serving; the message says what failed

Only the engine's own small state is in the image: its weights stay in the memory service.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import httpx

from understudy.common.auth import admin_headers
from understudy.engine.options import parse_serve_args
from understudy.engine.serve_config import ServeConfig
from understudy.logs import log
from understudy.snapshot import criu as criu_mod
from understudy.snapshot import cuda_checkpoint
from understudy.snapshot.identity import identity, params_from_config, serve_argv_of
from understudy.snapshot.manifest import Manifest, criu_dir, image_bytes

logger = logging.getLogger("understudy.snapshot")

HTTP_TIMEOUT = 120.0  # quiesce and resume wait for the engine thread and the memory service


class CheckpointFailed(RuntimeError):
    pass


def engine_url(config: ServeConfig) -> str:
    host = "127.0.0.1" if config.http.host in ("0.0.0.0", "::", "") else config.http.host
    return f"http://{host}:{config.http.port}"


def locate(engine: str | None = None, pid: int | None = None) -> tuple[int, str]:
    """(pid, url) of an engine named by its URL or its pid, which CRIU can dump."""
    if engine:
        try:
            health = httpx.get(f"{engine.rstrip('/')}/health", timeout=10).json()
        except (httpx.HTTPError, ValueError) as e:
            raise CheckpointFailed(f"cannot reach the engine at {engine}: {e}") from None
        if "pid" not in health:
            raise CheckpointFailed(f"{engine}/health names no pid: is it an understudy engine?")
        pid = int(health["pid"])
    assert pid is not None
    if os.getsid(pid) == 0:
        # getsid answers 0 when the session leader lives in another pid namespace (`docker exec`,
        # `kubectl exec`): CRIU cannot dump such a process, so say so before touching the engine.
        raise CheckpointFailed(
            f"process {pid}'s session leader is outside its pid namespace (started through `docker exec` or "
            f"`kubectl exec`?): CRIU cannot dump it; start the engine in its own session (`setsid understudy "
            f"serve ...`, as `understudy up` does)")
    return pid, engine.rstrip("/") if engine else engine_url(parse_serve_args(serve_argv_of(pid)))


def _control(url: str, action: str, token_file: str | None, **body) -> dict:
    # Connection: close, so the engine holds no connection from us when CRIU dumps it. The control routes
    # need the admin token (common/auth.py): the engine's --admin-token-file, or the node's default.
    r = httpx.post(f"{url}/engine/control/{action}", json=body or None,
                   headers={"Connection": "close", **admin_headers(token_file)}, timeout=HTTP_TIMEOUT)
    data = r.json() if r.headers.get("content-type", "").startswith("application/json") else {"text": r.text}
    if r.status_code != 200:
        message = data.get("error", {}).get("message") if isinstance(data.get("error"), dict) else None
        raise CheckpointFailed(f"{action}: HTTP {r.status_code}: {message or data}")
    return data


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def _stdio(pid: int) -> dict[str, str]:
    """What the engine's fds 0-2 are, as CRIU names them: 'pipe:[123]', 'socket:[45]', a terminal as
    'tty[rdev:dev]' (dumped as external, inherited on restore), a file by its path ('/dev/null')."""
    out = {}
    for fd in (0, 1, 2):
        link = f"/proc/{pid}/fd/{fd}"
        try:
            target = os.readlink(link)
            if target.startswith(("/dev/pts/", "/dev/tty")):
                st = os.stat(link)
                target = f"tty[{st.st_rdev:x}:{st.st_dev:x}]"
        except OSError:
            continue
        out[str(fd)] = target
    return out


def checkpoint(directory: str | os.PathLike, *, engine: str | None = None, pid: int | None = None,
               criu: str | None = None) -> Manifest:
    """Checkpoint the engine at URL `engine` (or with `pid`) into `directory`. Raises CheckpointFailed
    (the manifest says Failed, the engine still serves) or returns the Ready manifest."""
    directory = Path(directory)
    pid, url = locate(engine, pid)
    argv = serve_argv_of(pid)
    config = parse_serve_args(argv)
    params = params_from_config(config)
    token_file = config.access.admin_token_file
    manifest = Manifest(identity(params), params)
    manifest.engine = {"pid": pid, "url": url, "host": config.http.host, "port": config.http.port, "argv": argv}
    manifest.write(directory)  # Pending: an unwritable directory fails here, before the engine is touched
    log(logger, "checkpoint_pending", dir=str(directory), identity=manifest.identity, pid=pid, url=url)

    def fail(message: str) -> CheckpointFailed:
        manifest.set_phase(directory, "Failed", message)
        log(logger, "checkpoint_failed", logging.ERROR, dir=str(directory), message=message)
        return CheckpointFailed(message)

    try:
        criu = criu_mod.find_criu(criu)
        criu_version = criu_mod.version(criu)
    except criu_mod.CriuError as e:
        raise fail(str(e)) from None
    if children := _children(pid):
        raise fail(f"engine {pid} has child processes {children} (a memory service it started itself?): a "
                   f"snapshot holds the engine alone; run the memory service apart (--memory-service connect, "
                   f"as `understudy up` does)")
    t0 = time.perf_counter()
    try:
        quiesced = _control(url, "quiesce", token_file)
    except (CheckpointFailed, httpx.HTTPError) as e:
        raise fail(f"the engine could not be quiesced, nothing was dumped: {e}") from None
    t_quiesce = time.perf_counter() - t0
    manifest.engine.update(state=quiesced["previous"], stdio=_stdio(pid), shell_job=os.getsid(pid) != pid,
                           tids=sorted(int(t) for t in os.listdir(f"/proc/{pid}/task")),
                           cuda=cuda_checkpoint.uses_cuda(pid))
    manifest.image = {"criu_version": criu_version}
    manifest.set_phase(directory, "Creating")
    cuda_locked = False
    timings = {"quiesce_s": round(t_quiesce, 3)}
    try:
        if manifest.engine["cuda"]:
            t = time.perf_counter()
            cuda_checkpoint.checkpoint(pid)
            cuda_locked = True
            timings["cuda_checkpoint_s"] = round(time.perf_counter() - t, 3)
        ttys = sorted({key for key in manifest.engine["stdio"].values() if key.startswith("tty[")})
        timings["criu_dump_s"] = round(criu_mod.dump(pid, criu_dir(directory), shell_job=manifest.engine["shell_job"],
                                                     external=ttys, criu=criu), 3)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        undone = _undo(pid, url, cuda_locked, token_file)
        raise fail(f"checkpoint failed while the engine was quiesced: {error}; {undone}") from None
    if cuda_locked:
        t = time.perf_counter()
        cuda_checkpoint.restore(pid)
        timings["cuda_restore_s"] = round(time.perf_counter() - t, 3)
    try:
        resumed = _control(url, "resume", token_file)
    except (CheckpointFailed, httpx.HTTPError) as e:
        raise fail(f"the image was written but the engine did not resume: {e}") from None
    timings["total_s"] = round(time.perf_counter() - t0, 3)
    manifest.image.update(bytes=image_bytes(directory), **timings)
    manifest.set_phase(directory, "Ready", f"engine {pid} checkpointed in state {quiesced['previous']}; it "
                                           f"resumed as {resumed['state']}")
    log(logger, "checkpoint_ready", dir=str(directory), identity=manifest.identity, pid=pid,
        bytes=manifest.image["bytes"], **timings)
    return manifest


def _undo(pid: int, url: str, cuda_locked: bool, token_file: str | None) -> str:
    """After a failure: give the engine its CUDA state back and resume it. What happened, in words."""
    notes = []
    if cuda_locked:
        try:
            cuda_checkpoint.restore(pid)
        except Exception as e:  # the engine cannot run CUDA work: it must not claim to serve
            notes.append(f"CUDA restore failed ({e})")
    try:
        resumed = _control(url, "resume", token_file)
        notes.append(f"the engine resumed ({resumed['state']}) and serves")
    except (CheckpointFailed, httpx.HTTPError) as e:
        notes.append(f"the engine did not resume: {e}")
    return "; ".join(notes)

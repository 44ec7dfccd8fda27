"""Restore an engine from a Ready image: CRIU restore, CUDA restore + unlock, then resume.

The restored process is the dumped one, quiesced: same pid (and thread ids), same listening port,
same address reservations. It gets this process's stdin / stdout / stderr in place of the pipes or
sockets it had (CRIU --inherit-fd), so its logs go where ours go. Resume (POST
/engine/control/resume) connects it to the memory service again, remaps the weights read-only at
their old addresses (a changed layout is refused: the engine exits) and parks it as a shadow, or,
with `activate`, waits until it holds the failover lock and is ACTIVE.

Refused before anything runs, with the reason: an image that is not Ready, an identity other than
the one asked for, a pid or thread id of the image in use (CRIU restores pids as they were: the
dumped engine must have exited and been reaped), its port taken.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from pathlib import Path

import httpx

from understudy.common.auth import admin_headers
from understudy.engine.options import parse_serve_args
from understudy.logs import log
from understudy.snapshot import criu as criu_mod
from understudy.snapshot import cuda_checkpoint
from understudy.snapshot.identity import IdentityMismatch, differences
from understudy.snapshot.manifest import Manifest, criu_dir

logger = logging.getLogger("understudy.snapshot")

RESUME_TIMEOUT = 120.0


class RestoreFailed(RuntimeError):
    pass


def _pid_users(tids: list[int]) -> list[str]:
    busy = []
    for tid in tids:
        try:
            comm = Path(f"/proc/{tid}/comm").read_text().strip()
        except OSError:
            continue
        busy.append(f"{tid} ({comm})")
    return busy


def _port_taken(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT does not count
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def check(directory: str | os.PathLike, wanted: dict | None = None) -> Manifest:
    """The image's manifest if it can be restored here now (and is of the engine `wanted`: identity
    params); raises IdentityMismatch or RestoreFailed saying why not."""
    from understudy.snapshot.identity import identity

    m = Manifest.read(directory)
    if m.phase != "Ready":
        raise RestoreFailed(f"image {directory} is {m.phase}, not Ready" + (f": {m.message}" if m.message else ""))
    if wanted is not None and identity(wanted) != m.identity:
        raise IdentityMismatch(f"image {directory} has identity {m.identity}, the requested engine is "
                               f"{identity(wanted)}: " + "; ".join(differences(m.params, wanted)))
    busy = _pid_users([m.engine["pid"], *m.engine.get("tids", [])])
    if busy:
        raise RestoreFailed(f"the image's pids are in use: {', '.join(busy)}; CRIU restores an engine with the "
                            f"pids it had, so the checkpointed engine must have exited (and been reaped) first")
    if _port_taken(m.engine["host"], m.engine["port"]):
        raise RestoreFailed(f"port {m.engine['port']} of the image is in use: the restored engine listens on the "
                            f"port it was checkpointed with")
    return m


def _inherit(stdio: dict[str, str]) -> tuple[dict[int, str], list[int]]:
    """Our duplicates of fds 0-2 for the pipes, sockets and terminals the engine had as stdio (CRIU keys)."""
    inherit, dups = {}, []
    for fd, key in sorted(stdio.items(), key=lambda kv: -int(kv[0])):  # stderr first: it wins a shared key
        if key.startswith(("pipe:", "socket:", "tty[")) and key not in inherit.values():
            dup = os.dup(int(fd))
            dups.append(dup)
            inherit[dup] = key
    return inherit, dups


def _resume(url: str, activate: bool, timeout: float, token_file: str | None) -> dict:
    """POST resume to the restored engine (its listener was restored: connecting works at once)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = httpx.post(f"{url}/engine/control/resume", json={"activate": activate, "timeout": timeout},
                           headers={"Connection": "close", **admin_headers(token_file)}, timeout=timeout + 30)
            break
        except httpx.TransportError as e:
            if time.monotonic() > deadline:
                raise RestoreFailed(f"the restored engine at {url} does not answer: {e}") from None
            time.sleep(0.02)
    data = r.json() if r.headers.get("content-type", "").startswith("application/json") else {"text": r.text}
    if r.status_code != 200:
        message = data.get("error", {}).get("message") if isinstance(data.get("error"), dict) else data
        raise RestoreFailed(f"the restored engine did not resume (HTTP {r.status_code}): {message}")
    return data


def restore(directory: str | os.PathLike, *, wanted: dict | None = None, activate: bool = False,
            criu: str | None = None, timeout: float = RESUME_TIMEOUT) -> dict:
    """Restore the engine imaged in `directory`; returns pid, url, state and timings."""
    directory = Path(directory)
    m = check(directory, wanted)
    criu = criu_mod.find_criu(criu)
    t0 = time.perf_counter()
    inherit, dups = _inherit(m.engine.get("stdio", {}))
    try:
        pid = criu_mod.restore(criu_dir(directory), shell_job=m.engine.get("shell_job", False), inherit=inherit,
                               criu=criu)
    finally:
        for fd in dups:
            os.close(fd)
    t_criu = time.perf_counter() - t0
    try:
        if m.engine.get("cuda"):
            cuda_checkpoint.restore(pid)
        t_cuda = time.perf_counter() - t0 - t_criu
        # the control routes need the admin token (common/auth.py): the engine's --admin-token-file
        token_file = parse_serve_args(m.engine["argv"]).access.admin_token_file if m.engine.get("argv") else None
        resumed = _resume(m.engine["url"], activate, timeout, token_file)
    except BaseException:
        _kill(pid)  # a half-restored engine must not linger with the image's pids and port
        raise
    out = {"pid": pid, "url": m.engine["url"], "state": resumed["state"], "identity": m.identity,
           "criu_restore_s": round(t_criu, 3), "cuda_restore_s": round(t_cuda, 3),
           "seconds": round(time.perf_counter() - t0, 3)}
    log(logger, "restored", dir=str(directory), **out)
    return out


def _kill(pid: int) -> None:
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass

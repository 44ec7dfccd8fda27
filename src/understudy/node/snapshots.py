"""Snapshots in a node (`understudy up --snapshot-dir D`): shadows and replacements restored from images.

An image holds one engine process with its pids and its listening port, so it can stand in for the
engine of one port of the node, once its pids are free again. The supervisor keeps one image per
engine port, D/<identity>-<port>: the first time a shadow parks on a port cold, it is checkpointed
(it goes on parked); later replacements on that port are restored from the image (seconds) when it is
Ready, of the same identity, and restorable now (restore.check: its pids free, its port free); any
other case, or a restore that fails, cold-starts (a failed image is not tried again by this supervisor).

Restored engines are orphaned when criu exits: the supervisor is made a child subreaper, so that they
become its children and it can wait for them like for the engines it started.
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

from understudy.logs import log
from understudy.snapshot.identity import identity, params_from_serve_argv
from understudy.snapshot.manifest import criu_dir, find_ready
from understudy.snapshot.restore import RestoreFailed, check

logger = logging.getLogger("understudy.node.snapshots")

PR_SET_CHILD_SUBREAPER = 36


class RestoredEngine:
    """A Popen look-alike for an engine restored by `understudy snapshot restore` (run here, to its end).

    .stderr is the pipe the engine's logs arrive on (the restore command's, which CRIU gave the engine);
    .pid is the engine's once restored (the command's if the restore failed: then .returncode is set and
    .failed is True)."""

    def __init__(self, image: Path, ident: str, timeout: float = 300.0):
        self.image = image
        self.cmd = subprocess.Popen([sys.executable, "-m", "understudy", "snapshot", "restore", "--dir", str(image),
                                     "--identity", ident], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True, start_new_session=True)
        self.stderr = self.cmd.stderr
        try:
            rc = self.cmd.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.cmd.pid, 9)  # the command's own session (a restored engine has its own)
            rc = self.cmd.wait()
        self.failed = rc != 0
        self.returncode: int | None = rc if self.failed else None
        self.pid = self.cmd.pid if self.failed else int((criu_dir(image) / "restored.pid").read_text())
        self._reaping = threading.Lock()
        self._reaped = threading.Event()
        if self.failed:
            self._reaped.set()

    def wait(self, timeout: float | None = None) -> int:
        if self._reaping.acquire(blocking=False):  # the first waiter reaps (we are its subreaper)
            try:
                if self.returncode is None:
                    _, status = os.waitpid(self.pid, 0)
                    self.returncode = os.waitstatus_to_exitcode(status)
            finally:
                self._reaped.set()
        elif not self._reaped.wait(timeout):
            raise subprocess.TimeoutExpired(f"restored engine {self.pid}", timeout)
        return self.returncode

    def poll(self) -> int | None:
        return self.returncode


class NodeSnapshots:
    """Which image stands in for the engine of a port; restoring from it; making it from a parked shadow."""

    def __init__(self, root: Path, serve_argv: list[str], create: bool = True):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.identity = identity(params_from_serve_argv(serve_argv))
        self.create = create
        self.failed: set[Path] = set()
        self._making: set[int] = set()
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")

    @property
    def making(self) -> set[int]:
        """The ports whose engine is being checkpointed now (quiesced, then frozen by CRIU: not probed)."""
        return self._making

    def image_for(self, port: int) -> Path | None:
        """A Ready image of this node's engine for `port` that can be restored now, or None (logged why)."""
        image = find_ready(self.root, self.identity, port)
        if image is None or image in self.failed:
            return None
        try:
            check(image)
        except (RestoreFailed, OSError) as e:
            log(logger, "snapshot_not_restorable", image=str(image), reason=str(e))
            return None
        return image

    def restore(self, image: Path) -> RestoredEngine:
        proc = RestoredEngine(image, self.identity)
        if proc.failed:
            self.failed.add(image)
            log(logger, "snapshot_restore_failed", logging.WARNING, image=str(image), returncode=proc.returncode,
                note="cold-starting instead; this image is not tried again")
        return proc

    def after_parked(self, port: int, pid: int) -> None:
        """A shadow parked cold on `port`: checkpoint it, in the background, if no Ready image is there."""
        existing = find_ready(self.root, self.identity, port)
        if not self.create or port in self._making or (existing is not None and existing not in self.failed):
            return
        self._making.add(port)

        def make() -> None:
            directory = self.root / f"{self.identity}-{port}"
            try:
                r = subprocess.run([sys.executable, "-m", "understudy", "snapshot", "checkpoint", "--pid", str(pid),
                                    "--dir", str(directory)], stdin=subprocess.DEVNULL, capture_output=True,
                                   text=True, timeout=900)
            finally:
                self._making.discard(port)
            sys.stderr.write(r.stderr)
            if r.returncode == 0:
                self.failed.discard(directory)  # made anew: it may be tried
            else:
                log(logger, "snapshot_create_failed", logging.WARNING, dir=str(directory), port=port,
                    returncode=r.returncode)

        threading.Thread(target=make, name=f"checkpoint-{port}", daemon=True).start()

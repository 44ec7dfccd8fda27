"""An image's manifest.json: what it is of, where it is in its life, and how to bring it back.

Phases: Pending (asked for; nothing touched yet) -> Creating (the engine is quiesced, CRIU dumps)
-> Ready, or Failed with a message. The file is replaced atomically (write, fsync, rename), so a
reader sees one whole manifest or the previous one, never half of one.

An image directory holds manifest.json and criu/ (CRIU's image files and its dump.log /
restore.log). `list_images(root)` finds the manifests at root or one level below it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PHASES = ("Pending", "Creating", "Ready", "Failed")
MANIFEST = "manifest.json"
CRIU_DIR = "criu"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Manifest:
    identity: str
    params: dict[str, Any]  # what the identity is made of (identity.params_from_config)
    phase: str = "Pending"
    message: str = ""
    created_at: str = field(default_factory=_now)
    updated_at: str = field(default_factory=_now)
    # The engine as it was dumped: pid, tids, url, port, serve argv, the state it goes back to,
    # stdio (fd -> what /proc/PID/fd/N linked to: CRIU's key for --inherit-fd), shell_job, cuda.
    engine: dict[str, Any] = field(default_factory=dict)
    # criu version, image bytes, timings (seconds).
    image: dict[str, Any] = field(default_factory=dict)

    def write(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.updated_at = _now()
        tmp = directory / f".{MANIFEST}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(self), f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / MANIFEST)
        fd = os.open(directory, os.O_RDONLY)  # the rename itself is durable once the directory is synced
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def set_phase(self, directory: str | os.PathLike, phase: str, message: str = "") -> None:
        assert phase in PHASES, phase
        self.phase, self.message = phase, message
        self.write(directory)

    @classmethod
    def read(cls, directory: str | os.PathLike) -> "Manifest":
        path = Path(directory) / MANIFEST
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no snapshot image at {directory} (no {MANIFEST})") from None
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def criu_dir(directory: str | os.PathLike) -> Path:
    return Path(directory) / CRIU_DIR


def image_bytes(directory: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in criu_dir(directory).glob("*.img") if f.is_file())


def list_images(root: str | os.PathLike) -> list[tuple[Path, Manifest]]:
    """(directory, manifest) of the image at `root` and of those in its subdirectories, oldest first."""
    root = Path(root)
    found = []
    for d in [root, *(sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else [])]:
        if (d / MANIFEST).is_file():
            try:
                found.append((d, Manifest.read(d)))
            except (ValueError, TypeError):  # not ours, or half-written by something else
                continue
    return sorted(found, key=lambda dm: dm[1].created_at)


def find_ready(root: str | os.PathLike, identity: str, port: int | None = None) -> Path | None:
    """The newest Ready image under `root` with this identity (and this port, if given)."""
    for d, m in reversed(list_images(root)):
        if m.phase == "Ready" and m.identity == identity and (port is None or m.engine.get("port") == port):
            return d
    return None

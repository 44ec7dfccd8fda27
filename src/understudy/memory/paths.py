"""Where a device's memory service listens: one socket per device identity.

The name comes from the device's stable identity (the GPU UUID on CUDA), so
every process finds the same server whatever CUDA_VISIBLE_DEVICES says.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_socket_dir() -> Path:
    env = os.environ.get("UNDERSTUDY_SOCKET_DIR")
    return Path(env) if env else Path(f"/tmp/understudy-{os.getuid()}")


def socket_path(socket_dir: str | os.PathLike | None, identity: str) -> Path:
    return Path(socket_dir or default_socket_dir()) / f"memory-{identity}.sock"


def device_socket_path(socket_dir: str | os.PathLike | None, backend: str, device: int) -> Path:
    """The socket of `device` for `backend`, asking the backend for the identity."""
    from understudy.memory.backends import get_backend

    return socket_path(socket_dir, get_backend(backend, device).identity())

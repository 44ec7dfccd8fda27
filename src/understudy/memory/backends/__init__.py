"""Where the memory service's bytes live: `host` (memfd + mmap, any machine) and `cuda` (CUDA VMM).

base.py holds the interface every backend implements; `get_backend` picks one by name (imported only
when asked for, so the host backend needs no CUDA bindings).
"""

from understudy.memory.backends.base import Backend, BackendError, OutOfMemory


def get_backend(name: str, device: int = 0) -> Backend:
    """The backend called `name` ("host" or "cuda") for `device`."""
    if name == "host":
        from understudy.memory.backends.host import HostBackend

        return HostBackend(device)
    if name == "cuda":
        from understudy.memory.backends.cuda import CudaBackend

        return CudaBackend(device)
    raise ValueError(f"unknown memory backend {name!r} (choose 'host' or 'cuda')")


__all__ = ["Backend", "BackendError", "OutOfMemory", "get_backend"]

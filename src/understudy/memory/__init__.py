"""The memory service: per-device server owning weights and KV, and its client.

Parts: backends/ (host/cuda: where bytes live), protocol (frames on the wire),
pool (the weights/kv state machines), server (asyncio socket server),
client (sessions and address-stable mappings), tensors (torch helpers).
"""

from understudy.memory.backends import Backend, BackendError, OutOfMemory, get_backend
from understudy.memory.client import LayoutChanged, MemoryClient, MemoryServiceError, read_status
from understudy.memory.paths import default_socket_dir, device_socket_path, socket_path
from understudy.memory.protocol import Layout, TensorMeta

_TENSOR_HELPERS = ("materialize_module", "plan_layout", "publish_module", "publish_state_dict")


def __getattr__(name: str):
    # The torch helpers load on first use: the memory service itself runs without torch (fast restarts).
    if name in _TENSOR_HELPERS:
        from understudy.memory import tensors

        return getattr(tensors, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Backend", "BackendError", "OutOfMemory", "get_backend",
    "LayoutChanged", "MemoryClient", "MemoryServiceError", "read_status",
    "default_socket_dir", "device_socket_path", "socket_path",
    "Layout", "TensorMeta",
    "materialize_module", "plan_layout", "publish_module", "publish_state_dict",
]

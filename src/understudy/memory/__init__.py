"""The memory service: per-device server owning weights and KV, and its client.

Parts: backends/ (host/cuda: where bytes live), protocol (frames on the wire),
pool (the weights/kv state machines), server (asyncio socket server),
client (sessions and address-stable mappings), tensors (torch helpers).
"""

import importlib

# Every name loads with its module on first use: `memory-server --help` (memory/options.py is in this
# package) needs none of them, and the memory service itself runs without torch (fast restarts).
_WHERE = {
    "Backend": "backends", "BackendError": "backends", "OutOfMemory": "backends", "get_backend": "backends",
    "LayoutChanged": "client", "MemoryClient": "client", "MemoryServiceError": "client", "read_status": "client",
    "default_socket_dir": "paths", "device_socket_path": "paths", "socket_path": "paths",
    "Layout": "protocol", "TensorMeta": "protocol",
    "materialize_module": "tensors", "plan_layout": "tensors", "publish_module": "tensors",
    "publish_state_dict": "tensors",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_WHERE)

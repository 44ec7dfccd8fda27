"""Copies between the host and the device that do not wait for the device.

A plain `torch.tensor(values, device="cuda")` or `.to("cpu")` synchronises the whole stream: harmless
while the device is idle, but an overlapped engine queues step N+1 while step N runs
(engine/core/llm_engine.py), and such a copy would make the host wait for step N there. So host -> device
copies go through pinned staging memory (torch's caching host allocator keeps a block until the copy that
reads it is done), and device -> host copies land in pinned memory and are waited for with an event
recorded after them: waiting for one step's results does not wait for the step queued behind it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def to_device(values: list | np.ndarray | Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """A host list / array / CPU tensor on `device`, queued behind the stream's work without waiting for it."""
    if isinstance(values, np.ndarray):
        host = torch.from_numpy(values)
    elif isinstance(values, Tensor):
        host = values
    elif dtype in (torch.long, torch.int32):  # (numpy reads a long prompt's list ~4x faster than torch.tensor)
        host = torch.from_numpy(np.fromiter(values, dtype=np.int64, count=len(values)))
    else:
        host = torch.tensor(values, dtype=dtype)
    if dtype is not None and host.dtype != dtype:
        host = host.to(dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def copy_to_device(dst: Tensor, src: np.ndarray | Tensor) -> None:
    """dst.copy_(src) for a host src, without waiting for the work queued before it."""
    src = torch.from_numpy(src) if isinstance(src, np.ndarray) else src
    if dst.device.type != "cuda":
        dst.copy_(src)
    else:
        dst.copy_(src.pin_memory(), non_blocking=True)


@dataclass
class HostCopies:
    """Device tensors on their way to the host; wait() returns them once they are there."""

    tensors: list[Tensor]
    done: torch.cuda.Event | None  # recorded after the copies (None: they were made at once)

    def wait(self) -> list[Tensor]:
        if self.done is not None:
            self.done.synchronize()
        return self.tensors


def start_to_host(*tensors: Tensor) -> HostCopies:
    """Start copying device tensors to the host (pinned memory); HostCopies.wait() gives them."""
    if not tensors or tensors[0].device.type != "cuda":
        return HostCopies([t.cpu() for t in tensors], None)
    out = [t.to("cpu", non_blocking=True) for t in tensors]  # pinned: the copy does not block the host
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(tensors[0].device))
    return HostCopies(out, done)

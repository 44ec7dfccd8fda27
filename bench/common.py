"""Baselines shared by the benchmarks."""

from __future__ import annotations

import time


def pinned_h2d_seconds(nbytes: int) -> float:
    """Seconds to copy `nbytes` from pinned host memory to the GPU (after one warm-up copy)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return time.perf_counter() - t0

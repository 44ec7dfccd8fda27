"""Programmatic dependent launch (PDL): each Triton kernel of a step starts while the kernel before it ends.

On Hopper (sm_90) and later, a kernel launched with CUDA's programmatic-stream-serialization attribute may
begin before the kernel ahead of it in the stream has finished: its programs are placed on the SMs and run up
to `griddepcontrol.wait`, which returns once the kernel before has completed and its writes are visible. A
batch-1 decode step is hundreds of small kernels, each paying its launch and ramp-up (~1 us) with the device
otherwise idle; with PDL that overlaps the tail of the kernel before. CUDA graphs keep the attribute (their
captured kernels get programmatic edges), so replayed steps overlap too.

The contract, for every kernel launched with `launch_kwargs(device)`: it takes `PDL: tl.constexpr` and calls
`_pdl_kernels.wait_prior(PDL)` before it reads or writes any memory another kernel of the step may touch.
Since every such kernel waits, order is transitive: a kernel past its wait runs after every kernel before it
has ended. Kernels launched without the attribute (torch's, cuBLAS') start after the ones before them end, as
always, and a PDL kernel after one of them simply finds nothing to wait for.
"""

from __future__ import annotations

import functools

import torch

# Benches turn it off for their same-run baseline (kernels launched afterwards, graphs captured afterwards).
ENABLED = True


@functools.lru_cache(maxsize=None)
def _supported(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def launch_kwargs(device: torch.device) -> dict:
    """The PDL arguments of a Triton launch on `device`: the kernel's PDL constexpr, and Triton's launch_pdl
    option when the device has PDL (never for CPU tensors: the interpreter runs those)."""
    if ENABLED and device.type == "cuda" and _supported(device.index if device.index is not None
                                                        else torch.cuda.current_device()):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}

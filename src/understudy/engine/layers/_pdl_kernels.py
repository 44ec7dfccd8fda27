"""The kernel side of programmatic dependent launch (layers/pdl.py says the contract)."""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def wait_prior(PDL: tl.constexpr):
    """With PDL: wait until the kernel before this one has ended, then let the next kernel's programs be
    placed (signalled only after the wait, at most one kernel waits ahead of the one running).
    Without PDL: nothing (and the interpreter, which has no griddepcontrol, never sees it).

    Reading weights before the wait (prefetching them into L2 while the kernel before runs) was measured
    and dropped: no faster for matrices under 24 MB, slower above (docs/logs/bench_pdl_variants_h200.log)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


"""The kernel side of programmatic dependent launch (layers/pdl.py says the contract)."""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def wait_prior(PDL: tl.constexpr):
    """With PDL: wait until the kernel before this one has ended, then let the next kernel's programs be
    placed. Signalling after the wait keeps at most one kernel waiting ahead of the one running (signalled
    before it, every kernel of a layer could be placed at once, each reading ahead into L2).
    Without PDL: nothing (and the interpreter, which has no griddepcontrol, never sees it)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs, mask, base):
    """Ask for the 128-byte lines at `ptrs` (one pointer per line; `base` where masked off) to be brought into
    L2, without waiting for them: weights a kernel reads after wait_prior, fetched while the kernel before it
    still runs. GPU only."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l", [tl.where(mask, ptrs, base)],
                              dtype=tl.int32, is_pure=False, pack=1)

"""The decoder's unquantized projections (q/k/v, o, gate/up, down, the MoE router, lm_head): F.linear, except
one row on CUDA, where a table says the Triton GEMV beats cuBLAS.

Batch-1 decode multiplies one token's row by each weight matrix: memory bound, and for small matrices mostly
latency. cuBLAS reads the Llama-3-8B qkv at ~3.1 TB/s of the H200's ~4.3 and splits o and down over K with
a reduce launch of its own (~1.6 us each); the MoE router (0.5 MB) takes 5 us. The FP8 layers' GEMV
(quant.gemv, _fp8_kernels.gemv_kernel) runs with no scales on bf16/fp16 weights too, so shapes where it is
faster (measured, DENSE_GEMV_CONFIGS) take it. Which path runs depends only on shapes and dtypes, fixed
when a CUDA graph is captured: no host sync, nothing allocated by value. FP8 layers (quant.Fp8Linear) keep
their own routing; on the CPU (and under the Triton interpreter, whose tensors are CPU ones) this is F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from understudy.engine.layers import fused, quant

# (N, K) of a weight -> (BLOCK_N, BLOCK_K, SPLIT_K, num_warps) of the GEMV for one row of bf16/fp16 x; shapes
# not listed take cuBLAS. Paste the dict that `python bench/fp8.py --gemm-only --gemm-dtype bf16` prints (an
# H200: only shapes where the GEMV beat cuBLAS in that sweep). This one: docs/logs/bench_gemv_bf16_h200.log.
DENSE_GEMV_CONFIGS: dict[tuple[int, int], tuple[int, int, int, int]] = {
    (6144, 4096): (2, 2048, 1, 4),  # qkv: 13.5 us 3.72 TB/s, cuBLAS 15.0 us 3.35 TB/s: 1.11x
    (4096, 4096): (2, 2048, 1, 4),  # o: 9.8 us 3.43 TB/s, cuBLAS 12.5 us 2.69 TB/s: 1.28x
    (28672, 4096): (2, 2048, 1, 4),  # gate_up: 53.8 us 4.37 TB/s, cuBLAS 56.5 us 4.16 TB/s: 1.05x
    # (4096, 14336): (4, 512, 1, 1),  # down: 30.7 us 3.83 TB/s, cuBLAS 31.2 us 3.76 TB/s: 1.02x
    (128256, 4096): (2, 2048, 1, 4),  # lm_head: 231.0 us 4.55 TB/s, cuBLAS 248.3 us 4.23 TB/s: 1.07x
    (5120, 2048): (4, 1024, 1, 4),  # moe qkv: 7.0 us 3.00 TB/s, cuBLAS 8.2 us 2.57 TB/s: 1.17x
    (2048, 4096): (2, 2048, 1, 4),  # moe o: 6.1 us 2.77 TB/s, cuBLAS 8.6 us 1.96 TB/s: 1.41x
    (128, 2048): (2, 1024, 1, 2),  # moe router: 2.2 us 0.24 TB/s, cuBLAS 5.3 us 0.10 TB/s: 2.46x
    (151936, 2048): (2, 2048, 1, 4),  # moe lm_head: 138.1 us 4.51 TB/s, cuBLAS 150.2 us 4.14 TB/s: 1.09x
}
_DTYPES = (torch.bfloat16, torch.float16)  # what the sweep measures (fp16 reads the same bytes as bf16)


def _gemv_config(x: Tensor, weight: Tensor) -> tuple[int, int, int, int] | None:
    """The GEMV's tiles when `linear` sends x through it (one row on CUDA in bf16/fp16, a shape that
    DENSE_GEMV_CONFIGS lists), else None (F.linear)."""
    config = DENSE_GEMV_CONFIGS.get(tuple(weight.shape)) if x.numel() == x.shape[-1] else None
    if (config is not None and x.dtype in _DTYPES and weight.dtype == x.dtype and weight.stride(-1) == 1
            and fused._use_triton(x)):
        return config
    return None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias); one row (x [1, K] or [K], a decode step of one token) on CUDA in bf16/fp16
    through the GEMV when DENSE_GEMV_CONFIGS lists the weight's shape."""
    config = _gemv_config(x, weight)
    if config is not None:
        out = quant.gemv(x.reshape(1, -1), weight, None, bias, None, config)
        return out.reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def gated_linear(x: Tensor, weight: Tensor, bias: Tensor | None, act: str) -> Tensor:
    """act(gate) * up of a gate_up projection (gate rows of `weight`, then up rows): where `linear` takes the
    GEMV, the GEMV applies the activation in its epilogue (one launch, same bits); else linear, then
    fused.act_and_mul."""
    config = _gemv_config(x, weight)
    if config is not None and quant.gemv_takes_gated(weight, None):
        out = quant.gemv(x.reshape(1, -1), weight, None, bias, None, config, gated=act)
        return out.reshape(*x.shape[:-1], weight.shape[0] // 2)
    return fused.act_and_mul(*linear(x, weight, bias).chunk(2, dim=-1), act)


class Linear(nn.Linear):
    """nn.Linear whose forward is `linear` (the decoder's projections are these; quant.install swaps the
    ones a checkpoint quantizes for Fp8Linear)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)

    def gated(self, x: Tensor, act: str) -> Tensor:
        """act(gate) * up of this gate_up projection's output (gated_linear)."""
        return gated_linear(x, self.weight, self.bias, act)

"""Mixture-of-experts MLP: routing, and the experts applied to each token's top-k choices.

Weights are stacked per layer, as the memory service holds them (model/experts.py):
    gate_up [E, 2*I, H]   rows [0, I) are an expert's gate projection, rows [I, 2I) its up projection
    down    [E, H, I]
For each token, out = sum over its top-k experts e of  weight_e * down_e(silu(gate_e(x)) * up_e(x)).

FP8 experts (`Fp8Scales`): gate_up and down in float8 e4m3 with float32 scales per expert, one per output
row ([E, rows]: `--quantization fp8`, per-channel checkpoints) or one per block of weights ([E, rows / 128,
cols / 128] for 128x128 blocks: Qwen3-30B-A3B-FP8 style). The Triton kernels read the FP8 bytes and widen
them in registers (W8A16: activations stay in the model's dtype); the reference dequantizes each expert it
runs exactly (fp32), rounds it to the activations' dtype and runs the same math, so an FP8 model served on
the CPU gives what its dequantized twin gives.

`experts` (weights / ids from `route`, or `route_biased`: what the decoder's SparseMoE calls after its router)
and `routed_experts` (router logits: route + experts) dispatch on the device of their input:
  CUDA tensors  -> the Triton kernels of _moe_kernels.py, a fixed number of launches whatever the routing,
                   no host sync, so a decode step with it can be captured in a CUDA graph:
                   up to GEMV_MAX_TOKENS tokens (decode), `route` then two GEMV-shaped launches and no
                   sorting, as the GemvConfig for that many tokens says (GEMV_CONFIGS, from bench/moe_block.py
                   --sweep):
                   fma_gate_up (a program per (token, k) slot and BLOCK_N rows of the slot's expert's gate and
                   up; SiLU(gate) * up times the routing weight) and fma_down (a program per token and BLOCK_N
                   rows of H: the token's top-k strips of down summed in its fp32 accumulator), dot products on
                   the CUDA cores with 16-byte loads, all of K in flight; or the tensor-core gemv_gate_up /
                   gemv_down (MMA_GEMV: what decode ran before, and path="gemv" up to 16 tokens);
                   larger batches: `route`, the (token, k) slots sorted by expert on the device, two grouped
                   GEMMs (gate_up with SiLU*up fused, down with the routing weight applied), the top-k sum;
  anything else -> the plain-torch reference: a loop over the experts that were hit, op for op what
                   transformers does, so fp32 outputs match it.
FP8 experts take the same launches, the kernels picking their scale scheme at compile time.

Routing weights stay in fp32 until they scale an expert's output (Mixtral does so; Qwen3-MoE rounds them
to the model dtype first, which changes bf16 results by about an ulp).
"""

from __future__ import annotations

from types import ModuleType
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from understudy.engine.layers import fused
from understudy.engine.layers.quant import dequantize
from understudy.engine.layers import pdl

_KERNELS: ModuleType | None = None  # _moe_kernels, imported on first use; tests swap in an interpreted copy


class Fp8Scales(NamedTuple):
    """The scales of FP8 expert weights (float32): gate_up's [E, 2I] and down's [E, H] per output row, or per
    block of `block` = (rows, cols) weights [E, cdiv(rows), cdiv(cols)] (gate's and up's row blocks never
    straddle: I is a whole number of blocks, model/quantization.check_experts)."""

    gate_up: Tensor
    down: Tensor
    block: tuple[int, int] | None = None  # None: one scale per output row

    @property
    def kind(self) -> str:
        return "channel" if self.block is None else "block"


def route(router_logits: Tensor, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """(weights [T, k] fp32, expert ids [T, k] int64): softmax over all experts in fp32, the top k,
    renormalized to sum to 1 when `renormalize` (Mixtral; Qwen3-MoE with norm_topk_prob). On CUDA one
    Triton kernel (a decode step pays per launch); elsewhere torch's ops, as transformers runs them."""
    if fused._use_triton(router_logits):
        return route_triton(router_logits, top_k, renormalize)
    return route_ref(router_logits, top_k, renormalize)


def route_ref(router_logits: Tensor, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def route_biased(router_logits: Tensor, bias: Tensor, top_k: int, groups: int, top_groups: int,
                 renormalize: bool, scaling: float) -> tuple[Tensor, Tensor]:
    """(weights [T, k] fp32, expert ids [T, k] int64) as DeepSeek-V3's and GLM-4.5's routers choose them:
    sigmoid scores in fp32; the choice ranks score + bias (a per-expert correction that balances the load,
    which does not weigh the outputs), among the experts of the `top_groups` groups (of `groups` equal ones)
    whose two best biased scores sum highest; the chosen experts' plain scores, renormalized to sum to 1
    (`renormalize`), times `scaling`. torch's ops on every device (no host sync: a CUDA graph captures it)."""
    scores = torch.sigmoid(router_logits.float())
    choice = scores + bias.float()
    if groups > 1:
        T, E = choice.shape
        best_two = choice.view(T, groups, E // groups).topk(2, dim=-1).values.sum(dim=-1)
        kept = torch.zeros_like(best_two).scatter_(1, best_two.topk(top_groups, dim=-1).indices, 1.0)
        choice = choice.masked_fill(kept.repeat_interleave(E // groups, dim=1) == 0, float("-inf"))
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling, ids


def experts(x: Tensor, gate_up: Tensor, down: Tensor, weights: Tensor, ids: Tensor,
            scales: Fp8Scales | None = None) -> Tensor:
    """The experts' weighted sum for each row of x [T, H]; weights/ids [T, k] from `route`; `scales`: the
    FP8 weights' (None: gate_up and down are in x's dtype)."""
    if fused._use_triton(x):
        return experts_triton(x, gate_up, down, weights, ids, scales=scales)
    return experts_ref(x, gate_up, down, weights, ids, scales)


def routed_experts(x: Tensor, router_logits: Tensor, gate_up: Tensor, down: Tensor, top_k: int, renormalize: bool,
                   scales: Fp8Scales | None = None) -> Tensor:
    """The whole block after its router GEMM: `route`, then `experts` (a softmax router's SparseMoE)."""
    return experts(x, gate_up, down, *route(router_logits, top_k, renormalize), scales)


def experts_ref(x: Tensor, gate_up: Tensor, down: Tensor, weights: Tensor, ids: Tensor,
                scales: Fp8Scales | None = None) -> Tensor:
    """A loop over the experts that were hit (ascending), each applied to its tokens, accumulated with
    index_add_ in transformers' order. FP8 experts: each one dequantized (fp32) as it is used, then rounded
    to x's dtype, as its dequantized twin's weights would be."""

    def weight(w: Tensor, scale: Tensor | None) -> Tensor:
        return w if scale is None else dequantize(w, scale, scales.kind, scales.block).to(x.dtype)

    out = torch.zeros_like(x)
    hit = torch.zeros(gate_up.shape[0], ids.shape[1], x.shape[0], dtype=torch.bool, device=x.device)
    hit[ids.T, torch.arange(ids.shape[1], device=x.device)[:, None], torch.arange(x.shape[0], device=x.device)] = True
    for e in hit.flatten(1).any(1).nonzero().flatten().tolist():
        k, token = torch.where(hit[e])
        gate_up_e = weight(gate_up[e], None if scales is None else scales.gate_up[e])
        down_e = weight(down[e], None if scales is None else scales.down[e])
        gate, up = F.linear(x[token], gate_up_e).chunk(2, dim=-1)
        y = F.linear(fused.silu_and_mul_ref(gate, up), down_e) * weights[token, k, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


# ---------------------------------------------------------------------------------------------
# The Triton path
# ---------------------------------------------------------------------------------------------


def _kernels() -> ModuleType:
    global _KERNELS
    if _KERNELS is None:
        from understudy.engine.layers import _moe_kernels

        _KERNELS = _moe_kernels
    return _KERNELS


def _tiles(slots_per_expert: float) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for a batch with this many (token, k) slots per
    expert on average: decode batches leave most rows of a block empty, so they get short blocks and long
    K steps (the weights streamed in big pieces); prefill gets tiles that reuse each weight tile more.
    Picked on an H200 at the Qwen3-30B-A3B shape (bench/moe.py)."""
    if slots_per_expert <= 16:
        return 16, 64, 128, 4, 4
    return 64, 64, 64, 4, 3


def route_triton(router_logits: Tensor, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    T, E = router_logits.shape
    if router_logits.stride(-1) != 1:
        router_logits = router_logits.contiguous()
    weights = torch.empty(T, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=router_logits.device)
    if T:
        _kernels().route[(T,)](router_logits, weights, ids, E, router_logits.stride(0), TOP_K=top_k,
                               K_POW2=fused._next_pow2(top_k), RENORMALIZE=renormalize,
                               BLOCK_E=fused._next_pow2(E), num_warps=1 if E <= 256 else 4,
                               **pdl.launch_kwargs(router_logits.device))
    return weights, ids


def align(ids: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor, Tensor]:
    """(sorted slot ids [max_blocks * block_m] int32, expert of each block [max_blocks] int32, rows used
    [1] int32): the flat (token, k) slots of `ids` grouped by expert, each expert's run padded to a
    multiple of block_m with the sentinel ids.numel()."""
    k = _kernels()
    n = ids.numel()
    max_blocks = -(-n // block_m) + min(num_experts, n)
    dev = ids.device
    sorted_slots = torch.empty(max_blocks * block_m, dtype=torch.int32, device=dev)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    num_padded = torch.empty(1, dtype=torch.int32, device=dev)
    cursor = torch.empty(num_experts, dtype=torch.int32, device=dev)
    k.align[(1,)](ids.reshape(-1), sorted_slots, block_expert, num_padded, cursor, n, num_experts, max_blocks,
                  BLOCK_M=block_m, BINS=fused._next_pow2(num_experts + 1), CHUNK=128, BLOCKS_PER_PASS=64,
                  num_warps=4, **pdl.launch_kwargs(dev))
    return sorted_slots, block_expert, num_padded


# Batches of at most this many tokens take the GEMV-shaped path (no sorting, the top-k sum fused into the
# down kernel); larger ones the sorted, grouped GEMMs. Compared on an H200 by bench/moe_block.py.
GEMV_MAX_TOKENS = 2  # H200, bench/moe_block.py: T=1 block 29.1 us vs grouped 44.0; at T=8 GEMV lost (148.7 vs 143.6)


class GemvConfig(NamedTuple):
    """How the GEMV path runs. gate_up / down: (kernel, BLOCK_N, BLOCK_K, num_warps, num_stages), kernel "fma"
    (fma_gate_up / fma_down: a token per program, dot products on the CUDA cores, K unrolled so num_stages
    is unused) or "mma" (gemv_gate_up / gemv_down: tensor-core tiles of 16 token rows, pipelined K loop)."""

    gate_up: tuple[str, int, int, int, int]
    down: tuple[str, int, int, int, int]


# tokens -> GemvConfig for 16-bit experts and for FP8 ones, at Qwen3-30B-A3B's shape (128 x [1536, 2048] /
# [2048, 768], top-8). `bench/moe_block.py --sweep` (--fp8 channel for the FP8 table) times the candidates
# on a GPU and prints the lines to paste here. H200 (docs/logs/bench_moe_block_h200_fma_sweep.log): T = 1
# 29.1 us per block (61% of the copy bandwidth over its bytes) vs 38.8 for the tensor-core kernels (MMA_GEMV)
# before; T = 2 44.7 us (77%) vs 54.4. (Routing inside fma_gate_up, one launch fewer, was slower there:
# 33.9 / 75.1 us; it was removed.)
GEMV_CONFIGS = {
    1: GemvConfig(("fma", 8, 512, 8, 1), ("fma", 2, 256, 2, 1)),
    2: GemvConfig(("fma", 2, 1024, 8, 1), ("fma", 16, 128, 8, 1)),
}
# FP8 tiles, from `bench/moe_block.py --sweep --fp8 channel` on an H200 (docs/logs/bench_moe_block_h200_fp8_sweep.log:
# the block 28.2 -> 20.7 us at T = 1, 38.0 -> 30.6 at T = 2); block scales cut BLOCK_K to the block's 128.
GEMV_CONFIGS_FP8 = {
    1: GemvConfig(("fma", 16, 128, 4, 1), ("fma", 8, 256, 8, 1)),
    2: GemvConfig(("fma", 16, 128, 4, 1), ("fma", 16, 128, 8, 1)),
}
# the tensor-core tiles: what 1-2 tokens ran before the fma kernels (bench/moe_block.py's "before" line), and
# path="gemv" above the tables' token counts, where tokens sharing an expert read it once
MMA_GEMV = GemvConfig(("mma", 32, 128, 4, 4), ("mma", 16, 256, 4, 4))


def _gemv_config(tokens: int, fp8: bool) -> GemvConfig:
    return (GEMV_CONFIGS_FP8 if fp8 else GEMV_CONFIGS).get(tokens, MMA_GEMV)


def experts_triton(x: Tensor, gate_up: Tensor, down: Tensor, weights: Tensor, ids: Tensor,
                   path: str | None = None, config: GemvConfig | None = None,
                   scales: Fp8Scales | None = None) -> Tensor:
    """path: "gemv" (at most 16 tokens) or "grouped"; by default GEMV up to GEMV_MAX_TOKENS tokens.
    config: the GEMV path's GemvConfig to use instead of GEMV_CONFIGS' (bench/moe_block.py --sweep).
    scales: FP8 weights' (W8A16)."""
    T = x.shape[0]
    x, scales = _checked(x, gate_up, down, scales)
    if T * ids.shape[1] == 0:
        return torch.zeros_like(x)
    weights = weights.reshape(-1).to(torch.float32).contiguous()
    ids = ids.contiguous()
    if path is None:
        path = "gemv" if T <= GEMV_MAX_TOKENS else "grouped"
    if path == "gemv":
        return _experts_gemv(x, gate_up, down, weights, ids, config or _gemv_config(T, scales is not None), scales)
    if path == "grouped":
        return _experts_grouped(x, gate_up, down, weights, ids, scales)
    raise ValueError(f"unknown MoE path {path!r}")


def _checked(x: Tensor, gate_up: Tensor, down: Tensor, scales: Fp8Scales | None) -> tuple[Tensor, Fp8Scales | None]:
    """(x with unit column stride, the scales contiguous), if the expert weights fit x."""
    H = x.shape[1]
    E, two_i, _ = gate_up.shape
    inter = two_i // 2
    if gate_up.shape[2] != H or down.shape != (E, H, inter) or gate_up.stride(2) != 1 or down.stride(2) != 1:
        raise ValueError(f"expert weights {tuple(gate_up.shape)} / {tuple(down.shape)} do not fit x {tuple(x.shape)}")
    if scales is not None:
        scales = _check_scales(scales, E, inter, H)
    return (x if x.stride(-1) == 1 else x.contiguous()), scales


def _precision(x: Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"  # fp32 models: no TF32 rounding of the inputs


def _check_scales(scales: Fp8Scales, E: int, inter: int, H: int) -> Fp8Scales:
    """The scales, contiguous (the kernels index a block's K position with stride 1), if their shapes fit."""
    if scales.block is None:
        want = (E, 2 * inter), (E, H)
    else:
        (bn, bk), cdiv = scales.block, fused._cdiv
        want = (E, cdiv(2 * inter, bn), cdiv(H, bk)), (E, cdiv(H, bn), cdiv(inter, bk))
        if inter % bn:
            raise ValueError(f"FP8 expert blocks of {bn} rows do not divide the experts' width {inter}")
    if (tuple(scales.gate_up.shape), tuple(scales.down.shape)) != want:
        raise ValueError(f"FP8 expert scales {tuple(scales.gate_up.shape)} / {tuple(scales.down.shape)} are not "
                         f"{want[0]} / {want[1]}")
    return Fp8Scales(scales.gate_up.contiguous(), scales.down.contiguous(), scales.block)


def _scale_args(w: Tensor, scales: Fp8Scales | None, which: str, block_k: int,
                rows_of_k: bool = False) -> tuple[tuple, dict, int]:
    """((S, stride_se, stride_sn), {SCHEME, SB_N, SB_K}, BLOCK_K) of one expert matrix for the kernels: SCHEME
    0 (no scales: S is a placeholder), 1 (per output row) or 2 (per block, BLOCK_K cut to divide the block's
    columns). rows_of_k: per-row scales passed as blocks of one row by every K column (gemv_down, whose
    experts change along its K loop)."""
    if scales is None:
        return (w, 0, 0), dict(SCHEME=0, SB_N=1, SB_K=1), block_k
    s = scales.gate_up if which == "gate_up" else scales.down
    if scales.block is None:
        if rows_of_k:
            return (s, s.stride(0), 1), dict(SCHEME=2, SB_N=1, SB_K=w.shape[2]), block_k
        return (s, s.stride(0), 1), dict(SCHEME=1, SB_N=1, SB_K=1), block_k
    bn, bk = scales.block
    block_k = min(block_k, bk)
    if bk % block_k or block_k < 16:
        raise ValueError(f"FP8 expert blocks of {bk} columns are not supported (a multiple of 16 is)")
    return (s, s.stride(0), s.stride(1)), dict(SCHEME=2, SB_N=bn, SB_K=bk), block_k


def _experts_gemv(x: Tensor, gate_up: Tensor, down: Tensor, weights: Tensor, ids: Tensor, config: GemvConfig,
                  scales: Fp8Scales | None = None) -> Tensor:
    """Two launches, gate_up (SiLU(gate) * up times the routing weight, per (token, k) slot) then down (each
    token's top-k outputs summed in the accumulator)."""
    T = x.shape[0]
    if T > 16:
        raise ValueError(f"the GEMV MoE path takes at most 16 tokens, not {T}")
    hidden = _gemv_gate_up(x, gate_up, weights, ids, config.gate_up, scales)
    return _gemv_down(hidden, down, ids, config.down, scales)


def _gemv_gate_up(x: Tensor, gate_up: Tensor, weights: Tensor, ids: Tensor, tiles: tuple,
                  scales: Fp8Scales | None) -> Tensor:
    """hidden [T * top_k, I]: one launch of fma_gate_up or gemv_gate_up (tiles: GemvConfig.gate_up)."""
    kern = _kernels()
    (T, H), top_k = x.shape, ids.shape[1]
    inter = gate_up.shape[1] // 2
    kind, block_n, block_k, warps, stages = tiles
    (s, se, sn), scheme, block_k = _scale_args(gate_up, scales, "gate_up", block_k)
    hidden = torch.empty(T * top_k, inter, dtype=x.dtype, device=x.device)
    grid = (T * top_k, fused._cdiv(inter, block_n))
    if kind == "fma":
        kern.fma_gate_up[grid](
            x, gate_up, s, hidden, ids, weights, x.stride(0), gate_up.stride(0), gate_up.stride(1), se, sn,
            hidden.stride(0), N=inter, K=H, TOP_K=top_k, **scheme, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=warps, num_stages=stages, **pdl.launch_kwargs(x.device))
    elif kind == "mma":
        kern.gemv_gate_up[grid](
            x, gate_up, s, hidden, ids, weights, T, x.stride(0), gate_up.stride(0), gate_up.stride(1), se, sn,
            hidden.stride(0), N=inter, K=H, TOP_K=top_k, K_POW2=fused._next_pow2(top_k), **scheme, BLOCK_M=16,
            BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=_precision(x), num_warps=warps, num_stages=stages,
            **pdl.launch_kwargs(x.device))
    else:
        raise ValueError(f"no gate_up kernel {tiles}")
    return hidden


def _gemv_down(hidden: Tensor, down: Tensor, ids: Tensor, tiles: tuple, scales: Fp8Scales | None) -> Tensor:
    """out [T, H]: one launch of fma_down or gemv_down (tiles: GemvConfig.down), each token's top-k summed."""
    kern = _kernels()
    (T, top_k), (_, H, inter) = ids.shape, down.shape
    kind, block_n, block_k, warps, stages = tiles
    # gemv_down's experts change along its one K loop: per-row scales go in as blocks of a row by all of K
    (s, se, sn), scheme, block_k = _scale_args(down, scales, "down", block_k, rows_of_k=kind == "mma")
    out = torch.empty(T, H, dtype=hidden.dtype, device=hidden.device)
    grid = (T, fused._cdiv(H, block_n))
    if kind == "fma":
        kern.fma_down[grid](
            hidden, down, s, out, ids, hidden.stride(0), down.stride(0), down.stride(1), se, sn, out.stride(0),
            N=H, K=inter, TOP_K=top_k, **scheme, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
            num_stages=stages, **pdl.launch_kwargs(hidden.device))
    elif kind == "mma":
        kern.gemv_down[grid](
            hidden, down, s, out, ids, hidden.stride(0), down.stride(0), down.stride(1), se, sn, out.stride(0),
            N=H, K=inter, TOP_K=top_k, K_POW2=fused._next_pow2(top_k), **scheme, BLOCK_N=block_n,
            BLOCK_K=block_k, PRECISION=_precision(hidden), num_warps=warps, num_stages=stages,
            **pdl.launch_kwargs(hidden.device))
    else:
        raise ValueError(f"no down kernel {tiles}")
    return out


def _experts_grouped(x: Tensor, gate_up: Tensor, down: Tensor, weights: Tensor, ids: Tensor,
                     scales: Fp8Scales | None = None) -> Tensor:
    """The slots sorted by expert (align), two grouped GEMMs, then each token's top-k rows summed."""
    kern = _kernels()
    T, H = x.shape
    E, inter, top_k = gate_up.shape[0], down.shape[2], ids.shape[1]
    n = T * top_k
    block_m, block_n, block_k, warps, stages = _tiles(n / E)
    sorted_slots, block_expert, num_padded = align(ids, E, block_m)
    precision = _precision(x)
    grid_m = block_expert.numel()
    (s_up, se_up, sn_up), scheme_up, up_k = _scale_args(gate_up, scales, "gate_up", block_k)
    (s_down, se_down, sn_down), scheme_down, down_k = _scale_args(down, scales, "down", block_k)
    hidden = torch.empty(n, inter, dtype=x.dtype, device=x.device)
    kern.expert_gemm[(grid_m, fused._cdiv(inter, block_n))](
        x, gate_up, s_up, hidden, sorted_slots, block_expert, num_padded, weights, n,
        x.stride(0), gate_up.stride(0), gate_up.stride(1), se_up, sn_up, hidden.stride(0), N=inter, K=H,
        TOP_K=top_k, GATED=True, A_PER_TOKEN=True, WEIGHTED=False, **scheme_up, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=up_k, PRECISION=precision, num_warps=warps, num_stages=stages, **pdl.launch_kwargs(x.device))
    per_slot = torch.empty(n, H, dtype=x.dtype, device=x.device)
    kern.expert_gemm[(grid_m, fused._cdiv(H, block_n))](
        hidden, down, s_down, per_slot, sorted_slots, block_expert, num_padded, weights, n,
        hidden.stride(0), down.stride(0), down.stride(1), se_down, sn_down, per_slot.stride(0), N=H, K=inter,
        TOP_K=top_k, GATED=False, A_PER_TOKEN=False, WEIGHTED=True, **scheme_down, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=down_k, PRECISION=precision, num_warps=warps, num_stages=stages,
        **pdl.launch_kwargs(x.device))
    return per_slot.view(T, top_k, H).sum(dim=1)  # one kernel; torch sums half types in fp32

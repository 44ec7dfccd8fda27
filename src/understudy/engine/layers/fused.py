"""Fused elementwise kernels for the decoder: RMSNorm (with the residual add), RoPE (with the q/k norms and
the KV-cache store), SiLU*mul.

Each function dispatches on the device of its input:
  CUDA tensors  -> one Triton kernel each (when Triton is importable);
  anything else -> the plain-torch reference, which is op for op what transformers
                   does, so the CPU path keeps matching it bit for bit.

A batch-1 decode step is bound by launches as much as by bytes: the reference
RMSNorm is ~7 kernels, RoPE ~10 and SiLU*mul 2. The kernels here do each in one
pass, reading every input once; rope_and_store does a layer's q/k norms, RoPE and
the store of its new keys and values into the paged KV cache in one launch. They
take no host syncs and branch only on shapes, so they can be captured in a CUDA
graph (see engine/core/cuda_graphs.py).

Numerics of the Triton path, against the reference:
  rms_norm / add_rms_norm: the same roundings (residual + x in the stream's dtype, normalize in fp32,
    cast to x's dtype, then scale by the weight); only the order of the fp32 sum
    differs.
  apply_rope: cos/sin are computed inline in fp32 from the positions and the
    inverse frequencies, and the rotation is done in fp32 with one rounding at the
    end (transformers rounds cos/sin and each product to the model dtype first), so
    it is at least as accurate; fp32 models agree to rounding.
  rope_and_store: the q/k norms rounded as rms_norm's, then apply_rope's rotation (partial rotary too),
    k rounded to the model dtype before the cache cast (FP8: / scale, saturated), as store_kv.
  silu_and_mul: SiLU in fp32, rounded to the gate's dtype (as torch does), times up.
  argmax: torch.argmax's answer exactly (first index of the largest value, a NaN above everything), in two
    launches of many programs (torch's reduction of one 128k-vocabulary row runs ~28 us on an H200).

The kernels live in _fused_kernels.py, imported on the first CUDA call only: this
module imports (and the CPU path runs) without Triton. Set UNDERSTUDY_FUSED_KERNELS=0 to send CUDA tensors to the reference
path too (to compare, or to rule the kernels out).
"""

from __future__ import annotations

import os
from types import ModuleType

import torch
from torch import Tensor

from understudy.engine.layers.attention import FP8_KV, store_kv
from understudy.engine.layers import pdl

__all__ = [
    "act_and_mul",
    "add_rms_norm",
    "apply_rope",
    "argmax",
    "gelu_tanh_and_mul",
    "rms_norm",
    "rope_and_store",
    "rope_cos_sin",
    "rotate_half",
    "set_enabled",
    "silu_and_mul",
    "triton_available",
]

_ENABLED = os.environ.get("UNDERSTUDY_FUSED_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")
_KERNELS: ModuleType | None = None  # _fused_kernels, imported on first use; tests swap in an interpreted copy
_TRITON_OK: bool | None = None
_MAX_NORM_COLS = 1 << 16  # rows wider than this go to the reference path (one row per program)


def set_enabled(enabled: bool) -> None:
    """Route CUDA tensors to the Triton kernels (True, the default) or to the reference path."""
    global _ENABLED
    _ENABLED = bool(enabled)


def triton_available() -> bool:
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception:  # ImportError, or a broken install
            _TRITON_OK = False
        else:
            _TRITON_OK = True
    return _TRITON_OK


def _use_triton(x: Tensor) -> bool:
    return x.is_cuda and _ENABLED and triton_available()


# ---------------------------------------------------------------------------------------------
# Reference implementations (plain torch; exactly the ops transformers runs)
# ---------------------------------------------------------------------------------------------


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # Normalize in fp32 and scale after casting back, exactly as transformers does,
    # so greedy outputs match it token for token.
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def add_rms_norm_ref(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    residual = residual + x
    return rms_norm_ref(residual, weight, eps), residual


def offset_rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # Gemma's RMSNorm: scale by (1 + weight), all in fp32, one cast at the end (as transformers does).
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight.float())).type_as(x)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype,
                 mscale: float = 1.0) -> tuple[Tensor, Tensor]:
    """cos/sin [T, 1, rotary_dim] in `dtype`, as transformers computes them (fp32, scaled, then cast).
    inv_freq is [rotary_dim/2], or [T, rotary_dim/2] when each token has its own."""
    freqs = positions.float()[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # broadcast over heads
    cos, sin = emb.cos(), emb.sin()
    if mscale != 1.0:  # yarn / longrope attention factor
        cos, sin = cos * mscale, sin * mscale
    return cos.to(dtype), sin.to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_with_cos_sin(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # HF layout: the two halves of each head form the rotated pairs (not interleaved pairs).
    return x * cos + rotate_half(x) * sin


def apply_rope_ref(q: Tensor, k: Tensor, positions: Tensor, inv_freq: Tensor,
                   mscale: float = 1.0) -> tuple[Tensor, Tensor]:
    cos, sin = rope_cos_sin(positions, inv_freq, q.dtype, mscale)
    rot = cos.shape[-1]
    if rot == q.shape[-1]:
        return rope_with_cos_sin(q, cos, sin), rope_with_cos_sin(k, cos, sin)
    # partial rotary: only the first `rot` dims of each head turn
    return (torch.cat((rope_with_cos_sin(q[..., :rot], cos, sin), q[..., rot:]), dim=-1),
            torch.cat((rope_with_cos_sin(k[..., :rot], cos, sin), k[..., rot:]), dim=-1))


def silu_and_mul_ref(gate: Tensor, up: Tensor) -> Tensor:
    return torch.nn.functional.silu(gate) * up


def gelu_tanh_and_mul_ref(gate: Tensor, up: Tensor) -> Tensor:
    return torch.nn.functional.gelu(gate, approximate="tanh") * up


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def rms_norm(x: Tensor, weight: Tensor, eps: float, offset: bool = False) -> Tensor:
    """RMSNorm over the last dimension of x (any leading shape); `offset`: Gemma's, scaled by (1 + weight)."""
    if _use_triton(x) and x.shape[-1] <= _MAX_NORM_COLS:
        return _rms_norm_triton(x, weight, eps, offset)
    return offset_rms_norm_ref(x, weight, eps) if offset else rms_norm_ref(x, weight, eps)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float,
                 offset: bool = False) -> tuple[Tensor, Tensor]:
    """(rms_norm(residual + x), residual + x): the residual stream's add fused into the norm."""
    if _use_triton(x) and x.shape[-1] <= _MAX_NORM_COLS:
        return _add_rms_norm_triton(x, residual, weight, eps, offset)
    if offset:
        residual = residual + x
        return offset_rms_norm_ref(residual, weight, eps), residual
    return add_rms_norm_ref(x, residual, weight, eps)


def apply_rope(q: Tensor, k: Tensor, positions: Tensor, inv_freq: Tensor,
               mscale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] by their tokens' positions [T] (HF rotate_half layout).

    inv_freq fp32 on q's device: [R/2], or [T, R/2] per token (length-dependent RoPE, model/rope.py); the
    first R <= D dims of each head turn (partial rotary), the rest pass through. cos and sin are scaled by
    `mscale` (yarn / longrope). Returns new tensors; the inputs are not modified.
    """
    if _use_triton(q):
        return _apply_rope_triton(q, k, positions, inv_freq, mscale)
    return apply_rope_ref(q, k, positions, inv_freq, mscale)


def rope_and_store(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, inv_freq: Tensor, mscale: float,
                   k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor, k_scale: float = 1.0,
                   v_scale: float = 1.0, q_norm: Tensor | None = None, k_norm: Tensor | None = None,
                   eps: float = 1e-6, offset: bool = False) -> tuple[Tensor, Tensor]:
    """A layer's q/k/v up to attention: [q_norm / k_norm,] RoPE, then k and v into the KV cache.

    q [T, Hq, D], k and v [T, Hkv, D]; q_norm / k_norm: the per-head RMSNorm weights (Qwen3, Gemma 3; `offset`:
    Gemma's 1 + weight), eps their epsilon; positions, inv_freq and mscale as apply_rope. The rotated k and v
    go to k_cache / v_cache [num_blocks, block_size, Hkv, D] at slot_mapping [T] (a slot < 0 is skipped), as
    attention.store_kv writes them (an FP8 cache: k / k_scale, v / v_scale). Returns the new (q, k); the
    attention reads k and v back from the cache.

    On CUDA one Triton kernel does it all (a decode step's 4-7 launches per layer become one); elsewhere it
    is the norms, apply_rope and store_kv one after the other, so the CPU path is the reference path.
    """
    if _use_triton(q) and _rope_store_fits(q, k, v, q_norm, k_norm):
        return _rope_and_store_triton(q, k, v, positions, inv_freq, mscale, k_cache, v_cache, slot_mapping,
                                      k_scale, v_scale, q_norm, k_norm, eps, offset)
    if q_norm is not None and k_norm is not None:
        q, k = rms_norm(q, q_norm, eps, offset), rms_norm(k, k_norm, eps, offset)
    q, k = apply_rope(q, k, positions, inv_freq, mscale)
    store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q, k


def silu_and_mul(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, elementwise (same shapes)."""
    if _use_triton(gate):
        return _silu_and_mul_triton(gate, up)
    return silu_and_mul_ref(gate, up)


def argmax(x: Tensor) -> Tensor:
    """x.argmax(dim=-1) of a 2-D tensor (int64): each row's first index of its largest value, or of its first
    NaN (as torch); the sampler's greedy pick."""
    if _use_triton(x) and x.dim() == 2 and x.shape[0] and x.shape[1]:
        return _argmax_triton(x)
    return x.argmax(dim=-1)


def gelu_tanh_and_mul(gate: Tensor, up: Tensor) -> Tensor:
    """gelu_tanh(gate) * up (Gemma's MLP), elementwise (same shapes)."""
    if _use_triton(gate):
        return _silu_and_mul_triton(gate, up, gelu=True)
    return gelu_tanh_and_mul_ref(gate, up)


def act_and_mul(gate: Tensor, up: Tensor, act: str) -> Tensor:
    """act(gate) * up, `act` by name: "silu" or "gelu_tanh" (the MLP's; quant.GATED_ACTS)."""
    return (gelu_tanh_and_mul if act == "gelu_tanh" else silu_and_mul)(gate, up)


# ---------------------------------------------------------------------------------------------
# Launchers for the Triton kernels in _fused_kernels.py (imported on first use: no Triton needed before)
# ---------------------------------------------------------------------------------------------


def _kernels() -> ModuleType:
    global _KERNELS
    if _KERNELS is None:
        from understudy.engine.layers import _fused_kernels

        _KERNELS = _fused_kernels
    return _KERNELS


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _norm_launch(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float,
                 offset: bool = False) -> tuple[Tensor, Tensor | None]:
    k = _kernels()
    shape, n_cols = x.shape, x.shape[-1]
    res_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out_dtype = torch.promote_types(res_dtype, weight.dtype)
    x2 = _rows(x)
    n_rows = x2.shape[0]
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
    if residual is not None:
        if residual.shape != shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(shape)}")
        r2 = _rows(residual)
        ro = torch.empty((n_rows, n_cols), dtype=res_dtype, device=x.device)
    else:
        r2 = ro = x2  # unused (HAS_RESIDUAL=False)
    if weight.shape != (n_cols,):
        raise ValueError(f"weight shape {tuple(weight.shape)} != ({n_cols},)")
    weight = weight if weight.is_contiguous() else weight.contiguous()
    if n_rows:
        block_n = _next_pow2(n_cols)
        block_m = min(max(1, 2048 // block_n), _next_pow2(n_rows))  # several short rows (q/k heads) per program
        tile = block_m * block_n
        num_warps = 1 if tile <= 256 else 2 if tile <= 512 else 4 if tile <= 2048 else 8 if tile <= 8192 else 16
        k.rms_norm[(_cdiv(n_rows, block_m),)](
            x2, r2, weight, y, ro, n_rows, n_cols, x2.stride(0), r2.stride(0), y.stride(0), ro.stride(0), eps,
            HAS_RESIDUAL=residual is not None, BLOCK_M=block_m, BLOCK_N=block_n, OFFSET=offset, num_warps=num_warps,
            **pdl.launch_kwargs(x.device),
        )
    return y.view(shape), (None if residual is None else ro.view(shape))


def _rms_norm_triton(x: Tensor, weight: Tensor, eps: float, offset: bool = False) -> Tensor:
    return _norm_launch(x, None, weight, eps, offset)[0]


def _add_rms_norm_triton(x: Tensor, residual: Tensor, weight: Tensor, eps: float,
                         offset: bool = False) -> tuple[Tensor, Tensor]:
    y, r = _norm_launch(x, residual, weight, eps, offset)
    assert r is not None
    return y, r


def _heads(x: Tensor) -> Tensor:
    if x.dim() != 3:
        raise ValueError(f"expected [tokens, heads, head_dim], got shape {tuple(x.shape)}")
    return x if x.stride(-1) == 1 else x.contiguous()


def _apply_rope_triton(q: Tensor, k: Tensor, positions: Tensor, inv_freq: Tensor,
                       mscale: float = 1.0) -> tuple[Tensor, Tensor]:
    kern = _kernels()
    q, k = _heads(q), _heads(k)
    T, n_q, D = q.shape
    n_k = k.shape[1]
    if k.shape[0] != T or k.shape[2] != D or D % 2:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share tokens and an even head_dim")
    half = inv_freq.shape[-1]  # pairs that turn; D // 2 unless partial rotary
    if 2 * half > D or inv_freq.shape not in ((half,), (T, half)):
        raise ValueError(f"inv_freq shape {tuple(inv_freq.shape)} is neither (R/2,) nor ({T}, R/2) with R <= {D}")
    if positions.shape != (T,):
        raise ValueError(f"positions shape {tuple(positions.shape)} != ({T},)")
    inv_freq = inv_freq.to(device=q.device, dtype=torch.float32).contiguous()  # no-op when already so
    positions = positions if positions.is_contiguous() else positions.contiguous()
    partial = 2 * half < D  # the kernel writes the turning dims only: the others are copied first
    qo = q.clone() if partial else torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = k.clone() if partial else torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if T:
        block_d = _next_pow2(half)
        block_h = min(max(1, 1024 // block_d), _next_pow2(max(n_q, n_k)))
        heads_blocks = _cdiv(n_q, block_h) + _cdiv(n_k, block_h)
        num_warps = 1 if block_h * block_d <= 256 else 2 if block_h * block_d <= 512 else 4
        kern.rope[(T, heads_blocks)](
            q, k, qo, ko, positions, inv_freq, inv_freq.stride(0) if inv_freq.dim() == 2 else 0, mscale, n_q, n_k,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1),
            HALF=half, BLOCK_D=block_d, BLOCK_H=block_h, PRECISE=kern.PRECISE_TRIG, num_warps=num_warps,
            **pdl.launch_kwargs(q.device),
        )
    return qo, ko


def _rope_store_fits(q: Tensor, k: Tensor, v: Tensor, q_norm: Tensor | None, k_norm: Tensor | None) -> bool:
    """The fused kernel rounds everything to q's dtype: other mixes (a norm weight in fp32 over bf16 heads
    promotes) take the separate kernels."""
    if q_norm is not None and (q_norm.dtype != q.dtype or k_norm is None or k_norm.dtype != q.dtype):
        return False
    return k.dtype == v.dtype == q.dtype and q.shape[-1] <= _MAX_NORM_COLS


def _cache_rows(cache: Tensor, like: Tensor) -> tuple[int, int]:
    """(slot stride, head stride) of a cache [num_blocks, block_size, Hkv, D] whose slots are evenly spaced
    (what store_kv's .view needs too): slot s is element s * slot stride."""
    nb, bs, h, d = cache.shape
    if (h, d) != tuple(like.shape[1:]) or cache.stride(3) != 1 or cache.stride(0) != bs * cache.stride(1):
        raise ValueError(f"cache shape {tuple(cache.shape)} strides {cache.stride()} do not take k/v "
                         f"{tuple(like.shape)} slot by slot")
    return cache.stride(1), cache.stride(2)


def _rope_and_store_triton(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, inv_freq: Tensor, mscale: float,
                           k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor, k_scale: float, v_scale: float,
                           q_norm: Tensor | None, k_norm: Tensor | None, eps: float,
                           offset: bool) -> tuple[Tensor, Tensor]:
    kern = _kernels()
    q, k, v = _heads(q), _heads(k), _heads(v)
    T, n_q, D = q.shape
    n_k = k.shape[1]
    if k.shape != (T, n_k, D) or v.shape != k.shape or D % 2:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must share tokens and "
                         "an even head_dim")
    half = inv_freq.shape[-1]
    if 2 * half > D or inv_freq.shape not in ((half,), (T, half)):
        raise ValueError(f"inv_freq shape {tuple(inv_freq.shape)} is neither (R/2,) nor ({T}, R/2) with R <= {D}")
    if positions.shape != (T,) or slot_mapping.shape != (T,):
        raise ValueError(f"positions {tuple(positions.shape)} and slot_mapping {tuple(slot_mapping.shape)} "
                         f"must be ({T},)")
    k_strides, v_strides = _cache_rows(k_cache, k), _cache_rows(v_cache, v)
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache {k_cache.dtype} and v_cache {v_cache.dtype} differ")
    inv_freq = inv_freq.to(device=q.device, dtype=torch.float32).contiguous()  # no-op when already so
    positions = positions if positions.is_contiguous() else positions.contiguous()
    slot_mapping = slot_mapping if slot_mapping.is_contiguous() else slot_mapping.contiguous()
    norm = q_norm is not None
    if norm:
        for w in (q_norm, k_norm):
            if w.shape != (D,):
                raise ValueError(f"norm weight shape {tuple(w.shape)} != ({D},)")
        q_norm, k_norm = q_norm.contiguous(), k_norm.contiguous()
    else:
        q_norm = k_norm = inv_freq  # not read (NORM=False)
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if T:
        block_d = _next_pow2(D)  # whole heads: the norm needs every dim, partial rotary passes the rest through
        block_h = min(max(1, 1024 // block_d), _next_pow2(max(n_q, n_k)))
        tile = block_h * block_d
        num_warps = 1 if tile <= 256 else 2 if tile <= 512 else 4
        kern.rope_store[(T, _cdiv(n_q, block_h) + _cdiv(n_k, block_h))](
            q, k, v, qo, ko, k_cache, v_cache, slot_mapping, positions, inv_freq, q_norm, k_norm,
            inv_freq.stride(0) if inv_freq.dim() == 2 else 0, mscale, k_scale, v_scale, eps, n_q, n_k, D,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1), *k_strides, *v_strides,
            HALF=half, BLOCK_D=block_d, BLOCK_H=block_h, PRECISE=kern.PRECISE_TRIG, NORM=norm, OFFSET=offset,
            CACHE_FP8=k_cache.dtype == FP8_KV, num_warps=num_warps, **pdl.launch_kwargs(q.device),
        )
    return qo, ko


def _silu_and_mul_triton(gate: Tensor, up: Tensor, gelu: bool = False) -> Tensor:
    kern = _kernels()
    if gate.shape != up.shape:
        raise ValueError(f"gate shape {tuple(gate.shape)} != up shape {tuple(up.shape)}")
    shape = gate.shape
    gate, up = _rows(gate), _rows(up)  # the halves of a fused gate_up output: views, read in place
    out = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    n = gate.numel()
    if n:
        block, cols = 1024, max(gate.shape[-1], 1)
        kern.silu_mul[(_cdiv(n, block),)](gate, up, out, n, cols, gate.stride(0), up.stride(0), BLOCK=block,
                                          GELU=gelu, num_warps=4, **pdl.launch_kwargs(gate.device))
    return out.reshape(shape)


_ARGMAX_BLOCK = 4096  # columns per program: a 128k vocabulary is 32 programs a row


def _argmax_triton(x: Tensor) -> Tensor:
    kern = _kernels()
    x = x if x.stride(-1) == 1 else x.contiguous()
    rows, cols = x.shape
    chunks = _cdiv(cols, _ARGMAX_BLOCK)
    top = torch.empty(rows, chunks, dtype=torch.float32, device=x.device)
    idx = torch.empty(rows, chunks, dtype=torch.int32, device=x.device)
    nan = torch.empty(rows, chunks, dtype=torch.int32, device=x.device)
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    kern.argmax_chunks[(rows, chunks)](x, top, idx, nan, cols, x.stride(0), CHUNKS=chunks, BLOCK=_ARGMAX_BLOCK,
                                       num_warps=8, **pdl.launch_kwargs(x.device))
    kern.argmax_rows[(rows,)](top, idx, nan, out, cols, CHUNKS=chunks, BLOCK=_next_pow2(chunks), num_warps=1,
                              **pdl.launch_kwargs(x.device))
    return out


def _rows(x: Tensor) -> Tensor:
    """x as [rows, cols] whose rows are contiguous (a view when it can be: chunks of a wider matrix are)."""
    x = x.reshape(-1, x.shape[-1]) if x.dim() != 1 else x.reshape(1, -1)
    return x if x.stride(-1) == 1 else x.contiguous()

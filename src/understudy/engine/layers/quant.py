"""FP8 (e4m3) linear layers: the weights the memory service holds, and the matmuls over them.

An `Fp8Linear` holds what the checkpoint (or `--quantization fp8` at publish time) gives: `weight` in
float8_e4m3fn and its scales in float32 under the checkpoint's name (`weight_scale`, or `weight_scale_inv`
for 128x128 blocks), plus `input_scale` when activations have a static scale. They are ordinary
parameters, so they are published into the memory service beside the other weights and every shadow
maps the same bytes (model/weights.py); nothing is re-quantized on import.

How it computes, per device:
  * CPU (and any device without the kernels): the exact reference, dequantize (fp32) then matmul in the
    activations' dtype. A checkpoint served this way gives what its dequantized twin gives.
  * CUDA, decode-sized batches (at most GEMV_MAX_M rows), any scale layout: a Triton GEMV
    (_fp8_kernels.gemv_kernel, W8A16) that reads each FP8 weight once for all the rows, widens it in
    registers and sums over K in fp32, split over K where N alone gives too few programs (the partial
    sums then added in a second, tiny launch). Decode is memory bound, so half the bytes of bf16 is the
    point; tiles per matrix shape from gemv_config (GEMV_CONFIGS: bench/fp8.py --gemm-only). The same
    kernel (no scales) serves one-row bf16/fp16 projections where it beats cuBLAS (layers/linear.py).
  * CUDA, more rows, per-tensor / per-channel scales: `torch._scaled_mm` on FP8 tensor cores, activations
    quantized per token at run time by one Triton launch (or with the checkpoint's static `input_scale`).
  * CUDA, more rows, 128x128 blocks (and dims that are not multiples of 16): a Triton GEMM on tensor cores
    that reads the FP8 weight tiles and widens them in registers (W8A16, any scale layout, _fp8_kernels.py).
"""

from __future__ import annotations

import functools
import re
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from understudy.engine.model.quantization import Quantization, scale_shape
from understudy.engine.layers import fused, pdl

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# At most this many rows (tokens of a step) take the FP8 GEMV kernel on CUDA; more take torch._scaled_mm
# (per-tensor / per-channel weights) or the Triton GEMM (blocks). 0: never the GEMV (bench/fp8.py
# --scaled-mm-everywhere). bench/fp8.py --gemm-only prints the largest row count where the GEMV wins: on an
# H200 one row (1.57-1.78x cuBLAS bf16's time at the Llama-3-8B shapes), not 8 (0.47-0.70x bf16's speed,
# behind the tl.dot GEMM: docs/logs/bench_fp8_h200_gemv.log).
GEMV_MAX_M = 1
_SCHEME = {"tensor": 0, "channel": 1, "block": 2}
SCALE_SUFFIXES = ("weight_scale", "weight_scale_inv", "input_scale")
# The stacked FP8 experts' scale parameters (model/experts.py): mlp.experts.gate_up_proj_scale(_inv), ...
EXPERT_SCALE_SUFFIXES = (".experts.gate_up_proj_scale", ".experts.gate_up_proj_scale_inv",
                         ".experts.down_proj_scale", ".experts.down_proj_scale_inv")


# --------------------------------------------------------------------------- quantize / dequantize


def quantize(w: Tensor, weights: str, block: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """(FP8 weight, float32 scales) of a [N, K] matrix, scales in the shape `scale_shape` gives: one
    per tensor, per output row, or per block; each scale maps its group's largest |w| to 448."""
    w = w.float()
    n, k = w.shape
    if weights == "tensor":
        amax = w.abs().amax().reshape(1)
        scale = (amax / FP8_MAX).clamp(min=1e-12)
        return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale
    if weights == "channel":
        scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
        return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale
    rows, cols = block
    padded = F.pad(w, (0, -k % cols, 0, -n % rows))  # ragged edge blocks: zeros do not change the max
    tiles = padded.reshape(padded.shape[0] // rows, rows, padded.shape[1] // cols, cols)
    scale = (tiles.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).reshape(padded.shape)[:n, :k]
    return q.to(FP8).contiguous(), scale


def dequantize(weight: Tensor, scale: Tensor, weights: str, block: tuple[int, int] | None = None) -> Tensor:
    """The float32 matrix an FP8 weight and its scales stand for (the reference every path must give)."""
    w = weight.float()
    if weights == "tensor":
        return w * scale.reshape(())
    if weights == "channel":
        return w * scale.reshape(-1, 1)
    rows, cols = block
    n, k = w.shape
    full = scale.repeat_interleave(rows, 0)[:n].repeat_interleave(cols, 1)[:, :k]
    return w * full


def quantize_activations(x: Tensor, static_scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """(FP8 rows, float32 [M, 1] scales): one scale per token, or the checkpoint's static one."""
    if static_scale is None and x.device.type == "cuda" and x.shape[1] <= 32768:
        return _quantize_rows(x)
    if static_scale is None:
        scale = (x.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    else:
        scale = static_scale.reshape(1, 1).expand(x.shape[0], 1).contiguous()
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def _quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """quantize_activations' per-token case in one Triton launch (_fp8_kernels.quantize_rows_kernel)."""
    import triton

    from understudy.engine.layers._fp8_kernels import quantize_rows_kernel

    x = x.contiguous()
    q = torch.empty(x.shape, dtype=FP8, device=x.device)
    scale = torch.empty(x.shape[0], 1, dtype=torch.float32, device=x.device)
    quantize_rows_kernel[(x.shape[0],)](x, q, scale, x.shape[1], x.stride(0), q.stride(0),
                                        BLOCK=triton.next_power_of_2(x.shape[1]), FP8_MAX=FP8_MAX,
                                        **pdl.launch_kwargs(x.device))
    return q, scale


# --------------------------------------------------------------------------- the layer


class Fp8Linear(nn.Module):
    """nn.Linear's interface over an FP8 weight [out, in] and its scales (see the module doc)."""

    fp8_weights = ("weight",)  # the parameters --quantization fp8 quantizes (quantize_online)

    def __init__(self, in_features: int, out_features: int, bias: bool, quant: Quantization):
        super().__init__()
        self.in_features, self.out_features, self.quant = in_features, out_features, quant
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
        self.scale_name = quant.scale_name
        self.register_parameter(self.scale_name, nn.Parameter(
            torch.empty(scale_shape(quant, out_features, in_features), dtype=torch.float32), requires_grad=False))
        if quant.activations == "static":
            self.input_scale = nn.Parameter(torch.empty(1, dtype=torch.float32), requires_grad=False)
        else:
            self.input_scale = None
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self._per_channel: Tensor | None = None  # a per-tensor scale spread over N, for _scaled_mm

    @property
    def scales(self) -> Tensor:
        """The weight scales, whatever the checkpoint calls them."""
        return getattr(self, self.scale_name)

    def stored_dtypes(self) -> dict[str, torch.dtype]:
        """The parameters that keep their own dtype whatever dtype the model serves in."""
        out = {"weight": FP8, self.scale_name: torch.float32}
        if self.input_scale is not None:
            out["input_scale"] = torch.float32
        return out

    def dequantized(self) -> Tensor:
        return dequantize(self.weight, self.scales, self.quant.weights, self.quant.block)

    def forward(self, x: Tensor, *, add_bias: bool = True) -> Tensor:
        bias = self.bias if add_bias else None
        if x.device.type != "cuda":
            return F.linear(x, self.dequantized().to(x.dtype), None if bias is None else bias.to(x.dtype))
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] <= GEMV_MAX_M:
            out = gemv(flat, self.weight, self.scales, bias, self.quant)
        elif self.quant.weights != "block" and _scaled_mm_fits(self):
            out = self._scaled_mm(flat, bias)
        else:
            out = fp8_linear(flat, self.weight, self.scales, bias, self.quant)
        return out.reshape(*x.shape[:-1], self.out_features)

    def gated(self, x: Tensor, act: str) -> Tensor:
        """act(gate) * up of this gate_up projection's output (gate columns, then up): on the one-row GEMV's
        path in its epilogue (one launch, the same bits as the projection then the activation kernel)."""
        flat = x.reshape(-1, self.in_features)
        if x.device.type == "cuda" and flat.shape[0] <= GEMV_MAX_M and gemv_takes_gated(self.weight, self.quant):
            out = gemv(flat, self.weight, self.scales, self.bias, self.quant, gated=act)
            return out.reshape(*x.shape[:-1], self.out_features // 2)
        return fused.act_and_mul(*self(x).chunk(2, dim=-1), act)

    def _scaled_mm(self, x: Tensor, bias: Tensor | None) -> Tensor:
        xq, x_scale = quantize_activations(x, self.input_scale)
        w_scale = self.scales
        if self.quant.weights == "tensor":  # rowwise scaling wants one scale per output column
            if self._per_channel is None or self._per_channel.device != w_scale.device:
                self._per_channel = w_scale.expand(self.out_features).contiguous()
            w_scale = self._per_channel
        return torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale, scale_b=w_scale.reshape(1, -1),
                                bias=bias, out_dtype=x.dtype)


def _scaled_mm_fits(layer: Fp8Linear) -> bool:
    """FP8 tensor cores (compute capability 8.9+: Ada, Hopper) and dims torch._scaled_mm takes."""
    return layer.in_features % 16 == 0 and layer.out_features % 16 == 0 and _fp8_tensor_cores(
        layer.weight.device.index or 0)


@functools.cache
def _fp8_tensor_cores(device: int) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 9)


def gemm_config(m: int, quant: Quantization) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the Triton GEMM for `m` rows. Few rows are
    memory bound: narrow N tiles give enough programs to fill the SMs, long K tiles (and stages) keep
    enough weight bytes in flight per program. Block scales need BLOCK_K to divide the block's columns."""
    block_k = 256 if quant.weights != "block" else min(128, quant.block[1])
    if m <= 16:
        return 16, 32, min(256, block_k), 4, 5  # the best of an earlier bench/fp8.py --gemm sweep on an H200
    return 32 if m <= 32 else 64, 64, 128 if quant.weights != "block" else block_k, 4, 3


def fp8_linear(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None, quant: Quantization,
               config: tuple[int, int, int, int, int] | None = None) -> Tensor:
    """x [M, K] @ dequantize(weight [N, K], scale).T (+ bias) through the Triton kernel; any device Triton
    runs on (CUDA, or CPU tensors under TRITON_INTERPRET=1). `config`: gemm_config's (bench/fp8.py --gemm)."""
    import triton

    from understudy.engine.layers._fp8_kernels import fp8_linear_kernel

    M, K = x.shape
    N = weight.shape[0]
    x = x.contiguous()
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    block = quant.block or (1, 1)
    block_m, block_n, block_k, warps, stages = config or gemm_config(M, quant)
    if quant.weights == "block" and (block[1] % block_k or block_k < 16):
        raise ValueError(f"FP8 weight blocks of {block[1]} columns are not supported (a multiple of 16 is)")
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    fp8_linear_kernel[grid](
        x, weight, scale, bias if bias is not None else out, out, M, N, K,
        x.stride(0), weight.stride(0), out.stride(0), scale.stride(0) if scale.dim() == 2 else 0,
        SCHEME=_SCHEME[quant.weights], SB_N=block[0], SB_K=block[1], HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages,
        **pdl.launch_kwargs(x.device),
    )
    return out


# (N, K, rows) -> (BLOCK_N, BLOCK_K, SPLIT_K, num_warps) of the GEMV, rows a power of two (a batch of 3 uses
# the entry for 4). Paste the dict that `bench/fp8.py --gemm-only` prints last (best per Llama-3-8B shape on
# an H200: docs/logs/bench_fp8_h200_gemv_round8.log, whose configs also carry the load width and widening
# it tried, 8 and 0 here: the kernel's only ones); shapes not listed take gemv_config's rule.
GEMV_CONFIGS: dict[tuple[int, int, int], tuple[int, int, int, int]] = {
    (6144, 4096, 1): (2, 4096, 1, 2),  # 2986 GB/s (cuBLAS bf16: 3350 GB/s of twice the bytes)
    (4096, 4096, 1): (2, 1024, 1, 1),  # 2767 GB/s
    (28672, 4096, 1): (4, 1024, 2, 4),  # 3972 GB/s
    (4096, 14336, 1): (4, 1024, 1, 2),  # 3556 GB/s
}


def gemv_config(n: int, k: int, m: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, SPLIT_K, num_warps) of the GEMV for an [n, k] weight and m rows: the swept entry,
    else one warp per program over 4 weight rows x 512 columns (8 x 256 for several rows, whose per-row sums
    need registers too), split over K until there are ~2048 programs (~15 per SM of an H200: enough loads
    in flight to stream HBM) while each split keeps at least two tiles."""
    rows = 1 << max(m - 1, 0).bit_length()
    if (n, k, rows) in GEMV_CONFIGS:
        return GEMV_CONFIGS[n, k, rows]
    block_n, block_k, split = (4, 512, 1) if rows == 1 else (8, 256, 1)  # 4 rows: the sweep's most common best
    while -(-n // block_n) * split < 2048 and k >= 2 * block_k * split * 2:
        split *= 2
    return block_n, block_k, split, 1


# gemv's `gated`: the activation a gate_up projection's GEMV applies in its epilogue (_fp8_kernels GATED)
GATED_ACTS = {"silu": 1, "gelu_tanh": 2}
# Whether the layers take that epilogue (one launch fewer per MLP) for unquantized and for FP8 weights,
# measured per kind in one engine each (`bench/fp8.py --gated-ab`, docs/logs/bench_gated_epilogue_ab_h200.log,
# Llama-3-8B shape, batch 1): bf16 255.4 tok/s with it against 252.6 without; FP8 375-381 with it (whatever
# the gate_up tiles) against 383-386 without, so FP8 keeps the activation's own launch.
GATED_EPILOGUE = {"unquantized": True, "fp8": False}


def gemv(x: Tensor, weight: Tensor, scale: Tensor | None, bias: Tensor | None, quant: Quantization | None,
         config: tuple[int, int, int, int] | None = None, gated: str | None = None) -> Tensor:
    """x [M, K] @ dequantize(weight [N, K], scale).T (+ bias) for few rows (_fp8_kernels.gemv_kernel); quant
    None: `weight` is unquantized (x's dtype, no scale: layers/linear.py). Any device Triton runs on (CUDA,
    or CPU tensors under TRITON_INTERPRET=1). `config`: gemv_config's tuple. `gated` ("silu", "gelu_tanh"):
    `weight` is a gate_up projection (gate rows, then up rows) and the result is act(gate) * up [M, N/2],
    the activation applied as the sums are finished (not for 128x128 block scales: _can_gate)."""
    import triton

    from understudy.engine.layers._fp8_kernels import gemv_kernel, gemv_reduce_kernel

    M, K = x.shape
    N = weight.shape[0]
    if gated and not _can_gate(weight, quant):
        raise ValueError(f"a gated GEMV needs an even number of rows and no block scales (weight {tuple(weight.shape)})")
    x = x.contiguous()
    out = torch.empty(M, N // 2 if gated else N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    block_n, block_k, split_k, warps = config or gemv_config(N, K, M)
    block = quant.block if quant is not None and quant.block else (1, 1)
    scheme = -1 if quant is None else _SCHEME[quant.weights]  # -1: no scale (S is never read)
    if scheme == 2:  # the tile's rows must share their row of scale blocks
        block_n = min(block_n, block[0] & -block[0])
    if gated:  # each program takes gate and up rows in pairs
        block_n = max(2, block_n)
    # per thread: 16 bytes of x (8 bf16, 4 fp32), and at least one column per thread of the program
    vec = min(16 // x.element_size(), block_k // (32 * warps))
    if vec < 1:
        raise ValueError(f"GEMV tile of {block_k} columns is narrower than {warps} warps")
    k_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k  # whole tiles per split
    split_k = triton.cdiv(K, k_split)
    partial = split_k > 1
    # Split-K sums are added by a second launch rather than fp32 atomics: deterministic, no zeroed buffer
    # (a memset launch of its own), graph-capturable; the sweep times it with the launch, so SPLIT_K > 1 is
    # only chosen where the extra parallelism pays for it.
    dest = torch.empty(split_k, M, N, dtype=torch.float32, device=x.device) if partial else out
    b = bias if bias is not None else out
    scale = scale if scale is not None else out  # any pointer: not read
    gemv_kernel[(triton.cdiv(N // 2, block_n // 2) if gated else triton.cdiv(N, block_n), split_k)](
        x, weight, scale, b, dest, M, N, K, x.stride(0), weight.stride(0), dest.stride(-2),
        scale.stride(0) if scheme == 2 else 0, dest.stride(0) if partial else 0, TILES=k_split // block_k,
        SCHEME=scheme, SB_N=block[0], SB_K=block[1], HAS_BIAS=bias is not None and not partial,
        BLOCK_M=triton.next_power_of_2(M), BLOCK_N=block_n, BLOCK_K=block_k, VEC=vec, PARTIAL=partial,
        GATED=GATED_ACTS.get(gated, 0), **pdl.launch_kwargs(x.device),
        num_warps=warps, num_stages=1)  # Triton software-pipelines only loads that feed tl.dot
    if partial:
        gemv_reduce_kernel[(M, triton.cdiv(out.shape[1], 1024))](
            dest, scale, b, out, N, dest.stride(0), dest.stride(1), out.stride(0), SPLIT_K=split_k,
            SCHEME=scheme, HAS_BIAS=bias is not None, BLOCK=1024, GATED=GATED_ACTS.get(gated, 0), num_warps=4,
            **pdl.launch_kwargs(x.device))
    return out


def _can_gate(weight: Tensor, quant: Quantization | None) -> bool:
    """gemv(..., gated=) takes this weight: gate and up rows pair up, and no 128x128 block scales (a
    program's gate and up rows would sit in different rows of scale blocks)."""
    return weight.shape[0] % 2 == 0 and (quant is None or quant.weights != "block")


def gemv_takes_gated(weight: Tensor, quant: Quantization | None) -> bool:
    """Whether a gate_up layer's one-row GEMV applies the activation in its epilogue: it can (_can_gate) and
    GATED_EPILOGUE says it pays for this kind of weight."""
    return _can_gate(weight, quant) and GATED_EPILOGUE["unquantized" if quant is None else "fp8"]


# --------------------------------------------------------------------------- the model's linears


def install(model: nn.Module, quant: Quantization) -> None:
    """Swap the decoder's nn.Linear projections that `quant` covers for Fp8Linear (on the meta device
    too: nothing is allocated for a model built there)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and quant.quantizes(name):
            parent, _, leaf = name.rpartition(".")
            layer = Fp8Linear(module.in_features, module.out_features, module.bias is not None, quant)
            setattr(model.get_submodule(parent), leaf, layer)


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """model.to(dtype) for a model on the meta device, except the FP8 weights and float32 scales (of the
    Fp8Linears and of FP8 stacked experts, model/experts.py), which keep their dtypes (Module.to would turn
    them into `dtype` too: float8 is a floating-point type)."""
    model.to(dtype)
    for module in model.modules():
        if hasattr(module, "stored_dtypes"):
            for name, kept in module.stored_dtypes().items():
                param = getattr(module, name)
                assert param.is_meta, "cast_model is for models whose weights are not loaded yet"
                setattr(module, name, nn.Parameter(torch.empty(param.shape, dtype=kept, device="meta"),
                                                   requires_grad=False))
    return model


def checkpoint_dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    """{parameter name: dtype} for every parameter of the model (what loading casts each tensor to)."""
    return {name: p.dtype for name, p in model.named_parameters()}


def fit(name: str, tensor: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A checkpoint tensor of a quantized linear (FP8 weight, scale) as the model keeps it: scales stored as
    [], [1] or [N, 1] reshaped to the engine's shape (same number of elements), cast to the parameter's
    dtype (scales stored in bf16 become float32). Other tensors are returned as they are."""
    if not (dtype == FP8 or name.endswith(SCALE_SUFFIXES + EXPERT_SCALE_SUFFIXES)):
        return tensor
    if tuple(tensor.shape) != tuple(shape) and tensor.numel() == torch.Size(shape).numel():
        tensor = tensor.reshape(shape)
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def quantize_online(model: nn.Module, stream, param_of: Callable[[str], str],
                    device: torch.device | str | None = None):
    """--quantization fp8: the (name, tensor) stream of an unquantized checkpoint with each weight of an
    Fp8Linear replaced by its FP8 weight and scales, computed on `device` (the publisher's GPU: fast) or
    where the tensor is. `param_of`: the model parameter a checkpoint tensor fills (model/layout.py): a
    checkpoint's q_proj is quantized as its rows of the fused qkv_proj (per-channel scales are per row, so
    the parts' scales, in row order, are the fused layer's); an expert's gate_proj as its rows of the layer's
    stacked gate_up_proj, its scales into gate_up_proj_scale (model/layout.py)."""
    # The modules that hold FP8 weights name them: Fp8Linear its weight, model/experts.StackedExperts its
    # stacked matrices when the experts are FP8.
    quants = {f"{name}.{leaf}": m.quant for name, m in model.named_modules()
              for leaf in getattr(m, "fp8_weights", ())}
    for name, tensor in stream:
        q = quants.get(param_of(name))
        if q is None:
            yield name, tensor
            continue
        tensor = tensor.to(device or tensor.device)
        if name.endswith(".weight"):  # a linear's, or one expert's matrix
            w8, scale = quantize(tensor, q.weights, q.block)
            yield name, w8
            yield f"{name.removesuffix('.weight')}.{q.scale_name}", scale
        else:  # a checkpoint that stores the experts stacked (transformers>=5 names): expert by expert
            parts = [quantize(w, q.weights, q.block) for w in tensor]
            yield name, torch.stack([w8 for w8, _ in parts])
            yield f"{name}{q.scale_name.removeprefix('weight')}", torch.stack([scale for _, scale in parts])


def is_quantized_storage(name: str, tensor: Tensor) -> bool:
    """A tensor the loader must not cast to the serving dtype: an FP8 weight or a scale."""
    return tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) or name.endswith(SCALE_SUFFIXES +
                                                                                    EXPERT_SCALE_SUFFIXES)


# --------------------------------------------------------------------------- FP8 KV-cache scales

_KV_SCALE = re.compile(r"model\.layers\.(\d+)\.self_attn\.(k_scale|v_scale|kv_scale|k_proj\.output_scale|"
                       r"v_proj\.output_scale|attn\.k_scale|attn\.v_scale)")


def is_kv_scale(name: str) -> bool:
    """A checkpoint's per-layer KV-cache scale (compressed-tensors kv_cache_scheme, ModelOpt, AutoFP8
    names), which is not a weight: read by kv_scales, applied by the attention of an FP8 cache."""
    return _KV_SCALE.fullmatch(name) is not None


def kv_scales(tensors, num_layers: int) -> list[list[float]] | None:
    """[[k_scale, v_scale] per layer] from the checkpoint's (name, tensor) KV scales; None when it has
    none (an FP8 cache then uses 1.0, as vLLM does); layers it leaves out get 1.0."""
    scales = [[1.0, 1.0] for _ in range(num_layers)]
    found = False
    for name, tensor in tensors:
        m = _KV_SCALE.fullmatch(name)
        if m is None or int(m.group(1)) >= num_layers:
            continue
        value, which = float(tensor.float().reshape(-1)[0]), m.group(2)
        layer = scales[int(m.group(1))]
        if which == "kv_scale":
            layer[0] = layer[1] = value
        else:  # k_scale, v_scale, k_proj.output_scale, attn.v_scale, ...
            layer[0 if which.removeprefix("attn.").startswith("k") else 1] = value
        found = True
    return scales if found else None


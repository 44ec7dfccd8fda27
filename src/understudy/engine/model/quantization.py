"""Which quantized checkpoints the engine serves, read from config.json's `quantization_config`.

Served: FP8 (e4m3) weights, in the layouts published checkpoints use:
  * quant_method "fp8" with weight_block_size [128, 128]: `weight` + `weight_scale_inv` per 128x128 block
    (Qwen3-FP8, DeepSeek-V3 style); without a block size: one `weight_scale` per tensor (AutoFP8), plus an
    `input_scale` when activation_scheme is "static";
  * quant_method "fbgemm_fp8": `weight_scale` per output channel;
  * quant_method "compressed-tensors" with 8-bit float weights (llm-compressor's FP8, FP8_DYNAMIC,
    FP8_BLOCK): strategy "tensor", "channel" or "block", static (`input_scale`) or dynamic activations.
  * `serve --quantization fp8` on an unquantized checkpoint: per-channel scales computed when the weights
    are published (`Quantization.online`).
Mixture-of-experts checkpoints (Qwen3-MoE, Mixtral) in FP8 too, experts included, when every expert is
quantized with per-channel or block scales and dynamic activations (`check_experts`): the experts are
stacked per layer with their scales (model/experts.py, layers/moe.py).
Every other method (awq, gptq, bitsandbytes, ...) is refused here, when config.json is read, naming it.

`Quantization` says what each quantized linear holds; layers/quant.py is what computes with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Iterable, Sequence

SUPPORTED = ("fp8 (FP8 weights with per-tensor or 128x128 block scales)", "fbgemm_fp8 (per-channel FP8)",
             "compressed-tensors FP8 (8-bit float weights: tensor, channel or block strategy)")
# The decoder linears that hold quantized weights (lm_head and the embeddings never do).
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj")
# The decoder's fused linears and, in row order, the checkpoint's linears each holds (model/layout.py).
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class UnsupportedQuantization(ValueError):
    """A quantization_config the engine cannot serve."""


def _refuse(what: str) -> UnsupportedQuantization:
    return UnsupportedQuantization(
        f"{what} is not supported. Supported quantized checkpoints: {'; '.join(SUPPORTED)}. "
        f"An unquantized (bf16/fp16/fp32) checkpoint can be served in FP8 with --quantization fp8.")


@dataclass(frozen=True)
class Quantization:
    """How the decoder's linears are quantized (all of them the same way, except `ignore`d ones)."""

    method: str  # the checkpoint's quant_method, or "online" for --quantization fp8
    weights: str  # "tensor", "channel" or "block": what one weight scale covers
    activations: str  # "dynamic" (scales computed per token at run time) or "static" (`input_scale`)
    block: tuple[int, int] | None = None  # (rows, cols) of a weight block when weights == "block"
    scale_name: str = "weight_scale"  # the checkpoint's name of the weight scales (fp8 blocks: weight_scale_inv)
    ignore: tuple[str, ...] = ()  # module names (or "re:" patterns) left unquantized

    @property
    def online(self) -> bool:
        """Quantized from a higher-precision checkpoint when published, not read quantized from disk."""
        return self.method == "online"

    def quantizes(self, module_name: str) -> bool:
        """Whether the linear `module_name` (e.g. model.layers.0.mlp.up_proj) holds FP8 weights; a fused one
        (qkv_proj) not if the checkpoint leaves it, or the linears it holds (q_proj, ...), unquantized."""
        prefix, _, leaf = module_name.rpartition(".")
        if leaf not in LINEARS:
            return False
        return not any(self._ignores(name) for name in (module_name, *(f"{prefix}.{p}" for p in FUSED.get(leaf, ()))))

    def _ignores(self, module_name: str) -> bool:
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                if re.fullmatch(pattern[3:], module_name):
                    return True
            elif module_name == pattern or module_name.endswith("." + pattern):
                return True
        return False

    def fuses(self, rows: Sequence[int], layers: Iterable[Sequence[str]]) -> bool:
        """Whether linears of `rows` output rows each (their module names in every layer: `layers`) can be held
        as one FP8 linear. Per-channel scales are rows too, and 128x128 block scales when every part is a whole
        number of blocks; a per-tensor scale, or a static activation scale, is one number per linear that
        would differ between the parts, so those layers stay apart (simple and exact), as do layers whose
        linears are not all quantized or all not (an `ignore` naming some of them)."""
        if self.weights == "tensor" or self.activations == "static":
            return False
        if self.weights == "block" and any(r % self.block[0] for r in rows):
            return False
        return all(len({self.quantizes(name) for name in layer}) == 1 for layer in layers)


ONLINE_FP8 = Quantization(method="online", weights="channel", activations="dynamic")


def from_hf_dict(d: dict[str, Any]) -> Quantization | None:
    """The Quantization of a config.json (None: not quantized); raises UnsupportedQuantization."""
    q = d.get("quantization_config") or d.get("compression_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method == "fp8":
        block = q.get("weight_block_size")
        activations = q.get("activation_scheme", "dynamic")
        ignore = tuple(q.get("modules_to_not_convert") or q.get("ignored_layers") or ())
        if block is not None:
            if activations != "dynamic":
                raise _refuse(f"quantization_config fp8 with weight_block_size and activation_scheme {activations!r}")
            return Quantization("fp8", "block", "dynamic", _block(block), "weight_scale_inv", ignore)
        return Quantization("fp8", "tensor", _activation_scheme(activations), ignore=ignore)
    if method == "fbgemm_fp8":
        return Quantization("fbgemm_fp8", "channel", "dynamic", ignore=tuple(q.get("modules_to_not_convert") or ()))
    if method == "compressed-tensors":
        return _compressed_tensors(q)
    if method is None:
        raise _refuse("a quantization_config without quant_method")
    raise _refuse(f"quantization method {method!r} (quantization_config.quant_method)")


def _activation_scheme(value: str) -> str:
    if value not in ("dynamic", "static"):
        raise _refuse(f"activation_scheme {value!r}")
    return value


def _block(value) -> tuple[int, int]:
    if len(value) != 2 or any(int(v) <= 0 for v in value):
        raise _refuse(f"weight_block_size {value!r}")
    return int(value[0]), int(value[1])


def _compressed_tensors(q: dict[str, Any]) -> Quantization:
    groups = list((q.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise _refuse(f"compressed-tensors with {len(groups)} config_groups (one FP8 group is)")
    group = groups[0]
    w, a = group.get("weights") or {}, group.get("input_activations")
    desc = f"compressed-tensors format {q.get('format')!r} with {w.get('num_bits')}-bit {w.get('type')} weights"
    if w.get("type") != "float" or w.get("num_bits") != 8:
        raise _refuse(desc)
    if q.get("format") not in (None, "float-quantized", "naive-quantized"):
        raise _refuse(desc)
    strategy = w.get("strategy", "tensor")
    if strategy not in ("tensor", "channel", "block"):
        raise _refuse(f"{desc} and weight strategy {strategy!r}")
    if a is not None and (a.get("type") != "float" or a.get("num_bits") != 8):
        raise _refuse(f"{desc} and {a.get('num_bits')}-bit {a.get('type')} activations")
    activations = "static" if a is not None and not a.get("dynamic", True) else "dynamic"
    if activations == "static" and a.get("strategy", "tensor") != "tensor":
        raise _refuse(f"{desc} and static {a.get('strategy')!r} activation scales")
    block = _block(w.get("block_structure") or [128, 128]) if strategy == "block" else None
    return Quantization("compressed-tensors", strategy, activations, block, "weight_scale", tuple(q.get("ignore") or ()))


def check_experts(quant: Quantization, expert_names: Iterable[str], moe_intermediate_size: int) -> None:
    """Raise UnsupportedQuantization unless a MoE checkpoint's experts can be held stacked in FP8: one scale
    per output row or per block (per-tensor scales differ between the experts' gate and up, which share
    rows of one stacked matrix), dynamic activations (the experts' kernels keep activations in the model's
    dtype: a static input_scale has no use), whole blocks of the experts' width (gate's and up's rows in
    separate blocks), and no expert left unquantized by `ignore` (`expert_names`: the checkpoint's module
    names of every expert projection, mlp.experts.E.gate_proj ...)."""
    what = f"an FP8 mixture-of-experts checkpoint ({_describe(quant)})"
    if quant.weights == "tensor":
        raise _refuse(f"{what} with per-tensor weight scales (per-channel and 128x128 block scales are served)")
    if quant.activations == "static":
        raise _refuse(f"{what} with static activation scales")
    if quant.weights == "block" and moe_intermediate_size % quant.block[0]:
        raise _refuse(f"{what} whose experts' width {moe_intermediate_size} is not a whole number of "
                      f"{quant.block[0]}-row blocks")
    leaves = ("gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")
    # only patterns that could name an expert projection are tried against every name (usually none)
    patterns = [p for p in quant.ignore if p.startswith("re:") or p.rpartition(".")[2] in leaves]
    if patterns:
        narrow = replace(quant, ignore=tuple(patterns))
        for name in expert_names:
            if narrow._ignores(name):
                raise _refuse(f"{what} that leaves expert {name} unquantized (all experts or none are)")


def _describe(quant: Quantization) -> str:
    return f"{quant.method}, {quant.weights} scales, {quant.activations} activations"


def expert_scale_shapes(quant: Quantization, experts: int, hidden: int, inter: int) -> tuple[tuple, tuple]:
    """The shapes of the stacked experts' scales: (gate_up [E, 2I, H]'s, down [E, H, I]'s)."""
    if quant.weights == "tensor":  # refused when config.json is read (check_experts); a config built otherwise
        raise _refuse("FP8 experts with per-tensor scales")
    if quant.weights == "channel":
        return (experts, 2 * inter), (experts, hidden)
    return (experts, *scale_shape(quant, 2 * inter, hidden)), (experts, *scale_shape(quant, hidden, inter))


def scale_shape(quant: Quantization, out_features: int, in_features: int) -> tuple[int, ...]:
    """The shape the engine keeps a linear's weight scales in (checkpoints differ: [], [1], [N, 1] are
    reshaped to this when loaded)."""
    if quant.weights == "tensor":
        return (1,)
    if quant.weights == "channel":
        return (out_features,)
    rows, cols = quant.block
    return (-(-out_features // rows), -(-in_features // cols))


def with_quantization(config, flag: str | None):
    """The ModelConfig to serve under `--quantization` (None or "none": as the checkpoint is; "fp8": an
    unquantized checkpoint quantized when published, an FP8 checkpoint as it is). Other quantized
    checkpoints were refused when config.json was read."""
    if flag in (None, "none") or config.quantization is not None:
        return config
    if flag != "fp8":
        raise ValueError(f"--quantization {flag!r}: only fp8 is supported")
    return replace(config, quantization=ONLINE_FP8)

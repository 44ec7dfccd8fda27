"""Where each checkpoint tensor goes among the model's parameters: the layout the memory service holds.

The model keeps fewer, larger matrices than most checkpoints store (one GEMM where there were three or two):
    self_attn.qkv_proj          the rows of q_proj, then k_proj, then v_proj (weights, biases, FP8 scales)
    mlp.gate_up_proj            the rows of gate_proj, then up_proj (and mlp.shared_experts.gate_up_proj)
    mlp.experts.gate_up_proj    [E, 2I, H]: expert e's gate rows, then its up rows  (MoE: model/experts.py)
    mlp.experts.down_proj       [E, H, I]
    mlp.experts.gate_up_proj_scale(_inv), down_proj_scale(_inv)   FP8 experts' scales, stacked the same way
Phi-3 checkpoints store qkv_proj and gate_up_proj fused already: those load as they are. A fused parameter's
rows are cut into parts in fixed proportions (query heads : KV heads : KV heads; gate : up = 1 : 1), so one
description holds for the whole model and for a tensor-parallel rank's share of it (model/sharding.py cuts
each part). FP8 scales that cannot be cut along the parts' rows keep a layer unfused (Quantization.fuses).

`checkpoint_target` says which parameter a checkpoint tensor fills and, for a part, which `Slice` of it;
loading (CausalLM.load_weights), publishing (model/weights.py) and `--quantization fp8` (layers/quant.py)
all go through it, so every engine that imports the published weights sees the same fused layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from understudy.engine.model.config import ModelConfig
from understudy.engine.model.quantization import FUSED

_EXPERT = re.compile(r"(.*)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\."
                     r"(weight|weight_scale|weight_scale_inv)")
_EXPERT_PART = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1, "down_proj": None, "w2": None}
# A separate projection the model holds as rows of a fused one: its weight, bias and FP8 weight scales.
# (A static `input_scale` is one per projection: such checkpoints stay unfused, Quantization.fuses.)
_PART = re.compile(r"(.*)\.(self_attn\.(?:q_proj|k_proj|v_proj)|mlp\.(?:shared_experts\.)?(?:gate_proj|up_proj))\."
                   r"(weight|bias|weight_scale|weight_scale_inv)")
_FUSED_OF = {part: (fused, i) for fused, parts in FUSED.items() for i, part in enumerate(parts)}


@dataclass(frozen=True)
class Slice:
    """Where a checkpoint tensor lives inside a larger parameter: one expert's matrix of a stacked tensor,
    and / or one part of a fused tensor's rows."""

    param: str  # the parameter's name
    part: int = 0  # which of `parts`
    parts: tuple[int, ...] = ()  # the relative sizes of the parameter's parts along its rows; (): all of it
    expert: int | None = None  # a stacked tensor's index, None for an unstacked parameter

    def of(self, tensor: Tensor) -> Tensor:
        """The view of `tensor` (the parameter) this checkpoint tensor fills: a contiguous run of its rows."""
        w = tensor if self.expert is None else tensor[self.expert]
        if not self.parts:
            return w
        start, stop = part_rows(w.shape[0], self.parts, self.part)
        return w[start:stop]


def part_rows(rows: int, parts: tuple[int, ...], i: int) -> tuple[int, int]:
    """[start, stop) of part i of `rows` rows cut in the proportions `parts`."""
    total = sum(parts)
    start, stop = rows * sum(parts[:i]), rows * sum(parts[:i + 1])
    if start % total or stop % total:
        raise ValueError(f"{rows} rows do not cut into parts of relative sizes {parts}")
    return start // total, stop // total


def fused_parts(name: str, config: ModelConfig) -> tuple[int, ...] | None:
    """The relative sizes of a fused parameter's parts along its rows (by parameter or checkpoint name:
    qkv_proj, gate_up_proj, the experts' stacked gate_up_proj); None for any other tensor."""
    module = name.rpartition(".")[0] if not name.endswith(".experts.gate_up_proj") else name
    leaf = module.rpartition(".")[2]
    if leaf == "qkv_proj":
        kv = config.num_key_value_heads
        return (config.num_attention_heads, kv, kv)
    if leaf == "gate_up_proj":
        return (1, 1)
    return None


def checkpoint_target(name: str, config: ModelConfig) -> str | Slice:
    """The model parameter a checkpoint tensor fills: its name, or the Slice of a fused / stacked one."""
    m = _EXPERT.fullmatch(name)
    if m is not None:  # an expert's weight or FP8 scales: weight_scale(_inv) -> the stacked ..._proj_scale(_inv)
        prefix, expert, proj, leaf = m.groups()
        part, suffix = _EXPERT_PART[proj], leaf.removeprefix("weight")
        if part is None:
            return Slice(f"{prefix}.mlp.experts.down_proj{suffix}", expert=int(expert))
        return Slice(f"{prefix}.mlp.experts.gate_up_proj{suffix}", part, (1, 1), int(expert))
    m = _PART.fullmatch(name)
    if m is not None:
        prefix, module, leaf = m.groups()
        block, _, proj = module.rpartition(".")  # mlp.shared_experts: a MoE block's shared MLP
        fused, i = _FUSED_OF[proj]
        if config.fuse_qkv if fused == "qkv_proj" else config.fuse_gate_up:
            param = f"{prefix}.{block}.{fused}.{leaf}"
            return Slice(param, i, fused_parts(param, config))
        return name
    return name.replace(".block_sparse_moe.gate.", ".mlp.gate.")  # Mixtral's router


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def extra_layer(name: str, config: ModelConfig) -> bool:
    """Whether a checkpoint tensor belongs to a layer past the model's that the checkpoint may hold
    (ModelConfig.extra_checkpoint_layers: GLM-4.5's multi-token-prediction layer), which is not loaded."""
    m = _LAYER.match(name)
    return m is not None and 0 <= int(m.group(1)) - config.num_hidden_layers < config.extra_checkpoint_layers


def parameter_of(name: str, config: ModelConfig) -> str:
    """The name of the model parameter checkpoint tensor `name` fills (all of it, or a slice)."""
    target = checkpoint_target(name, config)
    return target.param if isinstance(target, Slice) else target


def checkpoint_view(name: str, config: ModelConfig, tensor_of: Callable[[str], Tensor]) -> tuple[str, Tensor]:
    """(parameter name, the tensor or view of it) that checkpoint tensor `name` fills, the parameter found
    with `tensor_of` (a model's state dict, the memory service's mapped tensors)."""
    target = checkpoint_target(name, config)
    if isinstance(target, Slice):
        return target.param, target.of(tensor_of(target.param))
    return target, tensor_of(target)

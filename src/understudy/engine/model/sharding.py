"""Tensor parallelism: how one decoder is cut into N ranks (Megatron style), one process per device.

A rank runs the same `CausalLM` as a single-device engine, built from a *rank config*: the
model's config with a 1/N share of the query heads, the KV heads and the MLP width. So each
rank's parameters already have its shard's shapes, under the checkpoint's names:

    q_proj, k_proj, v_proj, gate_proj, up_proj   column-parallel: rows [r*n/N, (r+1)*n/N) (biases too)
    o_proj, down_proj                            row-parallel: columns of the same range; their partial
                                                 outputs are summed across ranks (all-reduce), the bias
                                                 is added once, after the sum
    embeddings, norms, lm_head, q_norm/k_norm    replicated
    MoE experts (model/experts.py)               each expert's gate/up rows and down columns as the MLP's,
                                                 so a rank's stacked tensors hold its slice of every expert's
                                                 intermediate dimension; the router is replicated (every rank
                                                 routes every token alike) and the block's output all-reduced

Attention heads never cross ranks: rank r holds query heads [r*H/N, (r+1)*H/N) and the KV heads
they read, so the paged KV cache of a rank holds only its KV heads (its own device's kv pool).
After the last layer every rank holds the whole hidden state; only the leader computes logits.

`TensorParallel` is the hook the model calls (`model/decoder.py`: `Attention.tp`, `MLP.tp`); the process
model (leader + workers, control channel, group failover) lives in engine/parallel/ (group.py, rank.py, comm.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from understudy.engine.model.config import ModelConfig
from understudy.engine.model.experts import ExpertSlice, checkpoint_target

COLUMN = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
          "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
          "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.bias")
ROW = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in the group and the all-reduce the row-parallel layers call."""

    rank: int
    size: int
    all_reduce: Callable[[torch.Tensor], None]  # in place: the sum over the group's ranks


def check_shardable(config: ModelConfig, size: int) -> None:
    """Raise ValueError (saying why) if the model cannot be cut into `size` ranks."""
    if config.quantization is not None and size > 1:  # scales would need cutting along with their weights
        raise ValueError(f"FP8 weights (an FP8 checkpoint or --quantization fp8) are not supported with "
                         f"--tensor-parallel {size} yet; serve them on one device")
    if config.fused_projections and size > 1:  # a rank's rows of qkv_proj / gate_up_proj are not one run
        raise ValueError(f"--tensor-parallel {size}: {config.model_type}'s fused qkv_proj / gate_up_proj "
                         f"are not sharded yet; serve it on one device")
    problems = []
    for what, n in (("attention heads", config.num_attention_heads), ("KV heads", config.num_key_value_heads),
                    ("intermediate size", config.intermediate_size),
                    ("experts' intermediate size", config.moe_intermediate_size)):
        if n % size:
            problems.append(f"{n} {what}")
    if problems:
        raise ValueError(f"--tensor-parallel {size} does not divide the model's {', '.join(problems)}")


def rank_config(config: ModelConfig, size: int) -> ModelConfig:
    """The config of one rank's share: same hidden size and vocabulary, 1/size of the heads and MLP."""
    if size == 1:
        return config
    check_shardable(config, size)
    return replace(config, num_attention_heads=config.num_attention_heads // size,
                   num_key_value_heads=config.num_key_value_heads // size,
                   intermediate_size=config.intermediate_size // size,
                   moe_intermediate_size=config.moe_intermediate_size // size)


def shard_dim(name: str) -> int | None:
    """The dimension a checkpoint tensor is cut along (0 or 1), None if every rank holds all of it."""
    target = checkpoint_target(name)
    if isinstance(target, ExpertSlice):  # one expert's gate / up (rows) or down (columns)
        return 1 if target.part == "down" else 0
    if name.endswith(COLUMN):
        return 0
    if name.endswith(ROW):
        return 1
    return None


def shard_range(full: int, rank: int, size: int) -> tuple[int, int]:
    n = full // size
    return rank * n, (rank + 1) * n


def shard_tensor(name: str, tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This rank's piece of a full checkpoint tensor (a view; the tensor itself if replicated)."""
    dim = shard_dim(name) if size > 1 else None
    if dim is None:
        return tensor
    start, stop = shard_range(tensor.shape[dim], rank, size)
    return tensor.narrow(dim, start, stop - start)


def install(model: torch.nn.Module, tp: TensorParallel | None) -> None:
    """Give the model's row-parallel layers (attention output, MLP down, the experts' down) the group's
    all-reduce."""
    from understudy.engine.model.decoder import MLP, Attention
    from understudy.engine.model.experts import SparseMoE

    for module in model.modules():
        if isinstance(module, (Attention, MLP, SparseMoE)):
            module.tp = tp

"""Tensor parallelism: how one decoder is cut into N ranks (Megatron style), one process per device.

A rank runs the same `CausalLM` as a single-device engine, built from a *rank config*: the
model's config with a 1/N share of the query heads, the KV heads and the MLP width. So each
rank's parameters already have its shard's shapes, under the model's names:

    q_proj, k_proj, v_proj, gate_proj, up_proj   column-parallel: rows [r*n/N, (r+1)*n/N) (biases too)
    qkv_proj, gate_up_proj (fused, layout.py)    column-parallel part by part: rank r's shard is its rows of
                                                 each part, concatenated (its q heads, then its KV heads of
                                                 k and of v; its gate rows, then its up rows), so a rank's
                                                 fused matrix has the layout of the whole model's
    o_proj, down_proj                            row-parallel: columns of the same range; their partial
                                                 outputs are summed across ranks (all-reduce), the bias
                                                 is added once, after the sum
    embeddings, norms, lm_head, q_norm/k_norm    replicated
    MoE experts (model/experts.py)               each expert's gate/up rows and down columns as the MLP's,
                                                 so a rank's stacked tensors hold its slice of every expert's
                                                 intermediate dimension; the router is replicated (every rank
                                                 routes every token alike) and the block's output all-reduced;
                                                 shared experts (GLM-4.5) are cut as a dense MLP, their partial
                                                 sums added to the experts' before that one all-reduce

A checkpoint's separate q_proj (...) is cut as above and fills its part of the rank's fused matrix
(layout.checkpoint_target); a checkpoint that stores the fused matrix (Phi-3) is cut part by part.

Attention heads never cross ranks: rank r holds query heads [r*H/N, (r+1)*H/N) and the KV heads
they read, so the paged KV cache of a rank holds only its KV heads (its own device's kv pool).
After the last layer every rank holds the whole hidden state; only the leader computes logits.

`TensorParallel` is the hook the model calls (`model/decoder.py`: `Attention.tp`, `MLP.tp`); the process
model (leader + workers, control channel, group failover) lives in engine/parallel/ (group.py, rank.py, comm.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Callable

import torch

from understudy.engine.model.config import ModelConfig
from understudy.engine.model.layout import fused_parts, part_rows

# Checkpoint and parameter names: the dense projections (weights and biases) and one expert's matrices.
COLUMN = re.compile(r".*\.(?:self_attn\.(?:q_proj|k_proj|v_proj|qkv_proj)"
                    r"|mlp\.(?:shared_experts\.)?(?:gate_proj|up_proj|gate_up_proj))\.(?:weight|bias)"
                    r"|.*\.(?:mlp|block_sparse_moe)\.experts\.\d+\.(?:gate_proj|up_proj|w1|w3)\.weight")
ROW = re.compile(r".*\.(?:self_attn\.o_proj|mlp\.(?:shared_experts\.)?down_proj)\.weight"
                 r"|.*\.(?:mlp|block_sparse_moe)\.experts\.\d+\.(?:down_proj|w2)\.weight")
# The experts' stacked tensors under the model's names [E, rows, cols] (a checkpoint written by transformers>=5)
STACKED = {".mlp.experts.gate_up_proj": 1, ".mlp.experts.down_proj": 2}


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in the group and the all-reduce the row-parallel layers call."""

    rank: int
    size: int
    all_reduce: Callable[[torch.Tensor], None]  # in place: the sum over the group's ranks
    # in place: rank 0's values on every rank (the ids of a decode step queued ahead: core/llm_engine.py)
    broadcast: Callable[[torch.Tensor], None]


def check_shardable(config: ModelConfig, size: int) -> None:
    """Raise ValueError (saying why) if the model cannot be cut into `size` ranks."""
    if config.quantization is not None and size > 1:  # scales would need cutting along with their weights
        raise ValueError(f"FP8 weights (an FP8 checkpoint or --quantization fp8) are not supported with "
                         f"--tensor-parallel {size} yet; serve them on one device")
    problems = []
    for what, n in (("attention heads", config.num_attention_heads), ("KV heads", config.num_key_value_heads),
                    ("intermediate size", config.intermediate_size),
                    ("experts' intermediate size", config.moe_intermediate_size),
                    ("shared experts' intermediate size", config.shared_expert_intermediate_size)):
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
                   moe_intermediate_size=config.moe_intermediate_size // size,
                   shared_expert_intermediate_size=config.shared_expert_intermediate_size // size)


def shard_dim(name: str) -> int | None:
    """The dimension a tensor (by checkpoint or parameter name) is cut along, None if every rank holds all of it."""
    for suffix, dim in STACKED.items():
        if name.endswith(suffix):
            return dim
    if COLUMN.fullmatch(name):
        return 0
    if ROW.fullmatch(name):
        return 1
    return None


def shard_range(full: int, rank: int, size: int) -> tuple[int, int]:
    n = full // size
    return rank * n, (rank + 1) * n


def shard_ranges(name: str, shape: tuple[int, ...], rank: int, size: int,
                 config: ModelConfig) -> tuple[int, list[tuple[int, int]]] | None:
    """(dim, [(start, stop), ...]): the runs along `dim` of a full tensor whose concatenation is this rank's
    shard (one run; one per part of a fused tensor); None if every rank holds all of it."""
    dim = shard_dim(name) if size > 1 else None
    if dim is None:
        return None
    parts = fused_parts(name, config) or (1,)
    runs = []
    for i in range(len(parts)):
        start, stop = part_rows(shape[dim], parts, i)
        lo, hi = shard_range(stop - start, rank, size)
        runs.append((start + lo, start + hi))
    return dim, runs


def shard_tensor(name: str, tensor: torch.Tensor, rank: int, size: int, config: ModelConfig) -> torch.Tensor:
    """This rank's piece of a full tensor (a view when it is one run; the tensor itself if replicated)."""
    cut = shard_ranges(name, tuple(tensor.shape), rank, size, config)
    if cut is None:
        return tensor
    dim, runs = cut
    pieces = [tensor.narrow(dim, start, stop - start) for start, stop in runs]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


def install(model: torch.nn.Module, tp: TensorParallel | None) -> None:
    """Give the model's row-parallel layers (attention output, MLP down, the experts' down) the group's
    all-reduce."""
    from understudy.engine.model.decoder import MLP, Attention
    from understudy.engine.model.experts import SparseMoE

    for module in model.modules():
        if isinstance(module, (Attention, MLP, SparseMoE)):
            module.tp = tp

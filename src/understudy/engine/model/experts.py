"""The mixture-of-experts block of the decoder, and where checkpoints' per-expert tensors go in it.

Checkpoints store one small matrix per expert and projection:
    Qwen3-MoE  model.layers.L.mlp.experts.E.{gate_proj,up_proj,down_proj}.weight,  router mlp.gate.weight
    Mixtral    model.layers.L.block_sparse_moe.experts.E.{w1,w3,w2}.weight,        router block_sparse_moe.gate.weight
The model holds them stacked per layer, in the layout the kernels read (engine/layers/moe.py):
    model.layers.L.mlp.experts.gate_up_proj  [E, 2*I, H]   expert e's gate rows, then its up rows
    model.layers.L.mlp.experts.down_proj     [E, H, I]
(the names transformers>=5 uses in memory). These are what the memory service holds, so every engine that
imports the weights maps the stacked tensors as they are. `layout.checkpoint_target` says, for a checkpoint
name, which parameter it fills and, for an expert's matrix, which slice of the stacked one (the mechanism
that also puts q/k/v and gate/up rows into the dense layers' fused matrices). Under tensor parallelism a
rank's stacked tensors hold its slice of every expert's intermediate dimension (model/sharding.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from understudy.engine.layers import moe
from understudy.engine.model.config import ModelConfig


class StackedExperts(nn.Module):
    """All experts of a layer, stacked: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        e, h, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))


class SparseMoE(nn.Module):
    """Router + experts in place of a layer's MLP: each token goes through its top-k experts, whose outputs
    are summed with the router's weights."""

    tp = None  # sharding.TensorParallel: this rank holds a slice of each expert's intermediate dimension

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.renormalize = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # the router
        self.experts = StackedExperts(config)

    def forward(self, x: Tensor) -> Tensor:
        weights, ids = moe.route(self.gate(x), self.top_k, self.renormalize)
        out = moe.experts(x, self.experts.gate_up_proj, self.experts.down_proj, weights, ids)
        if self.tp is not None:  # each rank's experts produced partial sums over its slice of I
            self.tp.all_reduce(out)
        return out

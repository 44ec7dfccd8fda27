"""The mixture-of-experts block of the decoder, and where checkpoints' per-expert tensors go in it.

Checkpoints store one small matrix per expert and projection:
    Qwen3-MoE  model.layers.L.mlp.experts.E.{gate_proj,up_proj,down_proj}.weight,  router mlp.gate.weight
    Mixtral    model.layers.L.block_sparse_moe.experts.E.{w1,w3,w2}.weight,        router block_sparse_moe.gate.weight
    GLM-4.5    as Qwen3-MoE, the router's mlp.gate.e_score_correction_bias beside its weight, and the shared
               experts' mlp.shared_experts.{gate_proj,up_proj,down_proj}.weight (a dense MLP: mlp.shared_experts.
               gate_up_proj in the model, as every MLP's gate and up)
The model holds them stacked per layer, in the layout the kernels read (engine/layers/moe.py):
    model.layers.L.mlp.experts.gate_up_proj  [E, 2*I, H]   expert e's gate rows, then its up rows
    model.layers.L.mlp.experts.down_proj     [E, H, I]
(the names transformers>=5 uses in memory). These are what the memory service holds, so every engine that
imports the weights maps the stacked tensors as they are. `layout.checkpoint_target` says, for a checkpoint
name, which parameter it fills and, for an expert's matrix, which slice of the stacked one (the mechanism
that also puts q/k/v and gate/up rows into the dense layers' fused matrices). Under tensor parallelism a
rank's stacked tensors hold its slice of every expert's intermediate dimension (model/sharding.py).

FP8 (an FP8 MoE checkpoint, or `--quantization fp8`): the stacked tensors are float8 e4m3 and each has its
float32 scales beside it, named after the checkpoint's (weight_scale -> _scale, weight_scale_inv ->
_scale_inv, transformers' names for block scales):
    model.layers.L.mlp.experts.gate_up_proj_scale   [E, 2*I]  one per output row (--quantization fp8,
    model.layers.L.mlp.experts.down_proj_scale      [E, H]    per-channel checkpoints)
    model.layers.L.mlp.experts.gate_up_proj_scale_inv  [E, 2*I/128, H/128]  128x128 blocks (Qwen3-30B-A3B-FP8)
    model.layers.L.mlp.experts.down_proj_scale_inv     [E, H/128, I/128]    (ragged edge blocks rounded up)
Ordinary parameters, so published into the memory service with the rest and mapped by every shadow.
Tensor parallelism refuses FP8 weights (model/sharding.check_shardable).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from understudy.engine.layers import moe
from understudy.engine.layers.linear import Linear
from understudy.engine.model.config import ModelConfig
from understudy.engine.model.quantization import expert_scale_shapes

FP8 = torch.float8_e4m3fn


class StackedExperts(nn.Module):
    """All experts of a layer, stacked: gate_up_proj [E, 2I, H], down_proj [E, H, I] (FP8: and their scales)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        e, h, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.quant = config.quantization  # every expert FP8 or none (quantization.check_experts)
        if self.quant is None:
            self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
            self.down_proj = nn.Parameter(torch.empty(e, h, i))
            return
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h, dtype=FP8), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(e, h, i, dtype=FP8), requires_grad=False)
        self.suffix = self.quant.scale_name.removeprefix("weight")  # _scale or _scale_inv, as the checkpoint's
        for proj, shape in zip(("gate_up_proj", "down_proj"), expert_scale_shapes(self.quant, e, h, i)):
            self.register_parameter(proj + self.suffix, nn.Parameter(torch.empty(shape), requires_grad=False))

    @property
    def fp8_weights(self) -> tuple[str, ...]:
        """The parameters --quantization fp8 quantizes (layers/quant.quantize_online): none for bf16 experts."""
        return () if self.quant is None else ("gate_up_proj", "down_proj")

    def stored_dtypes(self) -> dict[str, torch.dtype]:
        """The parameters that keep their own dtype whatever dtype the model serves in (quant.cast_model)."""
        if self.quant is None:
            return {}
        return {"gate_up_proj": FP8, "down_proj": FP8, "gate_up_proj" + self.suffix: torch.float32,
                "down_proj" + self.suffix: torch.float32}

    def scales(self) -> moe.Fp8Scales | None:
        if self.quant is None:
            return None
        return moe.Fp8Scales(getattr(self, "gate_up_proj" + self.suffix), getattr(self, "down_proj" + self.suffix),
                             self.quant.block if self.quant.weights == "block" else None)


class SoftmaxRouter(Linear):
    """Qwen3-MoE's and Mixtral's router: its logits (a Linear, layers/linear.py), softmax over every expert,
    the top k (layers/moe.route: one Triton launch on CUDA)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config.hidden_size, config.num_experts, bias=False)
        self.top_k, self.renormalize = config.num_experts_per_tok, config.norm_topk_prob

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(weights [T, k] fp32, expert ids [T, k]) of each row of x."""
        return moe.route(self(x), self.top_k, self.renormalize)


class BiasedRouter(nn.Module):
    """DeepSeek-V3's and GLM-4.5's router (layers/moe.route_biased): its logits in fp32 from fp32 weights, as
    transformers keeps them (`_keep_in_fp32_modules`), and the per-expert correction bias of the choice."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size), requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(torch.empty(config.num_experts), requires_grad=False)
        self.top_k, self.renormalize = config.num_experts_per_tok, config.norm_topk_prob
        self.groups, self.top_groups = config.moe_groups, config.moe_top_groups
        self.scaling = config.routed_scaling_factor

    def stored_dtypes(self) -> dict[str, torch.dtype]:
        """Kept in fp32 whatever dtype the model serves in (layers/quant.cast_model)."""
        return {"weight": torch.float32, "e_score_correction_bias": torch.float32}

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(weights [T, k] fp32, expert ids [T, k]) of each row of x."""
        logits = torch.nn.functional.linear(x.float(), self.weight)
        return moe.route_biased(logits, self.e_score_correction_bias, self.top_k, self.groups, self.top_groups,
                                self.renormalize, self.scaling)


class SparseMoE(nn.Module):
    """Router + experts in place of a layer's MLP: each token goes through its top-k experts, whose outputs
    are summed with the router's weights; with `shared` (GLM-4.5's shared experts, a dense MLP the decoder
    builds), every token goes through that MLP too, added to the sum."""

    tp = None  # sharding.TensorParallel: this rank holds a slice of each expert's intermediate dimension

    def __init__(self, config: ModelConfig, shared: nn.Module | None = None):
        super().__init__()
        self.gate = BiasedRouter(config) if config.moe_router == "sigmoid" else SoftmaxRouter(config)
        self.experts = StackedExperts(config)
        self.shared_experts = shared

    def forward(self, x: Tensor) -> Tensor:
        out = moe.experts(x, self.experts.gate_up_proj, self.experts.down_proj, *self.gate.route(x),
                          self.experts.scales())
        if self.shared_experts is not None:  # its down projection's partial sums join the experts', one all-reduce
            out = out + self.shared_experts.down_proj(self.shared_experts.hidden(x))
        if self.tp is not None:  # each rank's experts produced partial sums over its slice of I
            self.tp.all_reduce(out)
        return out

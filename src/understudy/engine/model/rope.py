"""Rotary position embeddings: the rotation frequencies of every RoPE variant the engine serves.

config.py reads the variant from config.json (`normalize_rope_scaling`); this module turns it into the
per-pair inverse frequencies the rotation (layers/fused.apply_rope) uses, op for op as transformers'
modeling_rope_utils computes them:

  default, linear, llama3, freq_factors (llama.cpp's rope_freqs), yarn: fixed frequencies;
  dynamic (NTK) and longrope (Phi-3 "su"): the frequencies depend on the sequence's length.

Length-dependent variants follow transformers' generate() for one sequence: a token is rotated with the
frequencies of its sequence's length in the step that computes it (the whole prompt's length for a prefill,
its own position + 1 for a decode step); keys already cached keep their rotation. So a chunked prefill or a
prefix-cache hit can rotate a few keys differently than one whole prefill would, as in transformers when
it continues from a cache.

yarn and longrope also scale cos/sin by an attention factor (`RotaryEmbedding.mscale`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn


def base_inv_freq(theta: float, dim: int) -> Tensor:
    """1 / theta^(2i/dim) for i < dim/2, fp32 on the CPU."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))


def rope_inv_freq(config, theta: float | None = None, scaling: dict[str, Any] | None = ...) -> Tensor:
    """The fixed per-pair frequencies [rotary_dim/2] (fp32, CPU) of a config's RoPE (its global layers';
    `theta`/`scaling` override them, as for Gemma 3's local layers). For dynamic and longrope these are
    the frequencies of a sequence within the original context."""
    theta = config.rope_theta if theta is None else theta
    scaling = config.rope_scaling if scaling is ... else scaling
    dim = config.rotary_dim
    inv_freq = base_inv_freq(theta, dim)
    kind = None if scaling is None else scaling["rope_type"]
    if kind in (None, "dynamic"):
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "freq_factors":  # llama.cpp's rope_freqs tensor: per-pair divisors
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32, device="cpu")
    if kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    if kind == "yarn":
        return _yarn_inv_freq(theta, dim, scaling, config.max_position_embeddings)
    if kind == "longrope":
        return _longrope_inv_freq(theta, dim, scaling["short_factor"])
    raise ValueError(f"unknown rope_type {kind!r}")  # config.py rejects these earlier


def _yarn_inv_freq(theta: float, dim: int, s: dict[str, Any], max_pos: int) -> Tensor:
    """YaRN: interpolate (divide by factor) the low frequencies, keep the high ones, ramp in between."""
    factor = s.get("factor") or max_pos / s["original_max_position_embeddings"]
    old_len = s["original_max_position_embeddings"]
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the pair index that turns `rotations` times in old_len
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero division
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1: keep the frequency (extrapolate), 0: divide it by factor (interpolate)
    return interpolation * (1 - keep) + extrapolation * keep


def _longrope_inv_freq(theta: float, dim: int, factors: list[float]) -> Tensor:
    ext = torch.tensor(factors, dtype=torch.float32, device="cpu")
    return 1.0 / (ext * theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))


def attention_factor(scaling: dict[str, Any] | None, max_pos: int) -> float:
    """The factor yarn and longrope multiply cos and sin by (1 for the other variants)."""
    kind = None if scaling is None else scaling["rope_type"]
    if kind not in ("yarn", "longrope"):
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    old_len = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or max_pos / old_len
    if kind == "longrope":
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_len))

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return float(mscale(factor, scaling["mscale"]) / mscale(factor, scaling["mscale_all_dim"]))
    return mscale(factor)


class RotaryEmbedding(nn.Module):
    """The rotation frequencies of one RoPE variant, per device; the rotation itself is fused.apply_rope.

    The frequencies are plain attributes, not buffers: the model is built on the meta device and a buffer
    would stay there, since checkpoints don't carry it.
    """

    def __init__(self, config, theta: float | None = None, scaling: dict[str, Any] | None = ...):
        super().__init__()
        self.scaling = config.rope_scaling if scaling is ... else scaling
        self.theta = config.rope_theta if theta is None else theta
        self.dim = config.rotary_dim
        self.max_pos = config.max_position_embeddings
        self.mscale = attention_factor(self.scaling, self.max_pos)
        self._inv_freq = rope_inv_freq(config, self.theta, self.scaling)
        kind = None if self.scaling is None else self.scaling["rope_type"]
        self.by_length = kind in ("dynamic", "longrope")
        self._long = (_longrope_inv_freq(self.theta, self.dim, self.scaling["long_factor"])
                      if kind == "longrope" else None)
        self._per_device: dict[torch.device, tuple[Tensor, Tensor | None]] = {}

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """(fixed frequencies, longrope's long ones) on `device`, copied there once, before any graph capture."""
        found = self._per_device.get(device)
        if found is None:
            found = self._per_device[device] = (
                self._inv_freq.to(device), None if self._long is None else self._long.to(device))
        return found

    def inv_freq(self, device: torch.device, seq_lens: Tensor | None = None) -> Tensor:
        """[rotary_dim/2] fp32 on `device`; for the length-dependent variants, given each token's sequence
        length (`seq_lens` [T]), [T, rotary_dim/2]."""
        inv_freq, long = self._on(device)
        if not self.by_length:
            return inv_freq
        if long is not None:  # longrope: the long factors once the sequence is past the original context
            old_len = self.scaling["original_max_position_embeddings"]
            return torch.where((seq_lens > old_len)[:, None], long, inv_freq)
        # dynamic NTK: a larger base past max_position_embeddings, as transformers computes it
        factor, dim = self.scaling["factor"], self.dim
        seq = torch.clamp(seq_lens, min=self.max_pos)
        base = self.theta * ((factor * seq / self.max_pos) - (factor - 1)) ** (dim / (dim - 2))
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
        return 1.0 / (base[:, None] ** exponents[None, :])

"""The paged KV cache: one contiguous byte range, carved into per-layer K and V blocks.

The bytes come from the memory service's `kv` pool, so they outlive the engine
process: the next owner (a promoted shadow) adopts the same physical blocks at
its own addresses, cached prefixes included. Without a memory service (tests,
a throwaway engine) they come from a plain torch allocation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..memory import MemoryClient
from ..memory.tensors import dtype_name, dtype_of
from .config import ModelConfig


@dataclass(frozen=True)
class KVSpec:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of K (or V) of one layer."""
        return self.block_size * self.num_kv_heads * self.head_dim * dtype_of(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        return self.num_layers * 2 * self.num_blocks * self.block_bytes

    @classmethod
    def for_budget(cls, config: ModelConfig, budget_bytes: int, block_size: int, dtype: torch.dtype) -> "KVSpec":
        one = cls(config.num_hidden_layers, 1, block_size, config.num_key_value_heads, config.head_dim,
                  dtype_name(dtype))
        num_blocks = budget_bytes // one.nbytes
        if num_blocks < 2:  # block 0 is reserved (see BlockManager)
            raise ValueError(f"a KV budget of {budget_bytes} bytes holds no block of {one.nbytes} bytes")
        return cls(**{**asdict(one), "num_blocks": int(num_blocks)})


KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


def kv_views(raw: torch.Tensor, spec: KVSpec) -> KVCaches:
    """Per-layer (k, v) tensors [num_blocks, block_size, kv_heads, head_dim] over raw bytes."""
    t = raw[: spec.nbytes].view(dtype_of(spec.dtype)).view(
        spec.num_layers, 2, spec.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    return [(t[i, 0], t[i, 1]) for i in range(spec.num_layers)]


class KVCache:
    """The engine's KV bytes and its views; `adopted` says if they came from a previous owner."""

    def __init__(self, spec: KVSpec, raw: torch.Tensor, client: MemoryClient | None = None, adopted: bool = False):
        self.spec = spec
        self.raw = raw
        self.client = client
        self.adopted = adopted
        self.layers = kv_views(raw, spec)

    @classmethod
    def local(cls, spec: KVSpec, device: torch.device | str) -> "KVCache":
        return cls(spec, torch.zeros(spec.nbytes, dtype=torch.uint8, device=device))

    @classmethod
    def from_memory_service(cls, socket_path: str, spec: KVSpec, timeout: float = 60.0,
                            name: str = "engine") -> "KVCache":
        """Own the device's kv pool: adopt its blocks if they have our layout, else start afresh."""
        client = MemoryClient(socket_path, "kv", "rw", timeout=timeout, name=name)
        layout = client.layout
        adopt = layout.extra.get("kv_spec") == asdict(spec) and len(layout.sizes) == 1
        if adopt:
            client.map_all()
        else:
            if layout.sizes:
                client.reset()  # another model's or shape's cache: its contents mean nothing to us
            client.allocate(spec.nbytes, timeout=timeout)
            client.set_metadata(extra={"kv_spec": asdict(spec)}, replace=True)
        m = client.mappings[0]
        return cls(spec, client.backend.tensor(m.va, spec.nbytes), client, adopted=adopt)

"""The paged KV cache: one reserved address range, carved into per-layer K and V blocks.

The bytes come from the memory service's `kv` pool, so they outlive the engine
process: the next owner (a promoted shadow) adopts the same physical blocks at
its own addresses, cached prefixes included. Behind the K/V bytes lies the
*sealed-block index* (16 bytes per block: the block's prefix hash, zeros when
the block holds nothing complete), which the next owner reads to rebuild its
prefix cache.

A shadow, before it owns the pool, backs its range with one small scratch
chunk mapped over and over, so that warm-up and CUDA-graph capture run at the
very addresses the real blocks will have. Without a memory service (tests, a
throwaway engine) the bytes come from a plain torch allocation.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from understudy.logs import log
from understudy.engine.core.host_copies import to_device
from understudy.memory import MemoryClient
from understudy.memory.backends.base import Backend
from understudy.memory.tensors import dtype_name, dtype_of
from understudy.engine.model.config import ModelConfig

logger = logging.getLogger("understudy.engine.core.kv_cache")

INDEX_ENTRY = 16  # bytes per block: a BLAKE2b-128 prefix hash
_NO_HASH = bytes(INDEX_ENTRY)  # the entry of a block that holds nothing complete
SCRATCH_CHUNK = 64 << 20


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
        """K/V bytes (without the index)."""
        return self.num_layers * 2 * self.num_blocks * self.block_bytes

    @property
    def total_bytes(self) -> int:
        return self.nbytes + self.num_blocks * INDEX_ENTRY

    @classmethod
    def for_budget(cls, config: ModelConfig, budget_bytes: int, block_size: int, dtype: torch.dtype) -> "KVSpec":
        one = cls(config.num_hidden_layers, 1, block_size, config.num_key_value_heads, config.head_dim,
                  dtype_name(dtype))
        num_blocks = budget_bytes // (one.nbytes + INDEX_ENTRY)
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
    """The engine's KV bytes, views and sealed-block index."""

    def __init__(self, spec: KVSpec, raw: torch.Tensor, client: MemoryClient | None = None, adopted: bool = False,
                 backend: Backend | None = None):
        self.spec = spec
        self.backend = backend  # reused on promotion: finding the backend again means probing devices
        self.raw = raw
        self.client = client
        self.adopted = adopted
        self.layers = kv_views(raw, spec)
        self.index = raw[spec.nbytes: spec.total_bytes].view(spec.num_blocks, INDEX_ENTRY)
        self._scratch: tuple[object, int, list[tuple[int, int]]] | None = None  # handle, fd, mapped pieces
        self.parked = False  # a shadow's range: reserved, nothing mapped, waiting to adopt the pool

    @classmethod
    def local(cls, spec: KVSpec, device: torch.device | str) -> "KVCache":
        return cls(spec, torch.zeros(spec.total_bytes, dtype=torch.uint8, device=device))

    @classmethod
    def from_memory_service(cls, socket_path: str, spec: KVSpec, timeout: float = 60.0,
                            name: str = "engine") -> "KVCache":
        """Own the device's kv pool: adopt its blocks if they have our layout, else start afresh."""
        client = MemoryClient(socket_path, "kv", "rw", timeout=timeout, name=name)
        backend = client.backend
        size = backend.round_up(spec.total_bytes)
        va = backend.reserve(size)
        cache = cls(spec, backend.tensor(va, spec.total_bytes), backend=backend)
        cache._take_pool(client, va, timeout)
        return cache

    @classmethod
    def scratch(cls, backend: Backend, spec: KVSpec, chunk: int = SCRATCH_CHUNK) -> "KVCache":
        """A reserved range backed by one small chunk mapped repeatedly (a parked shadow's KV)."""
        size = backend.round_up(spec.total_bytes)
        chunk = min(backend.round_up(chunk), size)
        va = backend.reserve(size)
        handle, fd = backend.create(chunk)
        pieces = [(off, min(chunk, size - off)) for off in range(0, size, chunk)]
        for off, n in pieces:
            backend.map(va + off, n, fd, 0, readonly=False)
        cache = cls(spec, backend.tensor(va, spec.total_bytes), backend=backend)
        cache._scratch = (handle, fd, pieces)
        return cache

    def park(self) -> None:
        """Drop the scratch mapping once warm-up and graph capture are done; the range stays reserved.

        Unmapping right after another process died waits for the driver to tear that process
        down (~30 ms on an H100), so it must not happen on the promotion path."""
        if self._scratch is not None:
            handle, fd, pieces = self._scratch
            va = self.raw.data_ptr()
            for off, n in pieces:
                self.backend.unmap(va + off, n)
            self.backend.release(handle, fd)
            self._scratch = None
            self.parked = True

    def adopt(self, socket_path: str, timeout: float = 60.0, name: str = "engine") -> float:
        """Promotion: map the kv pool's blocks into our (parked) range, at the same addresses.

        Returns the seconds it took (the lock wait included)."""
        self.park()
        assert self.parked, "only a shadow's cache adopts"
        t0 = time.perf_counter()
        client = MemoryClient(socket_path, "kv", "rw", timeout=timeout, name=name, backend=self.backend)
        t1 = time.perf_counter()
        self._take_pool(client, self.raw.data_ptr(), timeout)
        t2 = time.perf_counter()
        self.parked = False
        log(logger, "kv_adopt_timing", lock_ms=round((t1 - t0) * 1e3, 3), map_pool_ms=round((t2 - t1) * 1e3, 3))
        return t2 - t0

    def release_pool(self) -> None:
        """Sleep: unmap the pool's blocks and leave the pool (another engine may own it meanwhile).

        Our range stays reserved, so the views and CUDA graphs over it stay valid for retake_pool()."""
        self.client.release_all()  # the mappings sit in our own range: only they go, not the range
        self.client.disconnect()

    def retake_pool(self, timeout: float = 60.0) -> None:
        """Wake up: own the kv pool again, at the same addresses (adopted if it still has our layout)."""
        self.client.connect(timeout)
        try:
            self._take_pool(self.client, self.raw.data_ptr(), timeout)
        except BaseException:
            self.release_pool()  # stay asleep, cleanly: nothing half-mapped, the pool free again
            raise

    def _take_pool(self, client: MemoryClient, va: int, timeout: float) -> None:
        spec = self.spec
        layout = client.layout
        self.adopted = layout.extra.get("kv_spec") == asdict(spec) and len(layout.sizes) == 1
        if self.adopted:
            client.map_all(base=va)
        else:
            if layout.sizes:
                client.reset()  # another model's or shape's cache: its contents mean nothing to us
            client.allocate(spec.total_bytes, timeout=timeout, at=va)
            self.index.zero_()  # a fresh pool holds no complete block
            client.set_metadata(extra={"kv_spec": asdict(spec)}, replace=True)
        self.client = client
        log(logger, "kv_cache_ready", adopted=self.adopted, blocks=spec.num_blocks, bytes=spec.total_bytes)

    def read_index(self) -> dict[int, bytes]:
        """Sealed blocks recorded by the previous owner: block -> prefix hash."""
        entries = self.index.cpu().numpy()
        blocks = entries.any(axis=1).nonzero()[0]
        blocks = blocks[blocks != 0]
        # One bytes object sliced per entry: a tobytes() per row cost ~0.5 us each, in the failover's path.
        raw, width = entries[blocks].tobytes(), entries.shape[1]
        return dict(zip(blocks.tolist(), (raw[i:i + width] for i in range(0, len(raw), width))))

    def write_index(self, updates: list[tuple[int, bytes | None]]) -> None:
        """Record sealed (hash) and recycled (None) blocks; stream-ordered after the K/V writes."""
        if not updates:
            return
        blocks = np.fromiter((b for b, _ in updates), dtype=np.int64, count=len(updates))
        # one bytes object for all the entries (a recycled block's is zeros), not a list of ints per entry
        raw = bytearray(b"".join(h or _NO_HASH for _, h in updates))
        values = np.frombuffer(raw, dtype=np.uint8).reshape(len(updates), INDEX_ENTRY)
        device = self.index.device  # (copies that do not wait for a step queued on the device)
        self.index.index_copy_(0, to_device(blocks, device), to_device(values, device))

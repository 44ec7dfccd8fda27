"""Getting weights into the memory service once, and onto every later engine for free.

The first engine of a device publishes: it plans the layout from the model's
own parameter shapes, streams checkpoint tensors into the mapped allocations
(through pinned staging buffers on CUDA, overlapping host copies with DMA) and
commits. Every later engine finds the committed layout and maps it read-only:
no disk read, no copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from understudy.logs import log
from understudy.memory import MemoryClient, MemoryServiceError, materialize_module, plan_layout, read_status
from understudy.memory.tensors import dtype_name
from understudy.engine.model.config import ModelConfig
from understudy.engine.model.fast_load import Staging, StoredTensor, copy_direct, read_header
from understudy.engine.model.loader import is_gguf, iter_weights, safetensors_files
from understudy.engine.model.decoder import CausalLM
from understudy.engine.model.sharding import TensorParallel, install, rank_config, shard_dim, shard_range, shard_tensor

logger = logging.getLogger("understudy.engine.model.weights")

STAGING_BYTES = 64 << 20


class WeightsMismatch(RuntimeError):
    """The memory service already holds another model's weights."""


def model_id(path: str | Path, config: ModelConfig, dtype: torch.dtype, tp: TensorParallel | None = None) -> str:
    """The identity of what a weights pool holds; a tensor-parallel shard's names its rank and group size,
    so a pool holding a shard is never imported by an engine of another group size or rank."""
    fields = {"path": str(Path(path).resolve()), "dtype": dtype_name(dtype), "config": repr(config)}
    if tp is not None and tp.size > 1:
        fields["tensor_parallel"] = [tp.rank, tp.size]
    desc = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(desc.encode()).hexdigest()[:16]


def _skippable(name: str, wanted: dict) -> bool:
    return name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and name not in wanted)


class _StagedCopier:
    """Host tensor -> device memory through two pinned buffers, so reads and DMA overlap."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)
        self.buffers = [torch.empty(STAGING_BYTES, dtype=torch.uint8).pin_memory() for _ in range(2)]
        self.done = [torch.cuda.Event() for _ in range(2)]
        self.turn = 0

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        src_bytes = src.contiguous().reshape(-1).view(torch.uint8)
        dst_bytes = dst.reshape(-1).view(torch.uint8)
        for start in range(0, src_bytes.numel(), STAGING_BYTES):
            piece = src_bytes[start:start + STAGING_BYTES]
            i = self.turn
            self.done[i].synchronize()  # the DMA out of this buffer has finished
            self.buffers[i][: piece.numel()].copy_(piece)
            with torch.cuda.stream(self.stream):
                dst_bytes[start:start + piece.numel()].copy_(self.buffers[i][: piece.numel()], non_blocking=True)
                self.done[i].record(self.stream)
            self.turn = 1 - i

    def finish(self) -> None:
        self.stream.synchronize()


def _sources(path, specs: dict, dtype: torch.dtype, tp: TensorParallel | None = None):
    """(tensors to copy byte for byte, an iterator over the ones to convert); under tensor parallelism
    only this rank's shard of each tensor (sharding.py)."""
    rank, size = (tp.rank, tp.size) if tp is not None else (0, 1)
    if is_gguf(path):
        return {}, ((n, shard_tensor(n, t, rank, size)) for n, t in iter_weights(path, dtype))
    stored: dict[str, StoredTensor] = {}
    for file in safetensors_files(path):
        stored.update(read_header(file))
    if size > 1:  # a shard cut along dim 0 is a contiguous run of the stored bytes: still read directly
        stored = {n: _row_shard(n, t, rank, size) for n, t in stored.items()}
    direct = {n: t for n, t in stored.items() if n in specs and t.dtype == dtype and t.shape == specs[n][0]}

    def converted():
        from safetensors import safe_open

        by_file: dict = {}
        for name, t in stored.items():
            if name not in direct:
                by_file.setdefault(t.file, []).append(name)
        for file, names in by_file.items():
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in names:
                    dim = shard_dim(name) if size > 1 else None
                    if dim is None:
                        yield name, f.get_tensor(name).to(dtype)
                        continue
                    piece = f.get_slice(name)  # reads only this rank's part
                    start, stop = shard_range(piece.get_shape()[dim], rank, size)
                    yield name, piece[start:stop].to(dtype) if dim == 0 else piece[:, start:stop].to(dtype)

    return direct, converted()


def _row_shard(name: str, t: StoredTensor, rank: int, size: int) -> StoredTensor:
    """The bytes of this rank's dim-0 shard of a stored tensor (others are left as they are)."""
    if shard_dim(name) != 0 or not t.shape or t.shape[0] % size:
        return t
    start, stop = shard_range(t.shape[0], rank, size)
    row = t.nbytes // t.shape[0]
    return StoredTensor(t.file, t.offset + start * row, (stop - start) * row, t.dtype, (stop - start, *t.shape[1:]))


def publish(client: MemoryClient, model: CausalLM, path: str | Path, dtype: torch.dtype, ident: str,
            progress: bool = True, tp: TensorParallel | None = None) -> dict:
    """Stream the checkpoint into the client's (rw) weights pool and commit. Returns load stats."""
    wanted = {n: t for n, t in model.state_dict().items()}
    specs = {n: (tuple(t.shape), dtype) for n, t in wanted.items()}
    sizes, metas = plan_layout(specs, client.granularity)
    for size in sizes:
        client.allocate(size)
    extra = {"model_id": ident, "model_path": str(path)}
    if tp is not None and tp.size > 1:
        extra["tensor_parallel"] = [tp.rank, tp.size]
    client.set_metadata(metas, extra=extra, replace=True)
    device = client.tensor(next(iter(metas))).device
    direct, stream = _sources(path, specs, dtype, tp)
    total = sum(t.numel() * dtype.itemsize for t in wanted.values())
    loaded: set[str] = set()
    threads = 8
    staging = Staging(device, threads) if device.type == "cuda" and direct else None
    t0 = time.perf_counter()
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not progress) as bar:
        # Tensors stored in the serving dtype: file -> destination with one copy, in parallel.
        copy_direct([(stored, client.tensor(name)) for name, stored in direct.items()], threads, staging,
                    on_bytes=bar.update)
        loaded.update(direct)
        # The rest needs a conversion (or comes from GGUF): one tensor at a time.
        copier = _StagedCopier(device) if device.type == "cuda" else None
        for name, tensor in stream:
            if name not in wanted:
                if _skippable(name, wanted):
                    continue
                raise KeyError(f"checkpoint has weight {name!r} that the model does not expect")
            if tuple(tensor.shape) != specs[name][0]:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {specs[name][0]}")
            dst = client.tensor(name)
            if copier is not None:
                copier.copy(dst, tensor)
            else:
                dst.copy_(tensor)
            loaded.add(name)
            bar.update(tensor.numel() * dtype.itemsize)
        if copier is not None:
            copier.finish()
    missing = sorted(set(wanted) - loaded)
    if missing:
        raise KeyError(f"checkpoint is missing {len(missing)} weights, e.g. {missing[:5]}")
    seconds = time.perf_counter() - t0
    digest = client.commit()
    stats = {"bytes": total, "seconds": round(seconds, 3), "GBps": round(total / seconds / 1e9, 2),
             "allocations": len(sizes), "layout_hash": digest}
    log(logger, "weights_published", **stats)
    return stats


def _shard_name(tp: list[int] | None) -> str:
    return "the whole model" if not tp else f"rank {tp[0]}'s shard of a --tensor-parallel {tp[1]} group"


def load(socket_path: str, path: str | Path, config: ModelConfig, dtype: torch.dtype, *, timeout: float = 600.0,
         progress: bool = True, name: str = "engine", attention_fn=None,
         tp: TensorParallel | None = None) -> tuple[CausalLM, MemoryClient, dict]:
    """A model whose weights live in the memory service: imported if there, published if not.

    Returns the model, the client that holds the read lock (keep it open), and
    how the weights arrived ({"source": "imported"|"published", ...}). With `tp` (a rank of a
    tensor-parallel group) the model is that rank's share and the pool holds its shard only."""
    ident = model_id(path, config, dtype, tp)
    if tp is not None:
        config = rank_config(config, tp.size)
    with torch.device("meta"):
        model = CausalLM(config) if attention_fn is None else CausalLM(config, attention_fn)
    model.to(dtype)  # parameters of the meta model carry the dtype we serve in
    if tp is not None and tp.size > 1:
        install(model, tp)
    state = read_status(socket_path)["pools"]["weights"]["state"]
    client = None
    if state == "EMPTY":
        try:  # try-lock: whoever wins publishes, the others wait for the commit as readers
            client = MemoryClient(socket_path, "weights", "rw", timeout=0, name=name)
        except MemoryServiceError as e:
            if e.code != "timeout":
                raise
    t0 = time.perf_counter()
    if client is not None:
        stats = {"source": "published", **publish(client, model, path, dtype, ident, progress, tp)}
    else:
        client = MemoryClient(socket_path, "weights", "ro", timeout=timeout, name=name)
        client.map_all()
        stats = {"source": "imported", "allocations": len(client.layout.sizes),
                 "bytes": sum(client.layout.sizes)}
    found = client.layout.extra.get("model_id")
    if found != ident:
        client.close()
        held, want = client.layout.extra.get("tensor_parallel"), [tp.rank, tp.size] if tp and tp.size > 1 else None
        shards = "" if held == want else (f" (it holds {_shard_name(held)}, this engine needs {_shard_name(want)})")
        raise WeightsMismatch(f"the memory service holds weights of {client.layout.extra.get('model_path')!r} "
                              f"(id {found}), not of {str(path)!r} in {dtype_name(dtype)} (id {ident}){shards}; "
                              f"stop the engines using them, or use another device / memory service")
    materialize_module(model, client)
    stats["seconds_total"] = round(time.perf_counter() - t0, 4)
    log(logger, "weights_ready", **stats)
    return model, client, stats

"""Getting weights into the memory service once, and onto every later engine for free.

The first engine of a device publishes: it plans the layout from the model's
own parameter shapes, streams checkpoint tensors into the mapped allocations
(on CUDA by pread into pinned buffers and DMA, see fast_load.py) and
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
from understudy.engine.layers import quant
from understudy.engine.model.loader import is_gguf, iter_weights, read_kv_scales, safetensors_files
from understudy.engine.model.decoder import CausalLM
from understudy.engine.model.layout import Slice, checkpoint_target, checkpoint_view, extra_layer, parameter_of
from understudy.engine.model.sharding import TensorParallel, install, rank_config, shard_ranges, shard_tensor

logger = logging.getLogger("understudy.engine.model.weights")

STAGING_BYTES = 64 << 20
# What a pool's parameters are and how their bytes are laid out (model/layout.py), part of its identity: a
# pool published under another layout (2: q/k/v and gate/up fused for every family) is never imported.
LAYOUT_VERSION = 2


class WeightsMismatch(RuntimeError):
    """The memory service already holds another model's weights."""


def model_id(path: str | Path, config: ModelConfig, dtype: torch.dtype, tp: TensorParallel | None = None) -> str:
    """The identity of what a weights pool holds; a tensor-parallel shard's names its rank and group size,
    so a pool holding a shard is never imported by an engine of another group size or rank."""
    fields = {"path": str(Path(path).resolve()), "dtype": dtype_name(dtype), "config": repr(config),
              "layout": LAYOUT_VERSION}
    if tp is not None and tp.size > 1:
        fields["tensor_parallel"] = [tp.rank, tp.size]
    desc = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(desc.encode()).hexdigest()[:16]


def _skippable(name: str, wanted: dict) -> bool:
    return (name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and name not in wanted)
            or quant.is_kv_scale(name))  # KV-cache scales travel in the layout's metadata (publish)


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


def _sources(path, specs: dict, dtype: torch.dtype, config: ModelConfig, tp: TensorParallel | None = None):
    """(tensors to copy byte for byte, an iterator over the ones to convert); under tensor parallelism
    only this rank's shard of each tensor (sharding.py). `specs`: name -> (shape, dtype the model keeps it
    in); converted tensors come out in `dtype`, except FP8 weights and scales (quant.fit converts those)."""
    rank, size = (tp.rank, tp.size) if tp is not None else (0, 1)
    if is_gguf(path):
        return {}, ((n, shard_tensor(n, t, rank, size, config)) for n, t in iter_weights(path, dtype))
    stored: dict[str, StoredTensor] = {}
    for file in safetensors_files(path):
        stored.update(read_header(file))
    stored = {n: t for n, t in stored.items() if not extra_layer(n, config)}  # never read (GLM-4.5's MTP layer)
    if size > 1:  # a shard that is one run along dim 0 is a contiguous run of the stored bytes: still direct
        stored = {n: _row_shard(n, t, rank, size, config) for n, t in stored.items()}
    direct = {n: t for n, t in stored.items() if _spec(n, specs, config) == (t.shape, t.dtype)}

    def cast(name, t):
        return t if quant.is_quantized_storage(name, t) or quant.is_kv_scale(name) else t.to(dtype)

    def converted():
        from safetensors import safe_open

        by_file: dict = {}
        for name, t in stored.items():
            if name not in direct:
                by_file.setdefault(t.file, []).append(name)
        for file, names in by_file.items():
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in names:
                    piece = f.get_slice(name)  # reads only this rank's runs
                    cut = shard_ranges(name, tuple(piece.get_shape()), rank, size, config)
                    if cut is None:
                        yield name, cast(name, f.get_tensor(name))
                        continue
                    dim, runs = cut
                    runs = [piece[(slice(None),) * dim + (slice(start, stop),)] for start, stop in runs]
                    yield name, cast(name, runs[0] if len(runs) == 1 else torch.cat(runs, dim))

    return direct, converted()


def _row_shard(name: str, t: StoredTensor, rank: int, size: int, config: ModelConfig) -> StoredTensor:
    """The bytes of this rank's shard of a stored tensor when it is one run of rows (others are left as they
    are: read and cut by `converted`)."""
    cut = shard_ranges(name, t.shape, rank, size, config) if t.shape and not t.shape[0] % size else None
    if cut is None or cut[0] != 0 or len(cut[1]) != 1:
        return t
    (start, stop), = cut[1]
    row = t.nbytes // t.shape[0]
    return StoredTensor(t.file, t.offset + start * row, (stop - start) * row, t.dtype, (stop - start, *t.shape[1:]))


def _spec(name: str, specs: dict, config: ModelConfig) -> tuple | None:
    """(shape, dtype) of what checkpoint tensor `name` fills: a parameter, or its slice of a fused or
    stacked parameter (model/layout.py); None if the model has no place for it."""
    target = checkpoint_target(name, config)
    if not isinstance(target, Slice):
        return specs.get(target)
    if target.param not in specs:
        return None
    shape, dtype = specs[target.param]
    return tuple(target.of(torch.empty(shape, device="meta")).shape), dtype


def _destination(client: MemoryClient, name: str, config: ModelConfig) -> tuple[str, torch.Tensor]:
    """(parameter name, the mapped tensor or slice) that checkpoint tensor `name` is copied into."""
    return checkpoint_view(name, config, client.tensor)


def publish(client: MemoryClient, model: CausalLM, path: str | Path, dtype: torch.dtype, ident: str,
            progress: bool = True, tp: TensorParallel | None = None) -> dict:
    """Stream the checkpoint into the client's (rw) weights pool and commit. Returns load stats."""
    wanted = {n: t for n, t in model.state_dict().items()}
    specs = {n: (tuple(t.shape), t.dtype) for n, t in wanted.items()}  # FP8 weights and scales: their own dtypes
    sizes, metas = plan_layout(specs, client.granularity)
    for size in sizes:
        client.allocate(size)
    # The FP8 KV-cache scales (a few floats) ride in the metadata: shadows read them with the layout.
    extra = {"model_id": ident, "model_path": str(path),
             "kv_scales": read_kv_scales(path, model.config.num_hidden_layers)}
    if tp is not None and tp.size > 1:
        extra["tensor_parallel"] = [tp.rank, tp.size]
    client.set_metadata(metas, extra=extra, replace=True)
    device = client.tensor(next(iter(metas))).device
    config = model.config  # a rank's under tensor parallelism: its fused parts have the whole's proportions
    direct, stream = _sources(path, specs, dtype, config, tp)
    quantization = model.config.quantization
    if quantization is not None and quantization.online:  # --quantization fp8: quantized on the device
        stream = quant.quantize_online(model, stream, lambda n: parameter_of(n, config), device)
    total = sum(t.numel() * t.element_size() for t in wanted.values())
    filled: dict[str, int] = dict.fromkeys(wanted, 0)  # elements copied into each parameter
    staging = Staging(device) if device.type == "cuda" and direct else None  # streams and buffers: before the clock
    t0 = time.perf_counter()
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not progress) as bar:
        # Tensors stored in the serving dtype: file -> destination, in parallel (fast_load.py).
        jobs = [(stored, *_destination(client, name, config)) for name, stored in direct.items()]
        copy_direct([(stored, dst) for stored, _, dst in jobs], staging=staging, on_bytes=bar.update)
        for _, param, dst in jobs:
            filled[param] += dst.numel()
        # The rest needs a conversion (or comes from GGUF): one tensor at a time.
        copier = _StagedCopier(device) if device.type == "cuda" else None
        for name, tensor in stream:
            spec = _spec(name, specs, config)
            if spec is None:
                if _skippable(name, wanted):
                    continue
                raise KeyError(f"checkpoint has weight {name!r} that the model does not expect")
            tensor = quant.fit(name, tensor, *spec)
            if tuple(tensor.shape) != spec[0]:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {spec[0]}")
            param, dst = _destination(client, name, config)
            if copier is not None:
                copier.copy(dst, tensor)
            else:
                dst.copy_(tensor)
            filled[param] += dst.numel()
            bar.update(dst.numel() * dst.element_size())
        if copier is not None:
            copier.finish()
    missing = sorted(n for n, t in wanted.items() if filled[n] != t.numel())
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
    quant.cast_model(model, dtype)  # parameters of the meta model carry the dtype we serve in (FP8: their own)
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
    model.set_kv_scales(client.layout.extra.get("kv_scales"))
    stats["seconds_total"] = round(time.perf_counter() - t0, 4)
    log(logger, "weights_ready", **stats)
    return model, client, stats

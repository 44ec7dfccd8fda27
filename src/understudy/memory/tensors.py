"""Torch on top of the memory service: zero-copy views, publishing, materializing.

Mapping cost grows with the number of allocations (16 GiB maps in ~1 ms as
16 x 1 GiB chunks but ~240 ms as 2 MiB chunks on an H100), so a state dict is
packed into few large allocations.
"""

from __future__ import annotations

from typing import Iterable, Mapping as MappingType

import torch
from tqdm import tqdm

from understudy.memory.backends.base import Backend
from understudy.memory.protocol import TensorMeta

ALIGN = 256  # bytes; keeps every tensor aligned for vectorised kernels
DEFAULT_CHUNK = 1 << 30


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def span_bytes(shape: Iterable[int], stride: Iterable[int], itemsize: int) -> int:
    """Bytes from a strided tensor's first element to just past its last."""
    shape, stride = tuple(shape), tuple(stride)
    if 0 in shape:
        return 0
    return (1 + sum((d - 1) * s for d, s in zip(shape, stride))) * itemsize


def view(backend: Backend, va: int, meta: TensorMeta) -> torch.Tensor:
    """A tensor of any dtype, shape and stride over mapped memory, without a copy."""
    dtype = dtype_of(meta.dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = span_bytes(meta.shape, meta.stride, itemsize)
    raw = backend.tensor(va + meta.offset, nbytes)
    if nbytes == 0:
        return torch.empty(meta.shape, dtype=dtype, device=raw.device)
    return raw.view(dtype).as_strided(meta.shape, meta.stride)


def plan_layout(specs: MappingType[str, tuple[tuple[int, ...], torch.dtype]], granularity: int,
                chunk_bytes: int = DEFAULT_CHUNK) -> tuple[list[int], dict[str, TensorMeta]]:
    """Pack contiguous tensors (name -> (shape, dtype)) into few allocations.

    Returns the allocation sizes and where each tensor goes. Tensors stay in
    the given order; a tensor larger than `chunk_bytes` gets a chunk to itself."""
    sizes: list[int] = []
    metas: dict[str, TensorMeta] = {}
    used = None  # bytes used in the open chunk
    for name, (shape, dtype) in specs.items():
        shape = tuple(int(d) for d in shape)
        stride = _contiguous_stride(shape)
        nbytes = span_bytes(shape, stride, torch.empty((), dtype=dtype).element_size())
        start = 0 if used is None else -(-used // ALIGN) * ALIGN
        if used is None or (start + nbytes > chunk_bytes and used > 0):
            sizes.append(0)
            start = 0
        used = start + nbytes
        sizes[-1] = used
        metas[name] = TensorMeta(len(sizes) - 1, start, shape, stride, dtype_name(dtype))
    rounded = [max(granularity, -(-s // granularity) * granularity) for s in sizes]
    return rounded, metas


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(stride))


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def publish_state_dict(client, state_dict: MappingType[str, torch.Tensor], *,
                       chunk_bytes: int = DEFAULT_CHUNK, progress: bool = True) -> str:
    """Copy a state dict into the client's (rw) weights pool and commit it.

    Tensors that share their storage (tied weights) are stored once, under
    both names. Returns the committed layout hash; the client's mappings then
    hold the published weights read-only."""
    unique: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name, t in state_dict.items():
        key = _storage_key(t)
        if key in unique:
            aliases[name] = unique[key]
            continue
        unique[key] = name
        specs[name] = (tuple(t.shape), t.dtype)
    sizes, metas = plan_layout(specs, client.granularity, chunk_bytes)
    first = len(client.layout.sizes)  # a writer may already have allocations
    for size in sizes:
        client.allocate(size)
    metas = {n: TensorMeta(m.alloc + first, m.offset, m.shape, m.stride, m.dtype) for n, m in metas.items()}
    metas.update({alias: metas[target] for alias, target in aliases.items()})
    client.set_metadata(metas)
    total = sum(t.numel() * t.element_size() for n, t in state_dict.items() if n not in aliases)
    with tqdm(total=total, unit="B", unit_scale=True, desc="publishing weights", disable=not progress) as bar:
        for name in specs:
            client.tensor(name).copy_(state_dict[name])
            bar.update(state_dict[name].numel() * state_dict[name].element_size())
    if client.backend.name == "cuda":
        torch.cuda.synchronize(client.backend.device)
    return client.commit()


def publish_module(client, module: torch.nn.Module, **options) -> str:
    return publish_state_dict(client, module.state_dict(keep_vars=False), **options)


def materialize_module(module: torch.nn.Module, client, *, strict: bool = True) -> torch.nn.Module:
    """Point a module built on the `meta` device at the pool's tensors, with zero copies.

    Shapes and dtypes must match the published ones; parameters come back with
    requires_grad=False (shared weights are read-only)."""
    wanted = module.state_dict(keep_vars=True)
    views = client.tensors([n for n in wanted if n in client.layout.tensors])
    problems = [f"{n}: module has {tuple(t.shape)} {t.dtype}, pool has {tuple(views[n].shape)} {views[n].dtype}"
                for n, t in wanted.items() if n in views and (t.shape != views[n].shape or t.dtype != views[n].dtype)]
    missing = [n for n in wanted if n not in views]
    if problems or (strict and missing):
        raise ValueError("module does not match the published weights:\n  "
                         + "\n  ".join(problems + [f"{n}: not in the pool" for n in missing]))
    module.load_state_dict(views, strict=False, assign=True)
    for param in module.parameters():
        param.requires_grad_(False)
    return module

"""Reading safetensors shards straight into their destination, in parallel.

A tensor whose stored dtype is the serving dtype needs no conversion, so its
bytes go from the file to where they belong with one copy: with pread into
the mapped memory on the host, or with pread into a pinned staging buffer and
an async DMA on CUDA. Several threads each own two pinned buffers and a CUDA
stream, so file reads, host copies and DMA all overlap.
"""

from __future__ import annotations

import json
import os
import queue
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

PIECE = 64 << 20
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    offset: int  # absolute byte offset in the file
    nbytes: int
    dtype: torch.dtype | None
    shape: tuple[int, ...]


def read_header(file: Path) -> dict[str, StoredTensor]:
    """Where each tensor of a .safetensors file is, from its JSON header."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {name: StoredTensor(file, 8 + n + info["data_offsets"][0],
                               info["data_offsets"][1] - info["data_offsets"][0],
                               SAFETENSORS_DTYPES.get(info["dtype"]), tuple(info["shape"]))
            for name, info in header.items()}


def _pieces(jobs: list[tuple[StoredTensor, torch.Tensor]]):
    for stored, dst in jobs:
        flat = dst.reshape(-1).view(torch.uint8)
        for start in range(0, stored.nbytes, PIECE):
            yield stored, start, min(PIECE, stored.nbytes - start), flat


class Staging:
    """Per-thread pinned buffers, events and a stream, made before the clock starts."""

    def __init__(self, device: torch.device, threads: int):
        self.device = device
        self.free: "queue.SimpleQueue" = queue.SimpleQueue()
        for _ in range(threads):
            self.free.put((torch.cuda.Stream(device),
                           [torch.empty(PIECE, dtype=torch.uint8).pin_memory() for _ in range(2)],
                           [torch.cuda.Event() for _ in range(2)], [0]))


def copy_direct(jobs: list[tuple[StoredTensor, torch.Tensor]], threads: int = 8, staging: Staging | None = None,
                on_bytes: Callable[[int], None] = lambda n: None) -> None:
    """Fill each contiguous destination tensor with its stored bytes (CUDA destinations need `staging`)."""
    pieces = list(_pieces(jobs))
    if not pieces:
        return
    cuda = pieces[0][3].device.type == "cuda"
    fds = {f: os.open(f, os.O_RDONLY) for f in {p[0].file for p in pieces}}
    local = threading.local()
    lock = threading.Lock()

    def work(piece) -> None:
        stored, start, n, flat = piece
        fd = fds[stored.file]
        if not cuda:
            _pread_into(fd, flat[start:start + n].numpy(), stored.offset + start)
        else:
            if not hasattr(local, "slot"):
                local.slot = staging.free.get()
            stream, buffers, events, turn = local.slot
            i = turn[0]
            events[i].synchronize()  # this buffer's previous DMA is done
            _pread_into(fd, buffers[i][:n].numpy(), stored.offset + start)
            with torch.cuda.stream(stream):
                flat[start:start + n].copy_(buffers[i][:n], non_blocking=True)
                events[i].record(stream)
            turn[0] = 1 - i
        with lock:
            on_bytes(n)

    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="load") as pool:
            for _ in pool.map(work, pieces):
                pass
        if cuda:
            torch.cuda.synchronize(pieces[0][3].device)
    finally:
        for fd in fds.values():
            os.close(fd)


def _pread_into(fd: int, out, offset: int) -> None:
    view = memoryview(out).cast("B")
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            raise OSError(f"unexpected end of file at offset {offset}")
        view, offset = view[n:], offset + n

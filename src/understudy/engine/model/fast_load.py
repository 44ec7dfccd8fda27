"""Reading safetensors shards straight into their destination, in parallel.

A tensor whose stored dtype is the serving dtype needs no conversion, so its bytes go from the file to
where they belong without a pass through Python objects:

* host destinations (the memory service's mapped memory): `THREADS` threads `pread` each piece straight
  into it;
* CUDA destinations: the wanted byte ranges are cut into windows (`WINDOW` bytes of a file, in file order)
  that `THREADS` threads take in turn. Each thread has its own CUDA stream and `DEPTH` pinned buffers: it
  `pread`s a window into a free buffer (the one CPU copy: page cache -> pinned memory), queues the DMA out
  of it, and goes on with the next window while that DMA runs.

The constants come from sweeps on an H200 (`python bench/load.py`, a 16 GB checkpoint in the page cache).
First run (docs/logs/bench_load_h200.log, pinned host->device 53.3 GB/s): 16 threads x 2 x 64 MiB gave
29.5 GB/s (55% of the pinned copy), 8 threads 20.3 GB/s (38%), smaller windows less. Second run, another
machine of the same kind (docs/logs/bench_load_h200_pread.log, 55.4 GB/s): 16 x 2 x 64 MiB 37.1 GB/s (67%),
16 x 3 x 64 MiB 39.6 (71%, within the runs' spread, for 1 GiB more pinned memory), 8 threads 31.7 (57%),
24 or 32 threads less; the whole publish 33.1 GB/s (60%). Page-locking the page cache in place
(cudaHostRegister of the mapped file, 16.5-21.6 GB/s) and O_DIRECT reads (1.4 GB/s, the disk) were
measured slower in the first run, so they are not used.
"""

from __future__ import annotations

import json
import os
import queue
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

PIECE = 64 << 20  # host destinations: bytes per pread
THREADS = 16
WINDOW = 64 << 20  # CUDA destinations: bytes of a file per staged window (the size of each pinned buffer)
DEPTH = 2  # windows in flight per thread: one being read while the DMA out of the other runs
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


@dataclass(frozen=True)
class Piece:
    offset: int  # in the file
    nbytes: int
    dst: torch.Tensor  # flat uint8 destination of these bytes


@dataclass
class Window:
    """Pieces of one file within one multiple of the window size, sorted by offset. Staged, its byte i is
    the file's byte `base` + i."""
    file: Path
    pieces: list[Piece]

    @property
    def base(self) -> int:
        return self.pieces[0].offset

    @property
    def end(self) -> int:
        return max(p.offset + p.nbytes for p in self.pieces)


def plan_windows(jobs: list[tuple[StoredTensor, torch.Tensor]], window: int = WINDOW) -> list[Window]:
    """The jobs' byte ranges cut at multiples of `window` in their file, grouped by file and window, in
    file order: each window fits one buffer of `window` bytes."""
    if window <= 0:
        raise ValueError(f"window {window} is not a positive number of bytes")
    groups: dict[tuple[str, int], list[Piece]] = {}
    for stored, dst in jobs:
        flat = dst.reshape(-1).view(torch.uint8)
        done = 0
        while done < stored.nbytes:
            offset = stored.offset + done
            n = min(stored.nbytes - done, window - offset % window)
            groups.setdefault((str(stored.file), offset // window), []).append(Piece(offset, n, flat[done:done + n]))
            done += n
    windows = []
    for (file, _), pieces in sorted(groups.items()):
        pieces.sort(key=lambda p: p.offset)
        windows.append(Window(Path(file), pieces))
    return windows


def spans(pieces: list[Piece]) -> list[tuple[int, int]]:
    """The file ranges to read for `pieces` (sorted by offset), merged where they touch or overlap: one
    pread for a run of whole tensors, none for the gaps a tensor-parallel rank skips."""
    out: list[tuple[int, int]] = []
    for p in pieces:
        start, stop = p.offset, p.offset + p.nbytes
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], stop))
        else:
            out.append((start, stop))
    return out


class _Ring:
    """One copy thread's stream and its `depth` buffers, used in turn; each buffer's event marks the DMA
    out of it done, so that it is not read into before."""

    def __init__(self, device: torch.device | None, window: int, depth: int):
        cuda = device is not None
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.buffers = [torch.empty(window, dtype=torch.uint8, pin_memory=cuda) for _ in range(depth)]
        self.events = [torch.cuda.Event() if cuda else None for _ in range(depth)]
        self.turn = 0

    def next(self) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        i = self.turn
        self.turn = (i + 1) % len(self.buffers)
        if self.events[i] is not None:
            self.events[i].synchronize()
        return self.buffers[i], self.events[i]


class Staging:
    """The copy threads' streams, events and pinned buffers, made before the clock starts (pinning memory
    takes time). On the CPU the same pipeline runs with plain buffers and no streams: that is how the tests
    exercise it."""

    def __init__(self, device: torch.device | str, threads: int = THREADS, window: int = WINDOW,
                 depth: int = DEPTH):
        self.device, self.window = torch.device(device), window
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:  # the copy threads set it as theirs
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.rings = [_Ring(self.device if self.cuda else None, window, depth) for _ in range(threads)]


def copy_direct(jobs: list[tuple[StoredTensor, torch.Tensor]], threads: int = THREADS,
                staging: Staging | None = None, on_bytes: Callable[[int], None] = lambda n: None) -> None:
    """Fill each contiguous destination tensor with its stored bytes: host destinations by pread straight
    into them (unless `staging` is given), CUDA ones through `staging` (a default one if None).
    `on_bytes(n)` is called as each n bytes are queued, from one thread at a time."""
    jobs = [(stored, dst) for stored, dst in jobs if stored.nbytes]
    if not jobs:
        return
    device = jobs[0][1].device
    if staging is None and device.type == "cpu":
        _pread_direct(jobs, threads, on_bytes)
        return
    staging = staging or Staging(device, threads)
    _copy_staged(plan_windows(jobs, staging.window), staging, on_bytes)


def _pread_direct(jobs, threads: int, on_bytes) -> None:
    pieces = [(stored, start, min(PIECE, stored.nbytes - start), dst.reshape(-1).view(torch.uint8))
              for stored, dst in jobs for start in range(0, stored.nbytes, PIECE)]
    fds = {f: os.open(f, os.O_RDONLY) for f in {p[0].file for p in pieces}}
    lock = threading.Lock()

    def work(piece) -> None:
        stored, start, n, flat = piece
        _pread_into(fds[stored.file], flat[start:start + n].numpy(), stored.offset + start)
        with lock:
            on_bytes(n)

    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="load") as pool:
            for _ in pool.map(work, pieces):
                pass
    finally:
        for fd in fds.values():
            os.close(fd)


def _copy_staged(windows: list[Window], staging: Staging, on_bytes) -> None:
    fds = {f: os.open(f, os.O_RDONLY) for f in {w.file for w in windows}}
    work: queue.SimpleQueue = queue.SimpleQueue()  # in file order: the threads read the files front to back
    for w in windows:
        work.put(w)
    lock = threading.Lock()
    failed = threading.Event()

    def run(ring: _Ring) -> None:
        if staging.cuda:
            torch.cuda.set_device(staging.device)  # the DMA in the destination's context
        while not failed.is_set():
            try:
                win = work.get_nowait()
            except queue.Empty:
                return
            try:
                buf, dma_done = ring.next()
                for start, stop in spans(win.pieces):
                    _pread_into(fds[win.file], buf[start - win.base:stop - win.base].numpy(), start)
                with torch.cuda.stream(ring.stream) if staging.cuda else nullcontext():
                    for p in win.pieces:
                        p.dst.copy_(buf[p.offset - win.base:p.offset - win.base + p.nbytes], non_blocking=True)
                    if dma_done is not None:
                        dma_done.record(ring.stream)
            except BaseException:
                failed.set()
                raise
            with lock:
                on_bytes(sum(p.nbytes for p in win.pieces))

    try:
        with ThreadPoolExecutor(len(staging.rings), thread_name_prefix="load") as pool:
            for future in [pool.submit(run, ring) for ring in staging.rings]:
                future.result()
    finally:
        if staging.cuda:  # every DMA done: the destinations are whole and the buffers free for the next call
            torch.cuda.synchronize(staging.device)
        for fd in fds.values():
            os.close(fd)


def _pread_into(fd: int, out, offset: int) -> None:
    """Fill `out` from the file at `offset`."""
    view = memoryview(out).cast("B")
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            raise OSError(f"unexpected end of file at offset {offset}")
        view, offset = view[n:], offset + n

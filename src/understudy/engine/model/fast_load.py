"""Reading safetensors shards straight into their destination, in parallel.

A tensor whose stored dtype is the serving dtype needs no conversion, so its bytes go from the file to
where they belong without a pass through Python objects:

* host destinations (the memory service's mapped memory): threads `pread` each piece straight into it;
* CUDA destinations: the wanted byte ranges are cut into windows (`WINDOW` bytes of a file, in file
  order) that `THREADS` threads stage and DMA out of, each thread on its own CUDA stream with `DEPTH`
  windows in flight, so staging and DMA overlap. How a window is staged is the `Staging`'s mode:
  - "register" (the default): the file is mapped read-only and the window's pages, the page cache's
    own, are page-locked with cudaHostRegister(ReadOnly) so that the DMA reads the page cache: no CPU
    copy at all. They are unlocked once the DMA out of them is done, so no more than
    THREADS x DEPTH x WINDOW bytes are locked at a time. Where the driver refuses (no read-only
    registration, a sandbox: probed once with a page of this file when the Staging is made, and
    checked for each window), windows are read as with "pread";
  - "pread": pread into a pinned buffer, then DMA (one CPU copy, page cache -> pinned buffer);
  - "odirect": O_DIRECT reads of the 4 KiB-aligned superset of each range into a pinned buffer, then DMA
    of the wanted sub-range: disk -> pinned memory with no page cache, for a checkpoint that is not
    cached (a cached one is read from the disk again). Where O_DIRECT is refused, "pread".
  bench/load.py measures each against the pinned host->device copy.
"""

from __future__ import annotations

import ctypes
import json
import logging
import mmap
import os
import queue
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

logger = logging.getLogger("understudy.engine.model.fast_load")

PIECE = 64 << 20  # host destinations: bytes per pread
THREADS = 16
WINDOW = 64 << 20
DEPTH = 2
MODES = ("register", "pread", "odirect")
MODE = "pread"
ALIGN = 4096  # O_DIRECT: file offsets, lengths and buffer addresses are multiples of this
_REGISTER_READ_ONLY = 0x08  # cudaHostRegisterReadOnly: the device only reads these pages
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
    """Pieces of one file within one multiple of the window size. Staged, its byte i is the file's byte
    `base` + i (`base`: the first piece's offset rounded down to a page, so registering starts on a page
    and aligned file offsets are aligned buffer offsets)."""
    file: Path
    base: int
    end: int  # the last piece's end
    pieces: list[Piece] = field(default_factory=list)


def plan_windows(jobs: list[tuple[StoredTensor, torch.Tensor]], window: int = WINDOW) -> list[Window]:
    """The jobs' byte ranges cut at multiples of `window` in their file, grouped by file and window, in
    file order."""
    if window % mmap.PAGESIZE:
        raise ValueError(f"window {window} is not a multiple of the page size {mmap.PAGESIZE}")
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
        windows.append(Window(Path(file), pieces[0].offset // mmap.PAGESIZE * mmap.PAGESIZE,
                              max(p.offset + p.nbytes for p in pieces), pieces))
    return windows


def spans(pieces: list[Piece], align: int = 1) -> list[tuple[int, int]]:
    """The file ranges to read for `pieces` (sorted by offset): each widened to multiples of `align`
    (O_DIRECT), merged where they touch or overlap."""
    out: list[tuple[int, int]] = []
    for p in pieces:
        start, stop = p.offset // align * align, -(-(p.offset + p.nbytes) // align) * align
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], stop))
        else:
            out.append((start, stop))
    return out


class _Ring:
    """One copy thread's stream and its stages in flight, used in turn: stage i has an event (its DMA
    done), a buffer (where windows are read rather than registered) and the address it registered."""

    def __init__(self, staging: "Staging", depth: int, buffers: bool):
        self.staging = staging
        self.stream = torch.cuda.Stream(staging.device) if staging.cuda else None
        self.events = [torch.cuda.Event() if staging.cuda else None for _ in range(depth)]
        self.buffers = [staging.buffer() if buffers else None for _ in range(depth)]
        self.registered: list[int | None] = [None] * depth
        self.turn = 0

    def next(self) -> int:
        i = self.turn
        self.turn = (i + 1) % len(self.events)
        self.release(i)
        return i

    def release(self, i: int) -> None:
        """Wait for the DMA out of stage i, then unlock its pages."""
        if self.events[i] is not None:
            self.events[i].synchronize()
        if self.registered[i] is not None:
            torch.cuda.cudart().cudaHostUnregister(self.registered[i])
            self.registered[i] = None

    def buffer(self, i: int) -> torch.Tensor:
        if self.buffers[i] is None:  # "register" refused: read from here on
            self.buffers[i] = self.staging.buffer()
        return self.buffers[i]


class Staging:
    """The copy threads' streams, events and (modes "pread" and "odirect") buffers, made before the clock
    starts. On the CPU the same pipeline runs with page-aligned plain buffers, no streams, and "register"
    reading straight out of the mapping: that is how the tests exercise it."""

    def __init__(self, device: torch.device | str, threads: int = THREADS, mode: str = MODE,
                 window: int = WINDOW, depth: int = DEPTH):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        self.device, self.mode, self.window = torch.device(device), mode, window
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:  # the copy threads set it as theirs
            self.device = torch.device("cuda", torch.cuda.current_device())
        # why the mode's own way ("register", "odirect") was refused, once it was: windows are read with pread
        self.refused = _probe_registration(self.device) if self.cuda and mode == "register" else None
        if self.refused:
            logger.info("loading weights by pread into pinned buffers: %s", self.refused)
        self.rings = [_Ring(self, depth, buffers=mode != "register" or self.refused is not None)
                      for _ in range(threads)]

    def buffer(self) -> torch.Tensor:
        if self.cuda:
            return torch.empty(self.window, dtype=torch.uint8).pin_memory()  # page-aligned (cudaHostAlloc)
        return torch.frombuffer(mmap.mmap(-1, self.window), dtype=torch.uint8)  # page-aligned, for O_DIRECT


def copy_direct(jobs: list[tuple[StoredTensor, torch.Tensor]], threads: int = THREADS,
                staging: Staging | None = None, on_bytes: Callable[[int], None] = lambda n: None) -> None:
    """Fill each contiguous destination tensor with its stored bytes: host destinations by pread straight
    into them (unless `staging` is given), CUDA ones through `staging` (a default one if None)."""
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
    files = sorted({w.file for w in windows})
    fds: dict[Path, tuple[int, int]] = {}  # file -> (fd, the alignment its reads need)
    maps: dict[Path, MappedFile] = {}
    work: queue.SimpleQueue = queue.SimpleQueue()
    for w in windows:
        work.put(w)
    lock = threading.Lock()
    failed = threading.Event()

    def run(ring: _Ring) -> None:
        if staging.cuda:
            torch.cuda.set_device(staging.device)  # registration and DMA in the destination's context
        while not failed.is_set():
            try:
                win = work.get_nowait()
            except queue.Empty:
                return
            try:
                i = ring.next()
                src = _register(win, maps, staging, ring, i) if staging.mode == "register" else None
                if src is None:
                    fd, align = fds[win.file]
                    src = ring.buffer(i)
                    for start, stop in spans(win.pieces, align):
                        # the last span may run past the end of the file (O_DIRECT): only its pieces must arrive
                        _pread_into(fd, src[start - win.base:stop - win.base].numpy(), start,
                                    need=min(stop, win.end) - start)
                with torch.cuda.stream(ring.stream) if staging.cuda else nullcontext():
                    for p in win.pieces:
                        p.dst.copy_(src[p.offset - win.base:p.offset - win.base + p.nbytes], non_blocking=True)
                    if ring.events[i] is not None:
                        ring.events[i].record(ring.stream)
            except BaseException:
                failed.set()
                raise
            with lock:
                on_bytes(sum(p.nbytes for p in win.pieces))

    try:
        for f in files:
            fds[f] = _open(f, staging)
            if staging.mode == "register" and staging.refused is None:
                try:
                    maps[f] = MappedFile(f)
                except OSError as e:
                    _refuse(staging, f"mmap: {e}")
        with ThreadPoolExecutor(len(staging.rings), thread_name_prefix="load") as pool:
            for future in [pool.submit(run, ring) for ring in staging.rings]:
                future.result()
    finally:
        device = torch.cuda.device(staging.device) if staging.cuda else nullcontext()
        with device:
            if staging.cuda:
                torch.cuda.synchronize()
            for ring in staging.rings:
                for i in range(len(ring.events)):
                    ring.release(i)
        for m in maps.values():
            m.close()
        for fd, _ in fds.values():
            os.close(fd)


def _register(win: Window, maps: dict, staging: Staging, ring: _Ring, i: int) -> torch.Tensor | None:
    """The window's bytes in place in the file's mapping, page-locked for the DMA; None where refused."""
    if staging.refused is not None:
        return None
    m = maps[win.file]
    addr = m.addr + win.base
    n = -(-(win.end - win.base) // mmap.PAGESIZE) * mmap.PAGESIZE  # within the mapping's last page
    if staging.cuda:
        cudart = torch.cuda.cudart()
        # (a refusal also leaves the error as this thread's last CUDA error: this thread launches no kernels)
        err = cudart.cudaHostRegister(addr, n, _REGISTER_READ_ONLY)
        if err != cudart.cudaError.success:
            _refuse(staging, f"cudaHostRegister: {cudart.cudaGetErrorString(err)}")
            return None
        ring.registered[i] = addr
    return torch.frombuffer((ctypes.c_uint8 * n).from_address(addr), dtype=torch.uint8)


def _probe_registration(device: torch.device) -> str | None:
    """Why the driver will not page-lock a read-only file mapping (a page of this file), or None."""
    def probe() -> str | None:
        torch.cuda.set_device(device)
        m = MappedFile(Path(__file__))
        try:
            cudart = torch.cuda.cudart()
            err = cudart.cudaHostRegister(m.addr, mmap.PAGESIZE, _REGISTER_READ_ONLY)
            if err != cudart.cudaError.success:
                return f"cudaHostRegister: {cudart.cudaGetErrorString(err)}"
            cudart.cudaHostUnregister(m.addr)
            return None
        finally:
            m.close()

    # In a thread of its own: a refusal stays that thread's last CUDA error, and it launches no kernels.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(probe).result()


def _refuse(staging: Staging, why: str) -> None:
    if staging.refused is None:
        staging.refused = why
        logger.info("loading weights by pread into pinned buffers: %s", why)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


class MappedFile:
    """A whole file mapped read-only and shared: its pages are the page cache's, not copies."""

    def __init__(self, file: Path):
        fd = os.open(file, os.O_RDONLY)
        try:
            self.size = os.fstat(fd).st_size
            addr = _libc.mmap(None, self.size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        finally:
            os.close(fd)
        if addr is None or addr == ctypes.c_void_p(-1).value:  # MAP_FAILED
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno), str(file))
        self.addr: int = addr

    def close(self) -> None:
        _libc.munmap(self.addr, self.size)


def _open(file: Path, staging: Staging) -> tuple[int, int]:
    """(fd, the alignment its reads need): O_DIRECT where asked for and the filesystem allows it."""
    if staging.mode == "odirect":
        try:
            return os.open(file, os.O_RDONLY | os.O_DIRECT), ALIGN
        except (OSError, AttributeError) as e:  # (AttributeError: an OS without O_DIRECT)
            _refuse(staging, f"O_DIRECT: {e}")
    return os.open(file, os.O_RDONLY), 1


def _pread_into(fd: int, out, offset: int, need: int | None = None) -> None:
    """Fill `out` from the file at `offset`; with `need`, the end of the file may come after that many bytes."""
    view = memoryview(out).cast("B")
    need = len(view) if need is None else need
    while need > 0:
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            raise OSError(f"unexpected end of file at offset {offset}")
        view, offset, need = view[n:], offset + n, need - n

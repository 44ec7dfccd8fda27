"""Loading a checkpoint onto the GPU with fast_load's pread staging, several shapes of it, next to the pinned
host->device copy measured in the same run, then the real publish into a memory service (as bench/engine.py's
load line).

Writes Llama-3-8B-shaped bf16 safetensors shards (16.06 GB; --size-gb for fewer layers) into a temporary
directory, syncs them to disk, then prints:
  * where they are (filesystem) and how much of them the page cache holds (mincore): just written, all of
    it, so every variant reads cached pages (dropping the cache is left to --uncached);
  * the pinned host->device bandwidth: one 4 GiB copy from pinned memory (bench/common.py, as
    bench/engine.py measures it);
  * per variant (copy_direct with a Staging of threads x buffers per thread x window, into plain device
    tensors; the best of --repeats runs, each checked byte for byte against the first variant's result,
    which is checked against the files): GB/s and its fraction of pinned H2D. The first is the loader's
    shape before the sweep (8 threads), then the default, then a sweep around it;
  * publish: weights.load into a memory service of its own, as `understudy serve` loads (GB/s of the
    `weights_published` stats);
  * a last line `json {...}`.
`--uncached` adds the default with the checkpoint evicted from the page cache before the run
(posix_fadvise DONTNEED after the sync: no root needed): disk speed.

    python bench/load.py                  # one H200: about 1.5 minutes (20 s of it writing the checkpoint)
    python bench/load.py --size-gb 4      # fewer layers
    python bench/load.py --cpu            # a tiny checkpoint on the CPU: checks the wiring, numbers mean nothing
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import pinned_h2d_seconds  # noqa: E402  (puts the repo root on sys.path)
from engine import LLAMA3_8B, TINY, make_checkpoint  # noqa: E402
from tests.helpers.tiny_model import llama_weight_shapes  # noqa: E402
from understudy.engine.model import fast_load  # noqa: E402
from understudy.engine.model.fast_load import Staging, copy_direct, read_header  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
DEFAULT = (fast_load.THREADS, fast_load.DEPTH, fast_load.WINDOW)  # (threads, buffers per thread, window bytes)
BEFORE = (8, 2, 64 * MiB)  # the loader's shape before the H200 sweep
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def variants(cpu: bool) -> list[tuple[str, tuple[int, int, int]]]:
    """(label, (threads, buffers per thread, window bytes)); the first is the reference the others are
    checked against."""
    if cpu:  # windows of 4 pages, so that a tiny checkpoint still spans many
        shapes = [(3, 2, 16 * 1024), (3, 3, 16 * 1024)]
    else:
        shapes = [BEFORE, DEFAULT, (16, 3, 64 * MiB), (16, 2, 32 * MiB), (16, 2, 128 * MiB), (24, 2, 64 * MiB),
                  (24, 3, 32 * MiB), (32, 2, 64 * MiB), (32, 2, 128 * MiB)]
    return [(describe(s), s) for s in dict.fromkeys(shapes)]


def describe(shape: tuple[int, int, int]) -> str:
    threads, depth, window = shape
    size = f"{window // MiB} MiB" if window >= MiB else f"{window // 1024} KiB"
    note = " (default)" if shape == DEFAULT else " (the loader before)" if shape == BEFORE else ""
    return f"pread {threads} thr x {depth} x {size}{note}"


def filesystem(d: Path) -> str:
    d, best = str(d.resolve()), ("?", "")
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, kind, *_ = line.split()
        if (d == mount or d.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best[1]):
            best = (kind, mount)
    return best[0]


def resident(files: list[Path]) -> float:
    """The fraction of the files' pages in the page cache (mincore of a read-only shared mapping)."""
    pages = held = 0
    for f in files:
        size = f.stat().st_size
        fd = os.open(f, os.O_RDONLY)
        try:
            addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        finally:
            os.close(fd)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap", str(f))
        try:
            n = -(-size // mmap.PAGESIZE)
            vec = (ctypes.c_ubyte * n)()
            if _libc.mincore(addr, size, vec):
                raise OSError(ctypes.get_errno(), "mincore")
            pages, held = pages + n, held + int((np.frombuffer(vec, np.uint8) & 1).sum())
        finally:
            _libc.munmap(addr, size)
    return held / max(pages, 1)


def evict(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=None, help="checkpoint size (default: Llama-3-8B's 32 layers)")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a new temporary directory)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--uncached", action="store_true", help="also load with the checkpoint evicted from the page cache")
    ap.add_argument("--keep", action="store_true", help="leave the checkpoint behind")
    args = ap.parse_args()
    cpu = args.cpu
    device, shape = ("cpu", TINY) if cpu else ("cuda", LLAMA3_8B)
    sync = (lambda: None) if cpu else torch.cuda.synchronize
    t_start = time.perf_counter()

    base = sum(int(np.prod(s)) for s in llama_weight_shapes(shape, 0).values()) * 2
    per_layer = sum(int(np.prod(s)) for s in llama_weight_shapes(shape, 1).values()) * 2 - base
    layers = 2 if cpu else 32 if args.size_gb is None else max(1, round((args.size_gb * 1e9 - base) / per_layer))
    work = Path(args.dir or tempfile.mkdtemp(prefix="us-bench-load-"))
    ckpt = work / "ckpt"
    ckpt.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        nbytes = make_checkpoint(ckpt, layers, shape=shape, dtype=torch.bfloat16, device=device)
        written = time.perf_counter() - t0
        t0 = time.perf_counter()
        os.sync()  # so that eviction finds clean pages; no writeback during the runs
        files = sorted(ckpt.glob("*.safetensors"))
        print(f"# checkpoint: {nbytes / 1e9:.2f} GB of bf16, {layers} layers, {len(files)} shards in {ckpt} "
              f"({filesystem(ckpt)}); written in {written:.1f}s, synced in {time.perf_counter() - t0:.1f}s; "
              f"{os.cpu_count()} CPUs", flush=True)
        print(f"# page cache: {resident(files):.0%} of the checkpoint resident (just written): every variant "
              f"reads cached pages", flush=True)

        h2d = None if cpu else nbytes_gbps(4 * GiB, pinned_h2d_seconds(4 * GiB))
        empty_host_cache()
        if h2d:
            print(f"# pinned host->device: {h2d:.1f} GB/s (one 4 GiB copy, as bench/engine.py)", flush=True)

        stored = [s for f in files for s in read_header(f).values()]
        big = torch.empty(sum(s.nbytes for s in stored), dtype=torch.uint8, device=device)
        jobs, at = [], 0
        for s in stored:
            jobs.append((s, big[at:at + s.nbytes]))
            at += s.nbytes
        results: dict[str, float] = {}

        def frac(gbps: float) -> str:
            return f"{gbps / h2d:6.0%}" if h2d else "     -"

        def measure(label: str, load, check, repeats: int) -> float:
            runs = []
            for _ in range(repeats):
                big.zero_()
                sync()
                t0 = time.perf_counter()
                note = load()
                sync()
                runs.append(nbytes / (time.perf_counter() - t0) / 1e9)
                check()
            results[label] = max(runs)
            note = f"  {note}" if note else ""
            print(f"{label:58s} {max(runs):7.1f} {frac(max(runs))}   ({' '.join(f'{r:.1f}' for r in runs)}){note}",
                  flush=True)
            return max(runs)

        print(f"{'variant':58s} {'GB/s':>7s} {'of H2D':>6s}   (each run)")
        ref = None

        def check_against_ref() -> None:
            if ref is None:
                return
            if not torch.equal(big, ref):
                raise AssertionError("a variant's bytes differ from the reference's")

        staged = variants(cpu)
        if cpu:  # the host path the memory service's host backend takes: pread straight into the destination
            staged = [("host: pread straight into the destination", None)] + staged
        for label, dims in staged:
            staging = None if dims is None else Staging(device, threads=dims[0], depth=dims[1], window=dims[2])
            measure(label, lambda: copy_direct(jobs, staging=staging), check_against_ref, args.repeats)
            if ref is None:
                check_files(jobs, big)
                ref = big.clone()
            staging = None  # its pinned buffers back before the next variant's
            empty_host_cache()

        if args.uncached:
            staging = None if cpu else Staging(device)  # (the CPU: the host path)

            def load_uncached():
                evict(files)
                held = resident(files)
                sync()
                copy_direct(jobs, staging=staging)
                return f"{held:.0%} cached at the start"

            label = "host: pread straight into the destination" if cpu else describe(DEFAULT)
            measure(f"uncached: {label}", load_uncached, check_against_ref, 1)  # (eviction, mincore: ms)
            staging = None
            empty_host_cache()

        big = ref = jobs = None  # the device memory back before the memory service takes its own
        if not cpu:
            torch.cuda.empty_cache()
        stats = publish(ckpt, "host" if cpu else "cuda")
        results["publish"] = stats["GBps"]
        print(f"{'publish into the memory service (weights.load, default)':58s} {stats['GBps']:7.1f} "
              f"{frac(stats['GBps'])}   ({stats['seconds']:.2f}s)", flush=True)
        print(f"# bench took {time.perf_counter() - t_start:.0f}s", flush=True)
        print("json " + json.dumps({"bytes": nbytes, "h2d_GBps": h2d, "GBps": results,
                                    "fraction_of_h2d": {k: round(v / h2d, 3) for k, v in results.items()} if h2d else None,
                                    "default": {"threads": fast_load.THREADS, "depth": fast_load.DEPTH,
                                                "window": fast_load.WINDOW}}))
    finally:
        if not args.keep:
            shutil.rmtree(work if args.dir is None else ckpt, ignore_errors=True)


def nbytes_gbps(n: int, seconds: float) -> float:
    return n / seconds / 1e9


def empty_host_cache() -> None:
    """Give cached pinned blocks back (torch keeps freed ones for reuse)."""
    if torch.cuda.is_available():
        getattr(torch._C, "_host_emptyCache", lambda: None)()


def check_files(jobs, got: torch.Tensor) -> None:
    """The reference variant's bytes against the files, for a few tensors (first, largest, last)."""
    picks = {0, len(jobs) - 1, max(range(len(jobs)), key=lambda i: jobs[i][0].nbytes)}
    for i in sorted(picks):
        s, dst = jobs[i]
        with open(s.file, "rb") as f:
            f.seek(s.offset)
            want = torch.frombuffer(bytearray(f.read(s.nbytes)), dtype=torch.uint8)
        if not torch.equal(dst.cpu(), want):
            raise AssertionError(f"reference variant: tensor {i} differs from its file")


def publish(ckpt: Path, backend: str) -> dict:
    """weights.load into a memory service started for it, as `understudy serve` does."""
    from understudy.engine.model import weights
    from understudy.engine.model.loader import load_config
    from understudy.engine.serving.bootstrap import ensure_memory_service

    socket_dir = tempfile.mkdtemp(prefix="us-", dir="/tmp")
    path, proc = ensure_memory_service(backend, 0, socket_dir, "auto")
    try:
        _, client, stats = weights.load(path, ckpt, load_config(ckpt), torch.bfloat16, progress=False)
        assert stats["source"] == "published", stats
        client.close()
        return stats
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
        shutil.rmtree(socket_dir, ignore_errors=True)


if __name__ == "__main__":
    main()

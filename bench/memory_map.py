"""How long a second process takes to import and map published weights.

Publishes N GiB as K allocations into a fresh memory service, then, in a
second process, times: import + map of everything, unmap, remap at the same
addresses. Baseline in the same run: copying the same bytes the way a reload
would (pinned host->device on CUDA, memcpy on the host), so the ratio holds
on any machine.

    python bench/memory_map.py --backend host --gib 4 --allocations 4 64
    python bench/memory_map.py --backend cuda --gib 16 --allocations 16 128 1024
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

GiB = 1 << 30


def reader(socket: str, repeats: int) -> None:
    """Runs in the second process: prints one JSON line of timings."""
    from understudy.memory import MemoryClient

    c = MemoryClient(socket, "weights", "ro", name="bench-reader")
    if c.backend.name == "cuda":
        import torch

        torch.zeros(1, device=f"cuda:{c.backend.device}")  # context made before timing, like an engine
    times = {"import_map": [], "unmap": [], "remap": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        c.map_all()
        t1 = time.perf_counter()
        c.unmap_all()
        t2 = time.perf_counter()
        c.remap_all()
        t3 = time.perf_counter()
        c.release_all()
        times["import_map"].append(t1 - t0)
        times["unmap"].append(t2 - t1)
        times["remap"].append(t3 - t2)
    print(json.dumps({k: statistics.median(v) for k, v in times.items()}), flush=True)


def copy_baseline(backend: str, nbytes: int) -> float:
    """Seconds to copy `nbytes` the way a weight reload would (measured on up to 4 GiB, scaled)."""
    import torch

    sample = min(nbytes, 4 * GiB if backend == "cuda" else GiB)
    if backend == "cuda":
        sys.path.insert(0, os.path.dirname(__file__))
        from common import pinned_h2d_seconds

        return pinned_h2d_seconds(sample) * nbytes / sample
    src = torch.ones(sample, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t0 = time.perf_counter()
    dst.copy_(src)
    return (time.perf_counter() - t0) * nbytes / sample


def run(backend: str, gib: float, allocations: int, repeats: int) -> dict:
    from understudy.memory import MemoryClient

    total = int(gib * GiB)
    with tempfile.TemporaryDirectory(prefix="us-bench-", dir="/tmp") as d:
        srv = subprocess.Popen([sys.executable, "-m", "understudy", "memory-server", "--backend", backend,
                                "--socket-dir", d], stderr=subprocess.PIPE, text=True)
        try:
            for line in srv.stderr:
                if '"listening"' in line:
                    socket = json.loads(line)["socket"]
                    break
            else:
                raise RuntimeError("memory server did not start")
            w = MemoryClient(socket, "weights", "rw", name="bench-writer")
            t0 = time.perf_counter()
            for _ in range(allocations):
                w.allocate(total // allocations)
            w.commit()
            publish = time.perf_counter() - t0
            w.release_all()  # keep the session (reader lock) but not the mappings
            out = subprocess.run([sys.executable, __file__, "--reader", socket, "--repeats", str(repeats)],
                                 capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            w.close()
        finally:
            srv.terminate()
            srv.wait()
    return {"backend": backend, "GiB": gib, "allocations": allocations, "allocate_commit_s": publish, **result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["host", "cuda"], default="host", help="memory backend to measure")
    ap.add_argument("--gib", type=float, default=4.0, help="GiB published (default 4)")
    ap.add_argument("--allocations", type=int, nargs="+", default=[4, 64],
                    help="numbers of allocations to split the bytes into (default: 4 64)")
    ap.add_argument("--repeats", type=int, default=5, help="map/unmap/remap rounds; the median is printed")
    ap.add_argument("--reader", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.reader:
        return reader(args.reader, args.repeats)
    baseline = copy_baseline(args.backend, int(args.gib * GiB))
    print(f"# {args.backend}: {args.gib} GiB; baseline copy of the same bytes "
          f"({'pinned host->device' if args.backend == 'cuda' else 'host memcpy'}): {baseline * 1e3:.1f} ms")
    print(f"{'allocations':>11} {'alloc+commit ms':>15} {'import+map ms':>13} {'unmap ms':>9} {'remap ms':>9} "
          f"{'copy/map':>9}")
    for k in args.allocations:
        r = run(args.backend, args.gib, k, args.repeats)
        print(f"{k:>11} {r['allocate_commit_s'] * 1e3:>15.2f} {r['import_map'] * 1e3:>13.3f} "
              f"{r['unmap'] * 1e3:>9.3f} {r['remap'] * 1e3:>9.3f} {baseline / r['import_map']:>8.0f}x", flush=True)
        print("json", json.dumps({**r, "baseline_copy_s": baseline}), flush=True)


if __name__ == "__main__":
    main()

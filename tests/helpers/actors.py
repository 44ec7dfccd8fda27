"""Client processes that the tests start, drive through stdin and kill.

Each prints one line per step reached (`allocated`, `committed`, `mapped`, ...)
so the test can wait for a step and then SIGKILL the process right there.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from understudy.memory import MemoryClient


def _sum(client: MemoryClient) -> int:
    total = 0
    for m in client.mappings.values():
        total += int(client.backend.tensor(m.va, m.size).to(torch.int64).sum().item())
    return total


def writer(args) -> None:
    c = MemoryClient(args.socket, "weights", "rw", timeout=args.timeout, name="actor-writer")
    print("granted", flush=True)
    for _ in range(args.allocations):
        m = c.allocate(args.size)
        c.backend.tensor(m.va, m.size).fill_(args.fill)
    print("allocated", flush=True)
    if args.hang_before_commit:
        sys.stdin.readline()
    c.commit()
    print("committed", c.mapped_hash, flush=True)
    sys.stdin.readline()  # hold the reader lock until told (or killed)


def reader(args) -> None:
    c = MemoryClient(args.socket, args.pool, "ro" if args.pool == "weights" else "rw",
                     timeout=args.timeout, name="actor-reader")
    c.map_all()
    print("mapped", json.dumps({"sum": _sum(c), "hash": c.mapped_hash}), flush=True)
    for line in sys.stdin:  # every line: read the mapped bytes again and report
        print("read", json.dumps({"sum": _sum(c)}), flush=True)


def ro_write(args) -> None:
    c = MemoryClient(args.socket, "weights", "ro", timeout=args.timeout, name="actor-ro-write")
    c.map_all()
    m = c.mappings[0]
    print("writing", flush=True)
    c.backend.tensor(m.va, m.size)[:16].fill_(1)  # must fault: the mapping is read-only
    if c.backend.name == "cuda":
        torch.cuda.synchronize()
    print("wrote", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("writer")
    w.add_argument("socket")
    w.add_argument("--size", type=int, default=4 << 20)
    w.add_argument("--allocations", type=int, default=1)
    w.add_argument("--fill", type=int, default=7)
    w.add_argument("--hang-before-commit", action="store_true")
    w.add_argument("--timeout", type=float, default=30.0)
    r = sub.add_parser("reader")
    r.add_argument("socket")
    r.add_argument("--pool", default="weights")
    r.add_argument("--timeout", type=float, default=30.0)
    x = sub.add_parser("ro-write")
    x.add_argument("socket")
    x.add_argument("--timeout", type=float, default=30.0)
    args = ap.parse_args()
    {"writer": writer, "reader": reader, "ro-write": ro_write}[args.cmd](args)


if __name__ == "__main__":
    main()

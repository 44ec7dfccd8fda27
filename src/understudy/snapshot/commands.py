"""`understudy snapshot checkpoint | restore | list`."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from understudy.snapshot.checkpoint import CheckpointFailed, checkpoint
from understudy.snapshot.criu import CriuError
from understudy.snapshot.cuda_checkpoint import CudaCheckpointError
from understudy.snapshot.identity import IdentityMismatch, params_from_serve_argv
from understudy.snapshot.manifest import list_images
from understudy.snapshot.restore import RestoreFailed, restore

EXIT_FAILED, EXIT_MISMATCH = 1, 2


def run(args: argparse.Namespace) -> int:
    return {"checkpoint": _checkpoint, "restore": _restore, "list": _list}[args.snapshot_command](args)


def _checkpoint(args: argparse.Namespace) -> int:
    try:
        m = checkpoint(args.dir, engine=args.engine, pid=args.pid, criu=args.criu)
    except (CheckpointFailed, OSError, ValueError) as e:
        print(f"understudy snapshot checkpoint: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps({"event": "checkpoint", "dir": args.dir, "phase": m.phase, "identity": m.identity,
                      "pid": m.engine["pid"], **m.image}), flush=True)
    return 0


def _restore(args: argparse.Namespace) -> int:
    serve_args = args.serve_args[1:] if args.serve_args[:1] == ["--"] else args.serve_args
    wanted = params_from_serve_argv(serve_args) if serve_args else None
    try:
        if args.identity:
            from understudy.snapshot.manifest import Manifest

            have = Manifest.read(args.dir).identity
            if have != args.identity:
                raise IdentityMismatch(f"image {args.dir} has identity {have}, not the requested {args.identity}")
        out = restore(args.dir, wanted=wanted, activate=args.activate, criu=args.criu, timeout=args.timeout)
    except IdentityMismatch as e:
        print(f"understudy snapshot restore: refused: {e}", file=sys.stderr)
        return EXIT_MISMATCH
    except (RestoreFailed, CriuError, CudaCheckpointError, OSError) as e:
        print(f"understudy snapshot restore: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps({"event": "restored", **out}), flush=True)
    return 0


def _list(args: argparse.Namespace) -> int:
    images = list_images(args.dir)
    if args.json:
        print(json.dumps([{"dir": str(d), **asdict(m)} for d, m in images], indent=2))
        return 0
    if not images:
        print(f"no images in {args.dir}")
        return 0
    print(f"{'identity':16s}  {'phase':8s}  {'created':20s}  {'size':>9s}  {'pid':>7s}  {'port':>5s}  dir")
    for d, m in images:
        size = m.image.get("bytes")
        size_s = f"{size / (1 << 20):.1f}MiB" if size else "-"
        print(f"{m.identity:16s}  {m.phase:8s}  {m.created_at:20s}  {size_s:>9s}  {m.engine.get('pid', '-'):>7}  "
              f"{m.engine.get('port', '-'):>5}  {d}" + (f"\n    {m.message}" if m.phase == "Failed" else ""))
    return 0

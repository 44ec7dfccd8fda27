"""The flags of `understudy snapshot checkpoint | restore | list` (no heavy imports: --help is instant)."""

from __future__ import annotations

import argparse


def add_snapshot_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="snapshot_command", required=True, metavar="ACTION")

    ck = sub.add_parser("checkpoint", help="image a parked (or sleeping) engine; it goes on serving",
                        description="Quiesce a parked (STANDBY) or sleeping engine (weights unmapped, memory-"
                                    "service connections closed), checkpoint its CUDA state and dump it with CRIU "
                                    "into DIR, then resume it. The weights stay in the memory service: the image "
                                    "holds the engine's own state. A failed checkpoint leaves the engine serving "
                                    "(the manifest says Failed and why).")
    who = ck.add_mutually_exclusive_group(required=True)
    who.add_argument("--engine", metavar="URL", help="the engine's HTTP address, e.g. http://127.0.0.1:8001")
    who.add_argument("--pid", type=int, help="the engine's process id")
    ck.add_argument("--dir", required=True, help="the image directory (manifest.json, criu/)")
    ck.add_argument("--criu", default=None,
                    help="the criu command (default: $UNDERSTUDY_CRIU, ./.criu/bin/criu from "
                         "scripts/install-criu.sh, or criu on PATH)")

    rs = sub.add_parser("restore", help="bring an engine back from a Ready image, parked as a shadow",
                        description="CRIU-restore the engine imaged in DIR (same pid and port as when it was "
                                    "checkpointed), restore its CUDA state, reconnect it to the memory service and "
                                    "remap its weights at their old addresses; it parks as a shadow (or becomes "
                                    "active with --activate). Its logs go to this command's stderr. Prints one "
                                    "JSON line: pid, url, state, seconds.",
                        epilog="example: understudy snapshot restore --dir /var/lib/understudy/img -- --model "
                               "/models/llama --dtype bfloat16   (refused unless the image is of that engine)")
    rs.add_argument("--dir", required=True, help="the image directory")
    rs.add_argument("--identity", default=None,
                    help="refuse the image unless its identity is this (16 hex digits)")
    rs.add_argument("--activate", action="store_true",
                    help="wait until the restored engine holds the failover lock and is ACTIVE (fails if another "
                         "engine stays active)")
    rs.add_argument("--timeout", type=float, default=120.0,
                    help="seconds to wait for the restored engine to resume (and, with --activate, to become "
                         "active) (default: 120)")
    rs.add_argument("--criu", default=None, help="the criu command (as for checkpoint)")
    rs.add_argument("serve_args", nargs=argparse.REMAINDER,
                    help="after `--`: the `understudy serve` flags of the engine wanted; the image is refused "
                         "unless its identity matches them")

    ls = sub.add_parser("list", help="list images and their phases",
                        description="List the images in DIR and in its subdirectories: identity, phase, engine, "
                                    "size, creation time.")
    ls.add_argument("--dir", default=".", help="an image directory or a directory of them (default: .)")
    ls.add_argument("--json", action="store_true", help="print the manifests as JSON")

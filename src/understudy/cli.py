"""The `understudy` command: one entry point, one subcommand per part."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from understudy.common.units import parse_size
from understudy.logs import setup_logging

def _octal(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r}") from None
    if mode & ~0o777:
        raise argparse.ArgumentTypeError(f"mode {text} has bits beyond 0777")
    return mode


def _add_logging(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-format", choices=["json", "text"], default="json",
                   help="json: one JSON object per line on stderr (default); text: for people")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="the least severe level that is logged (default: info)")


def _add_socket_location(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["host", "cuda"], default="host",
                   help="where the bytes live: 'cuda' for GPU memory (CUDA VMM), 'host' for shared CPU memory "
                        "(default: host)")
    p.add_argument("--device", type=int, default=0,
                   help="device ordinal as this process sees it (default: 0); the socket is named after the "
                        "device's stable identity (the GPU UUID on CUDA)")
    p.add_argument("--socket-dir", default=None,
                   help="directory of the per-device sockets (default: $UNDERSTUDY_SOCKET_DIR or "
                        "/tmp/understudy-$UID)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="understudy",
                                     description="LLM serving that survives engine crashes in milliseconds.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ms = sub.add_parser("memory-server", help="run the memory service of one device",
                        description="Run the memory service of one device: it owns the shared weights and KV "
                                    "cache and hands them to engines over a Unix socket.")
    _add_socket_location(ms)
    ms.add_argument("--socket-mode", type=_octal, default=0o600,
                    help="permission bits of the socket (default: 600, only this user; root is always allowed)")
    ms.add_argument("--socket-group", default=None,
                    help="also let members of this group (name or gid) connect: the socket gets the group and "
                         "mode 660 unless --socket-mode says otherwise; peers are checked with SO_PEERCRED")
    ms.add_argument("--max-bytes", type=parse_size, default=None,
                    help="budget for all allocations of this server, e.g. 60GiB (default: whatever the device "
                         "has); requests beyond it wait like out-of-memory ones")
    ms.add_argument("--metrics-port", type=int, default=None,
                    help="serve Prometheus metrics on 127.0.0.1:PORT/metrics (default: off)")
    _add_logging(ms)

    st = sub.add_parser("memory-status", help="print the state of a device's memory service",
                        description="Print pools, sessions, allocations and recent events of a memory service.")
    _add_socket_location(st)
    st.add_argument("--socket", default=None, help="the socket path itself (instead of backend/device/socket-dir)")
    st.add_argument("--json", action="store_true", help="print the raw status as JSON")
    st.add_argument("--events", type=int, default=10, help="how many recent events to show (default: 10)")

    from understudy.engine.options import add_serve_arguments, positive_int

    sv = sub.add_parser("serve", help="run an inference engine with an OpenAI-compatible HTTP API",
                        description="Run an inference engine whose weights and KV cache live in the device's "
                                    "memory service. With no --model it serves SmolLM2-135M-Instruct.")
    add_serve_arguments(sv)
    _add_logging(sv)

    from understudy.frontend.options import add_frontend_arguments

    fe = sub.add_parser("frontend", help="run the OpenAI frontend: routing, migration, load shedding over engines",
                        description="Run an OpenAI-compatible frontend that tokenises requests and streams them "
                                    "to engines found through discovery (engines register with `serve --register`). "
                                    "Broken streams move to another engine with no lost or duplicated token.",
                        epilog="example: understudy frontend --port 8080; understudy serve --register "
                               "http://127.0.0.1:8080")
    add_frontend_arguments(fe)
    _add_logging(fe)

    up = sub.add_parser("up", help="run a node: memory service, an active engine and parked shadows",
                        description="Run one device's memory service, one active engine and N shadow engines as "
                                    "child process groups; restart what dies (a dead engine's replacement parks "
                                    "as the new shadow). Flags after `--` go to every `understudy serve`.",
                        epilog="example: understudy up --shadows 1 -- --model /models/llama --kv-cache-memory 8GiB")
    up.add_argument("--shadows", type=int, default=1, help="parked shadow engines (default: 1)")
    up.add_argument("--port", type=int, default=8000,
                    help="the first engine's port; engine i listens on port+i (default: 8000)")
    _add_socket_location(up)
    up.add_argument("--snapshot-dir", default=None,
                    help="restore shadows and replacements from Ready images in this directory when one matches "
                         "(same engine identity and port, its pids free) and cold-start otherwise; a shadow that "
                         "parks cold is checkpointed into DIR/<identity>-<port> for the next time (docs/snapshot.md)")
    up.add_argument("--tensor-parallel", type=positive_int, default=1, metavar="N",
                    help="every engine is a group of N ranks on devices --device ... --device+N-1 (one memory "
                         "service per device is started); the active group and each shadow group fail over as a "
                         "whole (docs/tensor-parallel.md) (default: 1)")
    up.add_argument("--frontend-port", type=int, default=None,
                    help="also run `understudy frontend` on this port, with every engine registered to it "
                         "(default: none; docs/frontend.md)")
    up.add_argument("engine_args", nargs=argparse.REMAINDER,
                    help="after `--`: flags for `understudy serve` (model, KV size, ...)")
    _add_logging(up)

    from understudy.snapshot.options import add_snapshot_arguments

    sn = sub.add_parser("snapshot", help="checkpoint a parked engine into an image, restore engines from it",
                        description="Snapshot and restore of engines (cuda-checkpoint + CRIU): the weights stay in "
                                    "the memory service, the image holds the engine's own state. See "
                                    "docs/snapshot.md.")
    add_snapshot_arguments(sn)
    _add_logging(sn)

    ns = sub.add_parser("status", help="show a node's processes, roles and states",
                        description="Show the processes of a node started with `understudy up`: pids, roles, "
                                    "ports and each engine's lifecycle state.")
    ns.add_argument("--socket-dir", default=None,
                    help="the node's socket directory (default: $UNDERSTUDY_SOCKET_DIR or /tmp/understudy-$UID)")
    ns.add_argument("--json", action="store_true", help="print the raw status as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "memory-server":
        return _memory_server(args)
    if args.command == "memory-status":
        return _memory_status(args)
    if args.command == "up":
        return _up(args)
    if args.command == "status":
        return _node_status(args)
    if args.command == "snapshot":
        from understudy.snapshot.commands import run as snapshot

        setup_logging(args.log_format, args.log_level)
        return snapshot(args)
    if args.command == "frontend":
        from understudy.frontend.launch import run

        setup_logging(args.log_format, args.log_level)
        return run(args)
    if args.command == "serve":
        from understudy.engine.launch import serve

        setup_logging(args.log_format, args.log_level)
        return serve(args)
    raise AssertionError(args.command)


def _memory_server(args: argparse.Namespace) -> int:
    from understudy.memory.backends import get_backend
    from understudy.memory.paths import socket_path
    from understudy.memory.server import ServerError, run_server

    setup_logging(args.log_format, args.log_level)
    backend = get_backend(args.backend, args.device)
    mode = args.socket_mode
    if args.socket_group and mode == 0o600:
        mode = 0o660
    path = socket_path(args.socket_dir, backend.identity())
    try:
        run_server(backend, path, socket_mode=mode, socket_group=args.socket_group, limit_bytes=args.max_bytes,
                   metrics_port=args.metrics_port)
    except ServerError as e:
        print(f"understudy memory-server: {e}", file=sys.stderr)
        return 1
    return 0


def _up(args: argparse.Namespace) -> int:
    from understudy.node.supervisor import Supervisor
    from understudy.memory.paths import default_socket_dir

    setup_logging(args.log_format, args.log_level)
    engine_args = args.engine_args[1:] if args.engine_args[:1] == ["--"] else args.engine_args
    supervisor = Supervisor(socket_dir=Path(args.socket_dir) if args.socket_dir else default_socket_dir(),
                            backend=args.backend, device=args.device, port=args.port, shadows=args.shadows,
                            engine_args=engine_args,
                            snapshot_dir=Path(args.snapshot_dir) if args.snapshot_dir else None,
                            frontend_port=args.frontend_port, tensor_parallel=args.tensor_parallel)
    return supervisor.run()


def _node_status(args: argparse.Namespace) -> int:
    from understudy.node.supervisor import node_status
    from understudy.memory.paths import default_socket_dir

    socket_dir = Path(args.socket_dir) if args.socket_dir else default_socket_dir()
    try:
        state = node_status(socket_dir)
    except FileNotFoundError:
        print(f"understudy status: no node runs with socket dir {socket_dir} (start one with `understudy up`)",
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(state, indent=2))
        return 0
    print(f"node: supervisor pid {state['supervisor_pid']}, socket dir {state['socket_dir']}")
    print(f"  {'child':10s} {'pid':>7s} {'alive':5s} {'port':>5s} {'started as':10s} {'state':9s} {'routable':8s} starts")
    for c in state["children"]:
        health = c.get("health", {})
        print(f"  {c['name']:10s} {c['pid'] or '-':>7} {'yes' if c['alive'] else 'no':5s} {c.get('port') or '-':>5} "
              f"{c.get('role') or '-':10s} {health.get('state', '-'):9s} {str(health.get('routable', '-')):8s} "
              f"{c['starts']}")
    return 0


def _memory_status(args: argparse.Namespace) -> int:
    from understudy.memory.client import read_status
    from understudy.memory.paths import device_socket_path

    path = args.socket or device_socket_path(args.socket_dir, args.backend, args.device)
    try:
        status = read_status(path)
    except OSError as e:
        print(f"understudy memory-status: no memory service at {path}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(format_status(status, args.events))
    return 0


def _bytes(n: int | None) -> str:
    if n is None:
        return "unlimited"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def format_status(s: dict, n_events: int = 10) -> str:
    lines = [f"memory service pid {s['pid']} on {s['identity']} ({s['backend']}), socket {s['socket']}",
             f"  up {s['uptime_s']:.0f}s, {_bytes(s['bytes_in_use'])} in use of {_bytes(s['bytes_limit'])}"]
    for name, pool in s["pools"].items():
        writer = f"writer session {pool['writer']['id']} (pid {pool['writer']['pid']})" if pool["writer"] else "no writer"
        lines.append(f"  pool {name:8s} {pool['state']:9s} {pool['allocations']} allocations, "
                     f"{_bytes(pool['bytes'])}, {pool['tensors']} tensors, hash {pool['layout_hash'] or '-'}; "
                     f"{writer}, {len(pool['readers'])} readers, waiting {pool['waiting_writers']}w/"
                     f"{pool['waiting_readers']}r")
    lines.append(f"  sessions ({len(s['sessions'])}):")
    for sess in s["sessions"]:
        lines.append(f"    #{sess['id']} pid {sess['pid']} {sess['name'] or '-'} "
                     f"{sess['pool'] or '(no lock)'} {sess['mode'] or ''}".rstrip())
    if n_events:
        lines.append("  recent events:")
        for e in s["events"][-n_events:]:
            detail = ", ".join(f"{k}={v}" for k, v in e.items() if k not in ("t", "event", "pool") and v is not None)
            stamp = time.strftime("%H:%M:%S", time.localtime(e["t"]))
            lines.append(f"    {stamp} {e['pool'] or '-':8s} {e['event']:12s} {detail}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

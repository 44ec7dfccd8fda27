"""`understudy memory-server` (run one device's memory service) and `understudy memory-status` (print it)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from understudy.logs import setup_logging
from understudy.memory.backends import get_backend
from understudy.memory.paths import device_socket_path, socket_path


def memory_server(args: argparse.Namespace) -> int:
    from understudy.memory.server import ServerError, run_server

    setup_logging(args.log_format, args.log_level)
    backend = get_backend(args.backend, args.device)
    mode = args.socket_mode
    if args.socket_group and mode == 0o600:
        mode = 0o660
    path = socket_path(args.socket_dir, backend.identity())
    try:
        # A standby has done all of its start-up by now (imports, the backend: on CUDA its context);
        # what is left after a takeover is binding the socket.
        run_server(backend, path, standby=args.standby, socket_mode=mode, socket_group=args.socket_group,
                   limit_bytes=args.max_bytes, metrics_port=args.metrics_port, metrics_host=args.metrics_host)
    except ServerError as e:
        print(f"understudy memory-server: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # SIGINT while standing by (a serving one stops cleanly on it)
        return 130
    return 0


def memory_status(args: argparse.Namespace) -> int:
    from understudy.memory.client import read_status  # (the server does not need the client)

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

"""The flags of `understudy memory-server` and `understudy memory-status` (no heavy imports: --help is instant)."""

from __future__ import annotations

import argparse

from understudy.common.units import parse_size
from understudy.logs import add_logging_arguments


def octal_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r}") from None
    if mode & ~0o777:
        raise argparse.ArgumentTypeError(f"mode {text} has bits beyond 0777")
    return mode


def add_socket_location(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["host", "cuda"], default="host",
                   help="where the bytes live: 'cuda' for GPU memory (CUDA VMM), 'host' for shared CPU memory "
                        "(default: host)")
    p.add_argument("--device", type=int, default=0,
                   help="device ordinal as this process sees it (default: 0); the socket is named after the "
                        "device's stable identity (the GPU UUID on CUDA)")
    p.add_argument("--socket-dir", default=None,
                   help="directory of the per-device sockets (default: $UNDERSTUDY_SOCKET_DIR or "
                        "/tmp/understudy-$UID)")


def add_memory_server_arguments(ms: argparse.ArgumentParser) -> None:
    add_socket_location(ms)
    ms.add_argument("--standby", action="store_true",
                    help="stand by for the device's live memory service: start up now (imports, the backend: on "
                         "cuda a context, which holds some GPU memory), wait on its lock and, the moment it dies "
                         "or stops, take its socket over and serve (engines then hand this one their memory "
                         "back). Without a live service it serves at once. Give it the same flags as the live one "
                         "(default: off: exit if a live service holds the socket)")
    ms.add_argument("--socket-mode", type=octal_mode, default=0o600,
                    help="permission bits of the socket (default: 600, only this user; root is always allowed)")
    ms.add_argument("--socket-group", default=None,
                    help="also let members of this group (name or gid) connect: the socket gets the group and "
                         "mode 660 unless --socket-mode says otherwise; peers are checked with SO_PEERCRED")
    ms.add_argument("--max-bytes", type=parse_size, default=None,
                    help="budget for all allocations of this server, e.g. 60GiB (default: whatever the device "
                         "has); requests beyond it wait like out-of-memory ones")
    ms.add_argument("--metrics-port", type=int, default=None,
                    help="serve Prometheus metrics on --metrics-host:PORT/metrics (default: off)")
    ms.add_argument("--metrics-host", default="127.0.0.1",
                    help="address of the metrics listener, e.g. 0.0.0.0 for a Prometheus outside the pod or "
                         "node (default: 127.0.0.1)")
    add_logging_arguments(ms)


def add_memory_status_arguments(st: argparse.ArgumentParser) -> None:
    add_socket_location(st)
    st.add_argument("--socket", default=None, help="the socket path itself (instead of backend/device/socket-dir)")
    st.add_argument("--json", action="store_true", help="print the raw status as JSON")
    st.add_argument("--events", type=int, default=10, help="how many recent events to show (default: 10)")

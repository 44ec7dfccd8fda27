"""`understudy up` (run a node under the supervisor) and `understudy status` (print the node's children)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from understudy.logs import setup_logging
from understudy.memory.paths import default_socket_dir
from understudy.node.supervisor import Supervisor, node_status


def up(args: argparse.Namespace) -> int:
    setup_logging(args.log_format, args.log_level)
    engine_args = args.engine_args[1:] if args.engine_args[:1] == ["--"] else args.engine_args
    supervisor = Supervisor(socket_dir=Path(args.socket_dir) if args.socket_dir else default_socket_dir(),
                            backend=args.backend, device=args.device, port=args.port, shadows=args.shadows,
                            engine_args=engine_args,
                            snapshot_dir=Path(args.snapshot_dir) if args.snapshot_dir else None,
                            frontend_port=args.frontend_port, tensor_parallel=args.tensor_parallel)
    return supervisor.run()


def status(args: argparse.Namespace) -> int:
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

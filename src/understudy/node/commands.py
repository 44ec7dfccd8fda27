"""`understudy up` (run a node under the supervisor) and `understudy status` (print the node's children)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from understudy.logs import setup_logging
from understudy.memory.paths import default_socket_dir
from understudy.node.supervisor import Backoff, Probing, Spanning, Supervisor, node_status


def up(args: argparse.Namespace) -> int:
    setup_logging(args.log_format, args.log_level)
    engine_args = args.engine_args[1:] if args.engine_args[:1] == ["--"] else args.engine_args
    for name in ("probe_interval", "probe_timeout", "hang_timeout", "restart_delay", "restart_delay_max",
                 "restart_reset_after"):
        if getattr(args, name) < 0 or (name in ("probe_timeout", "hang_timeout") and getattr(args, name) == 0):
            flag = "--" + name.replace("_", "-")
            print(f"understudy up: error: {flag} must be {'more than' if name != 'probe_interval' else 'at least'} "
                  f"0, not {getattr(args, name)}", file=sys.stderr)
            return 2
    supervisor = Supervisor(socket_dir=Path(args.socket_dir) if args.socket_dir else default_socket_dir(),
                            backend=args.backend, device=args.device, port=args.port, shadows=args.shadows,
                            engine_args=engine_args,
                            snapshot_dir=Path(args.snapshot_dir) if args.snapshot_dir else None,
                            frontend_port=args.frontend_port, tensor_parallel=args.tensor_parallel,
                            own_memory=args.memory_service == "own", memory_standby=args.memory_standby,
                            spanning=Spanning(args.nnodes, args.node_rank, args.master_addr, args.master_port),
                            backoff=Backoff(args.restart_delay, args.restart_delay_max, args.restart_reset_after),
                            probing=Probing(args.probe_interval, args.probe_timeout, args.hang_timeout))
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
    device = state.get("device") or {}
    if device:
        devices = ", ".join(map(str, device.get("devices", [])))
        print(f"device {devices}: " + ("healthy" if device.get("healthy", True) else
                                       f"UNHEALTHY since {_clock(device.get('since'))}: {device.get('reason')}"))
    print(f"  {'child':10s} {'pid':>7s} {'alive':5s} {'port':>5s} {'started as':10s} {'state':9s} {'routable':8s} "
          f"{'starts':>6s}  {'last exit':22s} next restart")
    now = time.time()
    for c in state["children"]:
        health = c.get("health", {})
        if c.get("not_restarted"):
            restart = "never (" + c["not_restarted"].split(":")[0] + ")"
        elif c.get("next_restart_at"):
            restart = f"in {max(0.0, c['next_restart_at'] - now):.1f} s"
        else:
            restart = "-"
        print(f"  {c['name']:10s} {c['pid'] or '-':>7} {'yes' if c['alive'] else 'no':5s} {c.get('port') or '-':>5} "
              f"{c.get('role') or '-':10s} {health.get('state', '-'):9s} {str(health.get('routable', '-')):8s} "
              f"{c['starts']:>6}  {c.get('last_exit') or '-':22s} {restart}")
        if c.get("last_error"):
            print(f"  {'':10s} last error: {c['last_error']}")
    return 0


def _clock(t: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else "?"

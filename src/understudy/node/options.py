"""The flags of `understudy up` (run a node) and `understudy status` (show it); no heavy imports."""

from __future__ import annotations

import argparse

from understudy.common.units import positive_int
from understudy.logs import add_logging_arguments
from understudy.memory.options import add_socket_location


def add_up_arguments(up: argparse.ArgumentParser) -> None:
    up.add_argument("--shadows", type=int, default=1, help="parked shadow engines (default: 1)")
    up.add_argument("--port", type=int, default=8000,
                    help="the first engine's port; engine i listens on port+i (default: 8000)")
    add_socket_location(up)
    up.add_argument("--memory-service", choices=["own", "connect"], default="own",
                    help="own: start a memory service per device and restart it when it dies; connect: use the "
                         "ones already running in --socket-dir, started and restarted by someone else (systemd's "
                         "understudy-memory@N units: restarting `up` then keeps the weights resident) "
                         "(default: own)")
    up.add_argument("--memory-standby", action=argparse.BooleanOptionalAction, default=True,
                    help="with --memory-service own: also run a standby memory service per device (`memory-server "
                         "--standby`, child memory-twin), started up and waiting to take over the moment the live "
                         "one dies, so engines get a service back within milliseconds instead of a cold start; "
                         "the two take turns (a dead one is restarted as the standby). On cuda each standby holds "
                         "a CUDA context's GPU memory (default: on)")
    up.add_argument("--snapshot-dir", default=None,
                    help="restore shadows and replacements from Ready images in this directory when one matches "
                         "(same engine identity and port, its pids free) and cold-start otherwise; a shadow that "
                         "parks cold is checkpointed into DIR/<identity>-<port> for the next time (docs/snapshot.md)")
    up.add_argument("--tensor-parallel", "--tensor-parallel-size", "-tp", type=positive_int, default=1, metavar="N",
                    help="every engine is a group of N ranks on devices --device ... --device+N-1 (one memory "
                         "service per device is started); the active group and each shadow group fail over as a "
                         "whole (docs/tensor-parallel.md) (default: 1)")
    g = up.add_argument_group("groups across nodes (docs/tensor-parallel.md)")
    g.add_argument("--nnodes", type=positive_int, default=1, metavar="K",
                   help="every --tensor-parallel group spans K nodes; run `up` on each with the same flags and its "
                        "own --node-rank; each node starts a memory service per device of its N/K ranks (default: 1)")
    g.add_argument("--node-rank", type=int, default=0, metavar="R",
                   help="0: this node runs the groups' leaders (HTTP, the failover lock, the frontend); R > 0: it "
                        "runs their ranks R*N/K .. and restarts its part of any group that ended (default: 0)")
    g.add_argument("--master-addr", default="127.0.0.1", metavar="HOST",
                   help="node 0 as the other nodes reach it (default: 127.0.0.1)")
    g.add_argument("--master-port", type=int, default=29500, metavar="PORT",
                   help="the group of engine slot i meets at PORT+i on node 0 (default: 29500)")
    up.add_argument("--frontend-port", type=int, default=None,
                    help="also run `understudy frontend` on this port, with every engine registered to it "
                         "(default: none; docs/frontend.md)")
    g = up.add_argument_group("hangs and restarts")
    g.add_argument("--probe-interval", type=float, default=0.25,
                   help="seconds between GET /live probes of each serving engine (0: no probing) (default: 0.25)")
    g.add_argument("--probe-timeout", type=float, default=0.5,
                   help="the longest one probe waits for its answer, in seconds (default: 0.5)")
    g.add_argument("--hang-timeout", type=float, default=1.0,
                   help="an engine whose /live answers no probe with 200 for this many seconds (two probes "
                        "missed at least) is hung: its process group is SIGKILLed and the shadow takes over "
                        "(default: 1)")
    g.add_argument("--restart-delay", type=float, default=0.5,
                   help="seconds before a dead child is restarted; doubled for every further death soon after "
                        "a start (default: 0.5)")
    g.add_argument("--restart-delay-max", type=float, default=30.0,
                   help="the longest restart delay, in seconds (default: 30)")
    g.add_argument("--restart-reset-after", type=float, default=10.0,
                   help="a child that stayed up this many seconds is restarted after --restart-delay again "
                        "(default: 10)")
    up.add_argument("engine_args", nargs=argparse.REMAINDER,
                    help="after `--`: flags for `understudy serve` (model, KV size, ...)")
    add_logging_arguments(up)


def add_status_arguments(ns: argparse.ArgumentParser) -> None:
    ns.add_argument("--socket-dir", default=None,
                    help="the node's socket directory (default: $UNDERSTUDY_SOCKET_DIR or /tmp/understudy-$UID)")
    ns.add_argument("--json", action="store_true", help="print the raw status as JSON")

"""The `understudy` command: argv -> one subcommand per part. Each part owns its flags (an `options` module
with no heavy imports, so --help is instant) and its commands; this module only wires them. Nothing imports it."""

from __future__ import annotations

import argparse
import sys

from understudy.engine.options import add_serve_arguments
from understudy.frontend.options import add_frontend_arguments
from understudy.logs import add_logging_arguments, setup_logging
from understudy.memory.options import add_memory_server_arguments, add_memory_status_arguments
from understudy.node.options import add_status_arguments, add_up_arguments
from understudy.snapshot.options import add_snapshot_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="understudy",
                                     description="LLM serving that survives engine crashes in milliseconds.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ms = sub.add_parser("memory-server", help="run the memory service of one device",
                        description="Run the memory service of one device: it owns the shared weights and KV "
                                    "cache and hands them to engines over a Unix socket.")
    add_memory_server_arguments(ms)

    st = sub.add_parser("memory-status", help="print the state of a device's memory service",
                        description="Print pools, sessions, allocations and recent events of a memory service.")
    add_memory_status_arguments(st)

    sv = sub.add_parser("serve", help="run an inference engine with an OpenAI-compatible HTTP API",
                        description="Run an inference engine whose weights and KV cache live in the device's "
                                    "memory service. With no --model it serves SmolLM2-135M-Instruct.")
    add_serve_arguments(sv)
    add_logging_arguments(sv)

    fe = sub.add_parser("frontend", help="run the OpenAI frontend: routing, migration, load shedding over engines",
                        description="Run an OpenAI-compatible frontend that tokenises requests and streams them "
                                    "to engines found through discovery (engines register with `serve --register`). "
                                    "Broken streams move to another engine with no lost or duplicated token.",
                        epilog="example: understudy frontend --port 8080; understudy serve --register "
                               "http://127.0.0.1:8080")
    add_frontend_arguments(fe)
    add_logging_arguments(fe)

    up = sub.add_parser("up", help="run a node: memory service, an active engine and parked shadows",
                        description="Run one device's memory service, one active engine and N shadow engines as "
                                    "child process groups; restart what dies (a dead engine's replacement parks "
                                    "as the new shadow). Flags after `--` go to every `understudy serve`.",
                        epilog="example: understudy up --shadows 1 -- --model /models/llama --kv-cache-memory 8GiB")
    add_up_arguments(up)

    sn = sub.add_parser("snapshot", help="checkpoint a parked engine into an image, restore engines from it",
                        description="Snapshot and restore of engines (cuda-checkpoint + CRIU): the weights stay in "
                                    "the memory service, the image holds the engine's own state. See "
                                    "docs/snapshot.md.")
    add_snapshot_arguments(sn)
    add_logging_arguments(sn)

    ns = sub.add_parser("status", help="show a node's processes, roles and states",
                        description="Show the processes of a node started with `understudy up`: pids, roles, "
                                    "ports and each engine's lifecycle state.")
    add_status_arguments(ns)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "memory-server":
        from understudy.memory.commands import memory_server

        return memory_server(args)
    if args.command == "memory-status":
        from understudy.memory.commands import memory_status

        return memory_status(args)
    if args.command == "up":
        from understudy.node.commands import up

        return up(args)
    if args.command == "status":
        from understudy.node.commands import status

        return status(args)
    if args.command == "snapshot":
        from understudy.snapshot.commands import run as snapshot

        setup_logging(args.log_format, args.log_level)
        return snapshot(args)
    if args.command == "frontend":
        from understudy.frontend.launch import run

        setup_logging(args.log_format, args.log_level)
        return run(args)
    if args.command == "serve":
        from understudy.engine.options import ConfigError, config_from_args

        try:
            config = config_from_args(args)  # the one ServeConfig: nothing below sees the namespace
        except ConfigError as e:
            parser.exit(2, f"understudy serve: error: {e}\n")
        from understudy.engine.launch import serve

        setup_logging(config.output.log_format, config.output.log_level)
        return serve(config)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())

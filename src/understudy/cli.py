"""The `understudy` command: argv -> one subcommand per part. Each part owns its flags (an `options` module
with no heavy imports, so --help is instant) and its commands; this module only wires them. Only the chosen
subcommand's options module is imported (`memory-server` starts, and is restarted, without the engine's).
Nothing imports this module."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple

from understudy.logs import add_logging_arguments, setup_logging


class Command(NamedTuple):
    help: str
    description: str
    flags: str  # "module:function" that adds its flags
    logging: bool = False  # also --log-format / --log-level (when `flags` does not add them)
    epilog: str | None = None


COMMANDS = {
    "memory-server": Command(
        "run the memory service of one device",
        "Run the memory service of one device: it owns the shared weights and KV cache and hands them to "
        "engines over a Unix socket. With --standby it waits, started up, to take over from the live one.",
        "understudy.memory.options:add_memory_server_arguments"),
    "memory-status": Command(
        "print the state of a device's memory service",
        "Print pools, sessions, allocations and recent events of a memory service.",
        "understudy.memory.options:add_memory_status_arguments"),
    "serve": Command(
        "run an inference engine with an OpenAI-compatible HTTP API",
        "Run an inference engine whose weights and KV cache live in the device's memory service. With no "
        "--model it serves SmolLM2-135M-Instruct.",
        "understudy.engine.options:add_serve_arguments", logging=True),
    "frontend": Command(
        "run the OpenAI frontend: routing, migration, load shedding over engines",
        "Run an OpenAI-compatible frontend that tokenises requests and streams them to engines found through "
        "discovery (engines register with `serve --register`). Broken streams move to another engine with no "
        "lost or duplicated token.",
        "understudy.frontend.options:add_frontend_arguments", logging=True,
        epilog="example: understudy frontend --port 8080; understudy serve --register http://127.0.0.1:8080"),
    "up": Command(
        "run a node: memory service, an active engine and parked shadows",
        "Run one device's memory service (and a standby to take over from it), one active engine and N shadow "
        "engines as child process groups; restart what dies (a dead engine's replacement parks as the new "
        "shadow, a dead memory service's as the new standby). Flags after `--` go to every `understudy serve`.",
        "understudy.node.options:add_up_arguments",
        epilog="example: understudy up --shadows 1 -- --model /models/llama --kv-cache-memory 8GiB"),
    "snapshot": Command(
        "checkpoint a parked engine into an image, restore engines from it",
        "Snapshot and restore of engines (cuda-checkpoint + CRIU): the weights stay in the memory service, the "
        "image holds the engine's own state. See docs/snapshot.md.",
        "understudy.snapshot.options:add_snapshot_arguments", logging=True),
    "status": Command(
        "show a node's processes, roles and states",
        "Show the processes of a node started with `understudy up`: pids, roles, ports and each engine's "
        "lifecycle state.",
        "understudy.node.options:add_status_arguments"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or (`only`) one whose other subcommands have no flags: only that one's options
    module is imported."""
    parser = argparse.ArgumentParser(prog="understudy",
                                     description="LLM serving that survives engine crashes in milliseconds.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, c in COMMANDS.items():
        sp = sub.add_parser(name, help=c.help, description=c.description, epilog=c.epilog)
        if only in (None, name):
            module, function = c.flags.split(":")
            getattr(importlib.import_module(module), function)(sp)
            if c.logging:
                add_logging_arguments(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
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

"""`understudy frontend`: from command-line options to a running frontend.

The server listens at once (engines can register while the tokenizer loads on a thread; /health says
ready once the tokenizer is loaded and an engine is active). SIGTERM: /health turns 503 and new
requests are refused, in-flight answers finish within --drain-timeout, then the frontend exits.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import random
import signal
import time
from pathlib import Path

from understudy.common.auth import Access, cors_of
from understudy.common.http_server import limits_from_args, server_limits, warm_streaming
from understudy.common.openai_options import OpenAIOptions, read_chat_template, sampling_defaults
from understudy.discovery.embedded import EmbeddedRegistry
from understudy.discovery.etcd import EtcdAddress, EtcdView
from understudy.common.default_model import default_model_path
from understudy.common.tokenizer import Tokenizer
from understudy.logs import log
from understudy.frontend.app import create_app
from understudy.frontend.migration import Policy
from understudy.frontend.router import Thresholds
from understudy.frontend.service import Frontend

logger = logging.getLogger("understudy.frontend.launch")


def build(args: argparse.Namespace) -> Frontend:
    if args.migration_limit < 0:
        raise SystemExit("understudy frontend: --migration-limit must be 0 or more")
    if args.busy_waiting < 1:
        raise SystemExit("understudy frontend: --busy-waiting must be 1 or more")
    if not args.stream_timeout > 0 or args.stall_timeout < 0:
        raise SystemExit("understudy frontend: --stream-timeout must be more than 0 and --stall-timeout 0 or more")
    model_tag = getattr(args, "model_tag", None)
    if model_tag is not None and args.model is not None and model_tag != args.model:
        raise SystemExit(f"understudy frontend: two models: MODEL {model_tag} and --model {args.model} (give one)")
    model = model_tag or args.model
    model_path = Path(model) if model else default_model_path()
    if not model_path.exists():
        raise SystemExit(f"understudy frontend: no model at {model_path}")
    names = tuple(args.served_model_name) or (model_path.stem if model_path.is_file() else model_path.name,)
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise SystemExit("understudy frontend: --enable-auto-tool-choice needs --tool-call-parser")
    try:
        chat_template = read_chat_template(args.chat_template)
        openai = OpenAIOptions(
            served_model_names=names, max_model_len=args.max_model_len,  # None: the engines' (fe.max_model_len)
            sampling_defaults=sampling_defaults(args.generation_config, model_path, args.seed),
            tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser,
            enable_auto_tool_choice=args.enable_auto_tool_choice, chat_template=chat_template)
        access = Access.from_flags(args.api_key, args.admin_token_file)
    except ValueError as e:
        raise SystemExit(f"understudy frontend: {e}") from None
    if args.seed is not None:  # --seed: also the process's generator
        random.seed(args.seed)
    name = names[0]
    if args.discovery == "embedded":
        view = EmbeddedRegistry(max_ttl=args.registry_max_ttl)
    else:
        try:
            view = EtcdView(EtcdAddress.parse(args.discovery))
        except (ValueError, RuntimeError) as e:
            raise SystemExit(f"understudy frontend: --discovery: {e}") from None

    def load_tokenizer() -> Tokenizer:
        t0 = time.perf_counter()
        tokenizer = Tokenizer.from_pretrained(model_path, chat_template=chat_template)
        log(logger, "tokenizer_ready", model=name, seconds=round(time.perf_counter() - t0, 3))
        return tokenizer

    return Frontend(model_name=name, view=view, discovery=args.discovery,
                    policy=Policy(args.migration_limit, args.migration_max_seq_len, args.stream_timeout,
                                  args.stall_timeout),
                    thresholds=Thresholds(args.busy_kv_usage, args.busy_waiting),
                    default_max_tokens=args.default_max_tokens, max_request_bytes=args.max_request_bytes,
                    retry_after=args.retry_after, health_interval=args.health_interval,
                    health_timeout=args.health_timeout, canary_interval=args.canary_interval,
                    canary_timeout=args.canary_timeout, load_tokenizer=load_tokenizer, openai=openai,
                    access=access, cors=cors_of(args))


def run(args: argparse.Namespace) -> int:
    import uvicorn

    fe = build(args)
    app = create_app(fe)
    exit_code = 0

    def _tokenizer_loaded(task: asyncio.Future) -> None:
        nonlocal exit_code
        if not task.cancelled() and task.exception() is not None:
            log(logger, "tokenizer_failed", logging.ERROR, error=f"{type(task.exception()).__name__}: "
                                                                 f"{task.exception()}")
            exit_code = 1
            server.should_exit = True
            return
        # What lives as long as the process (modules, the app, the tokenizer) leaves the collector's reach:
        # a full collection holds the GIL for tens of ms, in some request's way (engine/launch.py does the same).
        gc.collect()
        gc.freeze()

    @app.on_event("startup")
    async def _start():
        await fe.start()
        await warm_streaming()
        fe.tokenizer_task.add_done_callback(_tokenizer_loaded)

    @app.on_event("shutdown")
    async def _shutdown():
        await fe.stop()
        log(logger, "stopped")

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.drain_timeout,
                            **server_limits(limits_from_args(args)))  # slow clients are bounded

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if not self.should_exit:  # logged once the socket accepts connections
                log(logger, "serving", url=f"http://{args.host}:{args.port}", model=fe.model_name,
                    discovery=fe.discovery)

        def handle_exit(self, sig, frame):
            # uvicorn's own SIGTERM / SIGINT handler while it serves: it stops listening and waits up
            # to --drain-timeout for in-flight answers; we turn /health and new requests away first.
            if not fe.draining:
                fe.draining = True
                log(logger, "draining", signal=signal.Signals(sig).name, inflight=len(fe.inflight),
                    timeout_s=args.drain_timeout)
            super().handle_exit(sig, frame)

    server = _Server(config)

    def _stop(*_):
        # Before uvicorn serves; and after its drain, when it raises the signal it handled again under
        # this handler (the default one would end us with -SIGTERM instead of exit 0).
        fe.draining = True
        server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    server.run()
    return exit_code

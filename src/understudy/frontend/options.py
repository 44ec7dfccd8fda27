"""The flags of `understudy frontend` (kept free of heavy imports so `--help` is instant)."""

from __future__ import annotations

import argparse

from understudy.common.auth import add_access_arguments
from understudy.common.http_server import add_http_limit_arguments
from understudy.common.openai_options import add_api_arguments, add_model_argument
from understudy.common.units import parse_token_count


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def add_frontend_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("HTTP")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    g.add_argument("--port", type=int, default=8080, help="port to listen on (default: 8080)")
    g.add_argument("--max-request-bytes", type=int, default=4 << 20,
                   help="larger request bodies get 413 (default: 4194304)")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let in-flight requests finish before exiting (default: 30)")
    add_http_limit_arguments(g)  # --timeout-keep-alive, --header-timeout, --max-header-bytes, --limit-concurrency
    add_access_arguments(p.add_argument_group("access (docs/frontend.md#access)"))
    g = p.add_argument_group("model")
    add_model_argument(g)
    g.description = ("the model whose tokenizer, chat template and generation_config.json the frontend uses: "
                     "what the engines serve, with the same --served-model-name")
    g.add_argument("--served-model-name", action="extend", nargs="+", default=[], metavar="NAME",
                   help="the model names clients use: responses carry the first, a request may name any; engines "
                        "must report the first (their own first --served-model-name) (default: from --model, like "
                        "`serve`)")
    g.add_argument("--max-model-len", type=parse_token_count, default=None,
                   help="longest prompt + completion in tokens, as the engines' (32k = 32000, 32K = 32768) "
                        "(default: the model's config, at most 32768, like `serve`)")
    g.add_argument("--default-max-tokens", type=int, default=None,
                   help="max_tokens of requests that do not say, at most the rest of the context "
                        "(default: the rest of the context, as OpenAI and vLLM)")
    g.add_argument("--seed", type=int, default=None,
                   help="the seed of requests that give none, as `serve --seed` (give the engines' value) "
                        "(default: none: a random seed per request)")
    add_api_arguments(p.add_argument_group("OpenAI API"))
    g = p.add_argument_group("discovery")
    g.add_argument("--discovery", default="embedded",
                   help="where engines are found: 'embedded' (engines register here with `serve --register "
                        "http://HOST:PORT`) or etcd://HOST:PORT[/prefix] (engines register there; many frontends "
                        "can share it) (default: embedded)")
    g.add_argument("--registry-max-ttl", type=float, default=300.0,
                   help="embedded registry: the longest lease an engine may ask for, in seconds (default: 300)")
    g = p.add_argument_group("routing and load shedding")
    g.add_argument("--busy-kv-usage", type=_fraction, default=0.95,
                   help="an engine whose KV cache usage is at or above this fraction is busy (default: 0.95); "
                        "change it at run time with POST /admin/thresholds")
    g.add_argument("--busy-waiting", type=int, default=32,
                   help="an engine with this many requests waiting or more is busy (default: 32); a request "
                        "gets 503 + Retry-After only when every active engine is busy")
    g.add_argument("--retry-after", type=int, default=1,
                   help="seconds in the Retry-After header of 503 answers (default: 1)")
    g = p.add_argument_group("migration")
    g.add_argument("--migration-limit", type=int, default=3,
                   help="how many times one request may move to another engine after its stream broke "
                        "(0: never; the client gets an error) (default: 3)")
    g.add_argument("--migration-max-seq-len", type=int, default=None,
                   help="do not migrate requests whose prompt + generated tokens exceed this many tokens "
                        "(their re-prefill would cost too much) (default: no limit)")
    g.add_argument("--stream-timeout", type=float, default=120.0,
                   help="seconds an engine may take to send the first token of a request (its prefill, a wait "
                        "in its queue) before the stream counts as broken (default: 120)")
    g.add_argument("--stall-timeout", type=float, default=10.0,
                   help="seconds without a token from an engine once it has sent one: the stream is stalled "
                        "(a hung engine), moves to another engine with prompt + tokens so far, and the engine "
                        "is suspect (no new work) until it shows progress again; 0: only --stream-timeout "
                        "(default: 10)")
    g = p.add_argument_group("health")
    g.add_argument("--health-interval", type=float, default=1.0,
                   help="seconds between polls of each engine's /health (default: 1)")
    g.add_argument("--health-timeout", type=float, default=5.0,
                   help="seconds an engine's /health may take before the engine counts as unreachable "
                        "(default: 5)")
    g.add_argument("--canary-interval", type=float, default=0.0,
                   help="send a one-token request to each idle active engine this often (seconds); an engine "
                        "that fails it is unhealthy (no new work) until one passes (default: 0, off)")
    g.add_argument("--canary-timeout", type=float, default=10.0,
                   help="seconds a canary request may take (default: 10)")

"""What the frontend adds: time to first token and time per token, through the frontend and straight
to the engine, in the same run against the same engine.

Starts a memory service, one engine and a frontend the engine registers with, then sends the same
streamed greedy request along three paths, interleaved round by round so that drift hits all alike:

  * frontend  POST /v1/completions   (client -> frontend -> engine /engine/generate; text in, SSE out)
  * engine    POST /v1/completions   (the engine's own OpenAI API: it tokenises and detokenises itself)
  * tokens    POST /engine/generate  (token ids in, NDJSON out: what the frontend itself calls)

Prints p50 / p90 time to first token and mean inter-token latency per path, and what the frontend adds
over each direct path (absolute and as a ratio). Then the same through the frontend and straight to an
*instant engine* (a stub process that streams its tokens with no compute): with the model's step time
out of the way, that is the frontend's own cost per request and per token.

    python bench/frontend.py                                  # built-in SmolLM2-135M, CPU or GPU
    python bench/frontend.py --requests 50 --max-tokens 64 --concurrency 1 8
    python bench/frontend.py --model /models/llama --backend cuda --kv-cache-memory 8GiB
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

import httpx
from understudy.common.auth import admin_headers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import PY, Proc, free_port  # noqa: E402  (bench/common.py)
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def timed_stream(http: httpx.Client, path: str, url: str, body: dict) -> list[float]:
    """perf_counter() of the request's start, then of every token (or text chunk) received."""
    times = [time.perf_counter()]
    with http.stream("POST", url, json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line:
                continue
            if path == "tokens":
                n = len(json.loads(line)["token_ids"])
            elif line.startswith("data: ") and line != "data: [DONE]":
                choices = json.loads(line[6:])["choices"]
                n = 1 if choices and choices[0]["text"] else 0
            else:
                n = 0
            if n:
                times += [time.perf_counter()] * n
    return times


def serve_stub(port: int, model: str, frontend: str) -> None:
    """An engine that is only an HTTP face: /health says ACTIVE, /engine/generate streams max_tokens
    NDJSON lines at once. It registers with the frontend like `serve --register`."""
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok", "state": "ACTIVE", "routable": True, "running": 0, "waiting": 0,
                "kv_cache_usage": 0.0}

    @app.post("/engine/generate")
    async def generate(body: dict):
        n, prompt = body["sampling"]["max_tokens"], len(body["token_ids"])

        async def lines():
            for i in range(n):
                yield json.dumps({"token_ids": [300 + i % 500], "finish_reason": "length" if i == n - 1 else None,
                                  "prompt_tokens": prompt, "cached_tokens": 0, "error": None}) + "\n"
        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.on_event("startup")
    async def register():
        record = {"id": f"stub-{port}", "url": f"http://127.0.0.1:{port}", "model": model, "node": "stub",
                  "state": "ACTIVE", "routable": True}
        async with httpx.AsyncClient(headers=admin_headers()) as http:
            (await http.post(f"{frontend}/registry/engines", json={"record": record, "ttl": 3600})).raise_for_status()
        print(json.dumps({"event": "serving"}), file=sys.stderr, flush=True)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def compare(http: httpx.Client, paths: dict, requests: int, concurrency: int) -> dict:
    """Rounds of `concurrency` streams per path, the paths interleaved; stats per path."""
    runs: dict[str, list] = {p: [] for p in paths}
    for _ in range(requests):
        for path, (url, body) in paths.items():
            out: list = [None] * concurrency
            threads = [threading.Thread(target=lambda i=i: out.__setitem__(
                i, timed_stream(http, path if path != "stub" else "tokens", url, body)))
                for i in range(concurrency)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            runs[path] += out
    return {p: summary(r) for p, r in runs.items()}


def print_table(s: dict, rows: list[tuple[str, str]], versus: list[str]) -> None:
    print(f"{'path':40s} {'TTFT p50 ms':>12s} {'TTFT p90 ms':>12s} {'ITL mean ms':>12s} {'ITL p90 ms':>11s}")
    for p, label in rows:
        print(f"{label:40s} {s[p]['ttft_p50']:12.2f} {s[p]['ttft_p90']:12.2f} {s[p]['itl_mean']:12.3f} "
              f"{s[p]['itl_p90']:11.3f}")
    f = s["frontend"]
    for p in versus:
        d = s[p]
        print(f"frontend adds vs {p:6s}: TTFT {f['ttft_p50'] - d['ttft_p50']:+.2f} ms p50 "
              f"({f['ttft_p50'] / d['ttft_p50']:.3f}x), per token {f['itl_mean'] - d['itl_mean']:+.3f} ms "
              f"({f['itl_mean'] / d['itl_mean']:.3f}x)")
    sys.stdout.flush()


def summary(runs: list[list[float]]) -> dict:
    ttft = sorted((t[1] - t[0]) * 1e3 for t in runs)
    itl = [(t[-1] - t[1]) / (len(t) - 2) * 1e3 for t in runs if len(t) > 2]
    q = statistics.quantiles(ttft, n=10) if len(ttft) > 1 else ttft * 9
    return {"ttft_p50": statistics.median(ttft), "ttft_p90": q[8], "itl_mean": statistics.fmean(itl),
            "itl_p90": statistics.quantiles(itl, n=10)[8] if len(itl) > 1 else itl[0], "n": len(runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model for engine and frontend (default: the built-in one)")
    ap.add_argument("--backend", default="auto", choices=["auto", "host", "cuda"])
    ap.add_argument("--kv-cache-memory", default="256MiB")
    ap.add_argument("--requests", type=int, default=20, help="rounds: each sends every path its requests")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1], help="concurrent streams per path")
    ap.add_argument("--serve-stub", type=int, default=None, help=argparse.SUPPRESS)  # the instant engine
    ap.add_argument("--stub-model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--stub-frontend", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_stub:
        return serve_stub(args.serve_stub, args.stub_model, args.stub_frontend)

    sock = tempfile.mkdtemp(prefix="us-bf-", dir="/tmp")
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")} if args.backend != "cuda" else {}
    model = ["--model", args.model] if args.model else []
    fe_port, eng_port = free_port(), free_port()
    procs: list[Proc] = []
    try:
        backend = args.backend if args.backend != "auto" else ("cuda" if shutil.which("nvidia-smi") else "host")
        memory = Proc(PY + ["memory-server", "--backend", backend, "--socket-dir", sock])
        procs.append(memory)
        memory.wait_event("listening")
        frontend = Proc(PY + ["frontend", "--port", str(fe_port), *model, "--health-interval", "0.5"])
        procs.append(frontend)
        frontend.wait_event("serving")
        engine = Proc(PY + ["serve", "--port", str(eng_port), "--backend", backend, "--socket-dir", sock,
                            "--memory-service", "connect", "--kv-cache-memory", args.kv_cache_memory,
                            "--no-progress", "--register", f"http://127.0.0.1:{fe_port}", *model], env=env)
        procs.append(engine)
        ready = engine.wait_event("serving")
        deadline = time.time() + 300
        while httpx.get(f"http://127.0.0.1:{fe_port}/health", timeout=5).status_code != 200:
            assert time.time() < deadline, "the frontend never became ready"
            time.sleep(0.1)
        fe, eng = f"http://127.0.0.1:{fe_port}", f"http://127.0.0.1:{eng_port}"
        ids = httpx.post(f"{eng}/v1/completions", json={"prompt": PROMPT, "max_tokens": 1}).json()["usage"]
        sampling = {"max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
        text_body = {"prompt": PROMPT, "stream": True, **sampling}
        # The same prompt as token ids: what the frontend sends (the engine's tokenizer, one request).
        from understudy.common.default_model import default_model_path
        from understudy.common.tokenizer import Tokenizer

        tok = Tokenizer.from_pretrained(args.model or default_model_path())
        prompt_ids = tok.encode(PROMPT)
        assert len(prompt_ids) == ids["prompt_tokens"]
        paths = {"frontend": (f"{fe}/v1/completions", text_body),
                 "engine": (f"{eng}/v1/completions", text_body),
                 "tokens": (f"{eng}/engine/generate", {"token_ids": prompt_ids, "sampling": sampling})}
        print(f"# model {ready['model']}, backend {backend}; {args.requests} rounds x {args.max_tokens} tokens "
              f"(greedy, prompt {len(prompt_ids)} tokens)", flush=True)
        with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=None), headers=admin_headers()) as http:
            for path, (url, body) in paths.items():  # warm-up: connections, caches, first-call costs
                timed_stream(http, path, url, body)
            for c in args.concurrency:
                s = compare(http, paths, args.requests, c)
                print(f"\nconcurrency {c}: {s['frontend']['n']} streams per path")
                print_table(s, [("tokens", "engine /engine/generate (tokens)"),
                                ("engine", "engine /v1/completions (text)"),
                                ("frontend", "frontend /v1/completions (text)")], ["engine", "tokens"])

            # The frontend's own cost: the same through it and straight to an instant engine.
            engine.stop()
            stub_port = free_port()
            stub = Proc([sys.executable, __file__, "--serve-stub", str(stub_port), "--stub-model", ready["model"],
                         "--stub-frontend", fe])
            procs.append(stub)
            stub.wait_event("serving")
            deadline = time.time() + 60
            while httpx.get(f"{fe}/health", timeout=5).status_code != 200:
                assert time.time() < deadline, "the frontend never routed to the instant engine"
                time.sleep(0.05)
            paths = {"frontend": (f"{fe}/v1/completions", text_body),
                     "stub": (f"http://127.0.0.1:{stub_port}/engine/generate",
                              {"token_ids": prompt_ids, "sampling": sampling})}
            for path, (url, body) in paths.items():
                timed_stream(http, "tokens" if path == "stub" else path, url, body)
            for c in args.concurrency:
                s = compare(http, paths, args.requests * 5, c)
                print(f"\ninstant engine (no compute), concurrency {c}: {s['frontend']['n']} streams per path")
                print_table(s, [("stub", "instant engine /engine/generate"),
                                ("frontend", "frontend /v1/completions -> instant")], ["stub"])
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(sock, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Decode speed of a tensor-parallel group: CUDA graphs against eager steps, measured in the same run.

One memory service per device; a group (`serve --tensor-parallel N`) with CUDA graphs for its decode
steps (the default), then, on the same memory services (it imports the weights), the same group with
`--enforce-eager`. For each batch size B: B concurrent greedy requests of --tokens tokens each over
/engine/generate; tokens/s = B * tokens / wall time, after one warm-up request.

    python bench/tp_decode.py                 # 2 GPUs: Llama-3-8B shape (bf16), TP=2
    python bench/tp_decode.py --model qwen3-30b-a3b   # the MoE shape, 8 layers, its experts split over the ranks
    python bench/tp_decode.py --cpu           # smoke check: tiny model, host backend, gloo (eager only)
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import PY, Proc  # noqa: E402  (bench/common.py)
from failover import stream  # noqa: E402  (bench/failover.py)
from tp_failover import add_model_args, memory_services, prepare  # noqa: E402  (bench/tp_failover.py)


def tokens_per_second(port: int, batch: int, tokens: int, vocab: int) -> float:
    """B concurrent requests (64-token prompts, distinct) of `tokens` tokens each: generated tokens/s."""
    done: list[int] = []

    def one(i: int) -> None:
        prompt = [(7 * i + j) % (vocab - 1) + 1 for j in range(64)]
        done.append(sum(1 for _ in stream(port, prompt, tokens)))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(batch)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert done == [tokens] * batch, done
    return batch * tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="smoke check on the CPU: tiny model, host backend, gloo")
    ap.add_argument("--tensor-parallel", type=int, default=2, help="ranks per group (default: 2)")
    add_model_args(ap)
    ap.add_argument("--batches", default="1,8,32", help="concurrent requests, comma-separated (default: 1,8,32)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per request (default: 128)")
    ap.add_argument("--workdir", default=None, help="where the checkpoint is written (and reused)")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    backend, ckpt, vocab = prepare(args)
    tp = args.tensor_parallel
    sock = tempfile.mkdtemp(prefix="us-", dir="/tmp")
    engine_args = ["--model", str(ckpt), "--backend", backend, "--socket-dir", sock, "--memory-service", "connect",
                   "--tensor-parallel", str(tp), "--kv-cache-memory", "32MiB" if args.cpu else "8GiB",
                   "--max-num-seqs", str(max(batches)), "--max-model-len", "2048", "--no-progress"]
    modes = [("eager", ["--enforce-eager"])] if args.cpu else [("graphs", []), ("eager", ["--enforce-eager"])]
    results: dict = {"tensor_parallel": tp, "device": "cpu" if args.cpu else "cuda", "model": args.model,
                     "tokens": args.tokens}
    mems = memory_services(backend, tp, sock)
    try:
        for mode, extra in modes:
            group = Proc(PY + ["serve", "--port", "18300", *engine_args, *extra])
            try:
                group.wait_event("serving")
                tokens_per_second(18300, 1, 8, vocab)  # warm-up
                results[mode] = {b: tokens_per_second(18300, b, args.tokens, vocab) for b in batches}
                for b, tps in results[mode].items():
                    print(f"TP={tp} {mode:6s} batch {b:3d}: {tps:8.1f} tok/s", flush=True)
            finally:
                group.kill(signal.SIGTERM)
    finally:
        for m in mems:
            m.kill(signal.SIGTERM)
        shutil.rmtree(sock, ignore_errors=True)
    if "graphs" in results:
        print("\n batch   graphs tok/s   eager tok/s   ratio")
        for b in batches:
            g, e = results["graphs"][b], results["eager"][b]
            print(f"  {b:4d}   {g:12.1f}   {e:11.1f}   {g / e:5.1f}x")
    print("json", json.dumps(results))


if __name__ == "__main__":
    main()

"""Failover on a GPU (or, with --cpu, a tiny model on the CPU): an active engine and a parked shadow under steady load, killed 10 times.

Prints, measured in the same run, over the kills:
  * kill -> shadow active (its lifecycle log line), p50 and max;
  * kill -> first token served by the shadow (a request already waiting on it), p50 and max;
  * the longest gap between tokens of in-flight streams (clients resend prompt + tokens so far);
  * the parked shadow's own GPU memory beyond the shared weights and KV;
  * the memory service SIGKILLed: kill -> engines gave their memory back to a standby that took over, and to
    a new service started cold (no standby);
  * a cold restart (new process -> first token) with HF transformers, as users run it today,
    and with understudy (fresh memory service, weights from disk).

The model (random weights, a checkpoint written once per --workdir): a Llama-3-8B shape in bf16 (default) or,
with --model qwen3-30b-a3b, a Qwen3-30B-A3B-shaped mixture of experts (bench/moe.py's shape, bf16 on disk),
8 of its 48 decoder layers unless --layers says otherwise (all 48 are a 61 GB checkpoint). --quantization fp8:
the engines quantize the weights to FP8 as they publish them into the memory service. --compare-dense: then
the same kills on the dense bf16 Llama shape, and kill -> first token of both side by side, with their ratio.

    python bench/failover.py                    # Llama-3-8B shape, 10 kills
    python bench/failover.py --layers 4 --kills 3
    python bench/failover.py --model qwen3-30b-a3b --quantization fp8 --compare-dense --workdir /tmp/us-ckpt
                                                # FP8 MoE (8 layers), then dense bf16 (32 layers): both printed
    python bench/failover.py --plot failover.png  # also: tokens of every stream over time, kills marked
    python bench/failover.py --cpu --kills 3 --plot failover_cpu.png  # tiny model, host backend
    python bench/failover.py --cpu --kills 2 --model qwen3-30b-a3b --quantization fp8 --compare-dense  # tiny MoE
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import PY, Proc  # noqa: E402  (bench/common.py)
from understudy.common.auth import admin_headers  # noqa: E402
from engine import cached_checkpoint  # noqa: E402  (bench/engine.py)
from moe import QWEN3_30B_A3B, write_model_dir  # noqa: E402  (bench/moe.py)
from moe import TINY as TINY_MOE, weight_shapes as moe_weight_shapes  # noqa: E402


def gpu_used_mib() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    return int(out.split()[0])


# One pooled client for every request of the benchmark (httpx clients are thread-safe): a client made per
# request builds an SSL context each time, which cost the load clients 100-300 ms per resend on this
# 2-core machine and put that into the "resumed" times.
HTTP = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
                    headers=admin_headers())  # /engine/generate needs the node's admin token


def stream(port: int, ids: list[int], max_tokens: int, timeout: float = 600):
    """Yield token ids from /engine/generate as they arrive."""
    body = {"token_ids": ids, "sampling": {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}}
    with HTTP.stream("POST", f"http://127.0.0.1:{port}/engine/generate", json=body, timeout=timeout) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line:
                msg = json.loads(line)
                yield from msg["token_ids"]


def routable_port(ports: list[int]) -> int:
    while True:
        for port in ports:
            try:
                if HTTP.get(f"http://127.0.0.1:{port}/health", timeout=1).json().get("routable"):
                    return port
            except (httpx.HTTPError, ValueError):
                pass
        time.sleep(0.005)  # a client's retry loop; not part of the measured path


class LoadClient(threading.Thread):
    """Runs requests one after another, each to whichever engine (or group) is routable; a broken stream is
    resent (prompt + tokens so far) at once to the other one, as the frontend resends to the node's shadow."""

    def __init__(self, ports: list[int], seed: int, max_tokens: int, vocab: int = 120000, prompt_len: int = 64):
        super().__init__(daemon=True)
        self.ports, self.seed, self.max_tokens, self.vocab, self.prompt_len = ports, seed, max_tokens, vocab, prompt_len
        self.stop = threading.Event()
        self.gaps: list[float] = []  # longest gap of each request that crossed a kill
        self.broke: list[float] = []  # when a stream broke (time.time())
        self.resumed: list[float] = []  # when a broken stream's next token came
        self.requests = 0
        self.errors: list[str] = []  # why streams broke
        self.token_times: list[float] = []  # when each token of any of its streams came (time.time()): --plot

    def run(self) -> None:
        import random

        rng = random.Random(self.seed)
        while not self.stop.is_set():
            prompt = [rng.randrange(1, self.vocab) for _ in range(self.prompt_len)]
            got: list[int] = []
            last, crossed, broken, gap = time.time(), False, False, 0.0
            port = routable_port(self.ports)
            while len(got) < self.max_tokens and not self.stop.is_set():
                try:
                    for tok in stream(port, prompt + got, self.max_tokens - len(got)):
                        now = time.time()
                        gap = max(gap, now - last) if crossed else gap
                        if broken:
                            self.resumed.append(now)
                            broken = False
                        last = now
                        got.append(tok)
                        self.token_times.append(now)
                except (httpx.HTTPError, json.JSONDecodeError) as e:
                    self.broke.append(time.time())
                    crossed = broken = True
                    self.errors.append(type(e).__name__)
                    # Resent at once to the node's other engine, which holds it until it is promoted: what the
                    # frontend does (frontend/migration.py), with no /health polling in the way.
                    # (Nobody listening there, e.g. a shadow still starting: the next routable one.)
                    port = (routable_port(self.ports) if isinstance(e, httpx.ConnectError)
                            else next(p for p in self.ports if p != port))
            if crossed:
                self.gaps.append(gap)
            self.requests += 1


def stop_clients(clients: list[LoadClient], results: dict, kills: list[float]) -> None:
    """Stop the load and put what it saw into results: the longest gap of a stream that crossed a kill, and
    when broken streams got their next token after the kill before it (kills: their time.time())."""
    for c in clients:
        c.stop.set()
    for c in clients:
        c.join(timeout=120)
    gaps = [g for c in clients for g in c.gaps]
    results["longest_gap_ms"] = max(gaps) * 1e3 if gaps else None
    results["streams_across_kills"] = len(gaps)
    results["requests"] = sum(c.requests for c in clients)
    for what in ("broke", "resumed"):
        results[f"kill_to_{what}_stream_ms"] = sorted((t - max(k for k in kills if k <= t)) * 1e3
                                                      for c in clients for t in getattr(c, what) if t >= kills[0])


def describe_streams(results: dict) -> str:
    gap, broke, resumed = (results["longest_gap_ms"], results["kill_to_broke_stream_ms"],
                           results["kill_to_resumed_stream_ms"])
    if gap is None or not resumed:
        return "no stream crossed a kill"
    return (f"{results['streams_across_kills']} streams crossed a kill ({results['requests']} requests): they broke "
            f"p50 {statistics.median(broke):.1f} ms, max {max(broke):.1f} ms after the kill; their next token came "
            f"p50 {statistics.median(resumed):.1f} ms, max {max(resumed):.1f} ms after it; longest gap in such a "
            f"stream {gap:.1f} ms")


def steps_after(events: list[dict], active: dict) -> list[dict]:
    """The promoted engine's first steps (it logs step_timing for three): when each ended after ACTIVE, and
    how long its tokens then waited for the engine's HTTP loop (step_delivered)."""
    keys = ("launch_ms", "queue_next_ms", "complete_ms", "seqs", "tokens", "graph", "queued", "cuda_mallocs")
    later = [e for e in events if e["ts"] >= active["ts"]]
    steps = [{**{k: e.get(k) for k in keys}, "ended_after_active_ms": round((e["ts"] - active["ts"]) * 1e3, 1)}
             for e in later if e.get("event") == "step_timing"][:3]
    lags = [e["lag_ms"] for e in later if e.get("event") == "step_delivered"]
    for step, lag in zip(steps, lags):  # (a step that produced no output delivers nothing: rare here)
        step["delivery_lag_ms"] = lag
    return steps


def describe_steps(steps: list[dict]) -> str:
    return "; ".join(f"{s['launch_ms']:.1f} ms ({s['seqs']} seqs, {s['tokens']} tokens{', graph' if s['graph'] else ''}"
                     f", ended {s['ended_after_active_ms']} ms after ACTIVE, its tokens waited "
                     f"{s.get('delivery_lag_ms', '?')} ms for the HTTP loop)" for s in steps)


def plot_streams(path: str, clients: list[LoadClient], kills: list[float], actives: list[float] = (),
                 memory_kill: float | None = None) -> None:
    """Tokens received by every load client over time, one line each, with the kills (and when the shadow was
    ACTIVE) marked: the whole run above, the first kill close up below, where a failover is the short flat
    step of every line between the kill and the next token (the streams resent and resumed on the shadow)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    t0 = min([t for c in clients for t in c.token_times[:1]] + kills)
    fig, (whole, close) = plt.subplots(2, 1, figsize=(10, 7.5), dpi=120, height_ratios=(3, 2))
    for i, c in enumerate(clients):
        whole.step([t - t0 for t in c.token_times], range(1, len(c.token_times) + 1), where="post", lw=1.2,
                   label=f"client {i}")
    for k, t in enumerate(kills):
        whole.axvline(t - t0, color="red", ls="--", lw=0.9, label="SIGKILL of the active engine" if k == 0 else None)
    if memory_kill is not None:
        whole.axvline(memory_kill - t0, color="purple", ls=":", lw=1.2, label="SIGKILL of the memory service")
    whole.set(xlabel="seconds", ylabel="tokens received",
              title=f"{len(clients)} streaming clients across {len(kills)} kills of the active engine")
    whole.grid(alpha=0.3)
    whole.legend(loc="upper left", fontsize=8)

    # Close up on the first kill: from as long before it as the longest wait after it for a client's next
    # token, to three such waits after it.
    kill = kills[0]
    waits = [next((t for t in c.token_times if t > kill), kill) - kill for c in clients]
    span = max(max(waits), 0.005)
    lo, hi = kill - span, kill + 3 * span
    for i, c in enumerate(clients):
        times = [t for t in c.token_times if lo <= t <= hi]
        close.step([(t - kill) * 1e3 for t in [lo] + times], range(len(times) + 1), where="post", lw=1.2,
                   label=f"client {i}")
    close.axvline(0, color="red", ls="--", lw=0.9, label="SIGKILL")
    if actives:
        close.axvline((actives[0] - kill) * 1e3, color="green", ls=":", lw=1.2, label="shadow ACTIVE")
    close.set(xlabel="ms from the first kill", ylabel="tokens since the window's start",
              title="the first kill, close up")
    close.grid(alpha=0.3)
    close.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def first_token_after(port: int, ids: list[int], t0: float) -> float:
    """Seconds from t0 (a time.time()) until a new request's first token."""
    next(stream(port, ids, 1))
    return time.time() - t0


# --model -> (its decoder layers, those run by default on a GPU): the MoE's 48 layers are a 61 GB checkpoint,
# which would take most of a run to write and read, so by default it runs 8 (11 GB). --cpu: 2 (tiny shapes).
LAYERS = {"llama3-8b": (32, 32), "qwen3-30b-a3b": (QWEN3_30B_A3B["num_hidden_layers"], 8)}


def checkpoint(work: Path, model: str, layers: int, cpu: bool) -> Path:
    """The model directory with random weights the engines serve, written once per --workdir."""
    if model == "llama3-8b":
        if cpu:
            from tests.helpers.tiny_model import make_tiny_llama

            return make_tiny_llama(work / "tiny", num_hidden_layers=layers)
        return cached_checkpoint(work, layers)
    return cached_checkpoint(work, layers, name="tiny-moe" if cpu else "qwen3-30b-a3b-shape",
                             shape=TINY_MOE if cpu else QWEN3_30B_A3B,
                             dtype=torch.float32 if cpu else torch.bfloat16, device="cpu" if cpu else "cuda",
                             write_dir=write_model_dir, weight_shapes=moe_weight_shapes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true",
                    help="a CPU run: a tiny random model of --model's family, the host backend (the times say "
                         "little; the plot shows the same shape)")
    ap.add_argument("--model", choices=list(LAYERS), default="llama3-8b",
                    help="the checkpoint's shape (random weights): Llama-3-8B, dense bf16 (default), or "
                         "Qwen3-30B-A3B, a mixture of experts (bench/moe.py's shape, bf16 on disk)")
    ap.add_argument("--quantization", choices=["none", "fp8"], default="none",
                    help="the engines' --quantization (fp8: the weights quantized to FP8 when published into the "
                         "memory service)")
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers of every model run (default: llama3-8b 32, all of them; qwen3-30b-a3b 8 of "
                         "48; --cpu: 2)")
    ap.add_argument("--compare-dense", action="store_true",
                    help="after --model's kills, the same on the dense bf16 Llama-3-8B shape (--layers or its own "
                         "default, --quantization none), then kill -> first token of both and their ratio")
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--clients", type=int, default=4, help="concurrent streaming clients (steady load)")
    ap.add_argument("--workdir", default=None, help="where the checkpoints are written, reused when given again "
                                                    "(default: a temp dir)")
    ap.add_argument("--kv-cache-memory", default=None, help="per engine (default: 8GiB on GPU, 16MiB with --cpu)")
    ap.add_argument("--prefill-attention", choices=["reference", "triton"], default=None,
                    help="the engines' --prefill-attention (default: theirs)")
    ap.add_argument("--plot", metavar="FILE.png", default=None,
                    help="also draw the tokens of every load client over time with the kills marked (matplotlib; "
                         "--model's run)")
    args = ap.parse_args()
    # This process's client threads share one GIL: with the default 5 ms switch interval a thread that got
    # its token waits for the GIL in slices of 5 ms, which would be counted as failover time.
    sys.setswitchinterval(0.0005)
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (checked now, not after the whole run)
        except ImportError:
            ap.error("--plot needs matplotlib: python -m pip install matplotlib")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="us-bench-failover-"))
    runs = [(args.model, args.quantization)] + ([("llama3-8b", "none")] if args.compare_dense else [])
    results = [measure(args, work, model, quantization, plot=args.plot if i == 0 else None)
               for i, (model, quantization) in enumerate(runs)]
    if args.compare_dense:
        (a, b) = [r["kill_to_first_token_ms"] for r in results]
        width = max(len(r["label"]) for r in results) + 1
        print()
        for r, ratio in zip(results, (f"   {args.model} / dense: p50 {statistics.median(a) / statistics.median(b):.2f}x"
                                      f", max {max(a) / max(b):.2f}x", "")):
            ft = r["kill_to_first_token_ms"]
            print(f"kill -> first token, {r['label'] + ':':<{width}} p50 {statistics.median(ft):7.1f} ms   "
                  f"max {max(ft):7.1f} ms{ratio}")


def measure(args, work: Path, model: str, quantization: str, plot: str | None) -> dict:
    """One model's run, printed as it goes: its kills, the memory service's, the cold restarts; returns the
    results (also printed as a last `json` line)."""
    cpu = args.cpu
    full, default = LAYERS[model]
    layers = args.layers or (2 if cpu else default)
    label = (f"{'tiny ' if cpu else ''}{model}, {layers} layers{'' if cpu else f' of {full}'}, "
             f"{'--quantization fp8' if quantization == 'fp8' else 'float32' if cpu else 'bf16'}")
    t0 = time.time()
    ckpt = checkpoint(work, model, layers, cpu)
    nbytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    torch.cuda.empty_cache()  # (a no-op unless the checkpoint was just drawn on the GPU here)
    print(f"\n# {label}: {nbytes / 1e9:.3g} GB checkpoint on disk ({ckpt}, ready in {time.time() - t0:.0f} s); "
          f"served with --quantization {quantization}", flush=True)
    backend, device = ("host", "cpu") if cpu else ("cuda", "cuda")
    vocab, prompt_len = (256, 16) if cpu else (120000, 64)  # 120000: within both models' vocabularies
    sock = tempfile.mkdtemp(prefix="us-", dir="/tmp")
    engine_args = ["--model", str(ckpt), "--backend", backend, "--socket-dir", sock, "--memory-service", "connect",
                   "--kv-cache-memory", args.kv_cache_memory or ("16MiB" if cpu else "8GiB"), "--max-num-seqs",
                   "16", "--max-model-len", "512" if cpu else "2048", "--standby-wait", "600", "--no-progress",
                   "--quantization", quantization]
    if args.prefill_attention:
        engine_args += ["--prefill-attention", args.prefill_attention]
    ports = [18100, 18101]

    def engine(port: int, role: str) -> Proc:
        p = Proc(PY + ["serve", "--port", str(port), "--role", role, *engine_args])
        p.wait_event("serving")
        return p

    memory = Proc(PY + ["memory-server", "--backend", backend, "--socket-dir", sock])
    memory.wait_event("listening")
    used_mib = (lambda: 0) if cpu else gpu_used_mib
    results: dict = {"model": model, "layers": layers, "quantization": quantization, "label": label,
                     "kill_to_active_ms": [], "kill_to_first_token_ms": []}
    procs: dict[int, Proc] = {}
    try:
        procs[ports[0]] = engine(ports[0], "primary")
        before = used_mib()
        procs[ports[1]] = engine(ports[1], "shadow")
        results["parked_shadow_MiB"] = used_mib() - before
        print(f"# parked shadow: {results['parked_shadow_MiB']} MiB of its own GPU memory", flush=True)
        gc.collect()  # what the bench set up stays: a full collection must not pause its client threads
        gc.freeze()
        clients = [LoadClient(ports, seed, 48, vocab=vocab, prompt_len=prompt_len) for seed in range(args.clients)]
        for c in clients:
            c.start()
        active = ports[0]
        kill_times: list[float] = []
        for k in range(args.kills):
            standby = ports[1] if active == ports[0] else ports[0]
            # A request already waiting on the shadow: its first token tells when serving resumed.
            probe_first: list[float] = []
            probe = threading.Thread(target=lambda: probe_first.append(
                (next(stream(standby, [1, 2, 3, 4], 4)), time.time())[1]), daemon=True)
            probe.start()
            time.sleep(0.5)  # steady load on the active engine before the kill
            t_kill = time.time()
            kill_times.append(t_kill)
            procs[active].kill()
            up = procs[standby].wait_event("state", new="ACTIVE")
            probe.join(timeout=60)
            phases = next((e for e in procs[standby].events if e.get("event") == "kv_adopt_timing"), {})
            results.setdefault("adopt_phases", []).append({k: phases.get(k) for k in
                                                           ("lock_ms", "map_pool_ms")})
            results["kill_to_active_ms"].append((up["ts"] - t_kill) * 1e3)
            results["kill_to_first_token_ms"].append((probe_first[0] - t_kill) * 1e3)
            print(f"kill {k + 1}: -> active {results['kill_to_active_ms'][-1]:.1f} ms, -> first token "
                  f"{results['kill_to_first_token_ms'][-1]:.1f} ms (switch {up.get('switch_s', 0) * 1e3:.1f} ms, "
                  f"restored {up.get('restored_blocks')} cached blocks; kv pool lock {phases.get('lock_ms')} ms, "
                  f"map pool {phases.get('map_pool_ms')} ms)",
                  flush=True)
            steps = steps_after(procs[standby].events, up)
            results.setdefault("first_steps", []).append(steps)
            print(f"    steps after promotion: {describe_steps(steps)}", flush=True)
            # The same request once the dead engine is gone, under the same load: an ordinary first token.
            results.setdefault("settled_first_token_ms", []).append(first_token_after(standby, [1, 2, 3, 4], time.time()) * 1e3)
            procs[active] = engine(active, "shadow")  # the replacement parks as the new shadow
            active = standby
        # The memory service dies under load: the engines give the next one what they map (16 GB of
        # weights, the KV) without reading the disk. First a standby (`memory-server --standby`, started
        # up and waiting on the lock, as `understudy up` runs one) takes over; then that one is killed
        # with no standby, and a new one is started cold (the old path, the baseline).
        memory_kill = None
        for path in ("standby", "cold"):
            if path == "standby":
                nxt = Proc(PY + ["memory-server", "--standby", "--backend", backend, "--socket-dir", sock])
                nxt.wait_event("standby_waiting")
            t_kill = time.time()
            memory_kill = memory_kill or t_kill
            memory.kill()
            if path == "cold":
                nxt = Proc(PY + ["memory-server", "--backend", backend, "--socket-dir", sock])
            # The standby wakes when the kernel drops the dead one's lock (after it unmapped its memory).
            took = nxt.wait_event("standby_took_over") if path == "standby" else None
            listening = nxt.wait_event("listening")
            memory = nxt
            rec = procs[active].wait_event("memory_service_recovered", timeout=120)
            results[f"memory_{path}"] = {"kill_to_recovered_ms": (rec["ts"] - t_kill) * 1e3,
                                         "kill_to_listening_ms": (listening["ts"] - t_kill) * 1e3,
                                         "weights": rec["weights"], "kv": rec.get("kv"),
                                         "lost_to_recovered_s": rec["seconds"], "give_back_ms": rec.get("give_back_ms"),
                                         "kill_to_took_over_ms": took and (took["ts"] - t_kill) * 1e3}
            standby = ports[1] if active == ports[0] else ports[0]
            procs[standby].wait_event("memory_service_recovered", timeout=120)  # both back before the next kill
            print(f"memory service killed, {path} path: engines recovered {results[f'memory_{path}']}", flush=True)
        stop_clients(clients, results, kill_times)
        if plot:
            actives = [k + ms / 1e3 for k, ms in zip(kill_times, results["kill_to_active_ms"])]
            plot_streams(plot, clients, kill_times, actives, memory_kill)
            print(f"plot: {plot}", flush=True)
    finally:
        for p in procs.values():
            p.kill(signal.SIGTERM)
        memory.kill(signal.SIGTERM)

    # Cold restarts, measured the same way as shared/probes/cold_start_baseline.py.
    code = ("import time; t0=time.time(); import torch; from transformers import AutoModelForCausalLM; "
            f"m=AutoModelForCausalLM.from_pretrained('{ckpt}', dtype=torch.bfloat16, device_map='{device}'); "
            f"m.generate(torch.tensor([[1,2,3,4]], device='{device}'), max_new_tokens=1, do_sample=False); "
            "torch.cuda.is_available() and torch.cuda.synchronize(); print('first_token', time.time())")
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    results["cold_hf_s"] = float(out.stdout.split("first_token")[-1]) - t0 if "first_token" in out.stdout else None
    if results["cold_hf_s"] is None:  # (a transformers that cannot build this model): the rest still runs
        print(f"cold restart, HF transformers failed; skipped:\n{out.stderr[-3000:]}", flush=True)
    sock2 = tempfile.mkdtemp(prefix="us-", dir="/tmp")
    t0 = time.time()
    memory = Proc(PY + ["memory-server", "--backend", backend, "--socket-dir", sock2])
    memory.wait_event("listening")
    cold = Proc(PY + ["serve", "--port", "18102", *[a if a != sock else sock2 for a in engine_args]])
    cold.wait_event("serving")
    next(stream(18102, [1, 2, 3, 4], 1))
    results["cold_understudy_s"] = time.time() - t0
    cold.kill(signal.SIGTERM)
    memory.kill(signal.SIGTERM)

    ft, act = results["kill_to_first_token_ms"], results["kill_to_active_ms"]
    print(f"\n# {label}")
    print(f"kill -> shadow active:      p50 {statistics.median(act):7.1f} ms   max {max(act):7.1f} ms")
    print(f"kill -> first token:        p50 {statistics.median(ft):7.1f} ms   max {max(ft):7.1f} ms")
    settled = results["settled_first_token_ms"]
    print(f"the same request's first token once the dead engine is gone (same load): p50 "
          f"{statistics.median(settled):7.1f} ms   max {max(settled):7.1f} ms")
    print(f"in-flight streams: {describe_streams(results)}")
    print(f"parked shadow GPU memory (own): {results['parked_shadow_MiB']} MiB")
    mr = results["memory_standby"]
    print(f"memory service SIGKILL -> standby took over and was given back the memory: "
          f"{mr['kill_to_recovered_ms']:.0f} ms (weights {mr['weights']}, kv {mr['kv']}; took over "
          f"{mr['kill_to_took_over_ms']:.0f} ms and listening {mr['kill_to_listening_ms']:.0f} ms after the kill, "
          f"handing it over took {mr['give_back_ms']} ms)")
    mr = results["memory_cold"]
    print(f"memory service SIGKILL -> new one started and given back the memory: {mr['kill_to_recovered_ms']:.0f} ms "
          f"(cold start, no standby; weights {mr['weights']}, kv {mr['kv']}; listening "
          f"{mr['kill_to_listening_ms']:.0f} ms after the kill, handing it over took {mr['give_back_ms']} ms)")
    hf = results["cold_hf_s"]
    print(f"cold restart, HF transformers{' (bf16: it does not quantize)' if quantization == 'fp8' else ''}: "
          f"{'failed' if hf is None else f'{hf:.2f} s'}; understudy (fresh memory service): "
          f"{results['cold_understudy_s']:.2f} s")
    if hf is not None:
        print(f"cold restart (HF) / failover first token p50: {hf * 1e3 / statistics.median(ft):.0f}x")
    print("json", json.dumps(results), flush=True)
    return results


if __name__ == "__main__":
    main()

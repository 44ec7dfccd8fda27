"""What the benchmarks share: a baseline, and children whose JSON log lines can be awaited."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

PY = [sys.executable, "-m", "understudy"]

# The repository root, once for every bench script that imports this module: `python bench/x.py` puts only
# bench/ on sys.path, and the scripts take the tests' helpers as the tests do (`from tests.helpers.tiny_model
# import ...`).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(1, ROOT)

# A bench stopped with SIGTERM (`timeout`, a CI job's end) unwinds like Ctrl-C, so its `finally` blocks stop
# the children it started: a memory service runs in a session of its own and would otherwise keep the device's
# memory from the next run.
signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


class Proc:
    """A child in a process group of its own whose JSON log lines (stderr) are kept: `events` has them
    all, `wait_event` blocks until one matches; other lines (tracebacks) go to `other`, stdout to `stdout`."""

    def __init__(self, argv: list[str], env: dict | None = None):
        self.t0 = time.time()
        self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, start_new_session=True, env={**os.environ, **(env or {})})
        self.lines: queue.Queue = queue.Queue()
        self.events: list[dict] = []
        self.other: list[str] = []
        self.stdout: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=lambda: self.stdout.extend(self.p.stdout), daemon=True).start()

    def _pump(self) -> None:
        for line in self.p.stderr:
            try:
                e = json.loads(line)
            except ValueError:
                e = None
            if not isinstance(e, dict):
                self.other.append(line)
                continue
            self.events.append(e)
            self.lines.put(e)
        self.lines.put(None)

    def wait_event(self, name: str, timeout: float = 900, **fields) -> dict:
        deadline = time.time() + timeout
        while True:
            e = self.lines.get(timeout=max(0.1, deadline - time.time()))
            if e is None:
                raise RuntimeError(f"{self.p.args[:5]} exited ({self.p.wait()}) before {name}:\n"
                                   + "".join(self.other[-30:]))
            if e.get("event") == name and all(e.get(k) == v for k, v in fields.items()):
                return e

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group and reap the child."""
        if self.p.poll() is None:
            os.killpg(self.p.pid, sig)
        self.p.wait()

    def stop(self) -> None:
        """SIGTERM (a clean stop), SIGKILL after 60 s."""
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned_h2d_seconds(nbytes: int) -> float:
    """Seconds to copy `nbytes` from pinned host memory to the GPU (after one warm-up copy)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def copy_bandwidth(device) -> float:
    """Device memory bandwidth in bytes/s, counting the bytes read and written by a large copy (4 GiB on a
    GPU, 256 MiB on the CPU), after one warm-up copy."""
    import torch

    device = torch.device(device)
    n = (4 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync = device_sync(device)
    sync()
    t0 = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    sync()
    bw = 2 * 5 * n / (time.perf_counter() - t0)
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return bw


def device_sync(device):
    """A function that waits for the device's queued work (nothing to wait for on the CPU)."""
    import torch

    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def decode_steps(engine, batch: int, prompt_len: int, tokens: int, vocab: int, sync, before_decode=None) -> dict:
    """`batch` greedy requests of random prompts stepped to the end; step_stats of the decode steps (steps with
    no prefill in them: prefill steps are not timed). A step's time is the interval between the returns of
    engine.step() (which returns once the step's tokens are on the host), with no device sync in between: an
    engine that queues the next step before reading this one's tokens keeps the device busy across steps, and
    a sync would take that away. before_decode(engine), not timed, runs before each decode step; when it
    returns True it stepped the engine itself and the loop looks again."""
    import torch

    from understudy.engine.core.sampling import SamplingParams

    gen = torch.Generator().manual_seed(batch)
    for r in range(batch):
        engine.add_request(f"b{batch}-{r}", torch.randint(0, vocab, (prompt_len,), generator=gen).tolist(),
                           SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
    seconds, decoded = [], []
    sync()
    last = time.perf_counter()
    while engine.has_work:
        prefill = any(s.num_pending > 1 for s in engine.scheduler.running) or engine.scheduler.waiting
        if not prefill and before_decode is not None and before_decode(engine):
            sync()
            last = time.perf_counter()
            continue
        outs = engine.step()
        now = time.perf_counter()
        if not prefill:
            seconds.append(now - last)
            decoded.append(sum(len(o.new_token_ids) for o in outs))
        last = now
    sync()
    return step_stats(seconds, decoded)


def step_stats(seconds: list[float], tokens: list[int]) -> dict:
    """Decode steps summed up. The headline is the median step (`tok_s`: the median step's tokens over its
    time), so that one slow step (a JIT compile, a GC pause, an allocator growth) moves it little; the mean
    (all tokens over all the time) and the slowest step are kept next to it."""
    import statistics

    rates = sorted(n / s for n, s in zip(tokens, seconds))
    return {"steps": len(seconds), "tok_s": statistics.median(rates), "mean_tok_s": sum(tokens) / sum(seconds),
            "median_ms": statistics.median(seconds) * 1e3, "mean_ms": statistics.fmean(seconds) * 1e3,
            "max_ms": max(seconds) * 1e3}


def fmt_steps(s: dict) -> str:
    """One line of step_stats: '123.4 tok/s (median step 8.10 ms; mean 8.30 ms = 120.5 tok/s; max 9.90 ms)'."""
    return (f"{s['tok_s']:>9.1f} tok/s (median step {s['median_ms']:.2f} ms; mean {s['mean_ms']:.2f} ms = "
            f"{s['mean_tok_s']:.1f} tok/s; max {s['max_ms']:.2f} ms, {s['steps']} steps)")


def recapture_graphs(engine) -> None:
    """Capture the engine's CUDA graphs anew, with the buckets it had (after a change to what its kernels
    launch: PDL, a kernel variant); nothing without graphs."""
    if engine.graphs is not None:
        engine.enable_cuda_graphs(mixed_steps=bool(engine.graphs.mixed_buckets))


def without_pdl(engine, measure):
    """measure(engine) with programmatic dependent launch off (layers/pdl.py: every kernel waits for the one before
    to end before it is placed; the engine's CUDA graphs are captured again without it), then PDL on again
    with graphs captured anew: what PDL is worth, in the same run. Returns measure's result."""
    from understudy.engine.layers import pdl

    def recapture(enabled: bool) -> None:
        pdl.ENABLED = enabled
        recapture_graphs(engine)

    recapture(False)
    try:
        return measure(engine)
    finally:
        recapture(True)


def profile_steps(step, steps: int, label: str, top: int = 18) -> dict:
    """Run step() `steps` times under torch.profiler (CUDA kernels included, those inside CUDA graph replays
    too) and print where each step's time goes: its wall time (step() returns after a device sync), the sum
    of its kernels' durations, the gap between them (wall - kernels: host work, launches and syncs the device
    waited for) and the `top` kernels by time per step. Returns those numbers (ms per step)."""
    import collections
    import tempfile

    import torch
    from torch.profiler import ProfilerActivity, profile

    walls = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t0)
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.load(open(f.name))
    events = trace.get("traceEvents", [])
    kernels = sorted((e for e in events if e.get("cat") == "kernel" and "dur" in e), key=lambda e: e["ts"])
    runtime: dict[str, list[float]] = collections.defaultdict(list)  # CUDA API calls on the host
    for e in events:
        if e.get("cat") == "cuda_runtime" and "dur" in e:
            runtime[e["name"]].append(e["dur"])
    # The device's idle stretches between kernels (the first kernel's start to the last one's end): what the
    # gap is made of, with the kernels on either side of the longest ones.
    idle = [(b["ts"] - (a["ts"] + a["dur"]), a["name"], b["name"]) for a, b in zip(kernels, kernels[1:])]
    idle = [g for g in idle if g[0] > 2.0]
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for k in kernels:
        by_name[k["name"]].append(k["dur"])  # µs
    total_us = sum(sum(d) for d in by_name.values())
    wall_ms = sum(walls) / steps * 1e3
    kernel_ms = total_us / steps / 1e3
    print(f"# {label}: {steps} steps; per step: wall {wall_ms:.3f} ms, kernels {kernel_ms:.3f} ms "
          f"({len(kernels) / steps:.0f} launches), gap {wall_ms - kernel_ms:.3f} ms "
          f"(host work and launches the device waited for)", flush=True)
    for name, durs in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]:
        print(f"#   {sum(durs) / steps:9.1f} us/step {len(durs) / steps:6.1f} calls/step {sum(durs) / len(durs):8.2f} us/call"
              f"  {sum(durs) / total_us:5.1%}  {name[:90]}", flush=True)
    print(f"#   device idle between its kernels: {sum(g[0] for g in idle) / steps:.1f} us/step in "
          f"{len(idle) / steps:.1f} stretches over 2 us; the longest:", flush=True)
    for g, before, after in sorted(idle, reverse=True)[:6]:
        print(f"#     {g:8.1f} us  after {before[:45]}  before {after[:45]}", flush=True)
    print("#   host CUDA API calls per step: " + ", ".join(
        f"{name} {sum(d) / steps:.0f} us ({len(d) / steps:.0f}x)"
        for name, d in sorted(runtime.items(), key=lambda kv: -sum(kv[1]))[:6]), flush=True)
    return {"wall_ms": wall_ms, "kernel_ms": kernel_ms, "gap_ms": wall_ms - kernel_ms,
            "launches": len(kernels) / steps}


def profile_engine(engine, label: str, *, batch: int = 1, prompt_len: int = 32, vocab: int,
                   prefill_lens: tuple[int, ...] = (), steps: int = 5) -> None:
    """profile_steps of an idle engine's work: one prefill of each of `prefill_lens` random tokens (the step
    that gives the first token), then `steps` decode steps of `batch` sequences."""
    import torch

    from understudy.engine.core.sampling import SamplingParams

    gen = torch.Generator().manual_seed(4242)
    greedy = dict(temperature=0, ignore_eos=True)
    for n in prefill_lens:
        # one untimed prefill of this length first: first-call costs (autotuning, allocator growth) stay out
        for tag in ("warm", "timed"):
            engine.add_request(f"prof-{tag}-{n}", torch.randint(0, vocab, (n,), generator=gen).tolist(),
                               SamplingParams(max_tokens=1, **greedy))
            if tag == "timed":
                profile_steps(engine.step, 1, f"{label}: prefill of {n} tokens")
            while engine.has_work:
                engine.step()
    for r in range(batch):
        engine.add_request(f"prof-{r}", torch.randint(0, vocab, (prompt_len,), generator=gen).tolist(),
                           SamplingParams(max_tokens=steps + 8, **greedy))
    while any(s.num_pending > 1 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    engine.step()
    profile_steps(engine.step, steps, f"{label}: decode at batch {batch}")
    while engine.has_work:
        engine.step()

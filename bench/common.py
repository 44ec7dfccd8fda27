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
    no prefill in them: prefill steps are not timed). before_decode(engine), not timed, runs before each decode
    step; when it returns True it stepped the engine itself and the loop looks again."""
    import torch

    from understudy.engine.core.sampling import SamplingParams

    gen = torch.Generator().manual_seed(batch)
    for r in range(batch):
        engine.add_request(f"b{batch}-{r}", torch.randint(0, vocab, (prompt_len,), generator=gen).tolist(),
                           SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
    seconds, decoded = [], []
    while engine.has_work:
        prefill = any(s.num_pending > 1 for s in engine.scheduler.running) or engine.scheduler.waiting
        if not prefill and before_decode is not None and before_decode(engine):
            continue
        sync()
        t0 = time.perf_counter()
        outs = engine.step()
        sync()
        if not prefill:
            seconds.append(time.perf_counter() - t0)
            decoded.append(sum(len(o.new_token_ids) for o in outs))
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

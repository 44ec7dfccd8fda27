"""Whole-group failover of a tensor-parallel engine: an active TP group and a parked standby group under load.

One memory service per device; the active group (`serve --tensor-parallel N --role primary`) and a standby
group (`--role shadow`) on the same devices. Under steady load (clients streaming and resending prompt +
tokens so far when a stream breaks) a rank of the active group is SIGKILLed, alternately the leader
(rank 0: its workers die with it) and a worker (rank N-1: its leader sees it and ends the group); the
standby group takes over and the dead group is relaunched as the next standby.

Prints, measured in the same run:
  * kill -> first token of the promoted group (a request already waiting on it), p50 and max, and
    kill -> promoted group ACTIVE;
  * restart without a standby: the active group killed, a new group started on the same memory services
    (weights imported, KV adopted) -> first token;
  * cold restart of the group: fresh memory services, weights from disk -> first token;
  * the parked standby group's own GPU memory beyond the shared weights and KV (GPU only).

    python bench/tp_failover.py                      # 2 GPUs: Llama-3-8B shape (bf16), TP=2, 5 kills
    python bench/tp_failover.py --layers 8 --kills 3
    python bench/tp_failover.py --model qwen3-30b-a3b  # the MoE shape (8 layers), experts split over the ranks
    python bench/tp_failover.py --cpu                # smoke check: tiny model, host backend, gloo
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import PY, Proc  # noqa: E402  (bench/common.py)
from failover import (LAYERS, LoadClient, checkpoint, describe_steps, describe_streams,  # noqa: E402  (bench/failover.py)
                      first_token_after, steps_after, stop_clients)


def gpu_used_mib() -> list[int]:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


class Group:
    """One `serve --tensor-parallel N` process tree (the leader's stderr carries every rank's log lines)."""

    def __init__(self, port: int, role: str, engine_args: list[str]):
        self.port = port
        self.proc = Proc(PY + ["serve", "--port", str(port), "--role", role, *engine_args])

    def wait(self, *events: str) -> "Group":
        """Until each of `events` was logged, in any order ("serving" comes once the port accepts)."""
        for event in events:
            if not any(e.get("event") == event for e in self.proc.events):
                self.proc.wait_event(event)
        started = next(e for e in self.proc.events if e.get("event") == "tp_group_started")
        self.ranks = [started["ranks"][str(r)] for r in range(len(started["ranks"]))]
        return self

    def kill_rank(self, rank: int) -> None:
        os.kill(self.ranks[rank], signal.SIGKILL)

    def stop(self, sig=signal.SIGKILL) -> None:
        self.proc.kill(sig)  # the whole process group: leader and workers


def prepare(args: argparse.Namespace) -> tuple[str, Path, int]:
    """Environment and checkpoint of a TP bench (args: --cpu, --model, --layers, --workdir):
    (memory backend, checkpoint directory, vocabulary size)."""
    # This host's GPUs are shared: NVLink multicast stays off (KINDS.md of the device machines).
    for k, v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ.setdefault(k, v)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="us-bench-tp-"))
    if args.cpu:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.cpu and args.model == "llama3-8b":
        from tests.helpers.tiny_model import make_tiny_llama  # the tests' tiny Llama (4 heads / 2 KV heads divide by 2)

        ckpt = make_tiny_llama(work / "tiny-llama", max_position_embeddings=4096)
    else:  # bench/failover.py's: the Llama-3-8B shape, or the Qwen3-30B-A3B-shaped MoE (--cpu: a tiny one)
        ckpt = checkpoint(work, args.model, args.layers or (2 if args.cpu else LAYERS[args.model][1]), args.cpu)
    return ("host" if args.cpu else "cuda"), ckpt, json.loads((ckpt / "config.json").read_text())["vocab_size"]


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """--model and --layers of the TP benches (bench/failover.py's models)."""
    ap.add_argument("--model", choices=list(LAYERS), default="llama3-8b",
                    help="the checkpoint's shape (random weights): Llama-3-8B, dense bf16 (default), or Qwen3-30B-A3B, "
                         "a mixture of experts whose experts' intermediate dimension the ranks share")
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers (default: llama3-8b 32; qwen3-30b-a3b 8 of 48, as bench/failover.py; "
                         "--cpu: 2 of the tiny MoE, the tiny Llama's own)")


def memory_services(backend: str, tp: int, sock: str) -> list[Proc]:
    """One memory service per device (0..tp-1), listening."""
    mems = [Proc(PY + ["memory-server", "--backend", backend, "--device", str(d), "--socket-dir", sock])
            for d in range(tp)]
    for m in mems:
        m.wait_event("listening")
    return mems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="smoke check on the CPU: tiny model, host backend, gloo")
    ap.add_argument("--tensor-parallel", type=int, default=2, help="ranks per group (default: 2)")
    add_model_args(ap)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--clients", type=int, default=4, help="concurrent streaming clients (steady load)")
    ap.add_argument("--max-tokens", type=int, default=48, help="tokens per client request")
    ap.add_argument("--kv-cache-memory", default=None, help="per rank (default: 8GiB on GPU, 32MiB on the CPU)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--prefill-attention", choices=["reference", "triton"], default=None,
                    help="the groups' --prefill-attention (default: theirs)")
    args = ap.parse_args()
    backend, ckpt, vocab = prepare(args)
    tp = args.tensor_parallel
    kv = args.kv_cache_memory or ("32MiB" if args.cpu else "8GiB")

    def engine_args(sock: str) -> list[str]:
        return ["--model", str(ckpt), "--backend", backend, "--socket-dir", sock, "--memory-service", "connect",
                "--tensor-parallel", str(tp), "--kv-cache-memory", kv, "--max-num-seqs", "16",
                "--max-model-len", "2048", "--standby-wait", "600", "--no-progress"] + (
                    ["--prefill-attention", args.prefill_attention] if args.prefill_attention else [])

    sock = tempfile.mkdtemp(prefix="us-", dir="/tmp")
    ports = [18200, 18201]
    probe = [1, 2, 3, 4, 5, 6, 7, 8]
    results: dict = {"device": "cpu (host backend, gloo)" if args.cpu else "cuda (NCCL)", "model": args.model,
                     "tensor_parallel": tp,
                     "kills": [], "kill_to_first_token_ms": [], "kill_to_active_ms": []}
    mems = memory_services(backend, tp, sock)
    groups: dict[int, Group] = {}
    try:
        t0 = time.time()
        groups[ports[0]] = Group(ports[0], "primary", engine_args(sock)).wait("serving")
        results["first_start_s"] = time.time() - t0
        before = None if args.cpu else gpu_used_mib()
        groups[ports[1]] = Group(ports[1], "shadow", engine_args(sock)).wait("waiting_for_failover_lock", "serving")
        if before is not None:
            results["parked_group_MiB_per_gpu"] = [a - b for a, b in zip(gpu_used_mib(), before)][:tp]
            print(f"# parked standby group: {results['parked_group_MiB_per_gpu']} MiB of its own per GPU", flush=True)
        clients = [LoadClient(ports, seed, args.max_tokens, vocab, 64) for seed in range(args.clients)]
        for c in clients:
            c.start()
        active = ports[0]
        kill_times: list[float] = []
        for k in range(args.kills):
            standby = ports[1] if active == ports[0] else ports[0]
            target = 0 if k % 2 == 0 else tp - 1  # the leader, then a worker, ...
            # A request already waiting on the standby group: its first token says when serving resumed.
            first: list[float] = []
            waiting = threading.Thread(target=lambda: first.append(first_token_after(standby, probe, 0.0)),
                                       daemon=True)
            waiting.start()
            time.sleep(0.5)  # steady load on the active group before the kill
            dead = groups[active]
            t_kill = time.time()
            kill_times.append(t_kill)
            dead.kill_rank(target)
            up = groups[standby].proc.wait_event("state", new="ACTIVE")
            waiting.join(timeout=120)
            rc = dead.proc.p.wait(timeout=60)
            # The same request once the dead group is gone, under the same load: an ordinary first token.
            results.setdefault("settled_first_token_ms", []).append(first_token_after(standby, probe, time.time()) * 1e3)
            events = groups[standby].proc.events
            adopted = next((e for e in events if e.get("event") == "tp_group_adopted"), {})
            waking = next((e for e in events if e.get("event") == "state" and e.get("new") == "WAKING"), {})
            steps = steps_after(events, up)
            results["kill_to_active_ms"].append((up["ts"] - t_kill) * 1e3)
            results["kill_to_first_token_ms"].append((first[0] - t_kill) * 1e3)
            results["kills"].append({"rank": target, "dead_group_exit": rc, "switch_ms": up.get("switch_s", 0) * 1e3,
                                     "restored_blocks": up.get("restored_blocks"),
                                     "rank_adopt_s": adopted.get("rank_seconds"),
                                     "kill_to_lock_ms": (waking["ts"] - t_kill) * 1e3 if waking else None,
                                     "first_steps": steps})
            print(f"kill {k + 1} (rank {target}): -> active {results['kill_to_active_ms'][-1]:.1f} ms, -> first "
                  f"token {results['kill_to_first_token_ms'][-1]:.1f} ms (dead group exit {rc}; switch "
                  f"{up.get('switch_s', 0) * 1e3:.1f} ms, per-rank kv adopt {adopted.get('rank_seconds')} s, "
                  f"restored {up.get('restored_blocks')} cached blocks)", flush=True)
            print(f"    lock taken {results['kills'][-1]['kill_to_lock_ms']:.1f} ms after the kill; steps after "
                  f"promotion: {describe_steps(steps)}; the same request later: "
                  f"{results['settled_first_token_ms'][-1]:.1f} ms", flush=True)
            groups[active] = Group(active, "shadow", engine_args(sock)).wait("waiting_for_failover_lock", "serving")
            active = standby
        stop_clients(clients, results, kill_times)

        # Restart without a standby: the group dies, a new one starts on the same memory services.
        groups.pop(ports[1] if active == ports[0] else ports[0]).stop()
        dead = groups.pop(active)
        t0 = time.time()
        dead.kill_rank(0)
        dead.proc.p.wait()
        restarted = Group(active, "primary", engine_args(sock)).wait("serving")
        results["restart_same_memory_s"] = first_token_after(active, probe, t0)
        restarted.stop(signal.SIGTERM)
    finally:
        for g in groups.values():
            g.stop()
        for m in mems:
            m.kill(signal.SIGTERM)

    # Cold restart of the group: fresh memory services, weights from the disk (page cache).
    sock2 = tempfile.mkdtemp(prefix="us-", dir="/tmp")
    t0 = time.time()
    mems = memory_services(backend, tp, sock2)
    try:
        cold = Group(ports[0], "primary", engine_args(sock2)).wait("serving")
        results["cold_restart_s"] = first_token_after(ports[0], probe, t0)
        cold.stop(signal.SIGTERM)
    finally:
        for m in mems:
            m.kill(signal.SIGTERM)

    for d in (sock, sock2):  # the stopped services' sockets and the lock files
        shutil.rmtree(d, ignore_errors=True)
    ft, act = results["kill_to_first_token_ms"], results["kill_to_active_ms"]
    print()
    print(f"TP={tp} on {results['device']}, {args.kills} kills under {args.clients} streaming clients")
    print(f"kill -> promoted group active:      p50 {statistics.median(act):8.1f} ms   max {max(act):8.1f} ms")
    print(f"kill -> first token (promoted):     p50 {statistics.median(ft):8.1f} ms   max {max(ft):8.1f} ms")
    settled = results["settled_first_token_ms"]
    print(f"the same request once the dead group is gone:  p50 {statistics.median(settled):8.1f} ms   "
          f"max {max(settled):8.1f} ms")
    for rank in sorted({k['rank'] for k in results['kills']}):
        mine = [f for f, k in zip(ft, results["kills"]) if k["rank"] == rank]
        print(f"  rank {rank} killed ({len(mine)}x):           p50 {statistics.median(mine):8.1f} ms   "
              f"max {max(mine):8.1f} ms")
    print(f"in-flight streams: {describe_streams(results)}")
    print(f"restart of the group, no standby (weights in the memory services): "
          f"{results['restart_same_memory_s']:.2f} s")
    print(f"cold restart of the group (fresh memory services, weights from disk): {results['cold_restart_s']:.2f} s")
    print(f"cold restart / failover first token p50: {results['cold_restart_s'] * 1e3 / statistics.median(ft):.0f}x")
    print("json", json.dumps(results))


if __name__ == "__main__":
    main()

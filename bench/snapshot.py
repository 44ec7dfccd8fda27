"""Snapshot / restore of a parked shadow on a GPU: cold start vs restore from the image, in one run.

A memory service and an active engine hold a Llama-3-8B-shaped model (random bf16 weights); then:
  * cold start of a shadow: process start -> parked (its `waiting_for_failover_lock` log line);
  * `understudy snapshot checkpoint` of that shadow (quiesce, CUDA checkpoint, CRIU dump, resume):
    the image size and the phases;
  * the shadow is SIGKILLed and reaped, then `understudy snapshot restore` (-> parked, STANDBY),
    --repeats times (each restored engine is killed before the next restore);
  * a check that the restored shadow works: the active engine is killed, the restored shadow takes
    over and serves a request.
Goals (issue 6): restore -> parked <= 2 s; image <= 2 GiB; cold / restore >= 10x.

    python bench/snapshot.py                      # GPU: Llama-3-8B shape (needs ./.criu: scripts/install-criu.sh)
    python bench/snapshot.py --cpu                # a smoke run on the CPU: host backend, the default tiny model
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
import time
from pathlib import Path

import httpx
from understudy.common.auth import admin_headers

sys.path.insert(0, str(Path(__file__).parent))
from common import PY, Proc  # noqa: E402  (bench/common.py)
PR_SET_CHILD_SUBREAPER = 36


def kill_reap(pid: int) -> None:
    """SIGKILL and reap (this process is a subreaper: restored engines are its children)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        while Path(f"/proc/{pid}").exists():  # not ours to reap: wait for whoever is
            time.sleep(0.01)


def anon_kib(pid: int) -> int:
    """Resident anonymous + dirty private memory of a process (what CRIU writes), KiB."""
    total = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Anonymous:",)):
            total += int(line.split()[1])
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="smoke run: host backend, the default (tiny) model")
    ap.add_argument("--layers", type=int, default=32, help="GPU model layers (default: 32, Llama-3-8B)")
    ap.add_argument("--repeats", type=int, default=3, help="restores (default: 3)")
    ap.add_argument("--kv-cache-memory", default=None, help="default: 8GiB on the GPU, 64MiB on the CPU")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    import ctypes

    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="us-bench-snapshot-"))
    work.mkdir(parents=True, exist_ok=True)
    backend = "host" if args.cpu else "cuda"
    engine_args = ["--backend", backend, "--memory-service", "connect", "--no-progress", "--standby-wait", "600",
                   "--kv-cache-memory", args.kv_cache_memory or ("64MiB" if args.cpu else "8GiB")]
    env = {"OMP_NUM_THREADS": "1"} if args.cpu else {}
    if args.cpu:
        engine_args += ["--max-model-len", "512"]
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        from engine import make_checkpoint, write_byte_tokenizer  # bench/engine.py

        ckpt = work / "llama3-8b-shape"
        ckpt.mkdir(parents=True, exist_ok=True)
        if not (ckpt / "done").exists():
            make_checkpoint(ckpt, args.layers)
            (ckpt / "done").touch()
        if not (ckpt / "tokenizer.json").exists():
            write_byte_tokenizer(ckpt)
        engine_args += ["--model", str(ckpt), "--max-model-len", "2048", "--max-num-seqs", "16"]
    sock = tempfile.mkdtemp(prefix="us-", dir="/tmp")
    engine_args += ["--socket-dir", sock]
    image = work / "image"
    ports = (18200, 18201)
    results: dict = {}
    memory = Proc(PY + ["memory-server", "--backend", backend, "--socket-dir", sock])
    memory.wait_event("listening")
    primary = shadow = None
    restored_pids: list[int] = []
    try:
        primary = Proc(PY + ["serve", "--port", str(ports[0]), "--role", "primary", *engine_args], env)
        primary.wait_event("serving")

        # Cold start of a shadow: process start -> parked.
        shadow = Proc(PY + ["serve", "--port", str(ports[1]), "--role", "shadow", *engine_args], env)
        parked = shadow.wait_event("waiting_for_failover_lock")
        results["cold_start_s"] = parked["ts"] - shadow.t0
        print(f"cold start (process start -> parked): {results['cold_start_s']:.2f} s", flush=True)
        results["shadow_anonymous_MiB"] = anon_kib(shadow.p.pid) / 1024

        # Checkpoint (the shadow goes on parked).
        t0 = time.time()
        ck = subprocess.run(PY + ["snapshot", "checkpoint", "--pid", str(shadow.p.pid), "--dir", str(image)],
                            capture_output=True, text=True)
        if ck.returncode != 0:
            raise RuntimeError(f"checkpoint failed:\n{ck.stderr[-3000:]}")
        ckpt_out = json.loads(ck.stdout.strip().splitlines()[-1])
        results["checkpoint_wall_s"] = time.time() - t0
        results["image_bytes"] = ckpt_out["bytes"]
        results["checkpoint_phases"] = {k: v for k, v in ckpt_out.items() if k.endswith("_s")}
        print(f"checkpoint: {results['checkpoint_wall_s']:.2f} s wall, phases {results['checkpoint_phases']}, "
              f"image {results['image_bytes'] / (1 << 20):.1f} MiB", flush=True)
        biggest = sorted(((f.stat().st_size, f.name) for f in (image / "criu").glob("*.img")), reverse=True)[:4]
        print("  largest image files: " + ", ".join(f"{n} {s / (1 << 20):.1f} MiB" for s, n in biggest), flush=True)
        shadow.p.kill()  # SIGKILL; then reaped: the image's pids must be free
        shadow.p.wait()

        # Restore -> parked, --repeats times.
        walls, internal = [], []
        restored = None
        for k in range(args.repeats):
            if restored is not None:
                kill_reap(restored_pids[-1])
            t0 = time.time()
            restored = Proc(PY + ["snapshot", "restore", "--dir", str(image)])
            done = restored.wait_event("restored")
            walls.append(time.time() - t0)
            internal.append(done["seconds"])
            restored_pids.append(done["pid"])
            assert done["state"] == "STANDBY", done
            print(f"restore {k + 1}: command start -> parked {walls[-1]:.2f} s (criu restore {done['criu_restore_s']} s, "
                  f"cuda restore {done['cuda_restore_s']} s, restore -> parked {done['seconds']} s)", flush=True)
        results["restore_wall_s"], results["restore_s"] = walls, internal
        h = httpx.get(f"http://127.0.0.1:{ports[1]}/health", timeout=30).json()
        assert (h["state"], h["weights"]) == ("STANDBY", "imported"), h

        # The restored shadow takes over and serves.
        t_kill = time.time()
        os.killpg(primary.p.pid, signal.SIGKILL)
        primary.p.wait()
        active = restored.wait_event("state", new="ACTIVE")
        r = httpx.post(f"http://127.0.0.1:{ports[1]}/engine/generate", timeout=300, headers=admin_headers(), json={
            "token_ids": [1, 2, 3, 4], "sampling": {"max_tokens": 4, "temperature": 0, "ignore_eos": True}})
        assert r.status_code == 200 and r.text.count("token_ids") == 4, r.text
        results["restored_takeover_ms"] = (active["ts"] - t_kill) * 1e3
        print(f"restored shadow took over {results['restored_takeover_ms']:.1f} ms after the kill and served",
              flush=True)
    finally:
        for pid in restored_pids:
            kill_reap(pid)
        for p in (primary, shadow):
            if p is not None and p.p.poll() is None:
                os.killpg(p.p.pid, signal.SIGKILL)
                p.p.wait()
        memory.p.terminate()
        memory.p.wait()
        shutil.rmtree(sock, ignore_errors=True)

    best, p50 = min(results["restore_s"]), statistics.median(results["restore_s"])
    wall = statistics.median(results["restore_wall_s"])
    ratio = results["cold_start_s"] / p50
    gib = results["image_bytes"] / (1 << 30)
    print()
    print(f"cold start -> parked:            {results['cold_start_s']:8.2f} s")
    print(f"restore -> parked (p50, best):   {p50:8.2f} s {best:6.2f} s   (goal <= 2 s: "
          f"{'met' if p50 <= 2 else 'NOT met'}); with the CLI's own start: {wall:.2f} s")
    print(f"image:                           {gib:8.3f} GiB   (goal <= 2 GiB: {'met' if gib <= 2 else 'NOT met'}); "
          f"shadow's anonymous memory {results['shadow_anonymous_MiB']:.0f} MiB")
    print(f"cold / restore:                  {ratio:8.1f} x    (goal >= 10x: {'met' if ratio >= 10 else 'NOT met'})")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

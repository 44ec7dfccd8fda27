"""Which liveness signal should `understudy up` use to notice a hung engine: an HTTP probe of /live, or a
heartbeat the engine loop writes into shared memory (an mmap'd file the prober reads)?

Measured in one run, on this machine:

  cost     per probe: latency p50 / p99 and CPU (the prober's thread, and for HTTP the engine process's,
           idle engine CPU over as long subtracted):
             * HTTP GET /live on a real `understudy serve` (default model on the CPU), through the node's own
               prober code (node/supervisor._get_live), over a kept-alive connection (what `up` does) and
               over a new connection each time; idle, and while the engine decodes a stream;
             * a heartbeat: 16 bytes (step counter, CLOCK_MONOTONIC ns) that a writer thread stores into a
               mapping of a /dev/shm file after each "step"; the prober reads them through a mapping of its
               own, as a prober process would; the writer's cost per beat too.
  detects  which faults each one notices, and how soon, by the node's rule (`up --hang-timeout 1`: no sign
           of life for 1 s; for HTTP the node's LiveProber itself):
             * SIGSTOP of the process;
             * the event loop blocked for 3 s (a signal handler that sleeps on the main thread);
             * the engine thread stuck in a step (the engine's fault injection, SIGURG; /live answers 503
               once one step has run longer than its bound, 5 s at least: engine/serving/faults.py).
           HTTP: the real engine. Heartbeat: a model of the engine's two threads in a process of its own
           (an asyncio loop on the main thread, an engine thread stepping every 10 ms and writing the
           heartbeat after each step), since the engine writes none.

    python bench/liveness.py                  # 2000 probes of each kind
    python bench/liveness.py --probes 500 --skip-stuck-step
"""

from __future__ import annotations

import argparse
import http.client
import json
import mmap
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import Proc, free_port  # noqa: E402  (bench/common.py)

from understudy.common.auth import admin_headers  # noqa: E402
from understudy.node.supervisor import LiveProber, Probing, _get_live  # noqa: E402

HZ = os.sysconf("SC_CLK_TCK")
BEAT = struct.Struct("<QQ")  # step counter, CLOCK_MONOTONIC ns of the beat
HANG_S = 1.0  # the node's rule: no sign of life for this long

# `understudy serve` with one more signal: SIGRTMIN blocks the event loop (the main thread) for 3 s.
ENGINE = ("import signal, sys, time; signal.signal(signal.SIGRTMIN, lambda *_: time.sleep(3)); "
          "from understudy.cli import main; sys.exit(main())")

# The heartbeat's engine model: the main thread runs an asyncio loop; the engine thread steps every 10 ms
# and writes the heartbeat after each step. SIGRTMIN blocks the loop for 3 s, SIGRTMIN+1 makes the engine
# thread stick inside a step.
MODEL = r"""
import asyncio, mmap, os, signal, struct, sys, threading, time
fd = os.open(sys.argv[1], os.O_RDWR)
beat = mmap.mmap(fd, 16)
stuck = threading.Event()
def engine():
    n = 0
    while True:
        time.sleep(0.01)  # a step
        if stuck.is_set():
            threading.Event().wait()  # inside a step, for ever
        n += 1
        struct.pack_into("<QQ", beat, 0, n, time.monotonic_ns())
signal.signal(signal.SIGRTMIN, lambda *_: time.sleep(3))
signal.signal(signal.SIGRTMIN + 1, lambda *_: stuck.set())
threading.Thread(target=engine, daemon=True).start()
async def main():
    print("ready", flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


def cpu_s(pid: int) -> float:
    """utime + stime of a process, all its threads (clock ticks: 10 ms resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summary(name: str, lat_s: list[float], prober_cpu_s: float, target_cpu_s: float | None, n: int) -> dict:
    return {"signal": name, "probes": n, "p50_us": round(pct(lat_s, 0.5) * 1e6, 1),
            "p99_us": round(pct(lat_s, 0.99) * 1e6, 1), "max_us": round(max(lat_s) * 1e6, 1),
            "prober_cpu_us": round(prober_cpu_s / n * 1e6, 2),
            "target_cpu_us": None if target_cpu_s is None else round(max(0.0, target_cpu_s) / n * 1e6, 1)}


# -- cost -------------------------------------------------------------------------------------------------

def http_cost(port: int, pid: int, n: int, keep_alive: bool, spacing: float = 0.0, name: str = "") -> dict:
    conn, lat = None, []
    c0, t0, e0 = time.thread_time(), time.monotonic(), cpu_s(pid)
    for _ in range(n):
        a = time.perf_counter()
        result, conn = _get_live(conn, port, 2.0)
        lat.append(time.perf_counter() - a)
        assert result in ("ok", "busy"), result
        if not keep_alive and conn is not None:
            conn.close()
            conn = None
        if spacing:
            time.sleep(spacing)
    prober, wall, engine = time.thread_time() - c0, time.monotonic() - t0, cpu_s(pid) - e0
    if conn is not None:
        conn.close()
    # the engine's own CPU when nobody probes it, over as long (it is not quite idle: its threads wake up)
    i0 = cpu_s(pid)
    time.sleep(wall)
    idle = cpu_s(pid) - i0
    return summary(name or f"HTTP /live ({'kept-alive' if keep_alive else 'new connection'})", lat, prober,
                   None if spacing else engine - idle, n)


def heartbeat_cost(n: int) -> tuple[dict, dict]:
    """Reads through a mapping of the prober's own, beats written by a thread (another mapping)."""
    fd, path = tempfile.mkstemp(prefix="understudy-beat-", dir="/dev/shm")
    os.ftruncate(fd, BEAT.size)
    writer_map = mmap.mmap(fd, BEAT.size)
    reader_map = mmap.mmap(fd, BEAT.size, prot=mmap.PROT_READ)
    stop = threading.Event()
    writes = {"n": 0, "cpu": 0.0}

    def writer() -> None:  # "the engine loop": one beat per step, a step every millisecond here
        c0, k = time.thread_time(), 0
        while not stop.is_set():
            k += 1
            BEAT.pack_into(writer_map, 0, k, time.monotonic_ns())
            time.sleep(0.001)
        writes["n"], writes["cpu"] = k, time.thread_time() - c0

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    time.sleep(0.05)
    lat = []
    c0 = time.thread_time()
    for _ in range(n):
        a = time.perf_counter()
        _, ns = BEAT.unpack_from(reader_map, 0)
        age = time.monotonic_ns() - ns
        lat.append(time.perf_counter() - a)
        assert age < 5e9
    prober = time.thread_time() - c0
    # CPU of the beat alone (the pack), apart from the sleep the model writer needs to pace itself
    c1 = time.thread_time()
    for k in range(n):
        BEAT.pack_into(writer_map, 0, k, time.monotonic_ns())
    beat_cpu = time.thread_time() - c1
    stop.set()
    t.join()
    for m in (writer_map, reader_map):
        m.close()
    os.close(fd)
    os.unlink(path)
    read = summary("heartbeat (mmap read)", lat, prober, None, n)
    write = {"signal": "heartbeat (mmap write, per beat)", "cpu_us": round(beat_cpu / n * 1e6, 3),
             "writer_thread_cpu_us_per_beat_with_1ms_sleep": round(writes["cpu"] / max(1, writes["n"]) * 1e6, 2)}
    return read, write


# -- detection --------------------------------------------------------------------------------------------

def http_detects(port: int, fault, limit_s: float) -> float | None:
    """Seconds from the fault to the node's verdict (hung), or None within limit_s."""
    prober = LiveProber(port, Probing(hang_timeout=HANG_S))
    try:
        for _ in range(4):  # alive before the fault
            assert not prober.probe(), prober.history
            time.sleep(0.25)
        t0 = fault()
        while time.monotonic() - t0 < limit_s:
            a = time.monotonic()
            if prober.probe():
                return time.monotonic() - t0
            time.sleep(max(0.0, a + 0.25 - time.monotonic()))
        return None
    finally:
        prober.close()


def heartbeat_detects(path: str, fault, limit_s: float) -> float | None:
    fd = os.open(path, os.O_RDONLY)
    m = mmap.mmap(fd, BEAT.size, prot=mmap.PROT_READ)
    try:
        _, ns = BEAT.unpack_from(m, 0)
        assert time.monotonic_ns() - ns < 0.5e9, "the model engine writes no heartbeat"
        t0 = fault()
        while time.monotonic() - t0 < limit_s:
            _, ns = BEAT.unpack_from(m, 0)
            if time.monotonic_ns() - ns > HANG_S * 1e9:
                return time.monotonic() - t0
            time.sleep(0.25)  # the node's probe interval
        return None
    finally:
        m.close()
        os.close(fd)


def model_engine(path: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", MODEL, path], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    time.sleep(0.1)
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probes", type=int, default=2000, help="probes of each kind for the cost (default: 2000)")
    ap.add_argument("--busy-probes", type=int, default=200, help="HTTP probes while the engine decodes (default: 200)")
    ap.add_argument("--skip-stuck-step", action="store_true", help="not the stuck-step case (it ends the engine)")
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = ap.parse_args()

    results: dict = {"machine": {"cpus": os.cpu_count(), "load_1m": round(os.getloadavg()[0], 2)}}
    tmp = Path(tempfile.mkdtemp(prefix="us-live-", dir="/tmp"))
    port = free_port()
    engine = Proc([sys.executable, "-c", ENGINE, "serve", "--backend", "host", "--socket-dir", str(tmp),
                   "--port", str(port), "--kv-cache-memory", "64MiB", "--max-model-len", "1024", "--no-progress",
                   "--step-timeout", "30"],
                  env={"OMP_NUM_THREADS": "1", "UNDERSTUDY_FAULT_INJECTION": "1"})
    beat_fd, beat_path = tempfile.mkstemp(prefix="understudy-beat-", dir="/dev/shm")
    os.ftruncate(beat_fd, BEAT.size)
    os.close(beat_fd)
    try:
        engine.wait_event("serving", timeout=600)
        pid = engine.p.pid
        time.sleep(1.0)
        print(f"engine pid {pid} on port {port}; {args.probes} probes of each kind; {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.2f} at the start\n", flush=True)

        cost = [http_cost(port, pid, args.probes, keep_alive=True),
                http_cost(port, pid, args.probes, keep_alive=False)]
        # while the engine decodes one stream (its event loop also sends the tokens)
        stop = threading.Event()

        def decode() -> None:
            body = json.dumps({"token_ids": list(range(100, 164)),
                               "sampling": {"max_tokens": 900, "temperature": 0, "ignore_eos": True}})
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            try:
                c.request("POST", "/engine/generate", body, {"content-type": "application/json", **admin_headers()})
                r = c.getresponse()
                while not stop.is_set() and r.readline():
                    pass
            except (OSError, http.client.HTTPException):
                pass  # the engine ended (the stuck-step case ends with its watchdog)
            finally:
                c.close()

        t = threading.Thread(target=decode, daemon=True)
        t.start()
        time.sleep(2.0)
        cost.append(http_cost(port, pid, args.busy_probes, keep_alive=True, spacing=0.01,
                              name="HTTP /live (kept-alive), engine decoding"))
        stop.set()
        read, write = heartbeat_cost(args.probes)
        cost += [read, write]
        results["cost"] = cost
        print(f"{'signal':44s} {'p50 us':>8s} {'p99 us':>8s} {'max us':>9s} {'prober CPU us':>14s} "
              f"{'engine CPU us':>14s}")
        for c in cost:
            if "p50_us" in c:
                print(f"{c['signal']:44s} {c['p50_us']:8.1f} {c['p99_us']:8.1f} {c['max_us']:9.1f} "
                      f"{c['prober_cpu_us']:14.2f} {c['target_cpu_us'] if c['target_cpu_us'] is not None else '-':>14}")
            else:
                print(f"{c['signal']:44s} writer CPU per beat {c['cpu_us']} us (the pack + clock read)")
        t.join(timeout=600)

        # -- detection ----------------------------------------------------------------------------------
        print(f"\ndetection, by the node's rule (no sign of life for {HANG_S:g} s); seconds from the fault:",
              flush=True)
        detect: dict[str, dict] = {}

        def sig(p: int, s: int):
            def fault() -> float:
                t0 = time.monotonic()
                os.kill(p, s)
                return t0
            return fault

        # SIGSTOP
        http_s = http_detects(port, sig(pid, signal.SIGSTOP), 5.0)
        os.kill(pid, signal.SIGCONT)
        model = model_engine(beat_path)
        beat_s = heartbeat_detects(beat_path, sig(model.pid, signal.SIGSTOP), 5.0)
        os.kill(model.pid, signal.SIGCONT)
        detect["SIGSTOP of the process"] = {"http": http_s, "heartbeat": beat_s}
        time.sleep(1.0)
        # the event loop blocked for 3 s
        http_s = http_detects(port, sig(pid, signal.SIGRTMIN), 2.5)
        time.sleep(3.0)
        beat_s = heartbeat_detects(beat_path, sig(model.pid, signal.SIGRTMIN), 2.5)
        time.sleep(1.0)
        detect["event loop blocked (3 s)"] = {"http": http_s, "heartbeat": beat_s}
        # the engine thread stuck in a step: the engine's own injection; it needs a step, so a request
        if not args.skip_stuck_step:
            beat_s = heartbeat_detects(beat_path, sig(model.pid, signal.SIGRTMIN + 1), 5.0)

            def stuck() -> float:
                os.kill(pid, signal.SIGURG)
                engine.wait_event("fault_armed", timeout=30)
                threading.Thread(target=decode, daemon=True).start()
                return engine.wait_event("fault_injected", timeout=60)["ts"] - time.time() + time.monotonic()

            stop.clear()
            http_s = http_detects(port, stuck, 25.0)
            stop.set()
            detect["engine thread stuck in a step"] = {"http": http_s, "heartbeat": beat_s}
        model.kill()
        model.wait()
        results["detect"] = detect
        for fault, d in detect.items():
            cells = [f"{k}: " + (f"{v:.2f} s" if v is not None else "not detected") for k, v in d.items()]
            print(f"  {fault:34s} " + ";  ".join(cells))
        if args.json:
            print(json.dumps(results))
    finally:
        if engine.p.poll() is None:
            os.killpg(engine.p.pid, signal.SIGCONT)
        engine.kill()
        os.unlink(beat_path)
        subprocess.run(["rm", "-rf", str(tmp)])


if __name__ == "__main__":
    main()

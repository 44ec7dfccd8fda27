"""When does the rest of the node learn that a CUDA process was SIGKILLed?

A dying process's files are released after it stops running, one by one, and on a GPU the driver's
teardown of its context takes a long time. Failover waits on two of those releases: the failover
lock (a flock) and the control or memory-service sockets (their EOF). This measures, for a victim
that holds GPU memory and runs kernels when it is killed:

* when a socket's EOF and a flock's release reach another process, for a file the victim opened
  before initialising CUDA (a low fd) and one moved to the top of its fd table (a high fd);
* when waitpid reports it;
* how long a bystander process's kernel (reading --probe-gib of its memory, like a step reading the
  weights) is slowed on the same GPU meanwhile.

    python bench/kill_teardown.py --gib 1 16     # on a GPU

The kernel releases a dead process's files last-opened-number first: a file above the driver's in the
fd table is released at once, one below only after the driver has torn the GPU context down.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time


def victim(args) -> None:
    import torch

    low_sock = os.dup(int(args.low_sock))  # the lowest free numbers: opened before CUDA, as at a spawn
    os.close(int(args.low_sock))
    low_lock = os.open(args.low_lock, os.O_RDWR)
    fcntl.flock(low_lock, fcntl.LOCK_EX)
    x = torch.empty(int(args.gib * 2**30), dtype=torch.uint8, device="cuda")
    x.fill_(1)
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    # After CUDA (and its driver files) exist: move one socket and one lock to the top of the table.
    top = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1
    os.dup2(int(args.high_sock), top)
    os.close(int(args.high_sock))
    high_lock = os.open(args.high_lock, os.O_RDWR)
    fcntl.flock(high_lock, fcntl.LOCK_EX)
    os.dup2(high_lock, top - 1)
    os.close(high_lock)
    fds = sorted(int(f) for f in os.listdir("/proc/self/fd"))
    print(f"victim fds: {len(fds)} open; low socket {low_sock}, low lock {low_lock}, high {top - 1}, {top}",
          flush=True)
    print("ready", flush=True)
    while True:  # busy like an engine under load
        for _ in range(20):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize()


def watch(events: dict, name: str, fn) -> threading.Thread:
    def run():
        fn()
        events[name] = time.perf_counter()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def measure(gib: float, probe_gib: float) -> dict:
    import torch

    # The bystander's probe: one kernel reading probe_gib of memory (like a decode step reading the
    # weights), or a tiny one; timed to completion, again and again.
    probe = torch.ones(max(1, int(probe_gib * 2**28)), device="cuda")
    samples: list[tuple[float, float]] = []

    def tick():
        t = time.perf_counter()
        probe.sum()
        torch.cuda.synchronize()
        samples.append((t, time.perf_counter() - t))

    t_end = time.perf_counter() + 0.5  # the baseline: the GPU to itself, before the victim starts
    while time.perf_counter() < t_end:
        tick()
    base = [d for _, d in samples]
    tmp = tempfile.mkdtemp(prefix="kt-")
    locks = {k: os.path.join(tmp, k) for k in ("low_lock", "high_lock")}
    for p in locks.values():
        open(p, "w").close()
    low_ours, low_theirs = socket.socketpair()
    high_ours, high_theirs = socket.socketpair()
    cmd = [sys.executable, __file__, "--victim", "--gib", str(gib), "--low-sock", str(low_theirs.fileno()),
           "--high-sock", str(high_theirs.fileno()), "--low-lock", locks["low_lock"],
           "--high-lock", locks["high_lock"]]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                         pass_fds=(low_theirs.fileno(), high_theirs.fileno()))
    low_theirs.close()
    high_theirs.close()
    timer = threading.Timer(120, p.kill)  # a victim that never gets ready
    timer.daemon = True
    timer.start()
    for line in p.stdout:
        if line.strip() == "ready":
            break
        print("  " + line.strip(), flush=True)
    events: dict[str, float] = {}
    watch(events, "socket EOF, low fd", lambda: low_ours.recv(1))
    watch(events, "socket EOF, high fd", lambda: high_ours.recv(1))
    for k, path in locks.items():
        fd = os.open(path, os.O_RDWR)
        watch(events, f"flock released, {k.split('_')[0]} fd", lambda fd=fd: fcntl.flock(fd, fcntl.LOCK_EX))
    watch(events, "waitpid", p.wait)

    os.kill(p.pid, signal.SIGKILL)
    t_kill = time.perf_counter()
    while time.perf_counter() < t_kill + 2.0 or len(events) < 5:
        tick()
        if time.perf_counter() > t_kill + 10:
            break
    after = [(t - t_kill, d) for t, d in samples if t >= t_kill]
    slow = [(t, d) for t, d in after if d > 1.5 * statistics.median(base) + 1e-4]
    return {"gib": gib, "events_ms": {k: (v - t_kill) * 1e3 for k, v in sorted(events.items(), key=lambda kv: kv[1])},
            "probe_base_us": statistics.median(base) * 1e6,
            "probe_first_200ms": [(round(t * 1e3, 1), round(d * 1e3, 2)) for t, d in after if t < 0.2], "probe_max_ms": max(d for _, d in after) * 1e3,
            "probe_stalls": len(slow), "probe_stall_ms": sum(d for _, d in slow) * 1e3,
            "last_stall_ends_ms": (slow[-1][0] + slow[-1][1]) * 1e3 if slow else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, nargs="+", default=[1.0, 16.0],
                    help="GPU memory the victim holds (GiB), one run per value")
    ap.add_argument("--probe-gib", type=float, default=4.0,
                    help="memory the bystander's probe kernel reads each time (GiB; 0: a tiny kernel)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per value")
    ap.add_argument("--victim", action="store_true", help=argparse.SUPPRESS)
    for name in ("--low-sock", "--high-sock", "--low-lock", "--high-lock"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.victim:
        args.gib = args.gib[0]
        return victim(args)
    for gib in args.gib:
        for _ in range(args.repeats):
            r = measure(gib, args.probe_gib)
            print(f"victim holding {gib:g} GiB, SIGKILLed while running kernels:")
            for k, v in r["events_ms"].items():
                print(f"  {k:<26} {v:8.1f} ms after the kill")
            print(f"  bystander's probe, (ms after the kill, ms it took) in the first 200 ms: {r['probe_first_200ms']}")
            print(f"  bystander's probe ({args.probe_gib:g} GiB read): {r['probe_base_us']:.0f} us before; after the kill max "
                  f"{r['probe_max_ms']:.1f} ms, {r['probe_stalls']} slower than 1.5x totalling {r['probe_stall_ms']:.1f} ms, "
                  f"the last ending {r['last_stall_ends_ms']:.1f} ms after the kill", flush=True)


if __name__ == "__main__":
    main()

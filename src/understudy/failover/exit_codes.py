"""How an engine process ended, in its exit status: what `understudy up` (and systemd, Kubernetes, Slurm)
read to tell a clean stop from a failure, and a broken process from a broken device.

A non-zero status always means "restart me somewhere"; DEVICE_FAULT also means "not on this device": a
shadow on the same GPU cannot help (docs/failover.md lists which CUDA errors count as device faults).
"""

from __future__ import annotations

OK = 0  # drained and stopped (SIGTERM), nothing lost
FAILED = 1  # could not start, or an unexpected error outside a step
BAD_FLAGS = 2  # the command line was refused before anything started
LAYOUT_CHANGED = 3  # the weights were republished with another layout under a sleeping / quiesced engine
GROUP_LOST = 4  # a tensor-parallel group lost a rank: the whole group ends
STEP_ERROR = 5  # a step raised (a bug, an out-of-memory, a CUDA error of this process): the shadow takes over
WATCHDOG = 6  # a step made no progress for longer than --step-timeout (a hang): the watchdog ended us
DEVICE_FAULT = 7  # the device itself is broken (Xid-like CUDA errors): the node reports it unhealthy

NAMES = {OK: "ok", FAILED: "failed", BAD_FLAGS: "bad_flags", LAYOUT_CHANGED: "layout_changed",
         GROUP_LOST: "group_lost", STEP_ERROR: "step_error", WATCHDOG: "watchdog", DEVICE_FAULT: "device_fault"}


def describe(returncode: int | None) -> str:
    """A name for an exit status as Popen reports it (negative: killed by that signal)."""
    if returncode is None:
        return "running"
    if returncode < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return NAMES.get(returncode, f"exit {returncode}")

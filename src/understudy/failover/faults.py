"""Process faults and device faults: which a failed step was, the device-fault marker a failed engine
leaves next to the device's failover lock, and leaving the process at once.

A *process fault* (a bug, an out-of-memory, a CUDA error that poisons only this process's context) ends the
engine with exit_codes.STEP_ERROR: the shadow on the same device takes over, as for a kill. A *device
fault* (the GPU itself is broken: uncorrectable ECC, fallen off the bus, ...) ends it with DEVICE_FAULT and
first writes `device-<identity>.fault` next to `failover-<identity>.lock`: an engine that gets that lock,
or starts, on a device with the marker does not serve (it exits DEVICE_FAULT too), so the node reports
the device unhealthy and traffic goes to other nodes. docs/failover.md has the table; the marker stays
until someone removes it (the device was reset or replaced).

Torch-free: the node supervisor reads markers and exit codes without importing the engine.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

from understudy.failover import exit_codes

# Substrings of error messages that say the device itself is broken, whatever this process did: CUDA
# runtime / driver error strings (cudaGetErrorString, CUDA 13; torch reports "CUDA error: <string>",
# Triton "Triton Error [CUDA]: <string>") of the errors NVIDIA's Xid catalog files under hardware
# (RESET_GPU / drain / RMA), and the driver's own text for a GPU that is gone. Everything else a step
# raises is a process fault (docs/failover.md has the table and why).
DEVICE_FAULT_MESSAGES: dict[str, str] = {
    "uncorrectable ecc error": "uncorrectable ECC error (cudaErrorECCUncorrectable 214; Xid 48, 63, 64)",
    "uncorrectable nvlink error": "uncorrectable NVLink error (cudaErrorNvlinkUncorrectable 220; Xid 74)",
    "nvlink or a hardware error": "contained hardware error (cudaErrorContained 226; Xid 94, 95)",
    "hardware stack error": "hardware stack error (cudaErrorHardwareStackError 714)",
    "fallen off the bus": "the GPU has fallen off the bus (Xid 79)",
    "gpu is lost": "the GPU is lost (NVML_ERROR_GPU_IS_LOST; Xid 79)",
    "no cuda-capable device is detected": "the device disappeared (cudaErrorNoDevice 100)",
    "system not yet initialized": "the GPU system is not ready: fabric manager / NVSwitch (cudaErrorSystemNotReady 802)",
}


def device_fault(error: BaseException | str) -> str | None:
    """What is broken about the device if `error` (an exception or its message) is a device fault, else
    None (a process fault)."""
    text = (f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else error).lower()
    for needle, what in DEVICE_FAULT_MESSAGES.items():
        if needle in text:
            return what
    return None


def exit_code_for(error: BaseException | str) -> int:
    """DEVICE_FAULT for a device fault, STEP_ERROR for anything else a step raised."""
    return exit_codes.DEVICE_FAULT if device_fault(error) else exit_codes.STEP_ERROR


# -- the device-fault marker -----------------------------------------------------------------------------

def marker_path(lock_path: str | os.PathLike) -> Path:
    """`device-<identity>.fault` next to the device's `failover-<identity>.lock`."""
    lock = Path(lock_path)
    identity = lock.name.removeprefix("failover-").removesuffix(".lock")
    return lock.with_name(f"device-{identity}.fault")


def write_marker(lock_path: str | os.PathLike, reason: str, **fields) -> Path:
    """Mark the device faulty (atomically: a reader sees the whole marker or none). Returns its path."""
    path = marker_path(lock_path)
    body = {"reason": reason, "pid": os.getpid(), "time": time.time(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields}
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(body) + "\n")
    os.replace(tmp, path)
    return path


def read_marker(lock_path: str | os.PathLike) -> dict | None:
    """The device's fault marker (a dict with at least `reason`), or None when the device is not marked."""
    path = marker_path(lock_path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        return {"reason": f"unreadable fault marker: {e}", "path": str(path)}
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {"reason": f"malformed fault marker: {text[:200]!r}"}
    return {**body, "path": str(path)}


# -- leaving ---------------------------------------------------------------------------------------------

def exit_now(code: int) -> NoReturn:
    """Leave the process at once, logs flushed, skipping the interpreter's teardown (atexit, CUDA and NCCL
    teardown, non-daemon threads): those can block, and a failed engine must not make the node wait. The
    kernel releases our files, highest number first: the failover lock and memory sessions (lifted to
    the top of the fd table, understudy/fds.py) before the driver's."""
    for handler in logging.getLogger("understudy").handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001 - nothing may stop us leaving
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)

"""The CUDA side of a snapshot: cuCheckpointProcess{Lock,Checkpoint,Restore,Unlock,GetState}.

Through `cuda.bindings.driver`, imported only when the target process has CUDA state (it maps the
driver library): on hosts without CUDA, and for engines on the host backend, every call here is a
no-op. The driver moves a locked process's device memory into host memory (checkpoint), so that CRIU
dumps it with the rest of the process, and back (restore). Weights and KV live in the memory service
and are unmapped by quiesce, so only the engine's own device memory (CUDA context, graphs, workspaces)
travels.

Checkpoint: lock (waits for running work; `timeout_ms`) -> checkpoint. Restore: restore -> unlock.
Verified on an H100 (shared/probes/criu_gpu_probe.py): 4 GiB checkpointed in 2.7 s, restored in 1.3 s.
"""

from __future__ import annotations

from pathlib import Path


class CudaCheckpointError(RuntimeError):
    pass


def uses_cuda(pid: int) -> bool:
    """Whether the process has loaded the CUDA driver (then it may hold CUDA state)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False
    return "libcuda.so" in maps


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError as e:
        raise CudaCheckpointError(f"the process uses CUDA but cuda.bindings is not installed here ({e}): "
                                  f"pip install 'understudy[cuda]'") from None
    _check(driver, driver.cuInit(0), "cuInit")
    return driver


def _check(driver, result, what: str):
    err = result[0] if isinstance(result, tuple) else result
    if err != driver.CUresult.CUDA_SUCCESS:
        name = driver.cuGetErrorName(err)[1] if hasattr(driver, "cuGetErrorName") else b""
        raise CudaCheckpointError(f"{what} failed: {err} {name.decode() if isinstance(name, bytes) else name}")
    return result[1:] if isinstance(result, tuple) and len(result) > 1 else None


def state(pid: int) -> str:
    """RUNNING, LOCKED, CHECKPOINTED or FAILED (the driver's CUprocessState, without its prefix)."""
    driver = _driver()
    (s,) = _check(driver, driver.cuCheckpointProcessGetState(pid), "cuCheckpointProcessGetState")
    return s.name.removeprefix("CU_PROCESS_STATE_")


def checkpoint(pid: int, timeout_ms: int = 30_000) -> None:
    """Lock the process's CUDA work, then move its device memory into host memory."""
    driver = _driver()
    args = driver.CUcheckpointLockArgs()
    args.timeoutMs = timeout_ms
    _check(driver, driver.cuCheckpointProcessLock(pid, args), "cuCheckpointProcessLock")
    try:
        _check(driver, driver.cuCheckpointProcessCheckpoint(pid, None), "cuCheckpointProcessCheckpoint")
    except CudaCheckpointError:
        driver.cuCheckpointProcessUnlock(pid, None)
        raise


def restore(pid: int) -> None:
    """Bring a checkpointed process's device memory back and let it run CUDA work again."""
    driver = _driver()
    if state(pid) == "CHECKPOINTED":
        _check(driver, driver.cuCheckpointProcessRestore(pid, None), "cuCheckpointProcessRestore")
    if state(pid) == "LOCKED":
        _check(driver, driver.cuCheckpointProcessUnlock(pid, None), "cuCheckpointProcessUnlock")

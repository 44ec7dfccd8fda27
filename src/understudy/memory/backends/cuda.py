"""The `cuda` backend: CUDA virtual memory management through `cuda.bindings.driver`.

Physical allocations are created with POSIX-fd handles and exported as fds;
clients import them, reserve address ranges and map with READ or READWRITE
access. CUDA cannot export a read-only handle, so read-only sessions are
enforced by the access flags the client sets (a write through such a mapping
is an illegal-address fault in the writing process only).
"""

from __future__ import annotations

import os

from understudy.memory.backends.base import Backend, BackendError, OutOfMemory

try:
    from cuda.bindings import driver as cu
except ImportError:  # pragma: no cover - depends on the machine
    cu = None

_POSIX_FD = None


def _check(result, what: str):
    err = result[0]
    if err != cu.CUresult.CUDA_SUCCESS:
        if err == cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY:
            raise OutOfMemory(f"{what}: out of device memory")
        name = cu.cuGetErrorName(err)[1]
        raise BackendError(f"{what} failed: {name.decode() if isinstance(name, bytes) else name}")
    if len(result) == 1:
        return None
    return result[1] if len(result) == 2 else result[1:]


class _ArrayInterface:
    """Just enough of __cuda_array_interface__ for torch.as_tensor to wrap a pointer."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3}


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self, device: int = 0):
        super().__init__(device)
        if cu is None:
            raise BackendError("the cuda backend needs the `cuda-bindings` package (pip install 'understudy[cuda]')")
        _check(cu.cuInit(0), "cuInit")
        self._dev = _check(cu.cuDeviceGet(device), f"cuDeviceGet({device})")
        # The primary context is the one PyTorch uses too, so tensors and
        # driver calls in this process share one context.
        self._ctx = _check(cu.cuDevicePrimaryCtxRetain(self._dev), "cuDevicePrimaryCtxRetain")
        self._make_current()
        self._prop = cu.CUmemAllocationProp()
        self._prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        self._prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self._prop.location.id = device
        self._prop.requestedHandleTypes = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        self._gran = int(
            _check(
                cu.cuMemGetAllocationGranularity(
                    self._prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
                ),
                "cuMemGetAllocationGranularity",
            )
        )

    def _make_current(self) -> None:
        _check(cu.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")

    def _access(self, readonly: bool):
        desc = cu.CUmemAccessDesc()
        desc.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        desc.location.id = self.device
        desc.flags = (
            cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READ
            if readonly
            else cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        )
        return desc

    def identity(self) -> str:
        uuid = _check(cu.cuDeviceGetUuid(self._dev), "cuDeviceGetUuid")
        b = bytes(uuid.bytes)
        h = b.hex()
        return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"

    def granularity(self) -> int:
        return self._gran

    def create(self, size: int) -> tuple[object, int]:
        self._make_current()
        handle = _check(cu.cuMemCreate(size, self._prop, 0), f"cuMemCreate({size})")
        try:
            fd = _check(
                cu.cuMemExportToShareableHandle(
                    handle, cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0
                ),
                "cuMemExportToShareableHandle",
            )
        except BaseException:
            cu.cuMemRelease(handle)
            raise
        return handle, int(fd)

    def adopt(self, fd: int, size: int) -> tuple[object, int]:
        # The driver refuses an fd that is not a CUDA allocation; a size that does not match is
        # refused later, by cuMemMap in the client that maps it (the driver does not tell sizes).
        self._make_current()
        handle = _check(
            cu.cuMemImportFromShareableHandle(fd, cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
            "cuMemImportFromShareableHandle",
        )
        return handle, fd

    def release(self, handle: object, fd: int) -> None:
        self._make_current()
        os.close(fd)
        _check(cu.cuMemRelease(handle), "cuMemRelease")

    def reserve(self, size: int) -> int:
        self._make_current()
        return int(_check(cu.cuMemAddressReserve(size, self._gran, 0, 0), f"cuMemAddressReserve({size})"))

    def free_reservation(self, va: int, size: int) -> None:
        self._make_current()
        _check(cu.cuMemAddressFree(cu.CUdeviceptr(va), size), "cuMemAddressFree")

    def map(self, va: int, size: int, fd: int, offset: int, readonly: bool) -> None:
        self._make_current()
        handle = _check(
            cu.cuMemImportFromShareableHandle(fd, cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
            "cuMemImportFromShareableHandle",
        )
        try:
            _check(cu.cuMemMap(cu.CUdeviceptr(va), size, offset, handle, 0), "cuMemMap")
            try:
                _check(cu.cuMemSetAccess(cu.CUdeviceptr(va), size, [self._access(readonly)], 1), "cuMemSetAccess")
            except BaseException:
                cu.cuMemUnmap(cu.CUdeviceptr(va), size)
                raise
        finally:
            # The mapping holds its own reference: memory goes back once unmapped.
            cu.cuMemRelease(handle)

    def unmap(self, va: int, size: int) -> None:
        self._make_current()
        _check(cu.cuMemUnmap(cu.CUdeviceptr(va), size), "cuMemUnmap")

    def set_access(self, va: int, size: int, readonly: bool) -> None:
        self._make_current()
        _check(cu.cuMemSetAccess(cu.CUdeviceptr(va), size, [self._access(readonly)], 1), "cuMemSetAccess")

    def tensor(self, va: int, nbytes: int):
        import torch

        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8, device=f"cuda:{self.device}")
        return torch.as_tensor(_ArrayInterface(va, nbytes), device=f"cuda:{self.device}")

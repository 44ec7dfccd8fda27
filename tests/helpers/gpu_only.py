"""A pytest plugin that keeps only the tests a GPU run adds: those marked to skip without a CUDA device.

    python -m pytest tests/engine -p tests.helpers.gpu_only

On the device machine this runs the CUDA and PDL tests without the CPU tests beside them, which the CPU CI
already runs."""

from __future__ import annotations


def _needs_gpu(item) -> bool:
    return any("CUDA" in str(m.kwargs.get("reason", "")) or "PDL" in str(m.kwargs.get("reason", ""))
               for m in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    keep = [item for item in items if _needs_gpu(item)]
    config.hook.pytest_deselected(items=[item for item in items if not _needs_gpu(item)])
    items[:] = keep

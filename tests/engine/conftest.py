import os
import sys
from pathlib import Path

# Everything here runs offline: models are built locally or shipped by a package.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Let the suite run from a plain checkout too (no editable install).
_SRC = Path(__file__).resolve().parents[2] / "src"
if str(_SRC) not in sys.path:
    sys.path.append(str(_SRC))

import pytest

from tests.helpers.engine import build_hf_model


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory):
    """family -> (transformers model, directory saved with save_pretrained)."""
    cache = {}

    def get(family: str):
        if family not in cache:
            model = build_hf_model(family)
            path = tmp_path_factory.mktemp(f"tiny-{family}")
            model.save_pretrained(path, safe_serialization=True)
            cache[family] = (model, path)
        return cache[family]

    return get

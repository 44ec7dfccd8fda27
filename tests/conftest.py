"""Shared fixtures: a real memory-server process per test, on the backend under test.

UNDERSTUDY_TEST_BACKEND=cuda runs the same suite on a GPU (device machine);
the default `host` backend runs everywhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.procs import BACKEND, ServerProcess


@pytest.fixture
def backend_name() -> str:
    return BACKEND


@pytest.fixture
def socket_dir(tmp_path_factory) -> Path:
    # Unix socket paths are limited to 107 bytes: keep the directory short.
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="us-", dir="/tmp"))
    yield d
    for f in d.iterdir():
        f.unlink()
    d.rmdir()


@pytest.fixture(scope="session")
def _tokenizer_future():
    """The default model's tokenizer (GGUF: seconds to load), loaded in the background while engines start."""
    import concurrent.futures

    def load():
        from understudy.common.tokenizer import Tokenizer
        from understudy.common.default_model import default_model_path

        return Tokenizer.from_pretrained(default_model_path())

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        yield pool.submit(load)


@pytest.fixture
def server(socket_dir):
    """A running memory server; stopped (SIGTERM) at the end of the test."""
    srv = ServerProcess.start(BACKEND, socket_dir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with a tokenizer and a chat template that renders tools (tests/helpers/openai_tiny.py)."""
    from tests.helpers.openai_tiny import write_model

    return write_model(tmp_path_factory.mktemp("tiny-openai") / "model")

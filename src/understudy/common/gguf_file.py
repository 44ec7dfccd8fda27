"""Reading GGUF metadata without torch (the tokenizer needs it in the frontend too)."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike


@functools.lru_cache(maxsize=4)
def _open_gguf(path: str, mtime_ns: int, size: int):
    from gguf import GGUFReader

    # Parsing the header takes seconds (tens of thousands of vocab strings), and config,
    # weights and tokenizer all need it: keep the (memory-mapped) reader around.
    return GGUFReader(path)


def open_gguf(path: PathLike):
    """A cached gguf.GGUFReader for `path` (reopened if the file changes)."""
    st = os.stat(path)
    return _open_gguf(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


def gguf_field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()

"""What an image is of: a 16-hex SHA-256 identity over the engine configuration it can stand in for.

In the identity: the model (its resolved path), the engine version, the tensor and pipeline
parallel sizes (1 and 1: one engine per GPU), the dtype, the max model length, and every other
`understudy serve` setting that ServeConfig marks as identity (engine/serve_config.py) as `extra`
(block size, attention kernels, CUDA graphs, batching limits, served model name, ...): all of them are
baked into the process image. Not in it: replicas and roles (`--role`), placement (`--device`, `--host`,
`--port`, socket and lock directories, discovery) and resources (`--kv-cache-memory`,
`--gpu-memory-utilization`; a parked shadow takes the KV shape of the pool anyway), nor output (logging,
progress). The port is baked into the image all the same: restore checks it apart.

    params = params_from_serve_argv(["--model", "/models/llama", "--dtype", "bfloat16"])
    identity(params)  # 'e3b0c44298fc1c14'
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from understudy.engine.options import parse_serve_args
from understudy.engine.serve_config import ServeConfig


class IdentityMismatch(ValueError):
    """An image was asked to stand in for an engine it is not (its identity differs)."""


def params_from_config(config: ServeConfig) -> dict[str, Any]:
    """The identity's fields from a serve configuration."""
    from understudy.common.default_model import default_model_path

    values = config.identity_values()
    model = values.pop("model")
    dtype, max_model_len = values.pop("dtype"), values.pop("max_model_len")
    return {
        "model": str(Path(model).resolve()) if model else str(default_model_path().resolve()),
        "engine_version": _engine_version(),
        "tensor_parallel_size": 1,
        "pipeline_parallel_size": 1,
        "dtype": dtype,
        "max_model_len": max_model_len,
        "extra": dict(sorted(values.items())),
    }


def params_from_serve_argv(argv: list[str]) -> dict[str, Any]:
    """The identity's fields of `understudy serve ARGV` (ARGV without the `serve`)."""
    return params_from_config(parse_serve_args(argv))


def _engine_version() -> str:
    from understudy import __version__

    return f"understudy {__version__}"


def identity(params: dict[str, Any]) -> str:
    """16 hex digits of SHA-256 over the canonical JSON of `params`."""
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def differences(image: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """'field: image value != requested value' for each field that differs (extra flattened)."""
    def flat(p: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in p.items() if k != "extra"}
        out.update({f"extra.{k}": v for k, v in p.get("extra", {}).items()})
        return out

    a, b = flat(image), flat(wanted)
    return [f"{k}: image {a.get(k)!r} != requested {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def serve_argv_of(pid: int) -> list[str]:
    """The `understudy serve` arguments of a running engine, from /proc/PID/cmdline."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError as e:
        raise ProcessLookupError(f"no process {pid}: {e}") from None
    argv = [a.decode() for a in argv if a]
    if "serve" not in argv:
        raise ValueError(f"process {pid} is not `understudy serve`: {' '.join(argv)[:200]}")
    return argv[argv.index("serve") + 1:]

"""The configuration of `understudy serve`: one frozen `ServeConfig`, built once from argv and checked there.

engine/options.py turns the flags into it (`parse_serve_args(argv)`, or `config_from_args(namespace)` for
the `understudy` parser); everything below the CLI (launch, bootstrap, the tensor-parallel group,
discovery announcements, snapshot identities) takes the config, never an argparse namespace.

The groups follow the flag groups of `understudy serve --help`, and every field is named after its
flag's argparse dest, so a flag is easy to find: `--kv-cache-memory 8GiB` is `config.kv.kv_cache_memory`
(an int, 8 << 30). Each field says whether it is part of a snapshot's identity (snapshot/identity.py):
what is baked into an engine's process image (model, dtype, kernels, batching limits, ...) is; replicas
and roles, placement, discovery, resources and output are not.

    config = ServeConfig(model=ModelOptions(model="/models/llama"), kv=KVOptions(kv_cache_memory=8 << 30))
    config.identity_values()  # {'model': '/models/llama', 'served_model_name': (), 'dtype': 'auto', ...}

Bad values (from argv or built in code) raise ConfigError naming the flag; `understudy serve` turns it
into `understudy serve: error: ...` and exit 2. Checks that need the machine (is CUDA there, does the
KV budget hold a block) stay where the machine is known (engine/serving/bootstrap.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from understudy.common.http_server import DEFAULT_HEADER_TIMEOUT, DEFAULT_MAX_HEADER_BYTES, DEFAULT_TIMEOUT_KEEP_ALIVE
from understudy.common.openai_options import REASONING_PARSERS, TOOL_CALL_PARSERS, read_chat_template

DTYPE_NAMES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A serve configuration that cannot run; the message names the flag."""


def _field(default: Any = None, *, identity: bool, factory: Any = None) -> Any:
    """A config field; `identity`: part of what a snapshot image of the engine is (snapshot/identity.py)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"identity": identity})
    return field(default=default, metadata={"identity": identity})


@dataclass(frozen=True)
class ModelOptions:
    model: str | None = _field(None, identity=True)  # None: the built-in default model
    # the names clients use (the first one in responses); (): from the model path
    served_model_name: tuple[str, ...] = _field(identity=True, factory=tuple)
    dtype: str = _field("auto", identity=True)  # auto or one of DTYPE_NAMES (half / float: argparse maps them)
    enforce_eager: bool = _field(False, identity=True)
    overlap_decode: str = _field("auto", identity=False)  # auto (on CUDA), on, off: LLMEngine.overlap_decode
    attention: str = _field("auto", identity=True)  # auto, reference, triton
    prefill_attention: str = _field("triton", identity=True)  # reference, triton
    quantization: str = _field("none", identity=True)  # none, fp8 (FP8 weights quantized when published)
    max_model_len: int | None = _field(None, identity=True)  # None: the model's, at most 32768
    seed: int | None = _field(None, identity=True)  # the seed of requests that give none; also torch's


@dataclass(frozen=True)
class APIOptions:
    """What the OpenAI routes do with requests (common/openai_options.py)."""

    chat_template: str | None = _field(None, identity=True)  # a file or the template itself
    generation_config: str = _field("auto", identity=True)  # auto, vllm or a directory
    tool_call_parser: str | None = _field(None, identity=True)
    reasoning_parser: str | None = _field(None, identity=True)
    enable_auto_tool_choice: bool = _field(False, identity=True)


@dataclass(frozen=True)
class AccessOptions:
    """Credentials and CORS (common/auth.py). Not in a snapshot's identity: secrets must not land in its
    manifest (a restored image keeps the keys it was checkpointed with; the admin token is the node's)."""

    api_key: tuple[str, ...] = _field(identity=False, factory=tuple)
    admin_token_file: str | None = _field(None, identity=False)
    allowed_origins: tuple[str, ...] = _field(identity=False, factory=tuple)
    allowed_methods: tuple[str, ...] = _field(identity=False, factory=tuple)  # (): common/auth.CORS's default
    allowed_headers: tuple[str, ...] = _field(identity=False, factory=tuple)


@dataclass(frozen=True)
class FailoverOptions:
    role: str = _field("primary", identity=False)  # primary, shadow
    failover_dir: str | None = _field(None, identity=False)  # None: the memory service's socket directory
    standby_wait: float = _field(30.0, identity=True)
    # seconds; None: 60 on CUDA, 600 on the CPU; 0: no watchdog (engine/serving/faults.py)
    step_timeout: float | None = _field(None, identity=False)


@dataclass(frozen=True)
class DiscoveryOptions:
    register: tuple[str, ...] = _field(identity=False, factory=tuple)
    advertise_url: str | None = _field(None, identity=False)
    registration_ttl: float = _field(10.0, identity=False)


@dataclass(frozen=True)
class DeviceOptions:
    """The device and its memory service."""

    backend: str = _field("auto", identity=True)  # auto, host, cuda
    device: int = _field(0, identity=False)
    tensor_parallel: int = _field(1, identity=True)
    # A group across nodes (parallel/nodes.py): where this node is in it and where the leader's store is.
    nnodes: int = _field(1, identity=False)
    node_rank: int = _field(0, identity=False)
    master_addr: str = _field("127.0.0.1", identity=False)
    master_port: int = _field(0, identity=False)
    socket_dir: str | None = _field(None, identity=False)
    memory_service: str = _field("auto", identity=False)  # auto, connect


@dataclass(frozen=True)
class KVOptions:
    """The KV cache and batching."""

    kv_cache_memory: int | None = _field(None, identity=False)  # bytes; None: from gpu_memory_utilization
    gpu_memory_utilization: float = _field(0.85, identity=False)
    block_size: int = _field(16, identity=True)
    kv_cache_dtype: str = _field("auto", identity=True)  # auto (the model's dtype), fp8 (e4m3 with per-layer scales)
    max_num_seqs: int = _field(256, identity=True)
    max_num_batched_tokens: int = _field(2048, identity=True)
    max_waiting: int = _field(1024, identity=True)
    default_max_tokens: int | None = _field(None, identity=True)  # None: the rest of the context


@dataclass(frozen=True)
class HTTPOptions:
    host: str = _field("127.0.0.1", identity=False)
    port: int = _field(8000, identity=False)
    max_request_bytes: int = _field(4 << 20, identity=True)
    drain_timeout: float = _field(30.0, identity=True)
    # Connection bounds (common/http_server.py): in a snapshot's image with the server they configure.
    timeout_keep_alive: float = _field(DEFAULT_TIMEOUT_KEEP_ALIVE, identity=True)
    header_timeout: float = _field(DEFAULT_HEADER_TIMEOUT, identity=True)
    max_header_bytes: int = _field(DEFAULT_MAX_HEADER_BYTES, identity=True)
    limit_concurrency: int | None = _field(None, identity=True)  # None: no limit


@dataclass(frozen=True)
class OutputOptions:
    """Logs and the loading progress bar."""

    log_format: str = _field("json", identity=False)  # json, text
    log_level: str = _field("info", identity=False)  # debug, info, warning, error
    no_progress: bool = _field(False, identity=False)


CHOICES = {  # the flags with a fixed set of values (argparse checks them too; this is for configs built in code)
    "dtype": ("auto", *DTYPE_NAMES), "attention": ("auto", "reference", "triton"),
    "prefill_attention": ("reference", "triton"), "quantization": ("none", "fp8"),
    "kv_cache_dtype": ("auto", "fp8"), "role": ("primary", "shadow"), "backend": ("auto", "host", "cuda"),
    "memory_service": ("auto", "connect"), "log_format": ("json", "text"),
    "log_level": ("debug", "info", "warning", "error"),
}


@dataclass(frozen=True)
class ServeConfig:
    model: ModelOptions = field(default_factory=ModelOptions)
    api: APIOptions = field(default_factory=APIOptions)
    failover: FailoverOptions = field(default_factory=FailoverOptions)
    discovery: DiscoveryOptions = field(default_factory=DiscoveryOptions)
    device: DeviceOptions = field(default_factory=DeviceOptions)
    kv: KVOptions = field(default_factory=KVOptions)
    http: HTTPOptions = field(default_factory=HTTPOptions)
    access: AccessOptions = field(default_factory=AccessOptions)
    output: OutputOptions = field(default_factory=OutputOptions)

    def __post_init__(self) -> None:
        check(self)

    @classmethod
    def groups(cls) -> dict[str, type]:
        """{group attribute: its options class}, in --help order."""
        return {f.name: f.default_factory for f in dataclasses.fields(cls)}

    @classmethod
    def identity_fields(cls) -> tuple[str, ...]:
        """The fields (flag dests) that are part of a snapshot's identity."""
        return tuple(f.name for group in cls.groups().values() for f in dataclasses.fields(group)
                     if f.metadata["identity"])

    def values(self) -> dict[str, Any]:
        """Every field by its flag dest, e.g. {'model': None, ..., 'kv_cache_memory': 8589934592, ...}."""
        return {f.name: getattr(g, f.name) for g in (getattr(self, name) for name in self.groups())
                for f in dataclasses.fields(g)}

    def identity_values(self) -> dict[str, Any]:
        """{field: value} of the identity fields (snapshot/identity.py hashes them)."""
        values = self.values()
        return {name: values[name] for name in self.identity_fields()}


_NAMES = [f.name for group in ServeConfig.groups().values() for f in dataclasses.fields(group)]
assert len(_NAMES) == len(set(_NAMES)), "a field name (a flag dest) in two groups"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check(config: ServeConfig) -> None:
    """Every check of a serve configuration that needs no machine, in one place; raises ConfigError."""
    v = config.values()
    for name, allowed in CHOICES.items():
        if v[name] not in allowed:
            raise ConfigError(f"{_flag(name)} must be one of {', '.join(allowed)}, not {v[name]!r}")

    def at_least(name: str, low: float, unit: str = "") -> None:
        if v[name] is not None and v[name] < low:
            raise ConfigError(f"{_flag(name)} must be at least {low}{unit}, not {v[name]}")

    for name in ("max_model_len", "tensor_parallel", "block_size", "max_num_seqs", "max_num_batched_tokens",
                 "default_max_tokens", "max_request_bytes", "max_header_bytes", "limit_concurrency"):
        at_least(name, 1)
    for name in ("timeout_keep_alive", "header_timeout"):
        if not 0 < v[name] < float("inf"):
            raise ConfigError(f"{_flag(name)} must be a number of seconds above 0, not {v[name]}")
    for name in ("device", "max_waiting", "standby_wait", "drain_timeout", "step_timeout"):
        at_least(name, 0)
    at_least("kv_cache_memory", 1, " byte")
    _check_nodes(config.device)
    if v["registration_ttl"] <= 0:
        raise ConfigError(f"--registration-ttl must be more than 0 seconds, not {v['registration_ttl']}")
    for url in v["register"]:  # before any weight is loaded: an engine that could never register fails now
        if url.startswith("etcd://") and importlib.util.find_spec("aetcd") is None:
            raise ConfigError(f"--register {url} needs the aetcd package, which is not installed (pip install "
                              f"'understudy[etcd]', or pip install aetcd)")
    if v["generation_config"] not in ("auto", "vllm") and not Path(v["generation_config"], "generation_config.json").is_file():
        raise ConfigError(f"--generation-config {v['generation_config']}: not auto, vllm or a directory with a "
                          f"generation_config.json")
    for name, known in (("tool_call_parser", TOOL_CALL_PARSERS), ("reasoning_parser", REASONING_PARSERS)):
        if v[name] is not None and v[name] not in known:
            raise ConfigError(f"{_flag(name)} must be one of {', '.join(known)}, not {v[name]!r}")
    if v["chat_template"] is not None:
        try:
            read_chat_template(v["chat_template"])
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if v["enable_auto_tool_choice"] and v["tool_call_parser"] is None:
        raise ConfigError("--enable-auto-tool-choice needs --tool-call-parser (which family's tool calls to parse)")
    if v["seed"] is not None and not 0 <= v["seed"] < 1 << 63:
        raise ConfigError(f"--seed must be in 0..2**63-1, not {v['seed']}")
    if len(set(v["served_model_name"])) != len(v["served_model_name"]) or "" in v["served_model_name"]:
        raise ConfigError(f"--served-model-name: names must be distinct and not empty: {v['served_model_name']}")
    if not 0 < v["gpu_memory_utilization"] <= 1:
        raise ConfigError(f"--gpu-memory-utilization must be a fraction in (0, 1], not {v['gpu_memory_utilization']}")
    if not 0 <= v["port"] <= 65535:
        raise ConfigError(f"--port must be in 0..65535, not {v['port']}")
    # On CUDA, decode steps run as CUDA graphs, which only the Triton attention can be captured in
    # (with --backend auto, whether CUDA is used is known only at start: bootstrap.start_engine says it then).
    if v["backend"] == "cuda" and v["attention"] == "reference" and not v["enforce_eager"]:
        raise ConfigError("CUDA graphs need --attention triton (or --enforce-eager): --backend cuda with "
                          "--attention reference")


def _check_nodes(d: DeviceOptions) -> None:
    """A group across nodes: every node runs the same number of ranks, and they must find the leader's store."""
    if d.nnodes < 1:
        raise ConfigError(f"--nnodes must be at least 1, not {d.nnodes}")
    if not 0 <= d.node_rank < d.nnodes:
        raise ConfigError(f"--node-rank must be in [0, --nnodes), not {d.node_rank}")
    if d.nnodes > 1:
        if d.tensor_parallel % d.nnodes:
            raise ConfigError(f"--tensor-parallel {d.tensor_parallel} does not divide into --nnodes {d.nnodes} "
                              f"nodes of equal size")
        if not 0 < d.master_port < 65536:
            raise ConfigError("--nnodes > 1 needs --master-port (the port of the group's store on the leader's node, "
                              "the same on every node)")

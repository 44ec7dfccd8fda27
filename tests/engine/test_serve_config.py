"""ServeConfig: the one frozen, checked configuration of `understudy serve` (engine/serve_config.py)."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from understudy.cli import build_parser, main
from understudy.engine.options import config_from_args, parse_serve_args
from understudy.engine.serve_config import (ConfigError, DeviceOptions, KVOptions, ModelOptions, OutputOptions,
                                            ServeConfig)
from understudy.snapshot.identity import identity, params_from_config, params_from_serve_argv

from tests.helpers.procs import BACKEND

ARGV = ["--model", "/models/llama", "--dtype", "bfloat16", "--kv-cache-memory", "8GiB", "--block-size", "32",
        "--register", "http://127.0.0.1:9000", "--register", "etcd://127.0.0.1:2379", "--role", "shadow",
        "--tensor-parallel", "2", "--port", "8123", "--log-format", "text", "--no-progress"]


def test_the_config_is_frozen():
    config = parse_serve_args(ARGV)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.kv.block_size = 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.kv = KVOptions()
    assert config.discovery.register == ("http://127.0.0.1:9000", "etcd://127.0.0.1:2379")  # a tuple, not a list
    assert hash(config) == hash(parse_serve_args(ARGV))  # frozen all the way down: it can key a dict


def test_async_scheduling_is_vllms_spelling_of_overlap_decode_on():
    assert parse_serve_args([]).model.overlap_decode == "auto"
    assert parse_serve_args(["--async-scheduling"]).model.overlap_decode == "on"
    assert parse_serve_args(["--overlap-decode", "off"]).model.overlap_decode == "off"


def test_sizes_are_parsed_into_ints_by_argparse():
    assert parse_serve_args(["--kv-cache-memory", "8GiB"]).kv.kv_cache_memory == 8 << 30
    assert parse_serve_args(["--kv-cache-memory", "512MiB"]).kv.kv_cache_memory == 512 << 20
    assert parse_serve_args(["--kv-cache-memory", "4096"]).kv.kv_cache_memory == 4096
    assert parse_serve_args([]).kv.kv_cache_memory is None


def test_a_bad_size_exits_2_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as e:
        parse_serve_args(["--kv-cache-memory", "8XB"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "understudy serve: error: argument --kv-cache-memory: not a size: '8XB'" in err, err


@pytest.mark.parametrize("argv, flag", [
    (["--backend", "cuda", "--attention", "reference"], "--attention triton (or --enforce-eager)"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
    (["--gpu-memory-utilization", "0"], "--gpu-memory-utilization"),
    (["--block-size", "0"], "--block-size"),
    (["--max-num-batched-tokens", "0"], "--max-num-batched-tokens"),
    (["--max-num-seqs", "0"], "--max-num-seqs"),
    (["--kv-cache-memory", "0"], "--kv-cache-memory"),
    (["--max-model-len", "0"], "--max-model-len"),
    (["--port", "70000"], "--port"),
    (["--registration-ttl", "0"], "--registration-ttl"),
])
def test_values_that_cannot_run_exit_2_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        parse_serve_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "understudy serve: error: " in err and flag in err, err
    # `understudy serve` says the same before it starts anything (no memory service, no model)
    with pytest.raises(SystemExit) as e:
        main(["serve", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("understudy serve: error: ") and flag in err, err


def test_a_cross_field_combination_is_refused_in_code_too():
    with pytest.raises(ConfigError, match="--attention triton .or --enforce-eager."):
        ServeConfig(model=ModelOptions(attention="reference"), device=DeviceOptions(backend="cuda"))
    ServeConfig(model=ModelOptions(attention="reference", enforce_eager=True), device=DeviceOptions(backend="cuda"))
    ServeConfig(model=ModelOptions(attention="reference"), device=DeviceOptions(backend="auto"))  # known at start
    with pytest.raises(ConfigError, match="--dtype must be one of"):
        ServeConfig(model=ModelOptions(dtype="int8"))


def test_parse_serve_args_is_what_understudy_serve_builds():
    for argv in ([], ARGV, ["--kv-cache-memory=1.5G", "--enforce-eager", "--attention", "triton"]):
        ns = build_parser().parse_args(["serve", *argv])
        assert config_from_args(ns) == parse_serve_args(argv), argv
        # every serve flag has its field, named after the flag's dest
        assert set(vars(ns)) - {"command"} == set(parse_serve_args(argv).values())
    assert parse_serve_args([]) == ServeConfig()  # the flags' defaults are the config's


def test_identity_fields_are_what_snapshot_identity_uses():
    fields = set(ServeConfig.identity_fields())
    params = params_from_serve_argv(ARGV)
    assert {"model", "dtype", "max_model_len"} | set(params["extra"]) == fields
    assert params == params_from_config(parse_serve_args(ARGV))
    assert not fields & {"role", "host", "port", "device", "socket_dir", "failover_dir", "memory_service",
                         "register", "advertise_url", "registration_ttl", "kv_cache_memory",
                         "gpu_memory_utilization", "log_format", "log_level", "no_progress"}
    # each field changes the identity exactly when it is an identity field
    other = {"model": "/models/other", "served_model_name": ("m",), "dtype": "float16", "enforce_eager": True,
             "overlap_decode": "on", "attention": "triton", "prefill_attention": "reference", "max_model_len": 256, "role": "shadow",
             "failover_dir": "/x", "standby_wait": 1.0, "step_timeout": 5.0, "register": ("http://h:1",),
             "advertise_url": "http://h:2",
             "registration_ttl": 3.0, "backend": "host", "device": 3, "tensor_parallel": 4, "socket_dir": "/y",
             "memory_service": "connect", "kv_cache_memory": 1 << 30, "gpu_memory_utilization": 0.5,
             "block_size": 32, "max_num_seqs": 8, "max_num_batched_tokens": 512, "max_waiting": 4,
             "default_max_tokens": 16, "host": "0.0.0.0", "port": 9, "max_request_bytes": 1024,
             "drain_timeout": 1.0, "timeout_keep_alive": 1.0, "header_timeout": 2.0, "max_header_bytes": 4096,
             "limit_concurrency": 8, "log_format": "text", "log_level": "debug", "no_progress": True,
             "quantization": "fp8", "kv_cache_dtype": "fp8", "seed": 7, "chat_template": "{{ messages }}",
             "generation_config": "vllm", "tool_call_parser": "hermes", "reasoning_parser": "qwen3",
             "enable_auto_tool_choice": True, "api_key": ("k",), "admin_token_file": "/t",
             "allowed_origins": ("*",), "allowed_methods": ("GET",), "allowed_headers": ("X",),
             "nnodes": 2, "node_rank": 1, "master_addr": "10.0.0.1", "master_port": 29500}
    companions = {"enable_auto_tool_choice": {"tool_call_parser": "hermes"},  # it needs a parser
                  "nnodes": {"tensor_parallel": 2, "master_port": 29500},  # a group across 2 nodes
                  "node_rank": {"tensor_parallel": 2, "nnodes": 2, "master_port": 29500}}
    base = ServeConfig()
    assert set(other) == set(base.values())
    for group in ServeConfig.groups():
        for f in dataclasses.fields(getattr(base, group)):
            # the field alone changes, over a config that has its companions already
            companion = companions.get(f.name, {})
            before = dataclasses.replace(base, **{group: dataclasses.replace(getattr(base, group), **companion)})
            changed = dataclasses.replace(base, **{group: dataclasses.replace(getattr(base, group), **companion,
                                                                              **{f.name: other[f.name]})})
            ident = identity(params_from_config(before))
            assert (identity(params_from_config(changed)) != ident) == (f.name in fields), f.name


def test_the_flags_import_neither_the_cli_nor_torch():
    code = ("import sys, understudy.engine.options, understudy.snapshot.identity, understudy.node.supervisor; "
            "bad = {'understudy.cli', 'torch'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_node_gives_the_frontend_the_engines_model_flags():
    from understudy.node.supervisor import frontend_flags

    assert frontend_flags(["--model", "/m", "--port", "1", "--served-model-name=n", "--no-progress"]) == [
        "--model", "/m", "--served-model-name", "n"]
    assert frontend_flags(["--kv-cache-memory", "64MiB"]) == []


def test_build_engine_gives_an_engine_to_step_by_hand():
    """The public builder bench/ uses: the default model, its own memory service, stepped without HTTP
    (--overlap-decode on, which the CPU's auto leaves off: the flag reaches the engine)."""
    from understudy.engine.core.sampling import SamplingParams
    from understudy.engine.launch import build_engine

    socket_dir = Path(tempfile.mkdtemp(prefix="us-cfg-", dir="/tmp"))
    config = ServeConfig(model=ModelOptions(overlap_decode="on"),
                         device=DeviceOptions(backend=BACKEND, socket_dir=str(socket_dir)),
                         kv=KVOptions(kv_cache_memory=32 << 20), output=OutputOptions(no_progress=True))
    built = build_engine(config)
    try:
        assert built.memory_server is not None and built.worker.state == "ACTIVE"
        engine = built.engine
        assert engine.overlap_decode
        prompt = built.worker.tokenizer.encode("The capital of France is")
        engine.add_request("r", prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        tokens = []
        while engine.has_work:
            tokens += [t for o in engine.step() for t in o.new_token_ids]
        assert len(tokens) == 4
        assert "Paris" in built.worker.tokenizer.decode(tokens)
    finally:
        built.close()
        shutil.rmtree(socket_dir, ignore_errors=True)
    assert built.memory_server.returncode is not None

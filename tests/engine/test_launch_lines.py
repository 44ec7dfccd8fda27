"""The launch lines a vLLM user types, each starting a real `understudy serve` on a tiny model (CPU) that serves
the official openai client: `serve MODEL` (positional), -tp / --tensor-parallel-size, several
--served-model-name, --max-model-len 1K / 1k (vLLM's rule: an uppercase suffix is binary, a lowercase one
decimal), --dtype float / half, --chat-template FILE, --generation-config DIR, --seed. Flags vLLM has and we
do not are refused, naming the flag.

Each engine gets its own memory service (engines of different dtypes cannot share one's pools).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import openai
import pytest

from understudy.engine.options import parse_serve_args, serve_parser

from tests.helpers.procs import ServerProcess, free_port, serve_process
from tests.helpers.tiny_model import make_tiny_llama

ENV = {"OMP_NUM_THREADS": "1"}
KV = ["--kv-cache-memory", "8MiB"]
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")  # no chat template of its own


@contextlib.contextmanager
def serving(*argv: str):
    """`understudy serve ARGV` on its own memory service: (engine_ready event, base URL)."""
    d = Path(tempfile.mkdtemp(prefix="us-ll-", dir="/tmp"))
    mem = ServerProcess.start("host", d)
    port = free_port()
    engine = serve_process(d, port, *KV, *argv, env=ENV, backend="host")
    try:
        ready = json.loads(engine.wait_line(lambda l: '"event": "engine_ready"' in l, timeout=180))
        engine.wait_line(lambda l: '"event": "serving"' in l, timeout=60)
        yield ready, f"http://127.0.0.1:{port}"
    finally:
        engine.kill()
        mem.stop()
        shutil.rmtree(d, ignore_errors=True)


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="-", max_retries=0, timeout=120)


def test_positional_model_tp_two_names_binary_size_float_chat_template_and_seed(tiny, tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text(TEMPLATE)
    with serving(str(tiny), "-tp", "1", "--served-model-name", "alpha", "beta", "--max-model-len", "1K",
                 "--dtype", "float", "--chat-template", str(template), "--seed", "5") as (ready, base):
        assert ready["dtype"] == "torch.float32" and ready["max_model_len"] == 1024
        models = httpx.get(f"{base}/v1/models").json()["data"]
        assert [(m["id"], m["max_model_len"]) for m in models] == [("alpha", 1024), ("beta", 1024)]
        c = client(base)
        for name in ("alpha", "beta"):  # a request may name either; its answer carries that name (as vLLM)
            r = c.completions.create(model=name, prompt="hello", max_tokens=4, temperature=0)
            assert r.model == name and r.usage.completion_tokens == 4
            chunks = list(c.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=2, stream=True))
            assert {ch.model for ch in chunks} == {name}
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model="gamma", prompt="hello", max_tokens=1)
        # The tiny model has no chat template: chat works through --chat-template's (byte tokens: one per byte).
        chat = c.chat.completions.create(model="beta", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert chat.usage.prompt_tokens == len("<user>hi\n<assistant>".encode())
        # --seed 5: a request without a seed samples as with seed 5 (temperature 2: samples differ by seed)
        kw = dict(model="alpha", prompt="once upon a time", max_tokens=12, temperature=2.0)
        unseeded = c.completions.create(**kw).choices[0].text
        assert unseeded == c.completions.create(**kw, seed=5).choices[0].text
        assert unseeded != c.completions.create(**kw, seed=6).choices[0].text


def test_tensor_parallel_size_half_decimal_size_and_generation_config_dir(tiny, tmp_path):
    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 3,
                                                            "do_sample": True}))
    with serving("--model", str(tiny), "--tensor-parallel-size", "1", "--dtype", "half", "--max-model-len", "1k",
                 "--generation-config", str(gen)) as (ready, base):
        assert ready["dtype"] == "torch.float16" and ready["max_model_len"] == 1000  # 1k = 1000, as vLLM
        c = client(base)
        name = c.models.list().data[0].id
        assert name == "tiny-llama"
        # generation_config.json's max_new_tokens and temperature fill what the request omits ...
        defaults = c.completions.create(model=name, prompt="hello")
        assert defaults.usage.completion_tokens == 3  # the tiny model has no EOS: it stops at max_tokens
        greedy = c.completions.create(model=name, prompt="hello", max_tokens=3, temperature=0)
        assert defaults.choices[0].text == greedy.choices[0].text
        # ... and never what it gives
        assert c.completions.create(model=name, prompt="hello", max_tokens=5).usage.completion_tokens == 5


@pytest.mark.parametrize("argv, named", [
    (["--enable-lora"], "--enable-lora"),  # vLLM flags we do not have: refused, never ignored
    (["--pipeline-parallel-size", "2"], "--pipeline-parallel-size"),
    (["--max-model-len", "1.5K"], "--max-model-len"),  # binary suffixes take whole numbers (vLLM's rule)
    (["--dtype", "int8"], "--dtype"),
    (["--generation-config", "/nonexistent"], "--generation-config"),
    (["--chat-template", "/nonexistent/template.jinja"], "--chat-template"),
    (["--enable-auto-tool-choice"], "--tool-call-parser"),
    (["--tool-call-parser", "nope"], "--tool-call-parser"),
    (["--reasoning-parser", "nope"], "--reasoning-parser"),
    (["/models/a", "--model", "/models/b"], "--model"),
])
def test_what_cannot_run_is_refused_naming_the_flag(argv, named, capsys):
    with pytest.raises(SystemExit) as e:
        parse_serve_args(argv)
    assert e.value.code == 2 and named in capsys.readouterr().err


def test_the_spellings_are_one_config():
    same = parse_serve_args(["/m", "-tp", "2", "--dtype", "half", "--max-model-len", "32K"])
    assert same == parse_serve_args(["--model", "/m", "--tensor-parallel", "2", "--dtype", "float16",
                                     "--max-model-len", "32768"])
    assert parse_serve_args(["--max-model-len", "32k"]).model.max_model_len == 32000
    names = parse_serve_args(["--served-model-name", "a", "b", "--served-model-name", "c"]).model.served_model_name
    assert names == ("a", "b", "c")


def test_every_flag_is_explained_in_help():
    import argparse

    from understudy.frontend.options import add_frontend_arguments

    frontend = argparse.ArgumentParser()
    add_frontend_arguments(frontend)
    for command, parser in (("serve", serve_parser()), ("frontend", frontend)):
        out = subprocess.run([sys.executable, "-m", "understudy", command, "--help"], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0
        for action in parser._actions:
            assert action.help, (command, action.option_strings or action.dest)
            assert all(flag in out.stdout for flag in action.option_strings), (command, action.option_strings)

"""A tiny random Llama served by a real `understudy serve` process on the CPU, for the OpenAI-field tests:
a byte-level tokenizer (token = byte), no EOS (answers run to max_tokens), a chat template that renders
tools, assistant tool calls and tool results (Qwen's layout, short)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import httpx
import openai

from understudy.common.auth import admin_headers
from understudy.common.tokenizer import Tokenizer
from tests.helpers.procs import ServerProcess, free_port, serve_process
from tests.helpers.streams import event_of
from tests.helpers.tiny_model import make_tiny_llama

BACKEND = "host"
MAX_MODEL_LEN = 1024
ENV = {"OMP_NUM_THREADS": "1"}

CHAT_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools:\n{%- for t in tools %}{{ t | tojson }}\n{%- endfor %}"
    "<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{%- if m.tool_calls %}{%- for c in m.tool_calls %}<tool_call>{\"name\": \"{{ c.function.name }}\", "
    "\"arguments\": {{ c.function.arguments | tojson }}}</tool_call>{%- endfor %}{%- endif %}"
    "{%- if m.tool_call_id %} [{{ m.tool_call_id }}]{%- endif %}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- if enable_thinking is defined and not "
    "enable_thinking %}<think></think>{%- endif %}{%- endif %}")


def write_model(d: Path, **config) -> Path:
    make_tiny_llama(d, **config)
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return d


MISTRAL_SPECIAL = ("[TOOL_CALLS]", "</s>")  # ids 256 and 257
# A lark grammar that makes the tiny model write text, the other special token, the marker token, a call.
MISTRAL_CALL = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'
MISTRAL_GRAMMAR = f'start: "Sure." <[257]> <[256]> {json.dumps(MISTRAL_CALL)}'


def write_mistral_model(d: Path) -> Path:
    """The tiny model with `[TOOL_CALLS]` (id 256) and `</s>` (id 257) as special tokens, as in Mistral's
    vocabulary: a detokenizer that skips special tokens loses the tool-call marker."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend

    write_model(d, vocab_size=256 + len(MISTRAL_SPECIAL))
    backend = Backend.from_file(str(d / "tokenizer.json"))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in MISTRAL_SPECIAL])
    backend.save(str(d / "tokenizer.json"))
    return d


class TinyServer:
    """A memory service and one engine serving the tiny model (extra: more `serve` flags)."""

    def __init__(self, model: Path, *extra: str):
        self.dir = Path(tempfile.mkdtemp(prefix="us-oai-", dir="/tmp"))  # short: unix socket paths
        self.mem = ServerProcess.start(BACKEND, self.dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.max_model_len = MAX_MODEL_LEN
        self.proc = serve_process(self.dir, self.port, "--model", str(model), "--dtype", "float32",
                                  "--kv-cache-memory", "8MiB", "--max-model-len", str(MAX_MODEL_LEN), *extra,
                                  env=ENV, backend=BACKEND)
        try:
            serving = event_of(self.proc.wait_line(lambda l: '"event": "serving"' in l, timeout=180))
        except BaseException:
            self.close()
            raise
        self.model = serving["model"]
        self.tokenizer = Tokenizer.from_pretrained(model)
        self.http = httpx.Client(base_url=self.url, timeout=120, headers=admin_headers())
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def wait_for(self, predicate, timeout: float = 30.0) -> dict:
        for line in list(self.proc.lines):
            if predicate(line):
                return event_of(line)
        return event_of(self.proc.wait_line(predicate, timeout=timeout))

    def close(self) -> None:
        if getattr(self, "proc", None) is not None and self.proc.proc.poll() is None:
            self.proc.kill()
        self.mem.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

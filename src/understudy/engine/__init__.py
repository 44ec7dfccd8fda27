"""The model layer of the inference engine.

config.py     ModelConfig: what the engine needs from a checkpoint's config
attention.py  paged-KV attention over a flat batch (plain-torch reference path)
model.py      one decoder implementation for Llama / Qwen2 / Qwen3
loader.py     configs and streamed weights from HF safetensors dirs or GGUF files
tokenizer.py  encode/decode, chat templates, streaming detokenization
default_model.py  where the built-in SmolLM2-135M-Instruct GGUF lives
"""

import importlib

# Imported on first use (PEP 562): the frontend uses the tokenizer and the request models without
# paying for torch, which the model layer needs.
_HOMES = {
    "AttentionFn": "attention", "AttentionMetadata": "attention", "reference_attention": "attention",
    "store_kv": "attention", "SUPPORTED_MODEL_TYPES": "config", "ModelConfig": "config",
    "UnsupportedModelError": "config", "DefaultModelMissing": "default_model",
    "default_model_path": "default_model", "iter_weights": "loader", "load_config": "loader",
    "load_model": "loader", "CausalLM": "model", "IncrementalDetokenizer": "tokenizer", "Tokenizer": "tokenizer",
}


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AttentionFn",
    "AttentionMetadata",
    "CausalLM",
    "DefaultModelMissing",
    "IncrementalDetokenizer",
    "ModelConfig",
    "SUPPORTED_MODEL_TYPES",
    "Tokenizer",
    "UnsupportedModelError",
    "default_model_path",
    "iter_weights",
    "load_config",
    "load_model",
    "reference_attention",
    "store_kv",
]

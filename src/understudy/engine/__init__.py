"""The model layer of the inference engine.

config.py     ModelConfig: what the engine needs from a checkpoint's config
attention.py  paged-KV attention over a flat batch (plain-torch reference path)
model.py      one decoder implementation for Llama / Qwen2 / Qwen3
loader.py     configs and streamed weights from HF safetensors dirs or GGUF files
tokenizer.py  encode/decode, chat templates, streaming detokenization
default_model.py  where the built-in SmolLM2-135M-Instruct GGUF lives
"""

from .attention import AttentionFn, AttentionMetadata, reference_attention, store_kv
from .config import SUPPORTED_MODEL_TYPES, ModelConfig, UnsupportedModelError
from .default_model import DefaultModelMissing, default_model_path
from .loader import iter_weights, load_config, load_model
from .model import CausalLM
from .tokenizer import IncrementalDetokenizer, Tokenizer

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

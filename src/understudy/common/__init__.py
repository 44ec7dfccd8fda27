"""Torch-free pieces the engine and the frontend both use: OpenAI request bodies (api), sampling
parameters (params), tokenizer and chat templates (tokenizer), streamed detokenization (text), GGUF
metadata (gguf_file), the built-in model's path (default_model), lifecycle state names (states), sizes (units).
"""

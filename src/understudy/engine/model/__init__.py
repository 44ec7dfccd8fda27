"""Models: what a checkpoint says (config), the one decoder for Llama / Qwen2 / Qwen3, reading checkpoints
(loader, fast_load), publishing to and importing from the memory service (weights), and what is
per-rank about a model under tensor parallelism (sharding).
"""

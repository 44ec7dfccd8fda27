"""Models: what a checkpoint says (config; each family's flags: families), the one decoder for every family
(decoder; RoPE variants: rope; where each checkpoint tensor lands among its fused / stacked parameters:
layout), reading checkpoints (loader, fast_load), publishing to and importing from
the memory service (weights), and what is per-rank about a model under tensor parallelism (sharding).
"""

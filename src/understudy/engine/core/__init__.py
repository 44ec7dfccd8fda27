"""The engine itself, no HTTP: the loop (llm_engine), scheduler, block manager with prefix caching,
sequences, sampling, the paged KV cache over the memory service's kv pool, decode CUDA graphs, and the
engine thread with its asyncio face (async_engine).
"""

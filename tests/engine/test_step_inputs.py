"""A step's inputs built on the host with numpy (AttentionMetadata.build, StepGraphs._fill, the block hashes,
the sealed-block index) against the plain per-token Python loops they replace."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest
import torch

from understudy.engine.core.block_manager import BlockManager
from understudy.engine.core.cuda_graphs import Bucket, StepGraphs
from understudy.engine.core.kv_cache import INDEX_ENTRY, KVCache, KVSpec
from understudy.engine.core.sampling import SamplingParams
from understudy.engine.core.sequence import Sequence
from understudy.engine.layers.attention import AttentionMetadata


def loop_positions_and_slots(query_lens, context_lens, tables, block_size):
    """Each new token's position and cache slot, one token at a time."""
    positions, slots = [], []
    for q_len, ctx, table in zip(query_lens, context_lens, tables):
        for pos in range(ctx - q_len, ctx):
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    return positions, slots


def random_batch(rng: random.Random, block_size: int):
    """Several sequences: prefills, chunks that start mid-sequence, decodes; tables wider than they need."""
    query_lens, context_lens, tables = [], [], []
    for _ in range(rng.randint(1, 6)):
        ctx = rng.randint(1, 40)
        query_lens.append(rng.choice([1, ctx, rng.randint(1, ctx)]))
        context_lens.append(ctx)
        tables.append(rng.sample(range(1, 100), -(-ctx // block_size) + rng.randint(0, 3)))
    return query_lens, context_lens, tables, block_size


BATCHES = [
    ([3, 1, 5], [3, 9, 12], [[7], [2, 4, 8], [1, 3, 5]], 4),  # a prefill, a decode, a chunk after 7 tokens
    ([1, 1, 1, 1], [1, 5, 16, 17], [[3], [9, 2], [4, 5, 6, 7], [8, 10, 11, 12, 13]], 4),  # decodes
    ([2048], [2048], [list(range(128, 0, -1))], 16),  # a long prompt in reversed blocks
] + [random_batch(random.Random(seed), bs) for seed in range(8) for bs in (1, 4, 16)]


@pytest.mark.parametrize("query_lens,context_lens,tables,block_size", BATCHES)
def test_metadata_build_matches_a_per_token_loop(query_lens, context_lens, tables, block_size):
    meta = AttentionMetadata.build(query_lens, context_lens, tables, block_size)
    positions, slots = loop_positions_and_slots(query_lens, context_lens, tables, block_size)
    assert meta.slot_mapping.dtype == torch.long and meta.slot_mapping.tolist() == slots
    assert meta.positions().dtype == torch.long and meta.positions().tolist() == positions
    starts = [0]
    for q_len in query_lens:
        starts.append(starts[-1] + q_len)
    assert meta.query_start_loc.dtype == torch.int32 and meta.query_start_loc.tolist() == starts
    assert meta.query_start_loc_host == tuple(starts)
    assert meta.context_lens.tolist() == list(context_lens) and meta.context_lens_host == tuple(context_lens)
    width = max(map(len, tables))
    assert meta.block_tables.dtype == torch.int32
    assert meta.block_tables.tolist() == [list(t) + [0] * (width - len(t)) for t in tables]
    assert (meta.max_query_len, meta.max_context_len) == (max(query_lens), max(context_lens))
    # metadata made without build (the CUDA graphs' own) computes the same positions from its host copies
    direct = AttentionMetadata(meta.query_start_loc, meta.context_lens, meta.block_tables, meta.slot_mapping,
                               meta.max_query_len, meta.max_context_len, meta.query_start_loc_host,
                               meta.context_lens_host)
    assert direct.positions().tolist() == positions


def test_metadata_build_names_the_first_bad_sequence():
    with pytest.raises(ValueError, match="block table of 1 blocks is too short for 5 tokens"):
        AttentionMetadata.build([1, 1, 0], [4, 5, 4], [[1], [2], [3]], block_size=4)
    with pytest.raises(ValueError, match="need 0 < query_len <= context_len, got 0 and 4"):
        AttentionMetadata.build([1, 1, 0], [4, 4, 4], [[1], [2], [3]], block_size=4)
    with pytest.raises(ValueError, match="need 0 < query_len <= context_len, got 6 and 5"):
        AttentionMetadata.build([1, 6], [4, 5], [[1], [2]], block_size=4)
    with pytest.raises(ValueError, match="one entry per sequence"):
        AttentionMetadata.build([1, 1], [4], [[1]], block_size=4)


@pytest.mark.parametrize("query_lens,context_lens,tables,block_size",
                         [b for b in BATCHES if sum(b[0]) <= 64 and len(b[0]) <= 4 and max(map(len, b[2])) <= 64])
def test_graph_inputs_match_a_per_token_loop(query_lens, context_lens, tables, block_size):
    """StepGraphs._fill shares build's arithmetic: its mixed bucket's positions, slots and tables."""
    kv = [(torch.zeros(100, block_size, 1, 1), torch.zeros(100, block_size, 1, 1))]
    graphs = StepGraphs(None, kv, max_batch=4, max_blocks_per_seq=64, max_tokens=64, device=torch.device("cpu"))
    b = Bucket(64, 5, 4, False)
    ids = list(range(1, sum(query_lens) + 1))
    graphs._fill(b, ids, query_lens, context_lens, tables, [len(ids) - 1])
    got_ids, got_positions, got_slots, _, query_start, ctx = graphs._views(b)
    positions, slots = loop_positions_and_slots(query_lens, context_lens, tables, block_size)
    used = len(ids)
    assert got_ids[:used].tolist() == ids
    assert got_positions[:used].tolist() == positions and got_slots[:used].tolist() == slots
    n = len(query_lens)
    assert query_start[:n + 1].tolist() == np.concatenate([[0], np.cumsum(query_lens)]).tolist()
    assert ctx[:n].tolist() == list(context_lens)
    for i, t in enumerate(tables):
        assert graphs.block_tables[i, :len(t)].tolist() == list(t)
    # the padding: one dummy sequence over block 0
    assert got_positions[used:].tolist() == list(range(64 - used))
    assert got_slots[used:].tolist() == [p % block_size for p in range(64 - used)]


def chained_hashes(tokens: list[int], block_size: int) -> list[bytes]:
    """The prefix hashes one block at a time, as the block manager has always defined them."""
    out, parent = [], b""
    for i in range(len(tokens) // block_size):
        block = np.asarray(tokens[i * block_size:(i + 1) * block_size], dtype=np.int64).tobytes()
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        out.append(parent)
    return out


def _seq(rid: str, prompt: list[int]) -> Sequence:
    return Sequence(rid, prompt, SamplingParams(max_tokens=4))


def test_block_hashes_match_one_block_at_a_time():
    rng = random.Random(0)
    tokens = [rng.randrange(50_000) for _ in range(203)]
    blocks = BlockManager(64, 16)
    seq = _seq("a", tokens[:150])
    assert blocks.hashes(seq, 40) == chained_hashes(tokens[:32], 16)  # two blocks
    assert blocks.hashes(seq, 150) == chained_hashes(tokens[:150], 16)  # extended from there
    seq.output = tokens[150:]  # across the prompt's end
    assert blocks.hashes(seq, 203) == chained_hashes(tokens, 16)


def test_prefix_match_hashes_up_to_the_first_miss():
    rng = random.Random(1)
    prompt = [rng.randrange(50_000) for _ in range(100)]
    blocks = BlockManager(64, 16)
    first = _seq("a", prompt)
    assert blocks.reserve(first, 100)
    first.num_computed = 100
    blocks.seal(first)  # 6 full blocks cached
    assert first.block_hashes == chained_hashes(prompt, 16)

    second = _seq("b", prompt[:40] + [1] * 60)  # shares 2 blocks, the third differs
    blocks.match_prefix(second)
    assert second.block_table == first.block_table[:2] and second.num_computed == 32
    assert second.block_hashes == chained_hashes(second.prompt, 16)[:3]  # hashed up to the miss only
    assert blocks.reserve(second, 68)
    second.num_computed = 100
    blocks.seal(second)  # the rest hashed (and sealed) as before
    assert second.block_hashes == chained_hashes(second.prompt, 16)
    assert [blocks.hash_of[b] for b in second.block_table[:6]] == chained_hashes(second.prompt, 16)


def test_write_index_records_hashes_and_clears_recycled_blocks():
    spec = KVSpec(num_layers=1, num_blocks=8, block_size=4, num_kv_heads=1, head_dim=2, dtype="float32")
    kv = KVCache.local(spec, "cpu")
    h3, h5 = bytes(range(16)), bytes(range(100, 116))
    kv.index[6] = 7
    kv.write_index([(3, h3), (5, h5), (6, None)])
    assert kv.index.shape == (8, INDEX_ENTRY)
    assert bytes(kv.index[3].tolist()) == h3 and bytes(kv.index[5].tolist()) == h5
    assert kv.index[6].tolist() == [0] * INDEX_ENTRY
    assert kv.read_index() == {3: h3, 5: h5}

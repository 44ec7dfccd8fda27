"""Paged KV blocks: allocation, reference counts and prefix caching by block hash.

A block is *sealed* once all its token slots hold computed K/V; its hash chains
the hash of the block before it with its own token ids, so equal hashes mean
equal prefixes. Sealed blocks stay findable after their sequences finish, until
their memory is needed (least recently freed go first).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from understudy.engine.core.sequence import Sequence


def block_hash(parent: bytes, token_bytes: bytes) -> bytes:
    """The hash of a block whose token ids are `token_bytes` (int64, native order) after the prefix hashed as
    `parent`. Stable across processes (a promoted shadow must compute the same hashes)."""
    return hashlib.blake2b(parent + token_bytes, digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.refs = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.by_hash: dict[bytes, int] = {}
        # Block 0 is never handed out: padded rows of a fixed-size (CUDA graph) batch write there.
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self.prefix_hits = 0  # tokens served from the cache, for metrics
        self.prefix_queries = 0
        # (block, hash) sealed / (block, None) recycled since the last take_index_updates():
        # the engine mirrors them into the sealed-block index in the kv pool.
        self.index_updates: list[tuple[int, bytes | None]] = []

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def capacity(self) -> int:
        """Blocks that sequences can use."""
        return self.num_blocks - 1

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.capacity

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take(self) -> int:
        block, _ = self.free.popitem(last=False)
        h = self.hash_of[block]
        if h is not None:  # evict its cached prefix
            if self.by_hash.get(h) == block:
                del self.by_hash[h]
            self.hash_of[block] = None
            self.index_updates.append((block, None))
        self.refs[block] = 1
        return block

    def hashes(self, seq: Sequence, upto_tokens: int) -> list[bytes]:
        """The sequence's chained block hashes, extended to its full blocks up to `upto_tokens`.

        Each hash is computed once; callers read the first upto_tokens // block_size entries."""
        bs, hashes = self.block_size, seq.block_hashes
        done, full = len(hashes), upto_tokens // bs
        if full > done:  # the new blocks' tokens as bytes in one conversion, sliced per block
            data, width = np.asarray(seq.token_slice(done * bs, full * bs), dtype=np.int64).tobytes(), bs * 8
            for i in range(full - done):
                hashes.append(block_hash(hashes[-1] if hashes else b"", data[i * width:(i + 1) * width]))
        return hashes

    def match_prefix(self, seq: Sequence) -> None:
        """Give a new sequence the cached blocks of its longest cached prefix.

        At least one token is always left to compute, so there are logits to sample from."""
        assert not seq.block_table
        self.prefix_queries += seq.num_tokens
        # Hash block by block up to the first miss: the rest are hashed later (seal), off the critical path
        # when the engine does it while the device computes (LLMEngine._forward_eager).
        for i in range((seq.num_tokens - 1) // self.block_size):
            block = self.by_hash.get(self.hashes(seq, (i + 1) * self.block_size)[i])
            if block is None:
                break
            if self.refs[block] == 0:
                del self.free[block]
            self.refs[block] += 1
            seq.block_table.append(block)
        seq.num_computed = len(seq.block_table) * self.block_size
        seq.num_sealed = len(seq.block_table)
        seq.num_cached_prompt = seq.num_computed
        self.prefix_hits += seq.num_computed

    def reserve(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make room for the next `num_new_tokens` of `seq`; False if the cache is full."""
        need = self.blocks_needed(seq.num_computed + num_new_tokens) - len(seq.block_table)
        if need > self.num_free:
            return False
        seq.block_table += [self._take() for _ in range(need)]
        return True

    def seal(self, seq: Sequence) -> list[tuple[int, bytes]]:
        """Register the blocks that became full; returns (block, hash) of the newly sealed."""
        sealed = []
        full = seq.num_computed // self.block_size
        hashes = self.hashes(seq, seq.num_computed)
        for i in range(seq.num_sealed, full):
            block, h = seq.block_table[i], hashes[i]
            if self.hash_of[block] is None and h not in self.by_hash:
                self.hash_of[block] = h
                self.by_hash[h] = block
                sealed.append((block, h))
        seq.num_sealed = max(seq.num_sealed, full)
        self.index_updates += sealed
        return sealed

    def take_index_updates(self) -> list[tuple[int, bytes | None]]:
        updates, self.index_updates = self.index_updates, []
        return updates

    def restore(self, sealed: dict[int, bytes]) -> int:
        """Adopt a previous owner's sealed blocks as cached prefixes; returns how many."""
        restored = 0
        for block, h in sealed.items():
            if 0 < block < self.num_blocks and self.refs[block] == 0 and h not in self.by_hash:
                self.hash_of[block] = h
                self.by_hash[h] = block
                self.free.move_to_end(block)  # cached: reused after blocks that hold nothing
                restored += 1
        return restored

    def release(self, seq: Sequence) -> None:
        """Drop the sequence's blocks; sealed ones stay cached until their memory is reused."""
        for block in reversed(seq.block_table):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free[block] = None  # most recently freed go last...
                if self.hash_of[block] is None:
                    self.free.move_to_end(block, last=False)  # ...but blocks worth nothing go first
        seq.block_table = []
        seq.num_sealed = 0

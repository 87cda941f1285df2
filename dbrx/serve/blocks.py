"""The KV-cache block pool: fixed-size blocks, reference counts, and prefix caching by chained block hashes.

The cache is `num_blocks` blocks of `block_size` token slots; slot id = block * block_size + offset, so a sequence's
list of block ids (its block table) maps each token position to a slot. Block 0 is reserved as the null block:
it is never handed out, so padded block tables and padded slot mappings can point at it without touching any
sequence's cache.

Prefix caching: a full block is named by `chain_hash(parent, its token ids)`, where the parent is the previous
block's hash (`ROOT_HASH` for the first), so equal hashes mean equal whole prefixes. A sequence with a `salt` (the
name of the LoRA adapter it runs under) starts its chain from a root of its own, `root_hash(salt)`: its blocks
match only those of sequences with the same salt, whose KV was computed by the same weights. Cached blocks are shared
between sequences with reference counts; a cached block whose count drops to 0 keeps its hash on an LRU free list
and is evicted (hash dropped) only when a block is needed and no uncached free block remains.

Pure Python bookkeeping; imports nothing from dbrx.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence

NULL_BLOCK = 0
ROOT_HASH = hashlib.blake2b(b"dbrx.serve.blocks root", digest_size=16).digest()


class NoFreeBlocks(RuntimeError):
    """The pool cannot hold the request; the pool was left unchanged."""


def root_hash(salt: str | None = None) -> bytes:
    """The parent of a sequence's first block: ROOT_HASH, or a root of the salt's own (keyed, never a block's hash)."""
    if salt is None:
        return ROOT_HASH
    return hashlib.blake2b(salt.encode(), digest_size=16, key=ROOT_HASH, person=b"dbrx.salt").digest()


def chain_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The stable hash of a full block: its parent's hash and its token ids (Python's hash() is salted per run)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


class BlockPool:
    """Blocks 1..num_blocks-1 for allocation, their reference counts, and the prefix cache over full blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool = True):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be at least 2 (block 0 is the null block), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_cache = enable_prefix_cache
        self._refs = [0] * num_blocks
        self._fresh: deque[int] = deque(range(1, num_blocks))  # free and uncached: taken before any eviction
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free but cached, least recently freed first
        # The hash of every full block a sequence has committed, cached or not: the hashed blocks of a sequence
        # are always a prefix of it, so a commit resumes from the last hashed block instead of rehashing all.
        self._hash: dict[int, bytes] = {}
        self._cached: dict[bytes, int] = {}  # hash -> the one block that holds it
        self.prefix_queries = 0  # prompt tokens looked up in the cache
        self.prefix_hits = 0  # of those, tokens found computed

    @property
    def num_free(self) -> int:
        """Blocks available for allocation, cached-but-unreferenced ones included."""
        return len(self._fresh) + len(self._evictable)

    @property
    def usage(self) -> float:
        """The fraction of allocatable blocks referenced by some sequence."""
        return 1.0 - self.num_free / (self.num_blocks - 1)

    def ref_count(self, block_id: int) -> int:
        return self._refs[block_id]

    def cached_hash(self, block_id: int) -> bytes | None:
        """The hash under which this block is in the prefix cache, or None."""
        h = self._hash.get(block_id)
        return h if h is not None and self._cached.get(h) == block_id else None

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_prompt(self, token_ids: Sequence[int], salt: str | None = None) -> tuple[list[int], int]:
        """Blocks for a new sequence: the longest cached prefix of full blocks (of sequences with the same salt), then
        fresh ones.

        Returns (block ids, tokens already computed). The last token is never counted as computed, because its
        logits are needed: hits are looked up only among the full blocks of token_ids[:-1].
        """
        if not token_ids:
            raise ValueError("cannot allocate blocks for an empty prompt")
        bs = self.block_size
        hits: list[int] = []
        if self.enable_prefix_cache:
            parent = root_hash(salt)
            for i in range((len(token_ids) - 1) // bs):
                parent = chain_hash(parent, token_ids[i * bs : (i + 1) * bs])
                block = self._cached.get(parent)
                if block is None:
                    break
                hits.append(block)
        num_fresh = self.blocks_needed(len(token_ids)) - len(hits)
        # Hit blocks sitting on the LRU list are taken off it, so they cannot also count as free.
        if num_fresh > self.num_free - sum(self._refs[b] == 0 for b in hits):
            raise NoFreeBlocks(f"{num_fresh} free blocks needed, {self.num_free} free")
        for b in hits:
            if self._refs[b] == 0:
                del self._evictable[b]
            self._refs[b] += 1
        self.prefix_queries += len(token_ids)
        self.prefix_hits += len(hits) * bs
        return hits + self._take(num_fresh), len(hits) * bs

    def ensure_capacity(self, block_ids: list[int], num_tokens: int) -> None:
        """Append fresh blocks to `block_ids` (in place) until `num_tokens` tokens fit."""
        need = self.blocks_needed(num_tokens) - len(block_ids)
        if need > self.num_free:
            raise NoFreeBlocks(f"{need} free blocks needed, {self.num_free} free")
        if need > 0:
            block_ids.extend(self._take(need))

    def commit_full_blocks(self, block_ids: Sequence[int], token_ids: Sequence[int], salt: str | None = None) -> None:
        """Register the full blocks of a sequence whose `token_ids` (the computed ones only) are in the cache, under
        the sequence's salt (as given to allocate_prompt).

        A block whose hash another block already holds stays an uncached duplicate: one block per hash.
        """
        if not self.enable_prefix_cache:
            return
        bs = self.block_size
        full = len(token_ids) // bs
        assert full <= len(block_ids), "more computed tokens than block slots"
        start = full
        while start > 0 and block_ids[start - 1] not in self._hash:
            start -= 1
        parent = self._hash[block_ids[start - 1]] if start else root_hash(salt)
        for i in range(start, full):
            parent = chain_hash(parent, token_ids[i * bs : (i + 1) * bs])
            self._hash[block_ids[i]] = parent
            self._cached.setdefault(parent, block_ids[i])

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference per block. Tail blocks are released first, so under pressure a sequence's later
        blocks are evicted before its prefix, the part most likely to be shared again."""
        for b, n in Counter(block_ids).items():
            if not 0 < b < self.num_blocks or self._refs[b] < n:
                raise ValueError(f"block {b} is not referenced {n} time(s); double free?")
        for b in reversed(block_ids):
            self._refs[b] -= 1
            if self._refs[b]:
                continue
            if self.cached_hash(b) is not None:
                self._evictable[b] = None
            else:
                self._hash.pop(b, None)
                self._fresh.append(b)

    def slots(self, block_ids: Sequence[int], start: int, end: int) -> list[int]:
        """The cache slot ids of token positions [start, end) of a sequence with this block table."""
        bs = self.block_size
        if not 0 <= start <= end <= len(block_ids) * bs:
            raise ValueError(f"positions [{start}, {end}) outside the {len(block_ids) * bs} slots of the blocks")
        return [block_ids[p // bs] * bs + p % bs for p in range(start, end)]

    def _take(self, n: int) -> list[int]:
        """n blocks at refcount 1: uncached free blocks first, then evictions in LRU order. Caller checked n."""
        out = []
        for _ in range(n):
            if self._fresh:
                b = self._fresh.popleft()
            else:
                b, _ = self._evictable.popitem(last=False)
                del self._cached[self._hash.pop(b)]
            self._refs[b] = 1
            out.append(b)
        return out

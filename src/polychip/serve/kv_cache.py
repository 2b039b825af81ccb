"""Host-side bookkeeping of the paged KV cache: a pool of fixed-size blocks with a free list,
reference counts and a prefix cache (vLLM's PagedAttention, Kwon et al. 2023, section 4).

The device arrays (k/v pages) live in serve/paged_model.py; this module only decides which block
id holds which tokens. Block 0 is reserved as the scratch block: padding slots of block tables
point at it, so writes from padded rows land there and never in a live sequence's block.

Prefix caching (vLLM's automatic prefix caching): a full block of prompt tokens is identified by
a chained hash of (hash of the previous block, its tokens), so equal hashes mean equal prefixes.
When the last sequence using a cached block lets it go, the block keeps its contents and stays
findable until the allocator needs it (least recently freed first).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict


class OutOfBlocks(RuntimeError):
    """Not enough free KV blocks for an allocation (the scheduler waits and retries)."""


def block_hashes(tokens: list[int], page_size: int) -> list[bytes]:
    """Chained hashes of each *full* block of `tokens` (a trailing partial block has none)."""
    out: list[bytes] = []
    prev = b""
    for i in range(len(tokens) // page_size):
        h = hashlib.blake2b(prev, digest_size=16)
        h.update(b",".join(str(t).encode() for t in tokens[i * page_size:(i + 1) * page_size]))
        prev = h.digest()
        out.append(prev)
    return out


class BlockPool:
    """`num_blocks` blocks of `page_size` tokens; block 0 is scratch and never handed out.

    Not thread-safe: only the engine thread calls it (the HTTP side reads counters only)."""

    def __init__(self, num_blocks: int, page_size: int, enable_prefix_cache: bool = True):
        if num_blocks < 2:
            raise ValueError(f"need at least 2 KV blocks (1 scratch + 1 usable), got {num_blocks}")
        self.num_blocks = num_blocks
        self.page_size = page_size
        self.enable_prefix_cache = enable_prefix_cache
        self._free: list[int] = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first
        self._ref = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}  # block -> hash (cached blocks only)
        self._by_hash: dict[bytes, int] = {}
        # Cached blocks nobody references, oldest first: reusable for their prefix, evictable.
        self._idle: OrderedDict[int, None] = OrderedDict()

    # -- counts -------------------------------------------------------------------------------
    @property
    def usable(self) -> int:
        return self.num_blocks - 1

    def available(self) -> int:
        """Blocks an allocation can get right now (free + idle cached ones, which get evicted)."""
        return len(self._free) + len(self._idle)

    def in_use(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.usable - self.available()

    def all_returned(self) -> bool:
        """True when no sequence holds any block (every allocation has been freed)."""
        return self.in_use() == 0 and not any(self._ref)

    # -- allocation ---------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        if n > self.available():
            raise OutOfBlocks(f"asked for {n} KV blocks, {self.available()} available")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:  # evict the least recently released cached block
                b, _ = self._idle.popitem(last=False)
                del self._by_hash[self._hash_of.pop(b)]
            self._ref[b] = 1
            out.append(b)
        return out

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._ref[b] <= 0:
                raise RuntimeError(f"KV block {b} freed twice")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if b in self._hash_of:
                    self._idle[b] = None
                else:
                    self._free.append(b)

    # -- prefix cache -------------------------------------------------------------------------
    def lookup_prefix(self, hashes: list[bytes]) -> list[int]:
        """Take a reference on the longest run of cached blocks matching `hashes` from the start."""
        if not self.enable_prefix_cache:
            return []
        got = []
        for h in hashes:
            b = self._by_hash.get(h)
            if b is None:
                break
            if self._ref[b] == 0:
                del self._idle[b]
            self._ref[b] += 1
            got.append(b)
        return got

    def register(self, block: int, h: bytes) -> None:
        """Record that `block` now holds the full prompt block with hash `h` (first writer wins)."""
        if not self.enable_prefix_cache or h in self._by_hash or block in self._hash_of:
            return
        self._by_hash[h] = block
        self._hash_of[block] = h

    def cached_blocks(self) -> int:
        return len(self._by_hash)

"""Which KV blocks each sequence holds on a shard, and which hold a reusable prefix,
without torch: the scheduler keeps one `KVBlocks` per shard and is its only owner. A
step's plan carries what changed (the blocks a sequence gained, the sliding blocks it can
still see), and the shard's cache writes and reads keys where the plan says
(shards/kv_cache.py).

Full-attention layers and sliding-window layers draw from separate pools, because they
hold different things: a full layer keeps every block of the sequence, a sliding layer
only the blocks that the window can still see, and lets the rest go as the window moves.
A block id means the same slot in every layer of its kind.

Prefix caching: a block whose tokens are all computed is registered under a chained hash
of the tokens up to its end, in both pools (`commit`). A block nobody uses any more stays
cached (its keys intact) until a new block is needed and none is free: then the least
recently released cached block is evicted. A new sequence starts from the longest run of
cached blocks that both kinds of layer can use (`cached_prefix`): gpt-oss is hybrid, so a
hit of L tokens needs the full layers' blocks 0..L and the sliding layers' blocks that
cover the window before L. Only whole blocks are shared and a sequence writes from its
first uncached token on, so a shared block is never written: no copy on write.

How the peers decide a hybrid hit, and what we chose. vLLM's hybrid manager hashes blocks
the same way for every group of layers; the full-attention group's hit is its longest run
of cached blocks from the start, the sliding-window group's is found from the right (the
last blocks that cover a window), and the coordinator shrinks the two to a length both
accept; sliding blocks that leave the window go back to the free queue with their hash, so
they are evictable cache, not lost. SGLang's SWA radix cache keeps a radix tree of token
runs whose full-attention KV is always there while its sliding-window KV can be freed on
its own (the node is then a "tombstone" for those layers, under a separate LRU); a match is
cut back to the longest prefix whose last window of tokens is not tombstoned. We do what
vLLM does, with our two pools: blocks keyed by chained hashes (a dict per pool, no tree: a
block's hash already names its whole prefix), the full run found from the left, then cut
back until the sliding blocks of the window before its end are cached too, and one LRU of
unused cached blocks per pool."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

from gptoss_ray.model.types import BlockGrant, BlockTable, KVLayout, cdiv, first_visible_block


def chain_hashes(
    known: list[bytes], tokens: Sequence[int], block_size: int, salt: bytes
) -> list[bytes]:
    """Extends `known`, the hashes of a sequence's first blocks, by the whole blocks of
    `tokens`, the sequence's tokens from the end of those blocks on. Block i's hash covers
    the salt (the model) and tokens 0..(i+1)*block_size, so equal hashes mean equal keys
    in every layer."""
    for i in range(len(tokens) // block_size):
        parent = known[-1] if known else salt
        chunk = array("q", tokens[i * block_size : (i + 1) * block_size]).tobytes()
        known.append(hashlib.blake2b(parent + chunk, digest_size=16).digest())
    return known


class BlockPool:
    """The blocks of one kind of layer: free, in use (counted: a cached block may be
    shared by several sequences), or cached and unused (reusable until evicted)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.evictions = 0
        self.clear()

    def clear(self) -> None:
        """Every block free, nothing cached (the eviction count stays)."""
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self.refs = [0] * self.num_blocks
        self.hash_of: dict[int, bytes] = {}
        self.block_of: dict[bytes, int] = {}
        # cached blocks nobody uses, least recently released first: evicted in this order
        self._unused: OrderedDict[int, None] = OrderedDict()

    @property
    def num_free(self) -> int:
        """Blocks a sequence can be given: the free ones and the unused cached ones."""
        return len(self._free) + len(self._unused)

    @property
    def num_cached(self) -> int:
        return len(self.block_of)

    def freed_by(self, blocks: list[int]) -> int:
        """How many of `blocks` giving them back would make available (the unshared)."""
        return sum(self.refs[b] == 1 for b in blocks)

    def unused(self, blocks: list[int]) -> int:
        """How many of these cached blocks are unused (sharing them takes them off num_free)."""
        return sum(self.refs[b] == 0 for b in blocks)

    def take(self, n: int) -> list[int]:
        assert n <= self.num_free, "checked by the caller"
        taken = []
        for _ in range(n):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._unused.popitem(last=False)
                del self.block_of[self.hash_of.pop(block)]
                self.evictions += 1
            self.refs[block] = 1
            taken.append(block)
        return taken

    def share(self, blocks: list[int]) -> None:
        for block in blocks:
            if self.refs[block] == 0:
                del self._unused[block]
            self.refs[block] += 1

    def give(self, blocks: list[int]) -> None:
        """Blocks a sequence lets go, in the order they should be evicted if unused."""
        for block in blocks:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.hash_of:
                    self._unused[block] = None
                else:
                    self._free.append(block)

    def register(self, block: int, key: bytes) -> None:
        """Block `block` holds the keys hashed `key` (a block computed twice at once by
        two sequences stays the first one's: the second is freed when let go)."""
        if key not in self.block_of and block not in self.hash_of:
            self.block_of[key] = block
            self.hash_of[block] = key


class KVBlocks:
    def __init__(
        self, layout: KVLayout, window: int | None, *, prefix_cache: bool = False, salt: bytes = b""
    ) -> None:
        """window: the sliding layers' window, None where the model has none. salt: what
        else than the tokens decides the keys (the model), at the root of every hash."""
        self.layout = layout
        self.window = window
        self.prefix_cache = prefix_cache
        self.salt = salt
        # counters kept across `reset`: tokens of admitted sequences, and those found cached
        self.queried_tokens = 0
        self.hit_tokens = 0
        self.full_pool = BlockPool(layout.full_blocks)
        self.sliding_pool = BlockPool(layout.sliding_blocks if window is not None else 0)
        self.tables: dict[str, BlockTable] = {}

    def reset(self) -> None:
        """Every block free and nothing cached (the shard's KV is gone)."""
        self.full_pool.clear()
        self.sliding_pool.clear()
        self.tables = {}

    def free_blocks(self) -> tuple[int, int]:
        return self.full_pool.num_free, self.sliding_pool.num_free

    def cache_stats(self) -> dict[str, int]:
        return {
            "queried_tokens": self.queried_tokens,
            "hit_tokens": self.hit_tokens,
            "cached_full_blocks": self.full_pool.num_cached,
            "cached_sliding_blocks": self.sliding_pool.num_cached,
            "evictions": self.full_pool.evictions + self.sliding_pool.evictions,
        }

    def _sliding_range(self, length: int, end: int) -> range:
        """The logical blocks the sliding layers need for queries at length..end-1."""
        return range(
            first_visible_block(length, self.window, self.layout.block_size),
            cdiv(end, self.layout.block_size),
        )

    def cached_prefix(self, hashes: list[bytes], length: int) -> int:
        """The blocks at the start of a new sequence of `length` known tokens (block
        hashes `hashes`) that this shard can reuse: the longest run cached in the full
        pool whose sliding blocks before its end are cached too, leaving at least one
        token to compute (its logits are the next draw's)."""
        if not self.prefix_cache:
            return 0
        full = 0
        limit = min(len(hashes), (length - 1) // self.layout.block_size)
        while full < limit and hashes[full] in self.full_pool.block_of:
            full += 1
        if self.window is None:
            return full
        for n in range(full, 0, -1):
            end = n * self.layout.block_size
            visible = self._sliding_range(end, end)
            if all(hashes[i] in self.sliding_pool.block_of for i in visible):
                return n
        return 0

    def grow(
        self, seq_id: str, length: int, new: int, prefix: list[bytes] | None = None
    ) -> BlockGrant | None:
        """Makes room for `new` tokens after the `length` a sequence has cached: first lets
        go of the sliding blocks its window has left, then takes the blocks the chunk
        needs. A new sequence (no table yet) starts with the cached blocks of `prefix`, the
        hashes `cached_prefix` found, so `length` is their tokens (0 without a hit). None,
        with nothing changed, where the pools are short."""
        bs = self.layout.block_size
        table = self.tables.get(seq_id)
        shared_full, shared_sliding = [], {}
        if table is None:
            table = BlockTable()
            if prefix:
                assert length == len(prefix) * bs, "a new sequence starts after its cached prefix"
                shared_full = [self.full_pool.block_of[key] for key in prefix]
                if self.window is not None:
                    shared_sliding = {
                        i: self.sliding_pool.block_of[prefix[i]]
                        for i in self._sliding_range(length, length)
                    }
        end = length + new
        need_full = max(0, cdiv(end, bs) - len(table.full) - len(shared_full))
        if need_full > self.full_pool.num_free - self.full_pool.unused(shared_full):
            return None
        if self.window is not None:
            visible = self._sliding_range(length, end)
            held = dict(enumerate(table.sliding, table.sliding_first)) | shared_sliding
            gone = [b for logical, b in held.items() if logical not in visible]
            missing = [logical for logical in visible if logical not in held]
            pool = self.sliding_pool
            room = pool.num_free - pool.unused(list(shared_sliding.values())) + pool.freed_by(gone)
            if len(missing) > room:
                return None
        self.tables[seq_id] = table
        self.full_pool.share(shared_full)
        table.full += shared_full
        table.committed = len(shared_full)
        added = self.full_pool.take(need_full)
        table.full += added
        if self.window is not None:
            self.sliding_pool.share(list(shared_sliding.values()))
            self.sliding_pool.give(gone)
            held.update(zip(missing, self.sliding_pool.take(len(missing)), strict=True))
            table.sliding_first, table.sliding = visible.start, [held[i] for i in visible]
        if shared_full:
            return BlockGrant(table.full[:], table.sliding_first, list(table.sliding), length)
        return BlockGrant(added, table.sliding_first, list(table.sliding))

    def fork(self, parent_id: str, child_id: str, length: int) -> tuple[BlockGrant, list] | None:
        """A new sequence whose first `length` tokens are the parent's (n choices of one
        prompt): it shares the parent's whole blocks and gets a copy of the partly written
        one, which it goes on writing. -> its grant (the whole table, `cached` = length)
        and the copies to make, (sliding, source, destination), before its first step;
        None, with nothing changed, where the pools are short. The parent's table must
        cover its first `length` tokens."""
        parent = self.tables[parent_id]
        bs = self.layout.block_size
        whole = length // bs
        partial = length % bs != 0
        need_sliding = 0
        if self.window is not None:
            visible = self._sliding_range(length, length)
            need_sliding = int(partial and whole in visible)
        if self.full_pool.num_free < partial or self.sliding_pool.num_free < need_sliding:
            return None
        table = BlockTable(committed=min(parent.committed, whole))
        table.full = parent.full[:whole]
        self.full_pool.share(table.full)
        copies = []
        if partial:
            (block,) = self.full_pool.take(1)
            copies.append((False, parent.full[whole], block))
            table.full.append(block)
        if self.window is not None:
            held = dict(enumerate(parent.sliding, parent.sliding_first))
            table.sliding_first = visible.start
            for logical in visible:
                if logical < whole:
                    self.sliding_pool.share([held[logical]])
                    table.sliding.append(held[logical])
                else:
                    (block,) = self.sliding_pool.take(1)
                    copies.append((True, held[logical], block))
                    table.sliding.append(block)
        self.tables[child_id] = table
        grant = BlockGrant(table.full[:], table.sliding_first, list(table.sliding), length)
        return grant, copies

    def admitted(self, length: int, hit: int) -> None:
        """Counts a new sequence of `length` tokens that found `hit` of them cached."""
        self.queried_tokens += length
        self.hit_tokens += hit

    def commit(self, seq_id: str, hashes: list[bytes], computed: int) -> None:
        """The sequence's first `computed` tokens have their keys in the cache: registers
        its blocks that became whole (`hashes`: at least computed // block_size of them)."""
        table = self.tables.get(seq_id)
        if table is None or not self.prefix_cache:
            return
        whole = computed // self.layout.block_size
        for i in range(table.committed, whole):
            self.full_pool.register(table.full[i], hashes[i])
            if 0 <= i - table.sliding_first < len(table.sliding):
                self.sliding_pool.register(table.sliding[i - table.sliding_first], hashes[i])
        table.committed = max(table.committed, whole)

    def release(self, seq_id: str) -> None:
        table = self.tables.pop(seq_id, None)
        if table is not None:
            # the tail first: a shared prefix outlives the turns that extended it
            self.full_pool.give(table.full[::-1])
            self.sliding_pool.give(table.sliding[::-1])

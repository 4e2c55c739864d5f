"""Which KV blocks each sequence holds on a shard, without torch: the scheduler keeps one
`KVBlocks` per shard and is its only owner. A step's plan carries what changed (the
blocks a sequence gained, the sliding blocks it can still see), and the shard's cache
writes and reads keys where the plan says (shards/kv_cache.py).

Full-attention layers and sliding-window layers draw from separate pools, because they
hold different things: a full layer keeps every block of the sequence, a sliding layer
only the blocks that the window can still see, and gives the rest back as the window
moves. A block id means the same slot in every layer of its kind."""

from __future__ import annotations

from dataclasses import dataclass, field

from gptoss_ray.model.types import BlockGrant, KVLayout, cdiv, first_visible_block


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self, n: int) -> list[int]:
        assert n <= len(self._free), "checked by the caller"
        taken = self._free[len(self._free) - n :]
        del self._free[len(self._free) - n :]
        return taken[::-1]

    def give(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


@dataclass
class BlockTable:
    full: list[int] = field(default_factory=list)  # physical block of logical block i
    sliding_first: int = 0  # the logical block of sliding[0]
    sliding: list[int] = field(default_factory=list)  # the sliding blocks still visible


class KVBlocks:
    def __init__(self, layout: KVLayout, window: int | None) -> None:
        """window: the sliding layers' window, None where the model has none."""
        self.layout = layout
        self.window = window
        self.full_pool = BlockPool(layout.full_blocks)
        self.sliding_pool = BlockPool(layout.sliding_blocks if window is not None else 0)
        self.tables: dict[str, BlockTable] = {}

    def free_blocks(self) -> tuple[int, int]:
        return self.full_pool.num_free, self.sliding_pool.num_free

    def grow(self, seq_id: str, length: int, new: int) -> BlockGrant | None:
        """Makes room for `new` tokens after the `length` a sequence has cached (a new one:
        0): first gives back the sliding blocks its window has left, then takes the blocks
        the chunk needs. None, with nothing changed, where the pools are short."""
        bs = self.layout.block_size
        table = self.tables.get(seq_id) or BlockTable()
        end = length + new
        need_full = max(0, cdiv(end, bs) - len(table.full))
        if need_full > self.full_pool.num_free:
            return None
        if self.window is not None:
            first = first_visible_block(length, self.window, bs)
            visible = range(first, (end - 1) // bs + 1)
            held = dict(enumerate(table.sliding, table.sliding_first))  # logical -> physical
            gone = [b for logical, b in held.items() if logical not in visible]
            missing = [logical for logical in visible if logical not in held]
            if len(missing) > self.sliding_pool.num_free + len(gone):
                return None
        self.tables[seq_id] = table
        added = self.full_pool.take(need_full)
        table.full += added
        if self.window is not None:
            self.sliding_pool.give(gone)
            held.update(zip(missing, self.sliding_pool.take(len(missing)), strict=True))
            table.sliding_first, table.sliding = first, [held[logical] for logical in visible]
        return BlockGrant(added, table.sliding_first, list(table.sliding))

    def release(self, seq_id: str) -> None:
        table = self.tables.pop(seq_id, None)
        if table is not None:
            self.full_pool.give(table.full)
            self.sliding_pool.give(table.sliding)

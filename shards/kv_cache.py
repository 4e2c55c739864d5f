"""The shard's paged KV cache: fixed-size blocks in one pool per layer, a block table per
sequence.

Full-attention layers and sliding-window layers draw from separate pools, because they
hold different things: a full layer keeps every block of the sequence, a sliding layer
only the blocks that the window can still see, and gives the rest back as the window
moves. A block id means the same slot in every layer of its kind.

`types.blocks_held` is the accounting that the coordinator mirrors to plan steps that
fit: given a sequence's committed length and the tokens of its next chunk, how many
blocks of each kind it holds after the step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gptoss_ray.model.config import ModelConfig
from gptoss_ray.model.kv_cache import AttentionTables
from gptoss_ray.model.types import KVLayout, cdiv, first_visible_block


class KVCacheError(RuntimeError):
    """The plan asked for more blocks than are free: a coordinator accounting bug."""


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self, n: int, what: str) -> list[int]:
        if n > len(self._free):
            raise KVCacheError(f"{what}: {n} blocks asked, {len(self._free)} free")
        taken = self._free[len(self._free) - n :]
        del self._free[len(self._free) - n :]
        return taken[::-1]

    def give(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


@dataclass
class BlockTable:
    length: int = 0  # committed tokens
    full: list[int] = field(default_factory=list)  # physical block of logical block i
    sliding: dict[int, int] = field(default_factory=dict)  # logical block -> physical


class PagedKVCache:
    def __init__(
        self, config: ModelConfig, layout: KVLayout, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.config = config
        self.layout = layout
        self.block_size = layout.block_size
        self.window = config.sliding_window
        self.full_pool = BlockPool(layout.full_blocks)
        self.sliding_pool = BlockPool(layout.sliding_blocks)
        shape = (layout.block_size, config.num_key_value_heads, config.head_dim)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        # one block past the pool's end that no sequence owns: the padding rows of a
        # static decode batch write and read there
        self.scratch_block = {False: layout.full_blocks, True: layout.sliding_blocks}
        for layer in range(config.num_hidden_layers):
            n = self.scratch_block[config.is_sliding(layer)] + 1
            self.k.append(torch.zeros((n, *shape), dtype=dtype, device=device))
            self.v.append(torch.zeros((n, *shape), dtype=dtype, device=device))
        self.tables: dict[str, BlockTable] = {}

    @property
    def has_sliding(self) -> bool:
        return any(self.config.is_sliding(i) for i in range(self.config.num_hidden_layers))

    def free_blocks(self) -> tuple[int, int]:
        return self.full_pool.num_free, self.sliding_pool.num_free

    def release(self, seq_id: str) -> None:
        table = self.tables.pop(seq_id, None)
        if table is not None:
            self.full_pool.give(table.full)
            self.sliding_pool.give(list(table.sliding.values()))

    def prepare(self, seq_id: str, new: int) -> PagedSequence:
        """Makes room for `new` tokens of a sequence (creating it if new): first gives back
        the sliding blocks its window has left, then takes the blocks the chunk needs."""
        table = self.tables.setdefault(seq_id, BlockTable())
        bs, end = self.block_size, table.length + new
        need_full = cdiv(end, bs) - len(table.full)
        if need_full > 0:
            table.full += self.full_pool.take(need_full, f"sequence {seq_id} (full layers)")
        if self.has_sliding:
            first = first_visible_block(table.length, self.window, bs)
            gone = [b for b in table.sliding if b < first]
            self.sliding_pool.give([table.sliding.pop(b) for b in gone])
            missing = [b for b in range(first, (end - 1) // bs + 1) if b not in table.sliding]
            got = self.sliding_pool.take(len(missing), f"sequence {seq_id} (sliding layers)")
            table.sliding.update(zip(missing, got, strict=True))
        return PagedSequence(self, table)


class PagedSequence:
    """One sequence's view of the paged cache, as attention sees it (`SequenceCache`)."""

    def __init__(self, cache: PagedKVCache, table: BlockTable) -> None:
        self.cache = cache
        self.table = table
        # per layer kind (sliding or not): block index, write slots, first row; the same
        # for every layer of the kind in this step, so built once
        self._plan: dict[bool, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = {}

    @property
    def next_position(self) -> int:
        return self.table.length

    def blocks(self, sliding: bool, n: int) -> tuple[list[int], int]:
        """The physical blocks that the next n tokens' queries can see, in order, and the
        absolute position of the first block's first slot."""
        cache, table, bs = self.cache, self.table, self.cache.block_size
        length = table.length
        if sliding:
            first = first_visible_block(length, cache.window, bs)
            return [table.sliding[b] for b in range(first, (length + n - 1) // bs + 1)], first * bs
        return table.full[: cdiv(length + n, bs)], 0

    def _layout(self, sliding: bool, n: int, device: torch.device):
        if sliding not in self._plan:
            length, bs = self.table.length, self.cache.block_size
            blocks, start = self.blocks(sliding, n)
            index = torch.tensor(blocks, dtype=torch.long, device=device)
            pos = torch.arange(length, length + n, device=device) - start
            self._plan[sliding] = (index, index[pos // bs], pos % bs, start)
        return self._plan[sliding]

    def store(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        cache, length, n = self.cache, self.table.length, k.shape[0]
        index, write_block, write_slot, start = self._layout(
            cache.config.is_sliding(layer), n, k.device
        )
        kb, vb = cache.k[layer], cache.v[layer]
        kb[write_block, write_slot] = k
        vb[write_block, write_slot] = v
        # the visible range, contiguous: rows start .. length+n-1
        rows = length + n - start
        k_all = kb[index].reshape(-1, *k.shape[1:])[:rows]
        v_all = vb[index].reshape(-1, *v.shape[1:])[:rows]
        return k_all, v_all, length - start

    def commit(self, n: int) -> None:
        self.table.length += n
        self._plan.clear()


class PagedBatchView:
    """A step's sequences on one paged cache, for the attention kernel (`PagedBatch`):
    block tables and write slots of every sequence, built once per layer kind."""

    def __init__(self, seqs: list[PagedSequence], lengths: list[int]) -> None:
        self.seqs, self.lengths = seqs, lengths
        self._built: dict[bool, tuple[AttentionTables, torch.Tensor, torch.Tensor]] = {}

    def _build(self, sliding: bool) -> tuple[AttentionTables, torch.Tensor, torch.Tensor]:
        if sliding not in self._built:
            cache = self.seqs[0].cache
            device = cache.k[0].device
            per_seq = [s.blocks(sliding, n) for s, n in zip(self.seqs, self.lengths, strict=True)]
            width = max(len(b) for b, _ in per_seq)
            table = torch.tensor(
                [b + [0] * (width - len(b)) for b, _ in per_seq], dtype=torch.int32
            ).to(device)
            positions = [s.table.length for s in self.seqs]
            starts, first, counts = torch.tensor(
                [[start for _, start in per_seq], positions, self.lengths]
            ).to(device)  # one copy
            kv_start = starts.to(torch.int32)
            # each new token's block and slot, gathered on the device
            seq = torch.repeat_interleave(torch.arange(len(self.seqs), device=device), counts)
            first_row = torch.cumsum(counts, 0) - counts
            offset = torch.arange(seq.shape[0], device=device) - first_row[seq]
            pos = first[seq] + offset - starts[seq]
            bs = cache.block_size
            write_block = table[seq, pos // bs].long()
            tables = AttentionTables(table, kv_start, positions, self.lengths)
            self._built[sliding] = (tables, write_block, pos % bs)
        return self._built[sliding]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        cache = self.seqs[0].cache
        _, block, slot = self._build(cache.config.is_sliding(layer))
        cache.k[layer][block, slot] = k
        cache.v[layer][block, slot] = v

    def pools(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.seqs[0].cache
        return cache.k[layer], cache.v[layer]

    def tables(self, sliding: bool) -> AttentionTables:
        return self._build(sliding)[0]

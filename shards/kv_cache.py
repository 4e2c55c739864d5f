"""The shard's paged KV cache: fixed-size blocks in one pool per layer (full-attention
and sliding-window layers apart), and each sequence's block table as the plans grant it.
Which blocks are free is the scheduler's to know (shards/kv_blocks.py): the shard writes
and reads keys where it is told."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptoss_ray.model.config import ModelConfig
from gptoss_ray.model.kv_cache import AttentionTables
from gptoss_ray.model.types import BlockGrant, BlockTable, KVLayout, cdiv, first_visible_block


class KVCacheError(RuntimeError):
    """A plan that does not fit the cache (a block outside the pools, a sequence whose
    cached length is not the plan's): a scheduler bug, never a request's fault."""


@dataclass
class PlacedTable(BlockTable):
    length: int = 0  # tokens whose keys are committed


class PagedKVCache:
    def __init__(
        self, config: ModelConfig, layout: KVLayout, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.config = config
        self.layout = layout
        self.block_size = layout.block_size
        self.window = config.sliding_window
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
        self.tables: dict[str, PlacedTable] = {}

    def nbytes(self) -> int:
        """The bytes the pools take on the device."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def has_sliding(self) -> bool:
        return any(self.config.is_sliding(i) for i in range(self.config.num_hidden_layers))

    def free_blocks(self) -> tuple[int, int]:
        """Blocks that no sequence's table here names (the scheduler's count is the one
        that plans use; this one is what the shard sees)."""
        full = sum(len(t.full) for t in self.tables.values())
        sliding = sum(len(t.sliding) for t in self.tables.values())
        return self.layout.full_blocks - full, self.layout.sliding_blocks - sliding

    def release(self, seq_id: str) -> None:
        self.tables.pop(seq_id, None)

    def copy(self, sliding: bool, source: int, destination: int) -> None:
        """One block's keys and values, in every layer of its kind."""
        for layer in range(self.config.num_hidden_layers):
            if self.config.is_sliding(layer) == sliding:
                self.k[layer][destination] = self.k[layer][source]
                self.v[layer][destination] = self.v[layer][source]

    def rollback(self, seq_id: str, n: int) -> None:
        """Forgets a sequence's last n committed keys (rejected draft tokens): the next
        step writes those positions again."""
        if n:
            self.tables[seq_id].length -= n

    def place(self, seq_id: str, start: int, blocks: BlockGrant) -> PagedSequence:
        """A sequence's blocks for the step: its table grows by what the plan granted. A
        sequence starting at 0, or after the cached prefix its grant reuses, begins a new
        one. `start` must be the length cached."""
        table = self.tables.get(seq_id)
        if start != blocks.cached and (table is None or table.length != start):
            have = table.length if table is not None else 0
            raise KVCacheError(f"sequence {seq_id} has {have} cached tokens, the plan says {start}")
        if any(not 0 <= b < self.layout.full_blocks for b in blocks.full) or any(
            not 0 <= b < self.layout.sliding_blocks for b in blocks.sliding
        ):
            raise KVCacheError(f"sequence {seq_id}: a block outside the pools in {blocks}")
        if start == blocks.cached:
            table = self.tables[seq_id] = PlacedTable(length=start)
        table.full += blocks.full
        table.sliding_first, table.sliding = blocks.sliding_first, blocks.sliding
        return PagedSequence(self, table)


class PagedSequence:
    """One sequence's view of the paged cache, as attention sees it (`SequenceCache`)."""

    def __init__(self, cache: PagedKVCache, table: PlacedTable) -> None:
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
            last = (length + n - 1) // bs
            offset = table.sliding_first
            return table.sliding[first - offset : last - offset + 1], first * bs
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

    def layout(self, sliding: bool) -> tuple[AttentionTables, torch.Tensor, torch.Tensor]:
        """The tables of one layer kind, and each new token's block and slot."""
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
        _, block, slot = self.layout(cache.config.is_sliding(layer))
        cache.k[layer][block, slot] = k
        cache.v[layer][block, slot] = v

    def pools(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.seqs[0].cache
        return cache.k[layer], cache.v[layer]

    def tables(self, sliding: bool) -> AttentionTables:
        return self.layout(sliding)[0]

"""Per-sequence key/value storage for incremental decoding on one device.

A `SequenceKV` holds one sequence's keys and values for every layer, contiguous and grown
by doubling. It is the single-device baseline; the shards' paged cache (fixed-size blocks,
block tables, sliding-window eviction) builds on the same attention math.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Protocol

import torch


class SequenceKV:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        first_position: int = 0,
        capacity: int = 64,
    ) -> None:
        self.first_position = first_position
        self.length = 0  # tokens whose keys are committed, in every layer
        self._shape = (num_kv_heads, head_dim)
        self._dtype = dtype
        self._device = torch.device(device)
        self._k = [self._empty(capacity) for _ in range(num_layers)]
        self._v = [self._empty(capacity) for _ in range(num_layers)]

    def _empty(self, rows: int) -> torch.Tensor:
        return torch.empty(rows, *self._shape, dtype=self._dtype, device=self._device)

    @property
    def next_position(self) -> int:
        return self.first_position + self.length

    def store(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Writes the new tokens' k, v [n, kv_heads, head_dim] after the committed ones and
        returns every key and value of the sequence, [length + n, kv_heads, head_dim], and
        the row of the first new token in them. The new rows count once `commit(n)` is
        called after the last layer."""
        end = self.length + k.shape[0]
        if end > self._k[layer].shape[0]:
            grown = max(end, 2 * self._k[layer].shape[0])
            for store in (self._k, self._v):
                bigger = self._empty(grown)
                bigger[: self.length] = store[layer][: self.length]
                store[layer] = bigger
        self._k[layer][self.length : end] = k
        self._v[layer][self.length : end] = v
        return self._k[layer][:end], self._v[layer][:end], self.length

    def commit(self, n: int) -> None:
        self.length += n


class SequenceCache(Protocol):
    """What attention needs of a sequence's cache (contiguous here, paged on shards)."""

    @property
    def next_position(self) -> int: ...

    def store(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]: ...

    def commit(self, n: int) -> None: ...


@dataclass
class AttentionTables:
    """Where a batch's keys live in a paged pool, for one kind of layer (full or sliding),
    as the attention kernel reads them. Sequence s's table row lists the physical blocks
    that hold its keys from absolute position kv_start[s] on, block by block."""

    block_table: torch.Tensor  # [S, max blocks] int32, padded with 0
    kv_start: torch.Tensor  # [S] int32
    positions: list[int]  # absolute position of each sequence's first new token
    lengths: list[int]  # new tokens of each sequence
    # a static decode batch: one tile per sequence whatever block_m, the positions
    # living on the device (updated in place between graph replays; `positions` unused)
    decode_tiles: tuple[torch.Tensor, ...] | None = None
    _tiles: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict, repr=False)
    _queries: tuple[torch.Tensor, list[int], torch.Tensor, torch.Tensor] | None = field(
        default=None, repr=False
    )

    def queries(self) -> tuple[torch.Tensor, list[int], torch.Tensor, torch.Tensor]:
        """For the torch path, made once for every layer of this kind: each sequence's
        first new token's position among its table's keys [S], and the sequences with one
        new token (decodes): their indices (host), their indices and their tokens' rows
        (device)."""
        if self._queries is None:
            device = self.block_table.device
            offsets = torch.tensor(self.positions, device=device) - self.kv_start
            single = [s for s, n in enumerate(self.lengths) if n == 1]
            first = [0, *itertools.accumulate(self.lengths)]
            rows = torch.tensor([single, [first[s] for s in single]], dtype=torch.long)
            at, row = rows.to(device)  # one copy
            self._queries = (offsets, single, at, row)
        return self._queries

    def tiles(self, block_m: int) -> tuple[torch.Tensor, ...]:
        """Query tiles of at most block_m tokens of one sequence: (sequence, first row in
        the token tensor, first position, tokens), each [tiles] int32 on the device."""
        if self.decode_tiles is not None:
            return self.decode_tiles
        if block_m not in self._tiles:
            seq, row, pos, count = [], [], [], []
            start = 0
            for s, (p, n) in enumerate(zip(self.positions, self.lengths, strict=True)):
                for j in range(0, n, block_m):
                    seq.append(s)
                    row.append(start + j)
                    pos.append(p + j)
                    count.append(min(block_m, n - j))
                start += n
            packed = torch.tensor([seq, row, pos, count], dtype=torch.int32)
            self._tiles[block_m] = tuple(packed.to(self.block_table.device))  # one copy
        return self._tiles[block_m]


class PagedBatch(Protocol):
    """A batch whose caches share paged pools, so that attention can run as one kernel
    for every sequence: write the new keys and values in one scatter, then read them in
    place through the block tables."""

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None: ...

    def pools(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def tables(self, sliding: bool) -> AttentionTables: ...


@dataclass
class SequenceBatch:
    """Several sequences' new tokens, concatenated in this order in the token tensor."""

    caches: list[SequenceCache]
    lengths: list[int]  # new tokens of each sequence
    paged: PagedBatch | None = None  # set when the caches are one paged pool
    # each token's LoRA slot (`model.lora.LoraSlots`), -1 for the base model [T]; None:
    # every token is the base model's
    adapters: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.caches) != len(self.lengths):
            raise ValueError("one length per cache")
        if any(n < 1 for n in self.lengths):
            raise ValueError(f"every sequence needs at least one new token, got {self.lengths}")

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def real(self) -> torch.Tensor | None:
        """Which rows are tokens (1) and which padding (0); None: every row is a token
        (a static decode batch has padding rows)."""
        return None

    def positions(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Absolute position of every new token, [T]."""
        parts = [
            torch.arange(c.next_position, c.next_position + n, device=device)
            for c, n in zip(self.caches, self.lengths, strict=True)
        ]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long, device=device)

    def last_rows(self) -> list[int]:
        """Row of each sequence's last new token in the token tensor."""
        rows, end = [], 0
        for n in self.lengths:
            end += n
            rows.append(end - 1)
        return rows

    def commit(self) -> None:
        for cache, n in zip(self.caches, self.lengths, strict=True):
            cache.commit(n)

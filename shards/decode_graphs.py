"""Decode steps replayed from CUDA graphs, one graph per batch bucket.

In a decode step every sequence brings one token, so for a given number of sequences the
step has the same shapes every time: its dozen launches per layer can be recorded once
and replayed, which removes the launch overhead that otherwise bounds small batches. A
replay reads only static buffers, refilled before it by three host-to-device copies: the
tokens and their positions, and per layer kind (full or sliding) where each sequence's
keys start, the slot its new key goes to, and its block table. S sequences run in the
smallest bucket B >= S; the B - S padding rows write to and read from the cache's scratch
block, which no sequence owns, so they touch no sequence's keys.

With several shards the step's bucket is the plan's (the same on every shard, which
pads its own sequences to it, none at all included), and the graph holds the expert
exchange's collectives: their buffers' shapes depend on the bucket only (router/moe.py).
Every bucket is captured at load, all shards together and in the same order, so that no
request waits for a capture or a kernel's compile. On a CPU (tests) the same static step
runs eagerly: exactly what a graph would record."""

from __future__ import annotations

import array
import time

import torch

from gptoss_ray.model.kv_cache import AttentionTables
from gptoss_ray.model.model import ExpertExchange, Transformer
from gptoss_ray.model.types import BUCKETS, cdiv
from gptoss_ray.shards.kv_cache import PagedKVCache, PagedSequence

# rows of DecodeBuffers.meta: token, position, 1 for a sequence (0 for padding), then for
# full and for sliding layers the first position of the table's first block, and the new
# key's block and slot
TOKEN, POSITION, REAL = 0, 1, 2
KV_START, WRITE_BLOCK, WRITE_SLOT = 3, 4, 5  # + 3 for sliding layers
META_ROWS = 9


def _row(field: int, sliding: bool) -> int:
    return field + (3 if sliding else 0)


class DecodeBuffers:
    """The static inputs of a decode step for up to `rows` sequences, on the device."""

    def __init__(self, cache: PagedKVCache, rows: int) -> None:
        config, bs = cache.config, cache.block_size
        device = cache.k[0].device
        self.cache, self.rows = cache, rows
        self.meta = torch.zeros(META_ROWS, rows, dtype=torch.long, device=device)
        width = {
            False: min(cache.layout.full_blocks, cdiv(config.max_context_length, bs)),
            True: min(max(cache.layout.sliding_blocks, 1), cdiv(cache.window, bs) + 1),
        }
        self.block_tables = {
            s: torch.zeros(rows, width[s], dtype=torch.int32, device=device) for s in (False, True)
        }
        # the longest sequence a replay can hold: a longer one decodes eagerly
        self.max_length = self.block_tables[False].shape[1] * bs
        self.ones = torch.ones(rows, dtype=torch.int32, device=device)
        self.arange = torch.arange(rows, dtype=torch.int32, device=device)

    def fill(self, seqs: list[PagedSequence], tokens: list[int], rows: int) -> None:
        """Writes the step of these sequences (one new token each, their blocks already
        prepared) into the first `rows` rows; the rows past the sequences are padding."""
        cache, bs = self.cache, self.cache.block_size
        meta = [[0] * rows for _ in range(META_ROWS)]
        tables: dict[bool, list[list[int]]] = {}
        for sliding in (False, True) if cache.has_sliding else (False,):
            scratch = cache.scratch_block[sliding]
            table = [[scratch] for _ in range(rows)]
            for i, seq in enumerate(seqs):
                blocks, start = seq.blocks(sliding, 1)
                offset = seq.next_position - start
                table[i] = blocks
                meta[_row(KV_START, sliding)][i] = start
                meta[_row(WRITE_BLOCK, sliding)][i] = blocks[offset // bs]
                meta[_row(WRITE_SLOT, sliding)][i] = offset % bs
            for i in range(len(seqs), rows):
                meta[_row(WRITE_BLOCK, sliding)][i] = scratch
            tables[sliding] = table
        for i, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            meta[TOKEN][i], meta[POSITION][i], meta[REAL][i] = token, seq.next_position, 1
        self.meta[:, :rows].copy_(torch.tensor(meta), non_blocking=True)
        for sliding, table in tables.items():
            self.block_tables[sliding][:rows, : _width(table)].copy_(_padded(table))

    def batch(self, rows: int) -> StaticDecodeBatch:
        return StaticDecodeBatch(self, rows)


def _width(table: list[list[int]]) -> int:
    return max(len(t) for t in table)


def _padded(table: list[list[int]]) -> torch.Tensor:
    """Ragged rows -> [rows, width] int32, zero-padded: one flat array placed through a
    mask (torch.tensor of the nested list is 4x slower at 256 rows of a long context)."""
    counts = torch.tensor([len(t) for t in table])
    flat = array.array("i")
    for row in table:
        flat.fromlist(row)
    out = torch.zeros(len(table), _width(table), dtype=torch.int32)
    out[torch.arange(out.shape[1])[None, :] < counts[:, None]] = torch.frombuffer(
        flat, dtype=torch.int32
    )
    return out


class StaticDecodeBatch:
    """The first `rows` rows of the buffers as the model's batch (one token a row, the
    padding rows marked in `real`) and as a `PagedBatch` for the attention kernel: every
    tensor a view of the buffers, so a graph that reads them sees each refill."""

    def __init__(self, buffers: DecodeBuffers, rows: int) -> None:
        self.cache = buffers.cache
        self.num_tokens = rows
        meta = buffers.meta[:, :rows]
        self.tokens, self.position_ids, self.real = meta[TOKEN], meta[POSITION], meta[REAL]
        self._write = {
            s: (meta[_row(WRITE_BLOCK, s)], meta[_row(WRITE_SLOT, s)]) for s in (False, True)
        }
        tiles = (
            buffers.arange[:rows],
            buffers.arange[:rows],
            self.position_ids,
            buffers.ones[:rows],
        )
        self._tables = {
            s: AttentionTables(
                buffers.block_tables[s][:rows], meta[_row(KV_START, s)], [], [1] * rows, tiles
            )
            for s in (False, True)
        }

    def positions(self, device: torch.device | str) -> torch.Tensor:
        return self.position_ids

    def last_rows(self) -> slice:
        return slice(None)  # every row is a sequence's one new token

    def commit(self) -> None:
        """Nothing: a replay runs no Python, so the caller commits the new keys."""

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        block, slot = self._write[self.cache.config.is_sliding(layer)]
        self.cache.k[layer][block, slot] = k
        self.cache.v[layer][block, slot] = v

    def pools(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.k[layer], self.cache.v[layer]

    def tables(self, sliding: bool) -> AttentionTables:
        return self._tables[sliding]


class GraphCaptureError(RuntimeError):
    """A decode step could not be captured (nothing was committed: the step can run
    eagerly instead)."""


class DecodeGraphs:
    """Runs a shard's decode steps from a graph per bucket, all captured by `capture_all`
    at load (on a CPU: the same static step, eagerly). `exchange`: the expert exchange of
    a shard among several, which each step's bucket sizes."""

    def __init__(
        self,
        model: Transformer,
        cache: PagedKVCache,
        load: torch.Tensor | None = None,
        exchange: ExpertExchange | None = None,
        buckets: tuple[int, ...] = BUCKETS,
    ) -> None:
        if not model.block[0].attn.use_kernels:
            raise ValueError("decode graphs need the Triton kernels (paged attention)")
        self.model, self.cache, self.load, self.exchange = model, cache, load, exchange
        self.buckets = tuple(sorted(buckets))
        self.buffers = DecodeBuffers(cache, self.buckets[-1])
        self.capture = cache.k[0].is_cuda
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None

    def fits(self, seqs: list[PagedSequence], rows: int) -> bool:
        """Whether a decode step of these sequences in a bucket of `rows` (the step's) can
        run from a graph. A shard among several may have none of its own."""
        longest = max((s.next_position for s in seqs), default=0)
        alone = self.exchange is None
        return (
            rows in self.buckets
            and (len(seqs) > 0 or not alone)
            and len(seqs) <= rows
            and longest < self.buffers.max_length
        )

    def capture_all(self) -> float:
        """Captures every bucket's step, smallest first (the kernels compile in the
        warm-ups) -> the seconds it took. Nothing on a CPU, which runs steps eagerly."""
        start = time.perf_counter()
        if self.capture:
            for rows in self.buckets:
                self.buffers.fill([], [], rows)  # padding only: the scratch block
                self._graph(rows)
            self.warm_prefill_attention()
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def warm(self, rows: int) -> None:
        """A bucket's step run eagerly on padding rows (the scratch block), counting no
        expert load: the activations of the largest step, for a reading of free memory."""
        self.buffers.fill([], [], rows)
        self._size_exchange(rows)
        batch = self.buffers.batch(rows)
        self.model.count_expert_load(None)
        try:
            self.model(batch.tokens, batch)
        finally:
            self.model.count_expert_load(self.load)
        if self.capture:
            torch.cuda.synchronize()

    def warm_prefill_attention(self) -> None:
        """Compiles the attention kernel's variant for prompt chunks (taller query tiles
        than a decode step's), on the scratch blocks, which no sequence owns. The MoE
        kernels' variants all compile in the buckets' warm-ups (single rows, tiles of 16
        and of 32 rows)."""
        from gptoss_ray.model.kernels.attention import paged_attention

        cache, config = self.cache, self.cache.config
        device = cache.k[0].device
        q = torch.zeros(
            2, config.num_attention_heads, config.head_dim, dtype=cache.k[0].dtype, device=device
        )
        kinds = {config.is_sliding(i): i for i in range(config.num_hidden_layers)}
        for sliding, layer in kinds.items():
            block = cache.scratch_block[sliding]
            tables = AttentionTables(
                torch.full((1, 1), block, dtype=torch.int32, device=device),
                torch.zeros(1, dtype=torch.int32, device=device),
                [0],
                [2],
            )
            attn = self.model.block[layer].attn
            paged_attention(
                q, cache.k[layer], cache.v[layer], attn.sinks, tables, window=attn.window
            )

    def run(self, seqs: list[PagedSequence], tokens: list[int], rows: int) -> torch.Tensor:
        """One new token for each sequence (blocks prepared), in a bucket of `rows` ->
        logits [S, V]. The keys are written; committing them is the caller's."""
        self.buffers.fill(seqs, tokens, rows)
        if not self.capture:
            batch = self.buffers.batch(rows)
            self._size_exchange(rows)
            return self.model(batch.tokens, batch)[: len(seqs)]
        graph, logits = self._graph(rows)
        graph.replay()
        return logits[: len(seqs)]

    def _graph(self, rows: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        if rows not in self.graphs:
            self._size_exchange(rows)  # the exchange's buffers, as captured
            try:
                self.graphs[rows] = self._capture(self.buffers.batch(rows))
            except Exception as exc:
                raise GraphCaptureError(f"capturing the decode step of bucket {rows}") from exc
        return self.graphs[rows]

    def _size_exchange(self, rows: int) -> None:
        if self.exchange is not None:
            self.exchange.rows = rows  # type: ignore[attr-defined]
            self.exchange.timer = None  # type: ignore[attr-defined]  # a replay runs no Python

    def _capture(self, batch: StaticDecodeBatch) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # A warm-up on a side stream compiles the kernels and sets up cuBLAS (neither may
        # happen during capture). It writes the same keys the replay then writes again,
        # and counts no expert load, so that the step is counted once.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        self.model.count_expert_load(None)
        try:
            with torch.cuda.stream(side):
                self.model(batch.tokens, batch)
        finally:
            self.model.count_expert_load(self.load)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.model(batch.tokens, batch)
        return graph, logits

"""EAGLE-3 drafts on the shard, for the sequences homed here (`--speculative eagle3`).

After the step has drawn (and verified) its tokens, the draft runs over every chunk the
step computed, fed the target's taps at each position and the token after it (a chunk's
next prompt token, or the token just drawn; in a drafted decode, the accepted drafts and
the target's own token after them). Its keys go to a pool of its own, addressed by each
sequence's full-attention block table, so that the scheduler's bookkeeping (blocks,
prefix hits, preemption, release) covers them too. From each drawing sequence's last
accepted position it then proposes k tokens, one batched step per token: the first from
that pass, the others from its own pre-norm output, their keys in a scratch buffer that
the next step's pass overwrites in the pool. The proposals go back with the step's
result (`StepResult.drafts`) and the scheduler sends them with the next decode."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from gptoss_ray.model.eagle3 import Eagle3Draft, load_draft
from gptoss_ray.model.model import Transformer, _sink_softmax, paged_attention_torch
from gptoss_ray.model.types import KVLayout, cdiv
from gptoss_ray.shards.kv_cache import PagedBatchView, PagedSequence


@dataclass
class DraftChunk:
    """One chunk the step computed, as the draft reads it."""

    seq_id: str
    seq: PagedSequence  # its cache (the length: after the step's accepted keys)
    start: int  # the chunk's first position
    tokens: list[int]  # the chunk's tokens
    after: int  # the token after the last valid one (next prompt token, or the draw)
    valid: int  # rows whose keys the target kept (a drafted decode: accepted + 1)
    propose: bool  # propose drafts from its last valid row


class DraftProposer:
    def __init__(
        self,
        folder: str | Path,
        target: Transformer,
        layout: KVLayout,
        *,
        k: int,
        device: torch.device,
    ) -> None:
        config = target.config
        self.draft: Eagle3Draft = load_draft(
            folder,
            config,
            dtype=target.dtype,
            device=device,
        )
        if self.draft.embed_tokens is None:
            self.draft.share_embedding(target.embedding)
        self.taps = self.draft.config.taps(config.num_hidden_layers)
        self.num_tokens = k
        self.device = device
        self.use_kernels = False
        dc = self.draft.config
        self._no_sinks = torch.full((dc.num_attention_heads,), float("-inf"), device=device)
        self.resize(layout)

    def resize(self, layout: KVLayout) -> None:
        """Pools for the draft's keys: one block per full-attention block of the cache
        (and its scratch block)."""
        dc = self.draft.config
        shape = (layout.full_blocks + 1, layout.block_size, dc.num_key_value_heads, dc.dim)
        dtype = self.draft.fc.weight.dtype
        self.keys = torch.zeros(shape, dtype=dtype, device=self.device)
        self.values = torch.zeros(shape, dtype=dtype, device=self.device)
        self.block_size = layout.block_size

    def copy(self, source: int, destination: int) -> None:
        """One full-attention block's draft keys (a forked choice's copy of its prompt's
        last block)."""
        self.keys[destination] = self.keys[source]
        self.values[destination] = self.values[source]

    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    @torch.inference_mode()
    def propose(self, chunks: list[DraftChunk], taps: torch.Tensor) -> dict[str, list[int]]:
        """chunks in the step's order, taps [T, 3H] of their rows -> k proposals for each
        chunk that asks."""
        if not chunks:
            return {}
        draft, device = self.draft, self.device
        lengths = [len(c.tokens) for c in chunks]
        shifted, positions, last = [], [], []
        row = 0
        for c, n in zip(chunks, lengths, strict=True):
            after = [*c.tokens[1:], c.after]
            after[c.valid - 1] = c.after  # past it, rejected drafts' rows: overwritten later
            shifted += after
            positions += range(c.start, c.start + n)
            if c.propose:
                last.append(row + c.valid - 1)
            row += n
        # the pass over the chunks, their keys in the pool as the target's are in the cache
        shadows = [
            PagedSequence(c.seq.cache, dataclasses.replace(c.seq.table, length=c.start))
            for c in chunks
        ]
        view = PagedBatchView(shadows, lengths)
        tables, block, slot = view.layout(False)

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.keys[block, slot], self.values[block, slot] = k, v
            if self.use_kernels:
                from gptoss_ray.model.kernels.attention import paged_attention
            else:
                paged_attention = paged_attention_torch
            return paged_attention(q, self.keys, self.values, self._no_sinks, tables, window=None)

        tokens = torch.tensor(shifted, dtype=torch.long, device=device)
        pos = torch.tensor(positions, dtype=torch.long, device=device)
        out = draft(tokens, draft.combine(taps), pos, attend)  # [T, H]
        if not last:
            return {}
        rows = torch.tensor(last, dtype=torch.long, device=device)
        hidden, proposed = out[rows], [draft.propose(out[rows])]  # [D, H], [D]
        asking = [c for c in chunks if c.propose]
        if self.num_tokens > 1:
            proposed += self._decode(asking, hidden, proposed[0])
        ids = torch.stack(proposed, dim=1).tolist()  # [D, k]: the step's one read of them
        return {c.seq_id: p for c, p in zip(asking, ids, strict=True)}

    def _decode(
        self, asking: list[DraftChunk], hidden: torch.Tensor, first: torch.Tensor
    ) -> list[torch.Tensor]:
        """k - 1 more proposals, a batched step each: position p + j reads the pool's keys
        before p (the sequence's verified ones) and the scratch keys of the steps before."""
        draft, device, bs = self.draft, self.device, self.block_size
        dc = draft.config
        base = [c.start + c.valid for c in asking]  # first position after the verified keys
        width = max(cdiv(b, bs) for b in base)
        table = torch.tensor(
            [
                c.seq.table.full[: cdiv(b, bs)] + [0] * (width - cdiv(b, bs))
                for c, b in zip(asking, base, strict=True)
            ],
            dtype=torch.long,
        ).to(device)
        base_t = torch.tensor(base, dtype=torch.long, device=device)
        # the verified keys, gathered and widened once for every step
        keys = self.keys[table].flatten(1, 2).float()  # [D, L, Hkv, d]
        values = self.values[table].flatten(1, 2).float()
        seen = torch.arange(keys.shape[1], device=device)[None, :] < base_t[:, None]  # [D, L]
        steps = self.num_tokens - 1
        d_count, hkv, dim = len(asking), dc.num_key_value_heads, dc.dim
        scratch_k = keys.new_zeros(d_count, steps, hkv, dim)
        scratch_v = keys.new_zeros(d_count, steps, hkv, dim)
        group = dc.num_attention_heads // hkv
        no_sink = self._no_sinks.view(1, hkv, group, 1)
        order = torch.arange(steps, device=device)[None, :].expand(d_count, steps)
        out, token = [], first
        for j in range(steps):  # over draft positions, not rows

            def attend(q, k, v, j=j):
                scratch_k[:, j], scratch_v[:, j] = k, v
                qg = q.float().view(d_count, hkv, group, dim)
                scores = torch.cat(  # [D, Hkv, g, L + steps]: the pool's keys, then the new
                    (
                        torch.einsum("skgd,slkd->skgl", qg, keys),
                        torch.einsum("skgd,slkd->skgl", qg, scratch_k),
                    ),
                    dim=-1,
                ) / math.sqrt(dim)
                visible = torch.cat((seen, order <= j), 1)[:, None, None, :]
                probs = _sink_softmax(scores, visible, no_sink)
                length = keys.shape[1]
                o = torch.einsum("skgl,slkd->skgd", probs[..., :length], values)
                o = o + torch.einsum("skgl,slkd->skgd", probs[..., length:], scratch_v)
                return o.reshape(d_count, -1, dim).to(q.dtype)

            hidden = draft(token, hidden, base_t + j, attend)
            token = draft.propose(hidden)
            out.append(token)
        return out

"""The gpt-oss transformer on one device: exact math, MXFP4 experts, an expert slice.

Tokens of several sequences travel as one flat batch x [T, H]; attention looks each
sequence up in its own KV cache. Parameter names follow the original checkpoint layout
(`block.N.attn.qkv.weight`, ...), except the expert tensors (`block.N.mlp.experts.*`).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from gptoss_ray.model import mxfp4
from gptoss_ray.model.config import ModelConfig
from gptoss_ray.model.expert_tiles import ExpertTiles
from gptoss_ray.model.kv_cache import AttentionTables, PagedBatch, SequenceBatch
from gptoss_ray.model.lora import (
    LayerSlots,
    LoraSlots,
    band_mask,
    lora_delta,
    lora_delta_tiles,
)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.float()
        t = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + self.eps)
        return (t * self.scale).to(x.dtype)


class RotaryEmbedding:
    """RoPE with YaRN, computed in float32 exactly as the reference does, so the angles (and
    the logits at long positions) match it to the last bit."""

    def __init__(self, config: ModelConfig) -> None:
        d_half = config.head_dim // 2
        base, factor = config.rope_theta, config.rope_scaling_factor
        context = config.initial_context_length
        freq = base ** (
            torch.arange(0, config.head_dim, 2, dtype=torch.float32, device="cpu") / config.head_dim
        )
        # The correction range is NOT rounded to integers (SPEC, gotcha 1).
        low = d_half * math.log(context / (config.rope_ntk_beta * 2 * math.pi)) / math.log(base)
        high = d_half * math.log(context / (config.rope_ntk_alpha * 2 * math.pi)) / math.log(base)
        ramp = (torch.arange(d_half, dtype=torch.float32, device="cpu") - low) / (high - low)
        extrapolate = 1 - ramp.clamp(0, 1)
        interpolation, extrapolation = 1.0 / (factor * freq), 1.0 / freq
        self.inv_freq = interpolation * (1 - extrapolate) + extrapolation * extrapolate  # [d/2]
        self.concentration = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        self._on: dict[torch.device, torch.Tensor] = {}

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, d/2] in float32, both scaled by the concentration."""
        device = positions.device
        if device not in self._on:
            self._on[device] = self.inv_freq.to(device)
        angles = positions.float()[:, None] * self._on[device][None, :]
        return angles.cos() * self.concentration, angles.sin() * self.concentration


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d]; half-split rotation (x1 = first half, x2 = second half)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def attention_with_sinks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    *,
    q_offset: int | torch.Tensor,
    window: int | None,
) -> torch.Tensor:
    """One sequence: q [n, Hq, d] at cache rows q_offset.. (an int, or one on the device),
    k and v [L, Hkv, d] -> [n, Hq, d].

    Each head's sink is an extra logit with no value: it only enlarges the softmax
    denominator (it gets neither 1/sqrt(d) nor RoPE). With a window, query i sees keys
    i-window+1..i. Computed in float32.
    """
    n, hq, d = q.shape
    length, hkv, _ = k.shape
    group = hq // hkv
    qg = q.float().view(n, hkv, group, d)
    scores = torch.einsum("nkgd,lkd->kgnl", qg, k.float()) / math.sqrt(d)  # [Hkv, g, n, L]
    q_pos = (q_offset + torch.arange(n, device=q.device))[:, None]
    visible = _visible(q_pos, torch.arange(length, device=q.device)[None, :], window)
    probs = _sink_softmax(scores, visible, sinks.float().view(hkv, group, 1, 1))
    out = torch.einsum("kgnl,lkd->nkgd", probs, v.float())
    return out.reshape(n, hq, d).to(q.dtype)


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Which keys each query sees: those at or before it, and within the window."""
    visible = k_pos <= q_pos
    if window is not None:
        visible &= k_pos > q_pos - window
    return visible


def _sink_softmax(scores: torch.Tensor, visible: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """scores [..., L] -> the probabilities of the visible keys, the head's sink (shaped
    to broadcast against scores[..., :1]) one more logit in the softmax, with no value."""
    scores = scores.masked_fill(~visible, float("-inf"))
    sink = sink.expand(*scores.shape[:-1], 1)
    return torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]


def paged_attention_torch(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    sinks: torch.Tensor,
    tables: AttentionTables,
    *,
    window: int | None,
) -> torch.Tensor:
    """The torch path of `kernels.attention.paged_attention` (same arguments and result):
    the step's single-token queries (decodes) in one gather of their keys and one
    softmax; a chunk of several tokens by `attention_with_sinks` on its sequence's keys."""
    hq, d = q.shape[1:]
    hkv = k_pool.shape[2]
    out = torch.empty_like(q)
    offsets, single, at, rows = tables.queries()
    if single:
        table = tables.block_table[at].long()  # [D, W]
        keys = k_pool[table].flatten(1, 2).float()  # [D, L, Hkv, d]
        values = v_pool[table].flatten(1, 2).float()
        qg = q[rows].float().view(len(single), hkv, hq // hkv, d)
        scores = torch.einsum("skgd,slkd->skgl", qg, keys) / math.sqrt(d)  # [D, Hkv, g, L]
        k_pos = torch.arange(keys.shape[1], device=q.device)[None, :]
        visible = _visible(offsets[at][:, None], k_pos, window)[:, None, None, :]
        probs = _sink_softmax(scores, visible, sinks.float().view(1, hkv, hq // hkv, 1))
        out[rows] = torch.einsum("skgl,slkd->skgd", probs, values).reshape(-1, hq, d).to(q.dtype)
    start = 0
    for s, n in enumerate(tables.lengths):
        if n > 1:
            table = tables.block_table[s].long()
            keys = k_pool[table].flatten(0, 1)  # [L, Hkv, d]
            values = v_pool[table].flatten(0, 1)
            chunk = slice(start, start + n)
            out[chunk] = attention_with_sinks(
                q[chunk],
                keys,
                values,
                sinks,
                q_offset=offsets[s],
                window=window,
            )
        start += n
    return out


class AttentionBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.window = config.sliding_window if config.is_sliding(layer) else None
        self.use_kernels = False  # the Triton path (Transformer.use_kernels)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.qkv = nn.Linear(config.hidden_size, config.qkv_dim, dtype=dtype)
        self.sinks = nn.Parameter(
            torch.zeros(config.num_attention_heads, dtype=torch.float32), requires_grad=False
        )
        self.out = nn.Linear(config.q_dim, config.hidden_size, dtype=dtype)
        self.lora: LayerSlots | None = None  # the resident adapters' (Transformer.attach_lora)

    def forward(
        self,
        x: torch.Tensor,
        batch: SequenceBatch | PagedBatch,
        cos: torch.Tensor,
        sin: torch.Tensor,
        masks: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x [T, H] -> x + attention. A bare `PagedBatch` (a static decode batch, its
        tables on the device) runs the kernel path only. `masks`: the tokens' LoRA slots
        (`LoraSlots.masks`)."""
        t = x.shape[0]
        paged = batch.paged if isinstance(batch, SequenceBatch) else batch
        xn = self.norm(x)
        qkv = self.qkv(xn)
        if masks is not None:
            qkv = qkv + lora_delta(xn, self.lora.qkv, masks[1]).to(qkv.dtype)  # type: ignore[union-attr]
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q = qkv[:, :q_dim].view(t, self.num_heads, self.head_dim)
        k = qkv[:, q_dim : q_dim + kv_dim].view(t, self.num_kv_heads, self.head_dim)
        v = qkv[:, q_dim + kv_dim :].view(t, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if paged is not None:
            paged.write(self.layer, k, v)
            k_pool, v_pool = paged.pools(self.layer)
            tables = paged.tables(self.window is not None)
            if self.use_kernels:
                from gptoss_ray.model.kernels.attention import paged_attention
            else:
                paged_attention = paged_attention_torch
            out = paged_attention(q, k_pool, v_pool, self.sinks, tables, window=self.window)
        else:
            out = torch.empty_like(q)
            start = 0
            for cache, n in zip(batch.caches, batch.lengths, strict=True):
                rows = slice(start, start + n)
                k_all, v_all, offset = cache.store(self.layer, k[rows], v[rows])
                out[rows] = attention_with_sinks(
                    q[rows], k_all, v_all, self.sinks, q_offset=offset, window=self.window
                )
                start += n
        out = out.reshape(t, q_dim)
        y = self.out(out)
        if masks is not None:
            y = y + lora_delta(out, self.lora.out, masks[0]).to(y.dtype)  # type: ignore[union-attr]
        return x + y


class Router(nn.Module):
    """Top-k gate: the k largest logits (descending), softmax over those k only."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.top_k = config.experts_per_token
        self.gate = nn.Linear(config.hidden_size, config.num_experts, dtype=dtype)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [T, H] -> expert ids [T, k] (long), routing weights [T, k] (float32)."""
        top = torch.topk(self.gate(h), self.top_k, dim=-1, sorted=True)
        return top.indices, torch.softmax(top.values.float(), dim=-1)


def swiglu(u: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """u [m, 2I] with gate and linear interleaved (even = gate) -> [m, I]."""
    gate, linear = u[..., 0::2], u[..., 1::2]
    gate = gate.clamp(max=limit)  # from above only
    linear = linear.clamp(-limit, limit)
    return gate * torch.sigmoid(alpha * gate) * (linear + 1)


class ExpertExchange(Protocol):
    """Expert parallelism, plugged into each MoE block from outside (router/moe.py): sends
    each token to the shards that own its experts, runs what comes here on this shard's
    `ExpertSlice`, and sends each slot's output home."""

    def __call__(
        self,
        experts: ExpertSlice,
        h: torch.Tensor,
        expert_ids: torch.Tensor,
        weights: torch.Tensor,
        real: torch.Tensor | None,
        adapters: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """-> this shard's tokens' MoE output [T, H], float32, as `ExpertSlice.forward`."""
        ...


# dequantized expert weights one torch-path chunk of tiles may hold at once
_TILE_WEIGHT_BYTES = 256 * 2**20
# a slice on the torch path keeps its experts dequantized when they take at most this
# (the built-in model's: 1 MB a layer; gpt-oss-20b's: 1.6 GB, dequantized tile by tile)
_KEPT_DEQUANTIZED_BYTES = 256 * 2**20


class ExpertSlice(nn.Module):
    """Experts [lo, hi) of one MoE layer, kept in MXFP4 (blocks and scales, uint8). With
    every expert here it computes the layer by itself; a slice of them needs an exchange
    with the shards that hold the others."""

    def __init__(self, config: ModelConfig, lo: int, hi: int) -> None:
        super().__init__()
        if not 0 <= lo <= hi <= config.num_experts:
            raise ValueError(f"expert range [{lo}, {hi}) is not within [0, {config.num_experts})")
        self.lo, self.hi = lo, hi
        self.num_experts = config.num_experts
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit
        self.use_kernels = False  # the Triton path (Transformer.use_kernels)
        self.exchange: ExpertExchange | None = None  # expert parallelism (Transformer.distribute)
        self.load: torch.Tensor | None = None  # [E] rows received (Transformer.count_expert_load)
        self.lora: LayerSlots | None = None  # the resident adapters' (Transformer.attach_lora)
        n, h, i = hi - lo, config.hidden_size, config.intermediate_size
        g1, g2 = h // mxfp4.BLOCK, i // mxfp4.BLOCK
        u8, b16 = torch.uint8, torch.bfloat16
        self.mlp1_blocks = nn.Buffer(torch.zeros(n, 2 * i, g1, mxfp4.BYTES_PER_BLOCK, dtype=u8))
        self.mlp1_scales = nn.Buffer(torch.zeros(n, 2 * i, g1, dtype=u8))
        self.mlp1_bias = nn.Buffer(torch.zeros(n, 2 * i, dtype=b16))
        self.mlp2_blocks = nn.Buffer(torch.zeros(n, h, g2, mxfp4.BYTES_PER_BLOCK, dtype=u8))
        self.mlp2_scales = nn.Buffer(torch.zeros(n, h, g2, dtype=u8))
        self.mlp2_bias = nn.Buffer(torch.zeros(n, h, dtype=b16))
        # the torch path's dequantized weights (w1 [n, 2I, H], w2 [n, H, I]) by dtype,
        # where they fit (`_weights`); dropped when the kernels take over
        self.dequantized: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def holds_all(self) -> bool:
        return (self.lo, self.hi) == (0, self.num_experts)

    def run_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """x [m, H] -> expert(x) [m, H], for a global expert id in [lo, hi). One expert's
        weights are dequantized at a time, in x's dtype; the rest stay 4-bit."""
        e = expert - self.lo
        w1 = mxfp4.dequantize(self.mlp1_blocks[e], self.mlp1_scales[e], x.dtype)  # [2I, H]
        a = swiglu(F.linear(x, w1, self.mlp1_bias[e].to(x.dtype)), self.alpha, self.limit)
        w2 = mxfp4.dequantize(self.mlp2_blocks[e], self.mlp2_scales[e], x.dtype)  # [H, I]
        return F.linear(a, w2, self.mlp2_bias[e].to(x.dtype))

    def run_grouped(
        self,
        x: torch.Tensor,
        experts: torch.Tensor,
        expected_rows: int | None = None,
        lora: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rows x [m, H], each for global expert experts[m] of this slice, or -1 for a row
        that none takes (padding: its output row is unspecified) -> [m, H]. The work is
        decided by shapes alone: no host reads, nothing sized by the routing.
        expected_rows: how many rows are not padding, about (the kernels' tile choice).
        lora: each row's LoRA slot [m] (-1: none), where adapters with expert factors
        are resident: the torch path adds their products."""
        n = self.hi - self.lo
        local = torch.where(experts < 0, n, experts - self.lo)  # n: no expert here
        if self.use_kernels and lora is None:
            from gptoss_ray.model.kernels.mxfp4_matmul import moe_mxfp4

            return moe_mxfp4(
                x,
                local,
                (self.mlp1_blocks, self.mlp1_scales, self.mlp1_bias),
                (self.mlp2_blocks, self.mlp2_scales, self.mlp2_bias),
                alpha=self.alpha,
                limit=self.limit,
                expected_rows=expected_rows,
            )
        return self._run_tiles(x, local, lora)

    def _run_tiles(
        self, x: torch.Tensor, local: torch.Tensor, lora: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The torch path: rows grouped by expert into tiles of a height set by shapes
        (`ExpertTiles`), each tile one batched matmul against its expert's weights,
        dequantized in x's dtype (the rest stay 4-bit) -> [m, H]."""
        rows, hidden = x.shape
        n = self.hi - self.lo
        out = x.new_zeros(rows + 1, hidden)  # the last row takes the tiles' empty places
        if rows == 0 or n == 0:
            return out[:rows]
        # tiles of about half an expert's share of the rows: at most 3n tiles, so about
        # as many dequantized experts as there are experts and 1.5x the rows computed
        height = 1 << max(0, (-(-rows // (2 * n)) - 1).bit_length())
        tiles = ExpertTiles(local, n, min(height, 128))
        source, taken = tiles.rows()  # [tiles, height]
        expert = tiles.tile_expert.long().clamp(min=0)
        w_bytes = self._expert_bytes(x.dtype)
        chunk = max(1, _TILE_WEIGHT_BYTES // w_bytes)
        kept = self._kept(x.dtype)
        parts = []
        for c in range(0, tiles.num_tiles, chunk):  # a shapes-only loop: memory, not data
            e = expert[c : c + chunk]
            if kept is not None:
                w1, w2 = kept[0][e], kept[1][e]  # [c, 2I, H], [c, H, I]
            else:
                w1 = mxfp4.dequantize(self.mlp1_blocks[e], self.mlp1_scales[e], x.dtype)
                w2 = mxfp4.dequantize(self.mlp2_blocks[e], self.mlp2_scales[e], x.dtype)
            rows_c = source[c : c + chunk]
            u = torch.baddbmm(self.mlp1_bias[e, None].to(x.dtype), x[rows_c], w1.mT)
            if lora is not None:  # LoRA on the experts: W + B @ A, as a product of its own
                mask = band_mask(lora[rows_c], self.lora.owner, self.lora.out[0].dtype)  # type: ignore[union-attr]
                d = lora_delta_tiles(x[rows_c], self.lora.mlp1, e, mask)  # type: ignore[union-attr]
                u = u + d.to(u.dtype)
            a = swiglu(u, self.alpha, self.limit)  # [c, height, I]
            y_c = torch.baddbmm(self.mlp2_bias[e, None].to(x.dtype), a, w2.mT)
            if lora is not None:
                d = lora_delta_tiles(a, self.lora.mlp2, e, mask)  # type: ignore[union-attr]
                y_c = y_c + d.to(y_c.dtype)
            parts.append(y_c)
        y = torch.cat(parts) if len(parts) > 1 else parts[0]
        out.index_copy_(0, torch.where(taken, source, rows).flatten(), y.flatten(0, 1))
        return out[:rows]

    def _expert_bytes(self, dtype: torch.dtype) -> int:
        """One expert's weights dequantized in dtype (w1 is 2I x H, w2 H x I)."""
        return 3 * self.mlp2_blocks.shape[1] * self.mlp2_blocks.shape[2] * 32 * dtype.itemsize

    def _kept(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The slice's experts dequantized in dtype, made on the first call where they
        fit in `_KEPT_DEQUANTIZED_BYTES` (the same values the tiles would dequantize each
        step: on a CPU that dequantization was most of the layer's time); None where
        they do not."""
        if dtype not in self.dequantized:
            if (self.hi - self.lo) * self._expert_bytes(dtype) > _KEPT_DEQUANTIZED_BYTES:
                return None
            self.dequantized[dtype] = (
                mxfp4.dequantize(self.mlp1_blocks, self.mlp1_scales, dtype),
                mxfp4.dequantize(self.mlp2_blocks, self.mlp2_scales, dtype),
            )
        return self.dequantized[dtype]

    def lora_rows(self, adapters: torch.Tensor | None, k: int) -> torch.Tensor | None:
        """Rows' LoRA slots [T] -> those of their k (row, slot) pairs [T * k], where a
        resident adapter has expert factors (else None: nothing to add)."""
        if adapters is None or self.lora is None or not self.lora.experts_active:
            return None
        return adapters[:, None].expand(-1, k).reshape(-1)

    def count(self, experts: torch.Tensor, counted: torch.Tensor | None = None) -> None:
        """Adds the rows routed to each expert to `load` (`counted` [rows]: 1, or 0 for a
        padding row), in place on the device: bincount would size its output from the
        data and so wait for it."""
        if self.load is not None:
            ones = counted if counted is not None else torch.ones_like(experts)
            self.load.index_add_(0, experts, ones.to(self.load.dtype))

    def forward(
        self,
        h: torch.Tensor,
        expert_ids: torch.Tensor,
        weights: torch.Tensor,
        real: torch.Tensor | None = None,
        adapters: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """h [T, H], expert_ids and weights [T, k] -> the MoE output [T, H] in float32: each
        token's k expert outputs, weighted and summed in slot order. `real` [T] marks the
        rows that are tokens (1) or padding (0), for the load count. `adapters`: the
        tokens' LoRA slots [T] (-1: none), given wherever the model serves LoRA (the
        exchange carries them to the experts' owners)."""
        if self.exchange is not None:
            return self.exchange(self, h, expert_ids, weights, real, adapters)
        t, k = expert_ids.shape
        # every pair is local: no data-dependent shapes (nor host syncs), so a decode step
        # can be graph-captured; padding rows go to no expert
        rows = h[:, None, :].expand(t, k, h.shape[1]).reshape(t * k, h.shape[1])
        flat = expert_ids.reshape(-1)
        if real is not None:
            flat = torch.where(real[:, None].expand(t, k).reshape(-1) > 0, flat, -1)
        self.count(flat.clamp(min=0), None if real is None else (flat >= 0))
        lora = self.lora_rows(adapters, k)
        y = self.run_grouped(rows, flat, lora=lora).view(t, k, h.shape[1])
        return combine(y.float() * weights[..., None])


def combine(contributions: torch.Tensor) -> torch.Tensor:
    """[T, k, H] float32 -> [T, H] float32, summing the k slots in a fixed order (slot 0
    first), so that the result does not depend on which device computed which slot."""
    total = contributions[:, 0].clone()
    for j in range(1, contributions.shape[1]):
        total += contributions[:, j]
    return total


class MLPBlock(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, experts: tuple[int, int]) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.router = Router(config, dtype)
        self.experts = ExpertSlice(config, *experts)

    def forward(
        self,
        x: torch.Tensor,
        real: torch.Tensor | None = None,
        adapters: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [T, H] -> x + MoE(x)."""
        h = self.norm(x)
        expert_ids, weights = self.router(h)
        return (x.float() + self.experts(h, expert_ids, weights, real, adapters)).to(x.dtype)


class TransformerBlock(nn.Module):
    def __init__(
        self, config: ModelConfig, layer: int, dtype: torch.dtype, experts: tuple[int, int]
    ) -> None:
        super().__init__()
        self.attn = AttentionBlock(config, layer, dtype)
        self.mlp = MLPBlock(config, dtype, experts)

    def forward(
        self, x: torch.Tensor, batch: SequenceBatch, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        return self.mlp(self.attn(x, batch, cos, sin), batch.real)


class Transformer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: torch.dtype = torch.bfloat16,
        experts: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.expert_range = experts if experts is not None else (0, config.num_experts)
        # weights come from a checkpoint or randomize_, never from init; and an Embedding's
        # own init (normal_) on the meta device imports torch's reference ops: 2 s a process
        self.embedding = nn.Embedding(
            config.vocab_size,
            config.hidden_size,
            _weight=torch.empty(config.vocab_size, config.hidden_size, dtype=dtype),
        )
        self.block = nn.ModuleList(
            TransformerBlock(config, i, dtype, self.expert_range)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.unembedding = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        self.rope = RotaryEmbedding(config)
        self.lora: LoraSlots | None = None  # resident LoRA adapters (attach_lora)
        self.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    def use_kernels(self, enabled: bool) -> Transformer:
        """Runs the experts (and, over a paged cache, attention) through the Triton
        kernels instead of the torch reference path."""
        for module in self.modules():
            if isinstance(module, AttentionBlock | ExpertSlice):
                module.use_kernels = enabled
            if isinstance(module, ExpertSlice):
                module.dequantized.clear()  # the torch path's, made again if it runs
        return self

    def distribute(self, exchange: ExpertExchange | None) -> Transformer:
        """Every MoE block reaches the experts it does not hold through `exchange`."""
        for block in self.block:
            block.mlp.experts.exchange = exchange
        return self

    def attach_lora(self, slots: LoraSlots | None) -> Transformer:
        """Resident LoRA adapters (`model.lora`), which a batch's tokens name by slot
        (`SequenceBatch.adapters`); their factors are read in place, so `LoraSlots.put`
        and `clear` take effect from the next step."""
        self.lora = slots
        for i, block in enumerate(self.block):
            layer = slots.layers[i] if slots is not None else None
            block.attn.lora = block.mlp.experts.lora = layer
        return self

    def count_expert_load(self, load: torch.Tensor | None) -> Transformer:
        """Counts, from now on, the rows each local expert receives into load[layer, e]
        (None: stop counting)."""
        for layer, block in enumerate(self.block):
            block.mlp.experts.load = None if load is None else load[layer]
        return self

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        batch: SequenceBatch,
        *,
        all_logits: bool = False,
        rows: list[int] | None = None,
        timer: StepTimer | None = None,
        taps: tuple[int, ...] = (),
        tapped: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """tokens [T] (the sequences' new tokens, concatenated) -> float32 logits of each
        sequence's last token [S, V], or of the given `rows` of the tokens, or of every
        token [T, V] with all_logits. Appends the tokens to their sequences' caches.
        `timer.lap(phase)`, if given, is called as each phase ends. With `taps` (layers),
        the residual stream entering each of them, side by side [T, len(taps) * H], is
        appended to `tapped` (an EAGLE-3 draft's input)."""
        experts = self.block[0].mlp.experts
        if not experts.holds_all and experts.exchange is None:
            lo, hi = self.expert_range
            raise RuntimeError(
                f"this model holds experts [{lo}, {hi}) only; the others live on other shards, "
                "so it cannot run a whole forward pass by itself"
            )
        if tokens.shape[0] != batch.num_tokens:
            raise ValueError(f"{tokens.shape[0]} tokens for a batch of {batch.num_tokens}")
        lap = timer.lap if timer is not None else _no_lap
        cos, sin = self.rope.cos_sin(batch.positions(tokens.device))
        x = self.embedding(tokens)
        lap("prepare")
        taken = {}
        masks = adapters = None
        if self.lora is not None:  # every shard gives the experts its tokens' slots
            adapters = batch.adapters
            if adapters is None:
                adapters = torch.full((tokens.shape[0],), -1, device=tokens.device)
            else:
                masks = self.lora.masks(adapters)
        for layer, block in enumerate(self.block):
            if layer in taps:
                taken[layer] = x
            x = block.attn(x, batch, cos, sin, masks)
            lap("attention")
            x = block.mlp(x, batch.real, adapters)
            lap("experts")
        batch.commit()
        if taps and tapped is not None:
            tapped.append(torch.cat([taken[layer] for layer in taps], dim=-1))
        if not all_logits:
            x = x[batch.last_rows() if rows is None else rows]
        return self.unembedding(self.norm(x)).float()


class StepTimer(Protocol):
    def lap(self, phase: str) -> None: ...


def _no_lap(phase: str) -> None:
    pass

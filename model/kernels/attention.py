"""Attention with per-head sinks and an optional sliding window, reading keys and values
in place from the paged pools: one launch for a whole batch of prefill chunks and decodes.

A program owns one query tile (up to BLOCK_M tokens of one sequence) and one KV head, and
with it the GROUP query heads that share that KV head, so each key block is loaded once
for all of them: the tile's rows are (token, head) pairs. It walks the sequence's block
table over the blocks its queries can see, flash-style (a running max and denominator,
the value sum rescaled as the max grows); the sink joins the denominator at the end as
one more logit with no value. The torch `attention_with_sinks` is the reference.

Dot precision as in the MoE kernel: bf16 operands with a float32 accumulator on a GPU
for bf16 inputs; float32 otherwise and under TRITON_INTERPRET=1."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from gptoss_ray.model.kernels.mxfp4_matmul import interpreted
from gptoss_ray.model.kv_cache import AttentionTables


@triton.jit
def _paged_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    sinks_ptr,
    out_ptr,
    block_table_ptr,
    kv_start_ptr,
    tile_seq_ptr,
    tile_row_ptr,
    tile_pos_ptr,
    tile_count_ptr,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_table,
    window,
    scale,
    GROUP: tl.constexpr,
    GROUP_P: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    SLIDING: tl.constexpr,
    BF16_DOT: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(tile_seq_ptr + tile)
    row0 = tl.load(tile_row_ptr + tile)
    pos0 = tl.load(tile_pos_ptr + tile)
    count = tl.load(tile_count_ptr + tile)
    kv_start = tl.load(kv_start_ptr + seq)

    r = tl.arange(0, BLOCK_M * GROUP_P)
    qi, g = r // GROUP_P, r % GROUP_P
    r_ok = (qi < count) & (g < GROUP)
    head = kv_head * GROUP + g
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    rows = (row0 + qi).to(tl.int64)
    q = tl.load(
        q_ptr + rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=r_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    q_pos = pos0 + qi

    lo = kv_start
    if SLIDING:
        lo = tl.maximum(kv_start, pos0 - window + 1)
    first_block = (lo - kv_start) // BLOCK_SIZE
    last_block = (pos0 + count - 1 - kv_start) // BLOCK_SIZE

    m = tl.full((BLOCK_M * GROUP_P,), -1.0e30, dtype=tl.float32)
    denom = tl.zeros((BLOCK_M * GROUP_P,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M * GROUP_P, BLOCK_D), dtype=tl.float32)
    slots = tl.arange(0, BLOCK_SIZE)
    for b in range(first_block, last_block + 1):
        block = tl.load(block_table_ptr + seq * stride_table + b).to(tl.int64)
        kv_off = block * stride_kb + slots[:, None] * stride_ks + kv_head * stride_kh + d[None, :]
        k = tl.load(k_ptr + kv_off, mask=d_ok[None, :], other=0.0)  # [BLOCK_SIZE, BLOCK_D]
        v = tl.load(v_ptr + kv_off, mask=d_ok[None, :], other=0.0)
        if BF16_DOT:
            s = tl.dot(q.to(tl.bfloat16), tl.trans(k.to(tl.bfloat16)))
        else:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        s = s * scale
        k_pos = kv_start + b * BLOCK_SIZE + slots
        visible = k_pos[None, :] <= q_pos[:, None]
        if SLIDING:
            visible &= k_pos[None, :] > q_pos[:, None] - window
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        rescale = tl.exp(m - m_new)
        denom = denom * rescale + tl.sum(p, 1)
        if BF16_DOT:
            acc = acc * rescale[:, None] + tl.dot(p.to(tl.bfloat16), v.to(tl.bfloat16))
        else:
            acc = acc * rescale[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        m = m_new
    sink = tl.load(sinks_ptr + head, mask=r_ok, other=0.0).to(tl.float32)
    m_new = tl.maximum(m, sink)
    rescale = tl.exp(m - m_new)
    denom = denom * rescale + tl.exp(sink - m_new)
    out = acc * rescale[:, None] / denom[:, None]
    tl.store(
        out_ptr + rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
        out,
        mask=r_ok[:, None] & d_ok[None, :],
    )


def paged_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    sinks: torch.Tensor,
    tables: AttentionTables,
    *,
    window: int | None,
) -> torch.Tensor:
    """q [T, Hq, d] (every sequence's new tokens, in batch order; their keys and values
    already written to the pools), pools [blocks, block_size, Hkv, d] -> [T, Hq, d]."""
    t, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_pool.shape[1], k_pool.shape[2]
    if k_pool.shape[3] != head_dim or v_pool.shape != k_pool.shape or num_heads % num_kv_heads:
        raise ValueError(
            f"queries {tuple(q.shape)} do not fit the key/value pools {tuple(k_pool.shape)}"
        )
    group = num_heads // num_kv_heads
    group_p = triton.next_power_of_2(group)
    decode_only = max(tables.lengths, default=1) == 1
    # at least 16 rows per tile (the smallest dot on a GPU); wider tiles for prefill
    block_m = max(1, (16 if decode_only else 64) // group_p)
    tile_seq, tile_row, tile_pos, tile_count = tables.tiles(block_m)
    out = torch.empty_like(q)
    if t == 0:
        return out
    k_pool, v_pool = k_pool.contiguous(), v_pool.contiguous()
    grid = (tile_seq.shape[0], num_kv_heads)
    _paged_attention_kernel[grid](
        q,
        k_pool,
        v_pool,
        sinks,
        out,
        tables.block_table,
        tables.kv_start,
        tile_seq,
        tile_row,
        tile_pos,
        tile_count,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_pool.stride(0),
        k_pool.stride(1),
        k_pool.stride(2),
        tables.block_table.stride(0),
        window or 0,
        1.0 / math.sqrt(head_dim),
        GROUP=group,
        GROUP_P=group_p,
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=block_m,
        BLOCK_SIZE=block_size,
        SLIDING=window is not None,
        BF16_DOT=q.dtype == torch.bfloat16 and q.is_cuda and not interpreted(),
    )
    return out

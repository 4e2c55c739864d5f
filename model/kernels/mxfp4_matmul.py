"""MoE expert matmuls reading MXFP4 weights directly: x @ W_e^T + b_e for rows grouped by
expert, the weights dequantized in registers tile by tile (they stay 4-bit in memory),
optionally with gpt-oss's clamped SwiGLU fused into the epilogue.

W_e [N, K] is stored as blocks [E, N, K/32, 16] (two E2M1 codes per byte, low nibble =
even k) and scales [E, N, K/32] (E8M0, 2^(s - 127)). With SwiGLU, output columns come in
pairs (even = gate, odd = linear) and the kernel writes [M, N/2].

Rows arrive in any order with an expert id each. `expert_tiles` sorts them by expert and
cuts each expert's run into BLOCK_M-row tiles, all on the device and into a grid whose
size depends on shapes only (no host synchronisation: the step can be graph-captured).
A program owns one tile and BLOCK_N output columns, so each expert's weights are read
once per tile row. Rows are gathered from x and scattered to the output through index
arrays, which saves the sorted copies.

Dot precision: bf16 operands with a float32 accumulator on a GPU when x is bf16 (the
torch path computes in bf16 too); float32 otherwise, and always under TRITON_INTERPRET=1,
whose bf16 dot is wrong."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from model.model import count_rows


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _fp4_value(code):
    """E2M1 code (0..15, as int32) -> float32: 0, .5, 1, 1.5, 2, 3, 4, 6 and negatives."""
    mag = code & 7
    exponent = (mag >> 1).to(tl.float32)
    mantissa = (mag & 1).to(tl.float32)
    normal = tl.exp2(exponent - 1.0) * (1.0 + 0.5 * mantissa)
    value = tl.where(mag < 2, mag.to(tl.float32) * 0.5, normal)
    return tl.where(code >= 8, -value, value)


@triton.jit
def _moe_mxfp4_kernel(
    x_ptr, x_index_ptr, blocks_ptr, scales_ptr, bias_ptr, out_ptr, out_index_ptr,
    tile_expert_ptr, tile_row_ptr, expert_end_ptr,
    N, K, stride_xm, stride_om, alpha, limit,
    GATHER: tl.constexpr, SCATTER: tl.constexpr, SWIGLU: tl.constexpr, BF16_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(tile_expert_ptr + tile)
    if expert < 0:  # a spare tile: the grid is sized for the worst case
        return
    row0 = tl.load(tile_row_ptr + tile)
    end = tl.load(expert_end_ptr + expert)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < end
    x_rows = offs_m
    if GATHER:
        x_rows = tl.load(x_index_ptr + offs_m, mask=m_ok, other=0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    e = expert.to(tl.int64)
    w_blocks = blocks_ptr + e * N * (K // 2)
    w_scales = scales_ptr + e * N * (K // 32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + x_rows[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
        w_ok = n_ok[:, None] & k_ok[None, :]
        packed = tl.load(w_blocks + offs_n[:, None] * (K // 2) + offs_k[None, :] // 2,
                         mask=w_ok, other=0).to(tl.int32)  # fmt: skip
        code = tl.where(offs_k[None, :] % 2 == 0, packed & 15, packed >> 4)
        scale = tl.load(w_scales + offs_n[:, None] * (K // 32) + offs_k[None, :] // 32,
                        mask=w_ok, other=127).to(tl.float32)  # fmt: skip
        w = _fp4_value(code) * tl.exp2(scale - 127.0)  # [BLOCK_N, BLOCK_K]
        if BF16_DOT:
            acc += tl.dot(x.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))
        else:
            acc += tl.dot(x.to(tl.float32), tl.trans(w))
    acc += tl.load(bias_ptr + e * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_rows = offs_m.to(tl.int64)
    if SCATTER:
        out_rows = tl.load(out_index_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
    if SWIGLU:
        gate, linear = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))
        gate = tl.minimum(gate, limit)  # from above only
        linear = tl.minimum(tl.maximum(linear, -limit), limit)
        out = gate * tl.sigmoid(alpha * gate) * (linear + 1.0)
        offs_h = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(out_ptr + out_rows[:, None] * stride_om + offs_h[None, :], out,
                 mask=m_ok[:, None] & (offs_h < N // 2)[None, :])  # fmt: skip
    else:
        tl.store(out_ptr + out_rows[:, None] * stride_om + offs_n[None, :], acc,
                 mask=m_ok[:, None] & n_ok[None, :])  # fmt: skip


class ExpertTiles:
    """Rows sorted by expert and cut into tiles; every tensor stays on the device."""

    def __init__(self, local_experts: torch.Tensor, num_experts: int, block_m: int) -> None:
        """local_experts [R]: each row's expert, 0..num_experts-1 (the slice's numbering)."""
        rows = local_experts.shape[0]
        self.block_m = block_m
        self.order = torch.argsort(local_experts, stable=True).to(torch.int32)  # sorted -> row
        counts = torch.zeros(num_experts, dtype=torch.long, device=local_experts.device)
        count_rows(counts, local_experts)
        self.expert_end = torch.cumsum(counts, 0).to(torch.int32)  # [E], in sorted rows
        starts = self.expert_end - counts
        tiles = (counts + block_m - 1) // block_m
        tile_end = torch.cumsum(tiles, 0)
        # each expert wastes at most one partly filled tile
        self.num_tiles = triton.cdiv(rows, block_m) + num_experts
        t = torch.arange(self.num_tiles, device=local_experts.device)
        expert = torch.searchsorted(tile_end, t, right=True)
        valid = expert < num_experts
        expert = expert.clamp(max=num_experts - 1)
        self.tile_row = (starts[expert] + (t - (tile_end - tiles)[expert]) * block_m).to(
            torch.int32
        )
        self.tile_expert = torch.where(valid, expert, -1).to(torch.int32)


def _launch(
    x, blocks, scales, bias, out, tiles, *, gather, scatter, swiglu, block_n, block_k, **launch
):
    n, k = blocks.shape[1], blocks.shape[2] * 32
    alpha, limit = swiglu if swiglu else (0.0, 0.0)
    bf16_dot = x.dtype == torch.bfloat16 and x.is_cuda and not interpreted()
    grid = (tiles.num_tiles, triton.cdiv(n, block_n))
    _moe_mxfp4_kernel[grid](
        x, tiles.order, blocks, scales, bias, out, tiles.order,
        tiles.tile_expert, tiles.tile_row, tiles.expert_end,
        n, k, x.stride(0), out.stride(0), alpha, limit,
        GATHER=gather, SCATTER=scatter, SWIGLU=swiglu is not None, BF16_DOT=bf16_dot,
        BLOCK_M=tiles.block_m, BLOCK_N=block_n, BLOCK_K=block_k, **launch,
    )  # fmt: skip


def _check(k: int, blocks: torch.Tensor, scales: torch.Tensor, what: str) -> None:
    e, n = blocks.shape[:2]
    if blocks.shape != (e, n, k // 32, 16) or scales.shape != (e, n, k // 32) or k % 32:
        raise ValueError(
            f"{what}: MXFP4 weight {tuple(blocks.shape)} / scales {tuple(scales.shape)} "
            f"for K={k} (expected [E, N, K/32, 16] and [E, N, K/32])"
        )


def moe_mxfp4(
    x: torch.Tensor,
    local_experts: torch.Tensor,
    mlp1: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    mlp2: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    alpha: float,
    limit: float,
    block_m: int = 16,
    block_n: int = 64,
    block_k: int = 64,
    **launch: int,
) -> torch.Tensor:
    """Rows x [R, H], each for expert local_experts[R] of the given stacks
    (blocks, scales, bias) -> expert(x) [R, H] in x's dtype, rows in x's order. `launch`
    (num_warps, num_stages) goes to both launches (`gptoss-ray bench kernels` tries them)."""
    rows, num_experts = x.shape[0], mlp1[0].shape[0]
    inter = mlp1[0].shape[1] // 2
    _check(x.shape[1], mlp1[0], mlp1[1], "mlp1")
    _check(inter, mlp2[0], mlp2[1], "mlp2")
    x = x.contiguous()
    tiles = ExpertTiles(local_experts, num_experts, block_m)
    a = torch.empty(rows, inter, dtype=x.dtype, device=x.device)  # sorted by expert
    out = torch.empty(rows, mlp2[0].shape[1], dtype=x.dtype, device=x.device)
    _launch(x, *mlp1, a, tiles, gather=True, scatter=False, swiglu=(alpha, limit),
            block_n=block_n, block_k=block_k, **launch)  # fmt: skip
    _launch(a, *mlp2, out, tiles, gather=False, scatter=True, swiglu=None,
            block_n=block_n, block_k=block_k, **launch)  # fmt: skip
    return out


def mxfp4_linear(
    x: torch.Tensor,
    blocks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor,
    *,
    swiglu: tuple[float, float] | None = None,
    block_m: int = 16,
    block_n: int = 32,
    block_k: int = 32,
) -> torch.Tensor:
    """One weight: x [M, K] -> [M, N] float32 (or [M, N/2] with swiglu=(alpha, limit))."""
    m, k = x.shape
    n = blocks.shape[0]
    _check(k, blocks[None], scales[None], "weight")
    if block_k % 32 or (swiglu and block_n % 2):
        raise ValueError(f"block_k={block_k} must be a multiple of 32, block_n even")
    x = x.contiguous()
    out = torch.empty(m, n // 2 if swiglu else n, dtype=torch.float32, device=x.device)
    tiles = ExpertTiles(torch.zeros(m, dtype=torch.long, device=x.device), 1, block_m)
    _launch(x, blocks[None].contiguous(), scales[None].contiguous(), bias[None].contiguous(),
            out, tiles, gather=False, scatter=False, swiglu=swiglu, block_n=block_n,
            block_k=block_k)  # fmt: skip
    return out

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

Decoding the weights costs instructions per byte read, and at small batches that, not
memory, bounds the speed (`gptoss-ray bench sass` counts them). So a byte of two codes
becomes the bf16 bits of both from bits alone (a multiply spreads its nibbles, a second
puts each nibble's magnitude at the bottom of the exponent and its sign at the top, a
mask cleans up: 2^-126 times each value, with 0.5 on the subnormal 2^-127), and each MX
block's scale multiplies the block's partial sum, not its 32 weights. Inputs enter
x 2^64, so that products with the small weights stay normal floats. Two kernels:
- tiles of BLOCK_M rows through tensor-core dots, the weights brought to 2^-64 by one
  bf16x2 multiply per byte, so that the dot sees normal numbers and yields true
  products (float32 under the interpreter, whose bf16 dot is wrong);
- single rows (decode, where an expert sees about one row) without a dot: each thread
  holds one output column's MX block and sums it alone, in float32 against the 2^-126
  weights as decoded, x pre-scaled by the caller; each partial sum is brought back by
  2^62 before its scale multiplies it.
Both are exact where the torch path is (a product of an E2M1 value and a bf16 has at
most 10 significant bits); sums are in float32, in another order."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from gptoss_ray.model.expert_tiles import ExpertTiles

X_SCALE = 2.0**64  # inputs: far from overflow, products far from 2^-126
_TO_TRUE = 2.0**126 / X_SCALE  # x 2^64 times weights x 2^-126 -> true products


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _e2m1_bits(packed):
    """Bytes of two E2M1 codes (uint8; low nibble = even k) -> int32s holding the bf16
    bits of both values x 2^-126, the even code's in the low half. A nibble's magnitude
    lands on the bottom 2 bits of the exponent and the top of the mantissa, its sign on
    bit 15: 1 .. 6 become 2^-126 .. 6 x 2^-126 and 0.5 the subnormal 2^-127."""
    spread = (packed.to(tl.uint32) * 0x1001) & 0xF000F  # nibbles at bits 0..3 and 16..19
    # x 0x1040 copies each nibble 6 and 12 bits up without carries: magnitude from the
    # first copy, sign from the second
    return ((spread * 0x1040) & 0x81C081C0).to(tl.int32, bitcast=True)


@triton.jit
def _e2m1_bf16_bits(packed):
    """[R, 16] bytes -> [R, 32] int16: the bf16 bits of the weights x 2^-126, k in order."""
    bits = _e2m1_bits(packed)
    return tl.reshape(tl.join(bits.to(tl.int16), (bits >> 16).to(tl.int16)), (packed.shape[0], 32))


@triton.jit
def _e2m1_bf16(packed):
    """[R, 16] bytes -> [R, 32] bf16 weights x 2^-64: times 2^62 in one bf16x2 multiply
    per byte, which keeps the subnormal input (PTX's bf16 multiply does not flush; the
    interpreter's does, so it runs the float32 path), so that the tensor cores see normal
    numbers only."""
    # bitcast after the reshape: before it, Triton 3.9 fails to lay out Hopper's wgmma operand
    w = _e2m1_bf16_bits(packed).to(tl.bfloat16, bitcast=True)
    return (w.to(tl.float32) * 4.611686018427388e18).to(tl.bfloat16)


@triton.jit
def _e2m1_float32(packed):
    """[R, 16] bytes -> ([R, 16] even k, [R, 16] odd k) float32 weights x 2^-126."""
    bits = _e2m1_bits(packed)
    return (bits << 16).to(tl.float32, bitcast=True), (bits & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _e8m0_value(scale):
    """E8M0 scale bytes (int32) -> 2^(s - 127) in float32, 255 a NaN, in integer
    instructions (a select per case cost two more per column): the byte is the exponent,
    bit 22 (the max) makes 0 the subnormal 2^-127, and s + 1 = 256 puts bit 22 under 255's
    all-ones exponent."""
    bits = tl.maximum(scale << 23, 0x400000) | (((scale + 1) << 14) & 0x400000)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _moe_mxfp4_kernel(
    x_ptr,
    x_index_ptr,
    blocks_ptr,
    scales_ptr,
    bias_ptr,
    out_ptr,
    out_index_ptr,
    tile_expert_ptr,
    tile_row_ptr,
    expert_end_ptr,
    N,
    K,
    stride_xm,
    stride_om,
    stride_be,
    stride_bn,
    stride_se,
    stride_sn,
    alpha,
    limit,
    GATHER: tl.constexpr,
    SCATTER: tl.constexpr,
    SWIGLU: tl.constexpr,
    BF16_DOT: tl.constexpr,
    X_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
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
    w_blocks = blocks_ptr + e * stride_be + offs_n[:, None] * stride_bn
    w_scales = scales_ptr + e * stride_se + offs_n * stride_sn
    # one MX block (32 k, 16 bytes) per step: its scale is one number per output column,
    # applied to the step's partial product instead of to every weight
    j = tl.arange(0, 16)
    x_tile = x_ptr + x_rows[:, None].to(tl.int64) * stride_xm + tl.arange(0, 32)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, K // 32):
        # [BLOCK_N, 16] bytes, each two k: even low, odd high
        packed = tl.load(w_blocks + (16 * g + j)[None, :], mask=n_ok[:, None], other=0)
        scale = _e8m0_value(tl.load(w_scales + g, mask=n_ok, other=127).to(tl.int32))
        # a no-op reduction: without it Triton 3.6 moves the layout conversion up to the
        # load and decodes each scale for all 16 MMA columns a thread holds, not for the 2
        # it loaded (bench sass: 0.39 -> 0.33 instructions per byte; 3.9 is unchanged)
        scale = tl.max(tl.join(scale, scale), axis=1)
        # x 2^64 against weights x 2^-64: true products, every operand a normal number
        xg = tl.load(x_tile + 32 * g, mask=m_ok[:, None], other=0.0).to(tl.float32) * X_SCALE
        if BF16_DOT:
            part = tl.dot(xg.to(tl.bfloat16), tl.trans(_e2m1_bf16(packed)))
        else:
            w = tl.reshape(tl.join(*_e2m1_float32(packed)), (BLOCK_N, 32)) * 4.611686018427388e18
            part = tl.dot(xg, tl.trans(w), input_precision="ieee")
        acc += part * scale[None, :]
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
        tl.store(
            out_ptr + out_rows[:, None] * stride_om + offs_h[None, :],
            out,
            mask=m_ok[:, None] & (offs_h < N // 2)[None, :],
        )
    else:
        tl.store(
            out_ptr + out_rows[:, None] * stride_om + offs_n[None, :],
            acc,
            mask=m_ok[:, None] & n_ok[None, :],
        )


@triton.jit
def _moe_mxfp4_row_kernel(
    x_ptr,
    x_index_ptr,
    blocks_ptr,
    scales_ptr,
    bias_ptr,
    out_ptr,
    out_index_ptr,
    tile_expert_ptr,
    tile_row_ptr,
    expert_end_ptr,
    N,
    K,
    stride_xm,
    stride_om,
    stride_be,
    stride_bn,
    stride_se,
    stride_sn,
    alpha,
    limit,
    to_true,
    out_scale,
    GATHER: tl.constexpr,
    SCATTER: tl.constexpr,
    SWIGLU: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """One row (x pre-scaled, float32) x BLOCK_N columns; writes out_scale x the result,
    rounded through bf16 first with ROUND_BF16 (as the torch path rounds it). UNROLL MX
    blocks (a divisor of K/32) per step: a thread has that many loads in flight, which at
    decode's few programs is what keeps the memory busy."""
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(tile_expert_ptr + tile)
    if expert < 0:
        return
    row = tl.load(tile_row_ptr + tile)  # tiles of one row: a real tile has a real row
    x_row = row
    if GATHER:
        x_row = tl.load(x_index_ptr + row)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    e = expert.to(tl.int64)
    w_blocks = blocks_ptr + e * stride_be + offs_n[:, None] * stride_bn + tl.arange(0, 16)[None, :]
    w_scales = scales_ptr + e * stride_se + offs_n * stride_sn
    x_block = x_ptr + x_row.to(tl.int64) * stride_xm + tl.arange(0, 32)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for g0 in range(0, K // 32, UNROLL):
        for i in tl.static_range(UNROLL):
            g = g0 + i
            packed = tl.load(w_blocks + 16 * g, mask=n_ok[:, None], other=0)
            scale = _e8m0_value(tl.load(w_scales + g, mask=n_ok, other=127).to(tl.int32))
            w_even, w_odd = _e2m1_float32(packed)  # [BLOCK_N, 16] each
            x_even, x_odd = tl.split(tl.reshape(tl.load(x_block + 32 * g), (16, 2)))
            part = tl.sum(w_even * x_even[None, :] + w_odd * x_odd[None, :], axis=1)
            acc += (part * to_true) * scale  # the true partial sum, then its scale
    acc = acc + tl.load(bias_ptr + e * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    out_row = row.to(tl.int64)
    if SCATTER:
        out_row = tl.load(out_index_ptr + row).to(tl.int64)
    if SWIGLU:
        gate, linear = tl.split(tl.reshape(acc, (BLOCK_N // 2, 2)))
        gate = tl.minimum(gate, limit)
        linear = tl.minimum(tl.maximum(linear, -limit), limit)
        out = gate * tl.sigmoid(alpha * gate) * (linear + 1.0)
        if ROUND_BF16:
            out = out.to(tl.bfloat16).to(tl.float32)
        offs_h = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(out_ptr + out_row * stride_om + offs_h, out * out_scale, mask=offs_h < N // 2)
    else:
        tl.store(out_ptr + out_row * stride_om + offs_n, acc * out_scale, mask=n_ok)


def _launch(
    x,
    blocks,
    scales,
    bias,
    out,
    tiles,
    *,
    gather,
    scatter,
    swiglu,
    block_n,
    one_row=False,
    out_scale=1.0,
    round_bf16=False,
    **launch,
):
    """Either kernel over `tiles`; out_scale and round_bf16 are the single-row kernel's."""
    n, groups = blocks.shape[1], blocks.shape[2]
    alpha, limit = swiglu if swiglu else (0.0, 0.0)
    grid = (tiles.num_tiles, triton.cdiv(n, block_n))
    args = (
        x,
        tiles.order,
        blocks,
        scales,
        bias,
        out,
        tiles.order,
        tiles.tile_expert,
        tiles.tile_row,
        tiles.expert_end,
        n,
        groups * 32,
        x.stride(0),
        out.stride(0),
        blocks.stride(0),
        blocks.stride(1),
        scales.stride(0),
        scales.stride(1),
        alpha,
        limit,
    )
    flags = {"GATHER": gather, "SCATTER": scatter, "SWIGLU": swiglu is not None}
    if one_row:
        unroll = max(d for d in range(1, 9) if groups % d == 0)
        _moe_mxfp4_row_kernel[grid](
            *args,
            _TO_TRUE,
            out_scale,
            **flags,
            ROUND_BF16=round_bf16,
            BLOCK_N=block_n,
            UNROLL=unroll,
            **launch,
        )
    else:
        bf16_dot = x.dtype == torch.bfloat16 and x.is_cuda and not interpreted()
        _moe_mxfp4_kernel[grid](
            *args,
            **flags,
            BF16_DOT=bf16_dot,
            X_SCALE=X_SCALE,
            BLOCK_M=tiles.block_m,
            BLOCK_N=block_n,
            **launch,
        )


def _check(k: int, blocks: torch.Tensor, scales: torch.Tensor, what: str) -> None:
    e, n = blocks.shape[:2]
    if blocks.shape != (e, n, k // 32, 16) or scales.shape != (e, n, k // 32) or k % 32:
        raise ValueError(
            f"{what}: MXFP4 weight {tuple(blocks.shape)} / scales {tuple(scales.shape)} "
            f"for K={k} (expected [E, N, K/32, 16] and [E, N, K/32])"
        )
    # the kernel walks rows with their strides but reads an MX block's 16 bytes in a row
    if blocks.stride()[2:] != (16, 1) or scales.stride(2) != 1:
        raise ValueError(f"{what}: MXFP4 blocks and scales must be contiguous within a row")


def moe_mxfp4(
    x: torch.Tensor,
    local_experts: torch.Tensor,
    mlp1: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    mlp2: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    alpha: float,
    limit: float,
    one_row: bool | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    expected_rows: int | None = None,
    **launch: int,
) -> torch.Tensor:
    """Rows x [R, H], each for expert local_experts[R] of the given stacks
    (blocks, scales, bias), or num_experts for a row left out -> expert(x) [R, H] in x's
    dtype, rows in x's order (a row left out is not written).

    one_row: the single-row kernel (default: when there are at most half as many rows as
    experts, so that an expert rarely has two; decided from shapes, as graph capture
    needs). block_m: rows per tile of the other (default 16, or 32 once experts average
    24 rows: each tile decodes its expert's weights anew). expected_rows: the rows these
    choices count, where most rows are padding left out (a fixed-size exchange's).
    `launch` (num_warps, num_stages) goes to both launches (`gptoss-ray bench kernels`
    tries them)."""
    rows, num_experts = x.shape[0], mlp1[0].shape[0]
    expected = rows if expected_rows is None else expected_rows
    inter = mlp1[0].shape[1] // 2
    _check(x.shape[1], mlp1[0], mlp1[1], "mlp1")
    _check(inter, mlp2[0], mlp2[1], "mlp2")
    out = torch.empty(rows, mlp2[0].shape[1], dtype=x.dtype, device=x.device)
    if rows == 0:  # a shard none of whose experts was picked
        return out
    if one_row is None:
        one_row = 2 * expected <= num_experts
    if one_row:
        tiles = ExpertTiles(local_experts, num_experts, 1)
        # sorted by expert, pre-scaled for mlp2, rounded to x's dtype as the torch path does
        a = torch.empty(rows, inter, dtype=torch.float32, device=x.device)
        # two warps of 64 columns: decode's few rows still make a few programs per SM
        common = {
            "tiles": tiles,
            "block_n": block_n or 64,
            "num_warps": 2,
            "one_row": True,
            **launch,
        }
        _launch(
            x.float() * X_SCALE,
            *mlp1,
            a,
            gather=True,
            scatter=False,
            swiglu=(alpha, limit),
            out_scale=X_SCALE,
            round_bf16=x.dtype == torch.bfloat16,
            **common,
        )
        _launch(a, *mlp2, out, gather=False, scatter=True, swiglu=None, **common)
        return out
    x = x.contiguous()
    if block_m is None:
        block_m = 32 if expected >= 24 * num_experts else 16
    tiles = ExpertTiles(local_experts, num_experts, block_m)
    a = torch.empty(rows, inter, dtype=x.dtype, device=x.device)  # sorted by expert
    # two warps of 128 columns: 32 bytes per thread per step spread the step's fixed cost
    # (the x fragment, the loop) thin: 0.34 instructions per byte against 0.39 at 4 warps
    common = {"tiles": tiles, "block_n": block_n or 128, "num_warps": 2, **launch}
    _launch(x, *mlp1, a, gather=True, scatter=False, swiglu=(alpha, limit), **common)
    _launch(a, *mlp2, out, gather=False, scatter=True, swiglu=None, **common)
    return out


def mxfp4_linear(
    x: torch.Tensor,
    blocks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor,
    *,
    swiglu: tuple[float, float] | None = None,
    one_row: bool = False,
    block_m: int = 16,
    block_n: int = 32,
) -> torch.Tensor:
    """One weight: x [M, K] -> [M, N] float32 (or [M, N/2] with swiglu=(alpha, limit)),
    through the tile kernel or (one_row) the single-row one."""
    m, k = x.shape
    n = blocks.shape[0]
    _check(k, blocks[None], scales[None], "weight")
    if swiglu and block_n % 2:
        raise ValueError(f"block_n={block_n} must be even with swiglu")
    out = torch.empty(m, n // 2 if swiglu else n, dtype=torch.float32, device=x.device)
    tiles = ExpertTiles(
        torch.zeros(m, dtype=torch.long, device=x.device), 1, 1 if one_row else block_m
    )
    weight = (blocks[None].contiguous(), scales[None].contiguous(), bias[None].contiguous())
    x = x.float() * X_SCALE if one_row else x.contiguous()  # the row kernel's input scale
    _launch(
        x,
        *weight,
        out,
        tiles,
        gather=False,
        scatter=False,
        swiglu=swiglu,
        block_n=block_n,
        one_row=one_row,
    )
    return out

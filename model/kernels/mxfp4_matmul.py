"""x @ W^T + b with W in MXFP4, dequantized in registers tile by tile (the weights stay
4-bit in memory), optionally with gpt-oss's clamped SwiGLU fused into the epilogue.

W [N, K] is stored as blocks [N, K/32, 16] (two E2M1 codes per byte, low nibble = even
k) and scales [N, K/32] (E8M0, 2^(s - 127)). With SwiGLU, output columns come in pairs
(even = gate, odd = linear) and the kernel writes [M, N/2].

Computed in float32 (the interpreter's bf16 dot is wrong; on GPU a bf16 tl.dot_scaled
path is the next step)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
def _mxfp4_matmul_kernel(
    x_ptr, blocks_ptr, scales_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_om,
    alpha, limit,
    SWIGLU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_ok[:, None], other=0.0).to(tl.float32)  # fmt: skip
        packed = tl.load(blocks_ptr + offs_n[:, None] * (K // 2) + offs_k[None, :] // 2,
                         mask=n_ok[:, None], other=0).to(tl.int32)  # fmt: skip
        code = tl.where(offs_k[None, :] % 2 == 0, packed & 15, packed >> 4)
        scale = tl.load(scales_ptr + offs_n[:, None] * (K // 32) + offs_k[None, :] // 32,
                        mask=n_ok[:, None], other=127).to(tl.float32)  # fmt: skip
        w = _fp4_value(code) * tl.exp2(scale - 127.0)  # [BLOCK_N, BLOCK_K]
        acc += tl.dot(x, tl.trans(w))
    acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if SWIGLU:
        gate, linear = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))
        gate = tl.minimum(gate, limit)
        linear = tl.minimum(tl.maximum(linear, -limit), limit)
        out = gate * tl.sigmoid(alpha * gate) * (linear + 1.0)
        offs_h = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_h[None, :], out,
                 mask=m_ok[:, None] & (offs_h < N // 2)[None, :])  # fmt: skip
    else:
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc,
                 mask=m_ok[:, None] & n_ok[None, :])  # fmt: skip


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
    """x [M, K] -> [M, N] float32 (or [M, N/2] with swiglu=(alpha, limit))."""
    m, k = x.shape
    n = blocks.shape[0]
    if blocks.shape != (n, k // 32, 16) or scales.shape != (n, k // 32):
        raise ValueError(f"MXFP4 weight {tuple(blocks.shape)}/{tuple(scales.shape)} for K={k}")
    if k % block_k or block_k % 32 or (swiglu and block_n % 2):
        raise ValueError(f"K={k} must be a multiple of block_k={block_k} (a multiple of 32)")
    x = x.contiguous()
    out = torch.empty(m, n // 2 if swiglu else n, dtype=torch.float32, device=x.device)
    alpha, limit = swiglu if swiglu else (0.0, 0.0)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _mxfp4_matmul_kernel[grid](
        x, blocks.contiguous(), scales.contiguous(), bias.contiguous(), out,
        m, n, k, x.stride(0), out.stride(0), alpha, limit,
        SWIGLU=swiglu is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return out

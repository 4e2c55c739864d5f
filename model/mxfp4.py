"""MXFP4 (OCP microscaling: E2M1 elements, E8M0 scales, blocks of 32) as gpt-oss stores it.

A weight [..., R, K] with K the reduction dimension is stored as
  blocks [..., R, K/32, 16] uint8: two elements per byte, low nibble = even element;
  scales [..., R, K/32]     uint8: the block's scale is 2^(byte - 127).
"""

from __future__ import annotations

import torch

BLOCK = 32
BYTES_PER_BLOCK = BLOCK // 2
SCALE_BIAS = 127

# Nibble -> value. Codes 8..15 are the negatives of 0..7 (code 8 is -0).
FP4_VALUES = (
    0.0,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    4.0,
    6.0,
    -0.0,
    -0.5,
    -1.0,
    -1.5,
    -2.0,
    -3.0,
    -4.0,
    -6.0,
)

# Round-to-nearest-even on the magnitudes [0, .5, 1, 1.5, 2, 3, 4, 6]: a magnitude rounds up
# past midpoint i when it exceeds it, or equals it and the upper neighbour has an even code.
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIE_GOES_UP = (False, True, False, True, False, True, False)


class MXFP4Error(ValueError):
    """Tensors that are not a valid MXFP4 encoding, or a weight that cannot be encoded."""


def _lut(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(FP4_VALUES, dtype=dtype, device=device)


def dequantize(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """blocks [..., G, 16] uint8, scales [..., G] uint8 -> weight [..., G*32] in `dtype`.

    Exact in bfloat16 and float32: an element has at most two significant bits and the scale
    is a power of two. Scale byte 255 is E8M0's NaN and dequantizes to NaN.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise MXFP4Error(f"blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != BYTES_PER_BLOCK or blocks.shape[:-1] != scales.shape:
        raise MXFP4Error(
            f"blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match: "
            f"expected blocks [..., G, {BYTES_PER_BLOCK}] and scales [..., G]"
        )
    lut = _lut(torch.float32, blocks.device)
    lo = lut[(blocks & 0x0F).long()]
    hi = lut[(blocks >> 4).long()]
    values = torch.stack((lo, hi), dim=-1).flatten(-2)  # [..., G, 32], low nibble first
    scale = torch.exp2(
        scales.to(torch.float32) - SCALE_BIAS
    )  # exact powers of two, 2^-127 included
    scale = scale.masked_fill(scales == 0xFF, float("nan"))  # E8M0's NaN encoding
    return (values * scale.unsqueeze(-1)).to(dtype).flatten(-2)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., K] (K a multiple of 32) -> (blocks [..., K/32, 16], scales [..., K/32]).

    Round to nearest, ties to even. Each block's scale is the smallest power of two that
    brings its largest magnitude within 6 (E2M1's maximum), so nothing is clipped unless the
    block's magnitude exceeds 6 * 2^127.
    """
    if weight.ndim == 0 or weight.shape[-1] % BLOCK:
        raise MXFP4Error(
            f"cannot quantize a weight of shape {tuple(weight.shape)}: its last (input) "
            f"dimension must be a multiple of {BLOCK}"
        )
    if not weight.is_floating_point():
        raise MXFP4Error(f"cannot quantize a {weight.dtype} tensor: expected a floating dtype")
    w = weight.to(torch.float32)
    if not torch.isfinite(w).all():
        raise MXFP4Error("cannot quantize a weight holding inf or NaN")
    w = w.reshape(*w.shape[:-1], -1, BLOCK)  # [..., G, 32]
    amax = w.abs().amax(dim=-1)  # [..., G]

    # Exponent e = ceil(log2(amax / 6)), taken exactly from frexp: amax/6 = m * 2^x, m in [.5, 1).
    mantissa, x = torch.frexp(amax / 6.0)
    e = torch.where(mantissa == 0.5, x - 1, x)
    e = torch.where(amax == 0, torch.full_like(e, -SCALE_BIAS), e)
    e = e.clamp(-SCALE_BIAS, SCALE_BIAS)
    scaled = torch.ldexp(w, -e.unsqueeze(-1))  # exact: a power-of-two scaling

    mag = scaled.abs()
    code = torch.zeros_like(mag, dtype=torch.uint8)
    for mid, up in zip(_MIDPOINTS, _TIE_GOES_UP, strict=True):
        code += (mag >= mid if up else mag > mid).to(torch.uint8)
    code = code | ((scaled < 0).to(torch.uint8) << 3)

    pairs = code.reshape(*code.shape[:-1], BYTES_PER_BLOCK, 2)
    blocks = pairs[..., 0] | (pairs[..., 1] << 4)
    scales = (e + SCALE_BIAS).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()

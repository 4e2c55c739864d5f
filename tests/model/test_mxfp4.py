import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gptoss_ray.model import mxfp4

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def one_block(byte_values: list[int], scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = torch.tensor(byte_values, dtype=torch.uint8).reshape(1, 16)
    return blocks, torch.tensor([scale], dtype=torch.uint8)


def test_hand_computed_bytes():
    # 0x21: low nibble 1 (+0.5) is element 0, high nibble 2 (+1.0) element 1.
    # 0xF8: low 8 (-0), high 15 (-6). 0x7A: low 10 (-1.0), high 7 (+6).
    blocks, scales = one_block([0x21, 0xF8, 0x7A] + [0] * 13, 127 + 3)  # scale 2^3
    w = mxfp4.dequantize(blocks, scales, torch.float32)
    assert w[:6].tolist() == [4.0, 8.0, -0.0, -48.0, -8.0, 48.0]
    assert w[6:].abs().sum() == 0
    blocks, scales = one_block([0x21] * 16, 127 - 2)  # scale 1/4
    assert mxfp4.dequantize(blocks, scales, torch.float32)[:2].tolist() == [0.125, 0.25]


def test_every_byte_value_low_nibble_first():
    blocks = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    for scale in (0, 1, 100, 126, 127, 128, 200, 254):
        scales = torch.full((16,), scale, dtype=torch.uint8)
        w = mxfp4.dequantize(blocks, scales, torch.float32).reshape(256, 2)
        factor = 2.0 ** (scale - 127)
        expected = torch.tensor(
            [[E2M1[b & 15] * factor, E2M1[b >> 4] * factor] for b in range(256)]
        )
        assert torch.equal(w, expected), scale


def test_bfloat16_is_exact():
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (8, 4, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 150, (8, 4), dtype=torch.uint8, generator=g)
    w32 = mxfp4.dequantize(blocks, scales, torch.float32)
    w16 = mxfp4.dequantize(blocks, scales, torch.bfloat16)
    assert w16.dtype == torch.bfloat16 and torch.equal(w16.float(), w32)


def test_agrees_with_transformers_dequantizer():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (3, 40, 5, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(0, 255, (3, 40, 5), dtype=torch.uint8, generator=g)
    ours = mxfp4.dequantize(blocks, scales, torch.bfloat16)  # [E, R, K]
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)  # [E, K, R]
    assert torch.equal(ours, theirs.transpose(1, 2))


def test_scale_255_is_nan():
    blocks, scales = one_block([0x21] * 16, 255)
    assert torch.isnan(mxfp4.dequantize(blocks, scales, torch.float32)).all()


def test_quantize_round_trips_representable_values():
    g = torch.Generator().manual_seed(2)
    blocks = torch.randint(0, 256, (6, 10, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(60, 200, (6, 10), dtype=torch.uint8, generator=g)
    w = mxfp4.dequantize(blocks, scales, torch.float32)
    again = mxfp4.dequantize(*mxfp4.quantize(w), torch.float32)
    assert torch.equal(again, w)


def test_quantize_picks_smallest_scale_and_rounds_ties_to_even():
    # amax 6 -> scale 2^0; amax 6.5 -> 2^1 (6.5/2 = 3.25 rounds to 3 -> 6.0).
    w = torch.zeros(2, 32)
    w[0, 0], w[1, 0] = 6.0, 6.5
    _, scales = mxfp4.quantize(w)
    assert scales.flatten().tolist() == [127, 128]
    # Midpoints at scale 1: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4.
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    w = torch.cat([mids, -mids, torch.zeros(16)])[None]
    got = mxfp4.dequantize(*mxfp4.quantize(w), torch.float32)[0, :16]
    expected = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0])
    assert torch.equal(got, torch.cat([expected, -expected]))


def error_bound(weight: torch.Tensor) -> torch.Tensor:
    """Round to nearest: at most half the E2M1 gap at the magnitude, times the block scale."""
    _, scales = mxfp4.quantize(weight)
    w = weight.float().reshape(*weight.shape[:-1], -1, 32)
    step = torch.exp2(scales.float() - 127).unsqueeze(-1)
    mag = w.abs() / step
    half_gap = torch.where(mag <= 2, 0.25, torch.where(mag <= 4, 0.5, 1.0))
    return (half_gap * step).reshape(weight.shape)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 4),
    groups=st.integers(1, 3),
    log_scale=st.floats(-30, 30),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_error_bound(rows, groups, log_scale, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, groups * 32, generator=g) * 2.0**log_scale
    q = mxfp4.dequantize(*mxfp4.quantize(w), torch.float32)
    err = (q - w).abs()
    assert (err <= error_bound(w)).all()
    # Relative to the block: the error is at most the scale 2^e (half of E2M1's widest gap,
    # 4..6), and 2^e < amax/3 because e is the smallest exponent with amax / 2^e <= 6.
    amax = w.reshape(rows, groups, 32).abs().amax(-1, keepdim=True)
    assert (err.reshape(rows, groups, 32) < amax / 3).all()


def test_quantize_shapes_and_zero_blocks():
    blocks, scales = mxfp4.quantize(torch.zeros(2, 3, 64))
    assert blocks.shape == (2, 3, 2, 16) and scales.shape == (2, 3, 2)
    assert blocks.dtype == scales.dtype == torch.uint8
    assert (scales == 0).all() and (blocks == 0).all()


def test_bad_input_names_the_problem():
    with pytest.raises(mxfp4.MXFP4Error, match="multiple of 32"):
        mxfp4.quantize(torch.zeros(4, 48))
    with pytest.raises(mxfp4.MXFP4Error, match="inf or NaN"):
        mxfp4.quantize(torch.full((1, 32), float("inf")))
    with pytest.raises(mxfp4.MXFP4Error, match="floating"):
        mxfp4.quantize(torch.zeros(1, 32, dtype=torch.int32))
    with pytest.raises(mxfp4.MXFP4Error, match="uint8"):
        mxfp4.dequantize(torch.zeros(1, 16), torch.zeros(1, dtype=torch.uint8))
    with pytest.raises(mxfp4.MXFP4Error, match="do not match"):
        mxfp4.dequantize(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8))

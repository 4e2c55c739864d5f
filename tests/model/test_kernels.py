"""Triton kernels (MXFP4 experts, paged sink attention) against the torch reference
path: under TRITON_INTERPRET=1 on CPU, on CUDA where present."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from gptoss_ray.cluster.engine.kv_blocks import KVBlocks
from gptoss_ray.model import mxfp4
from gptoss_ray.model.expert_tiles import ExpertTiles
from gptoss_ray.model.kernels.attention import paged_attention
from gptoss_ray.model.kernels.mxfp4_matmul import (
    _e2m1_bf16_bits,
    _e8m0_value,
    moe_mxfp4,
    mxfp4_linear,
)
from gptoss_ray.model.kv_cache import SequenceBatch
from gptoss_ray.model.model import AttentionBlock, ExpertSlice, RotaryEmbedding, swiglu
from gptoss_ray.model.types import KVLayout
from gptoss_ray.shards.kv_cache import PagedBatchView, PagedKVCache
from tests.tiny import place, tiny_config

# the interpreter evaluates sigmoid(x) as 1 / (1 + exp(-x)) in numpy: exp overflows to
# inf for very negative gates and the result is the right 0
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    blocks, scales = mxfp4.quantize(torch.randn(n, k, generator=g))
    return blocks, scales, torch.randn(n, generator=g)


@pytest.mark.parametrize("one_row", [False, True], ids=["tiles", "one-row"])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 32, 32), (5, 64, 96), (17, 48, 64)])
def test_linear_matches_dequantize_then_matmul(m, n, k, one_row):
    blocks, scales, bias = weight(n, k, seed=m + n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    ref = x @ mxfp4.dequantize(blocks, scales, torch.float32).T + bias
    out = mxfp4_linear(x, blocks, scales, bias, one_row=one_row)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("one_row", [False, True], ids=["tiles", "one-row"])
def test_every_byte_and_scale_value_decodes_exactly(one_row):
    """Each output column is one weight row: every E2M1 pair under scales from the
    subnormal 2^-127 (0) and 2^-126 (1) through the largest finite (252) to NaN (255)."""
    blocks = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16).repeat(32, 1, 1)
    scales = torch.full((32, 16), 127, dtype=torch.uint8)
    scales[:, 3], scales[:, 5], scales[:, 7], scales[:, 9] = 130, 120, 0, 1
    scales[:, 11], scales[:, 13], scales[2, 15] = 252, 60, 255
    x = torch.eye(16 * 32)  # row k picks weight column k: the output is W^T itself
    want = mxfp4.dequantize(blocks, scales, torch.float32).T  # (x @ W^T would flush on CPU)
    assert want[7 * 32 + 2, 0] == 2.0**-128  # a subnormal 0.5 x 2^-127 is checked
    want[:, 2] = float("nan")  # as in x @ W^T, a NaN weight spoils its whole column
    out = mxfp4_linear(x, blocks, scales, torch.zeros(32), one_row=one_row)
    torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True)


@triton.jit
def _decode_bf16_kernel(packed_ptr, out_ptr):
    i = tl.arange(0, 16)
    w = _e2m1_bf16_bits(tl.load(packed_ptr + 16 * i[:, None] + i[None, :]))  # [16, 32]
    tl.store(out_ptr + 32 * i[:, None] + tl.arange(0, 32)[None, :], w)


def test_the_gpus_bf16_weight_bits_are_exact():
    """The GPU's tile kernel feeds its dot from _e2m1_bf16_bits (then one bf16 multiply):
    the interpreter cannot run that dot, nor multiply a bf16 subnormal (it flushes), but
    it can run the decode. Every byte, as the bf16 bits of its two values x 2^-126 (the
    E8M0 scale 1), the code 0.5 as the subnormal 2^-127."""
    packed = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    out = torch.empty(16, 32, dtype=torch.int16)
    _decode_bf16_kernel[(1,)](packed, out)
    want = mxfp4.dequantize(packed[:, None], torch.ones(16, 1, dtype=torch.uint8), torch.float32)
    assert want[0, 2] == 2.0**-127
    assert torch.equal(out, (want.view(torch.int32) >> 16).to(torch.int16))  # bf16 = top half


@triton.jit
def _decode_scale_kernel(scale_ptr, out_ptr):
    i = tl.arange(0, 256)
    tl.store(out_ptr + i, _e8m0_value(tl.load(scale_ptr + i).to(tl.int32)))


def test_every_scale_byte_decodes_exactly():
    """Both kernels decode a scale in integer instructions: every byte, bit for bit, from
    the subnormal 2^-127 (0) to the NaN (255)."""
    scales = torch.arange(256, dtype=torch.uint8)
    out = torch.empty(256)
    _decode_scale_kernel[(1,)](scales, out)
    ones = torch.full((256, 1, 16), 0x22, dtype=torch.uint8)  # both codes of 0x22 are 1.0
    want = mxfp4.dequantize(ones, scales[:, None], torch.float32)  # [256, 32]
    assert want[0, 0] == 2.0**-127 and want[255].isnan().all()
    torch.testing.assert_close(out, want[:, 0], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("one_row", [False, True], ids=["tiles", "one-row"])
def test_fused_swiglu_matches_the_reference(one_row):
    blocks, scales, bias = weight(64, 64, seed=3)
    x = 3 * torch.randn(9, 64, generator=torch.Generator().manual_seed(2))  # reach the clamp
    ref = swiglu(x @ mxfp4.dequantize(blocks, scales, torch.float32).T + bias, 1.702, 7.0)
    out = mxfp4_linear(x, blocks, scales, bias, swiglu=(1.702, 7.0), one_row=one_row)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


def random_experts(config, lo: int, hi: int, seed: int) -> ExpertSlice:
    experts = ExpertSlice(config, lo, hi)
    g = torch.Generator().manual_seed(seed)
    for name, buf in experts.named_buffers():
        if buf.dtype == torch.uint8:
            hi = 256 if "blocks" in name else 130
            buf.copy_(torch.randint(0 if "blocks" in name else 115, hi, buf.shape, generator=g))
        else:
            buf.copy_(torch.randn(buf.shape, generator=g))
    return experts


def random_routing(config, tokens: int, seed: int):
    """-> h [tokens, H], distinct expert ids [tokens, 4] and their routing weights."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, config.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(config.num_experts, generator=g)[:4] for _ in range(tokens)])
    return h, ids, torch.softmax(torch.randn(tokens, 4, generator=g), -1)


def test_a_whole_expert_matches_the_torch_expert():
    config = tiny_config()
    experts = random_experts(config, 0, config.num_experts, seed=4)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, config.hidden_size, generator=g)
    ref = experts.run_expert(2, x)
    a = mxfp4_linear(
        x,
        experts.mlp1_blocks[2],
        experts.mlp1_scales[2],
        experts.mlp1_bias[2].float(),
        swiglu=(config.swiglu_alpha, config.swiglu_limit),
    )
    y = mxfp4_linear(
        a, experts.mlp2_blocks[2], experts.mlp2_scales[2], experts.mlp2_bias[2].float()
    )
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-3)


def test_expert_tiles_cover_every_row_once():
    experts = torch.tensor([3, 0, 3, 3, 1, 3, 0, 3, 3])  # expert 2 has no rows
    tiles = ExpertTiles(experts, 4, block_m=2)
    assert tiles.num_tiles == 5 + 4
    sorted_experts = experts[tiles.order.long()]
    assert sorted_experts.tolist() == sorted(experts.tolist())
    assert tiles.expert_end.tolist() == [2, 3, 3, 9]
    covered = []
    for e, row in zip(tiles.tile_expert.tolist(), tiles.tile_row.tolist(), strict=True):
        if e >= 0:
            end = tiles.expert_end[e].item()
            covered += [(e, r) for r in range(row, min(row + 2, end))]
    assert covered == [(sorted_experts[r].item(), r) for r in range(9)]
    assert ExpertTiles(experts, 4, block_m=1).num_tiles == 9  # a tile per row, no spares


@pytest.mark.parametrize(
    ("lo", "hi", "rows", "one_row"),
    [
        (0, 8, 0, None),
        (0, 8, 1, None),
        (0, 8, 4, None),
        (0, 8, 40, None),
        (3, 7, 23, None),
        (3, 7, 23, True),
        (5, 7, 70, None),  # 35 rows an expert on average: tiles of 32
    ],
)
def test_grouped_experts_match_the_torch_slice(lo, hi, rows, one_row):
    """Uneven groups: some experts get none, some more than a tile; rows in any order."""
    config = tiny_config()
    experts = random_experts(config, lo, hi, seed=rows)
    g = torch.Generator().manual_seed(rows + 1)
    x = 2 * torch.randn(rows, config.hidden_size, generator=g)
    skew = torch.tensor([0.5] + [0.5 / (hi - lo - 1)] * (hi - lo - 1))
    ids = lo + torch.multinomial(skew, max(rows, 1), replacement=True, generator=g)[:rows]
    ref = experts.run_grouped(x, ids)
    out = moe_mxfp4(
        x,
        ids - lo,
        (experts.mlp1_blocks, experts.mlp1_scales, experts.mlp1_bias),
        (experts.mlp2_blocks, experts.mlp2_scales, experts.mlp2_bias),
        alpha=config.swiglu_alpha,
        limit=config.swiglu_limit,
        one_row=one_row,
    )
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)
    if one_row:
        return
    experts.use_kernels = True
    torch.testing.assert_close(experts.run_grouped(x, ids), out, rtol=0, atol=0)


def attention_steps(
    config,
    chunks,
    *,
    seed: int,
    use_kernels: bool,
    dtype=torch.float32,
    device="cpu",
    block_size: int = 4,
) -> list[torch.Tensor]:
    """Runs every layer's attention over a paged cache for a series of steps, each a list
    of (sequence, new tokens); returns each step's outputs of every layer."""
    torch.manual_seed(seed)
    blocks = [AttentionBlock(config, i, dtype) for i in range(config.num_hidden_layers)]
    for b in blocks:
        for p in b.parameters():
            p.data.normal_(0, 0.5)
        b.to(device).use_kernels = use_kernels
    rope = RotaryEmbedding(config)
    layout = KVLayout(block_size, 64, 64)
    cache = PagedKVCache(config, layout, dtype=dtype, device=device)
    kv_blocks = KVBlocks(layout, config.attention_window)
    g = torch.Generator().manual_seed(seed + 1)
    outs = []
    for step in chunks:
        seqs = [place(cache, kv_blocks, name, n) for name, n in step]
        lengths = [n for _, n in step]
        batch = SequenceBatch(seqs, lengths, PagedBatchView(seqs, lengths))
        cos, sin = rope.cos_sin(batch.positions(device))
        x = torch.randn(batch.num_tokens, config.hidden_size, generator=g).to(device, dtype)
        outs.append(torch.stack([b(x, batch, cos, sin) for b in blocks]))
        batch.commit()
    return outs


@pytest.mark.parametrize(
    "shape",
    [
        dict(),  # GQA, group 2
        dict(num_attention_heads=8, num_key_value_heads=1, head_dim=8),  # MQA, d < 16
        dict(num_attention_heads=3, num_key_value_heads=3, sliding_window=5),  # MHA
    ],
)
def test_paged_attention_matches_the_torch_path(shape):
    """Prefill chunks, chunked prefill with context, decodes mixed in one batch, windows
    that start mid-block, across several 4-token blocks."""
    config = tiny_config(num_hidden_layers=2, **shape)
    steps = [
        [("a", 7), ("b", 1)],
        [("a", 1), ("b", 13), ("c", 3)],
        [("a", 1), ("b", 1), ("c", 9)],
        [("a", 1), ("b", 1), ("c", 1)],
    ]
    ref = attention_steps(config, steps, seed=7, use_kernels=False)
    out = attention_steps(config, steps, seed=7, use_kernels=True)
    for r, o in zip(ref, out, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)


def test_paged_attention_sinks_take_their_share():
    """With a huge sink the attention output vanishes; with a very negative one it is the
    plain softmax average."""
    config = tiny_config(num_hidden_layers=1)
    layout = KVLayout(4, 8, 8)
    cache = PagedKVCache(config, layout, dtype=torch.float32, device="cpu")
    seq = place(cache, KVBlocks(layout, config.attention_window), "s", 6)
    view = PagedBatchView([seq], [6])
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(2, 6, 2, 16, generator=g)
    q = torch.randn(6, 4, 16, generator=g)
    view.write(0, k, v)
    tables = view.tables(False)
    big = paged_attention(q, *view.pools(0), torch.full((4,), 1e4), tables, window=None)
    assert big.abs().max() < 1e-6
    plain = paged_attention(q, *view.pools(0), torch.full((4,), -1e4), tables, window=None)
    scores = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(2, 1)) / 4
    scores = scores.masked_fill(torch.ones(6, 6).triu(1).bool(), float("-inf"))
    want = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.repeat_interleave(2, 1))
    torch.testing.assert_close(plain, want, rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_named():
    blocks, scales, bias = weight(32, 64, seed=5)
    with pytest.raises(ValueError, match="for K=96"):
        mxfp4_linear(torch.zeros(2, 96), blocks, scales, bias)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("one_row", "block_m", "block_n"),
    [(False, 16, 128), (False, 64, 64), (True, 1, 64)],
    ids=["tiles-mma", "tiles-wgmma", "one-row"],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_on_cuda(dtype, one_row, block_m, block_n):
    """bf16 rounds nothing here (x is bf16, products exact): both dtypes agree with the
    float32 reference to float32 rounding; float32 checks the dot is not TF32. Tiles of 64
    rows take Hopper's wgmma path, of 16 the mma one; both get the subnormal 2^-127 that
    stands for 0.5 x 2^-126 straight from the decode."""
    blocks, scales, bias = weight(256, 512, seed=6)
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(7)).to(dtype)
    ref = x.float() @ mxfp4.dequantize(blocks, scales, torch.float32).T + bias
    out = mxfp4_linear(
        x.cuda(),
        blocks.cuda(),
        scales.cuda(),
        bias.cuda(),
        one_row=one_row,
        block_m=block_m,
        block_n=block_n,
    )
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [4, 256])  # the single-row kernel, the tile kernel
def test_on_cuda_grouped_experts_bf16_in_gpt_oss_shapes(rows):
    config = tiny_config(hidden_size=2880, intermediate_size=2880, num_experts=32)
    experts = random_experts(config, 0, 32, seed=8).cuda()
    g = torch.Generator().manual_seed(9)
    x = torch.randn(rows, 2880, generator=g).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 32, (rows,), generator=g).cuda()
    ref = experts.run_grouped(x.float(), ids)  # torch path in float32
    experts.use_kernels = True
    out = experts.run_grouped(x, ids)
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 1e-2, rel


@pytest.mark.gpu
def test_on_cuda_paged_attention_bf16_in_gpt_oss_shapes():
    config = tiny_config(
        num_hidden_layers=2,
        hidden_size=256,
        head_dim=64,
        num_attention_heads=64,
        num_key_value_heads=8,
        sliding_window=128,
    )
    steps = [[("a", 300), ("b", 1)], [("a", 1), ("b", 200), ("c", 5)], [("a", 1), ("b", 1)]]
    kw = dict(seed=10, dtype=torch.bfloat16, device="cuda", block_size=16)
    ref = attention_steps(config, steps, use_kernels=False, **kw)
    out = attention_steps(config, steps, use_kernels=True, **kw)
    for r, o in zip(ref, out, strict=True):
        rel = (o.float() - r.float()).norm() / r.float().norm()
        assert rel < 1e-2, rel

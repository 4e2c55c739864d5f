"""Triton MXFP4 expert kernels against the torch reference path (under
TRITON_INTERPRET=1 on CPU; on CUDA where present)."""

from __future__ import annotations

import pytest
import torch

from model import mxfp4
from model.kernels.mxfp4_matmul import mxfp4_linear
from model.model import ExpertSlice, swiglu
from tests.tiny import tiny_config


def weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    blocks, scales = mxfp4.quantize(torch.randn(n, k, generator=g))
    return blocks, scales, torch.randn(n, generator=g)


@pytest.mark.parametrize(("m", "n", "k"), [(1, 32, 32), (5, 64, 96), (17, 48, 64)])
def test_linear_matches_dequantize_then_matmul(m, n, k):
    blocks, scales, bias = weight(n, k, seed=m + n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    ref = x @ mxfp4.dequantize(blocks, scales, torch.float32).T + bias
    out = mxfp4_linear(x, blocks, scales, bias)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


def test_every_byte_value_decodes_exactly():
    blocks = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16).repeat(32, 1, 1)
    scales = torch.full((32, 16), 127, dtype=torch.uint8)
    scales[:, 3], scales[:, 5] = 130, 120
    x = torch.eye(16 * 32)[:16]  # picks columns: the output is the weights themselves
    ref = x @ mxfp4.dequantize(blocks, scales, torch.float32).T
    assert torch.equal(mxfp4_linear(x, blocks, scales, torch.zeros(32)), ref)


def test_fused_swiglu_matches_the_reference():
    blocks, scales, bias = weight(64, 64, seed=3)
    x = 3 * torch.randn(9, 64, generator=torch.Generator().manual_seed(2))  # reach the clamp
    ref = swiglu(x @ mxfp4.dequantize(blocks, scales, torch.float32).T + bias, 1.702, 7.0)
    out = mxfp4_linear(x, blocks, scales, bias, swiglu=(1.702, 7.0))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


def test_a_whole_expert_matches_the_torch_expert():
    config = tiny_config()
    experts = ExpertSlice(config, 0, config.num_experts)
    g = torch.Generator().manual_seed(4)
    for name, buf in experts.named_buffers():
        if buf.dtype == torch.uint8:
            hi = 256 if "blocks" in name else 130
            buf.copy_(torch.randint(0 if "blocks" in name else 115, hi, buf.shape, generator=g))
        else:
            buf.copy_(torch.randn(buf.shape, generator=g))
    x = torch.randn(6, config.hidden_size, generator=g)
    ref = experts.run_expert(2, x)
    a = mxfp4_linear(x, experts.mlp1_blocks[2], experts.mlp1_scales[2],
                     experts.mlp1_bias[2].float(), swiglu=(config.swiglu_alpha, config.swiglu_limit))  # fmt: skip
    y = mxfp4_linear(
        a, experts.mlp2_blocks[2], experts.mlp2_scales[2], experts.mlp2_bias[2].float()
    )
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-3)


def test_bad_shapes_are_named():
    blocks, scales, bias = weight(32, 64, seed=5)
    with pytest.raises(ValueError, match="for K=96"):
        mxfp4_linear(torch.zeros(2, 96), blocks, scales, bias)


@pytest.mark.gpu
def test_on_cuda_bf16_inputs():
    blocks, scales, bias = weight(256, 512, seed=6)
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    ref = x.float() @ mxfp4.dequantize(blocks, scales, torch.float32).T + bias
    out = mxfp4_linear(x.cuda(), blocks.cuda(), scales.cuda(), bias.cuda(), block_m=64,
                       block_n=64, block_k=64)  # fmt: skip
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-3, atol=1e-2)

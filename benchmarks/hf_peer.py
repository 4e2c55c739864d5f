"""The side-by-side peer: Hugging Face transformers' GptOssForCausalLM holding the same
weights as one of our models (experts dequantized from our MXFP4 to the peer's dtype,
which is how transformers runs gpt-oss where its MXFP4 kernels are not installed)."""

from __future__ import annotations

import torch

from gptoss_ray.model import mxfp4
from gptoss_ray.model.model import Transformer


@torch.no_grad()
def to_transformers(model: Transformer, dtype: torch.dtype = torch.bfloat16):
    """Our model (all experts local) -> GptOssForCausalLM on the same device, eager
    attention. The peer's own memory: dense weights plus every expert in `dtype`."""
    from transformers import GptOssConfig, GptOssForCausalLM

    c = model.config
    if model.expert_range != (0, c.num_experts):
        raise ValueError("the peer needs every expert: build the model with all of them")
    hf_config = GptOssConfig(**c.to_hf_dict())
    hf_config._attn_implementation = "eager"
    device = model.device
    with torch.device("meta"):
        peer = GptOssForCausalLM(hf_config)
    peer.to_empty(device=device)
    peer.to(dtype)
    q, kv = c.q_dim, c.kv_dim
    state = {
        "model.embed_tokens.weight": model.embedding.weight,
        "model.norm.weight": model.norm.scale,
        "lm_head.weight": model.unembedding.weight,
    }
    for i, block in enumerate(model.block):
        p, a, m = f"model.layers.{i}", block.attn, block.mlp
        w, b = a.qkv.weight, a.qkv.bias
        state |= {
            f"{p}.input_layernorm.weight": a.norm.scale,
            f"{p}.self_attn.q_proj.weight": w[:q],
            f"{p}.self_attn.q_proj.bias": b[:q],
            f"{p}.self_attn.k_proj.weight": w[q : q + kv],
            f"{p}.self_attn.k_proj.bias": b[q : q + kv],
            f"{p}.self_attn.v_proj.weight": w[q + kv :],
            f"{p}.self_attn.v_proj.bias": b[q + kv :],
            f"{p}.self_attn.o_proj.weight": a.out.weight,
            f"{p}.self_attn.o_proj.bias": a.out.bias,
            f"{p}.self_attn.sinks": a.sinks,
            f"{p}.post_attention_layernorm.weight": m.norm.scale,
            f"{p}.mlp.router.weight": m.router.gate.weight,
            f"{p}.mlp.router.bias": m.router.gate.bias,
            f"{p}.mlp.experts.gate_up_proj_bias": m.experts.mlp1_bias,
            f"{p}.mlp.experts.down_proj_bias": m.experts.mlp2_bias,
        }
        experts = peer.model.layers[i].mlp.experts
        for e in range(c.num_experts):  # one expert at a time: no full-size float copy
            ex = m.experts
            w1 = mxfp4.dequantize(ex.mlp1_blocks[e], ex.mlp1_scales[e], dtype)  # [2I, H]
            experts.gate_up_proj[e].copy_(w1.T)  # the peer computes x @ [H, 2I]
            w2 = mxfp4.dequantize(ex.mlp2_blocks[e], ex.mlp2_scales[e], dtype)  # [H, I]
            experts.down_proj[e].copy_(w2.T)
    params = dict(peer.named_parameters())
    for name, t in state.items():
        if params[name].shape != t.shape:
            raise ValueError(
                f"{name}: ours {tuple(t.shape)}, the peer's {tuple(params[name].shape)}"
            )
        params[name].copy_(t)
    # the rotary inverse frequencies (a float32 buffer) were left empty by to_empty
    peer.model.rotary_emb = type(peer.model.rotary_emb)(hf_config).to(device)
    return peer.eval()

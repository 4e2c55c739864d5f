"""gpt-oss's two checkpoint layouts (tensor names and shapes) and writing checkpoints in
them, among them the built-in small random model. Reading is `checkpoint.Checkpoint`; this
module needs nothing of the model's folder (`model_folder` writes the built-in model
with it, without a cycle).

Layouts, detected from the tensor names:
  hf        model.layers.N.self_attn.q_proj.weight, ...mlp.experts.gate_up_proj_blocks, ...
            one model.safetensors, or shards listed by model.safetensors.index.json
  original  block.N.attn.qkv.weight, ...mlp.mlp1_weight.blocks, ... (the `original/` folder)
Internal names are the model's parameter names (model/model.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from torch import nn

from gptoss_ray.model import mxfp4
from gptoss_ray.model.config import CheckpointError, ModelConfig
from gptoss_ray.model.model import Transformer

Layout = Literal["hf", "original"]


INDEX_FILE = "model.safetensors.index.json"


SINGLE_FILE = "model.safetensors"


_FLOAT_DTYPES = {"BF16", "F16", "F32", "F64"}


@dataclass(frozen=True)
class TensorSpec:
    name: str  # internal name
    shape: tuple[int, ...]  # full shape (all experts for expert tensors)
    packed: bool  # uint8 MXFP4 blocks/scales; otherwise a float tensor
    expert: bool  # dim 0 is the expert dimension


def tensor_specs(config: ModelConfig) -> list[TensorSpec]:
    c = config
    h, e, i = c.hidden_size, c.num_experts, c.intermediate_size
    g1, g2, b = h // mxfp4.BLOCK, i // mxfp4.BLOCK, mxfp4.BYTES_PER_BLOCK
    specs = [TensorSpec("embedding.weight", (c.vocab_size, h), False, False)]
    for n in range(c.num_hidden_layers):
        a, m = f"block.{n}.attn", f"block.{n}.mlp"
        specs += [
            TensorSpec(f"{a}.norm.scale", (h,), False, False),
            TensorSpec(f"{a}.qkv.weight", (c.qkv_dim, h), False, False),
            TensorSpec(f"{a}.qkv.bias", (c.qkv_dim,), False, False),
            TensorSpec(f"{a}.sinks", (c.num_attention_heads,), False, False),
            TensorSpec(f"{a}.out.weight", (h, c.q_dim), False, False),
            TensorSpec(f"{a}.out.bias", (h,), False, False),
            TensorSpec(f"{m}.norm.scale", (h,), False, False),
            TensorSpec(f"{m}.router.gate.weight", (e, h), False, False),
            TensorSpec(f"{m}.router.gate.bias", (e,), False, False),
            TensorSpec(f"{m}.experts.mlp1_blocks", (e, 2 * i, g1, b), True, True),
            TensorSpec(f"{m}.experts.mlp1_scales", (e, 2 * i, g1), True, True),
            TensorSpec(f"{m}.experts.mlp1_bias", (e, 2 * i), False, True),
            TensorSpec(f"{m}.experts.mlp2_blocks", (e, h, g2, b), True, True),
            TensorSpec(f"{m}.experts.mlp2_scales", (e, h, g2), True, True),
            TensorSpec(f"{m}.experts.mlp2_bias", (e, h), False, True),
        ]
    specs += [
        TensorSpec("norm.scale", (h,), False, False),
        TensorSpec("unembedding.weight", (c.vocab_size, h), False, False),
    ]
    return specs


_ORIGINAL_EXPERT_NAMES = {
    "mlp1_blocks": "mlp1_weight.blocks",
    "mlp1_scales": "mlp1_weight.scales",
    "mlp1_bias": "mlp1_bias",
    "mlp2_blocks": "mlp2_weight.blocks",
    "mlp2_scales": "mlp2_weight.scales",
    "mlp2_bias": "mlp2_bias",
}


_HF_EXPERT_NAMES = {
    "mlp1_blocks": "gate_up_proj_blocks",
    "mlp1_scales": "gate_up_proj_scales",
    "mlp1_bias": "gate_up_proj_bias",
    "mlp2_blocks": "down_proj_blocks",
    "mlp2_scales": "down_proj_scales",
    "mlp2_bias": "down_proj_bias",
}


_HF_TOP = {
    "embedding.weight": "model.embed_tokens.weight",
    "norm.scale": "model.norm.weight",
    "unembedding.weight": "lm_head.weight",
}


_HF_LAYER = {
    "attn.norm.scale": "input_layernorm.weight",
    "attn.sinks": "self_attn.sinks",
    "attn.out.weight": "self_attn.o_proj.weight",
    "attn.out.bias": "self_attn.o_proj.bias",
    "mlp.norm.scale": "post_attention_layernorm.weight",
    "mlp.router.gate.weight": "mlp.router.weight",
    "mlp.router.gate.bias": "mlp.router.bias",
}


def stored_parts(layout: Layout, spec: TensorSpec, config: ModelConfig) -> list[tuple[str, int]]:
    """The stored tensors (name, rows along dim 0) that, concatenated along dim 0, make the
    internal tensor. Only the HF layout splits one (qkv into q_proj, k_proj, v_proj)."""
    name, rows = spec.name, spec.shape[0]
    if layout == "original":
        if ".experts." in name:
            prefix, leaf = name.rsplit(".experts.", 1)
            return [(f"{prefix}.{_ORIGINAL_EXPERT_NAMES[leaf]}", rows)]
        return [(name.replace(".router.gate.", ".gate."), rows)]
    if name in _HF_TOP:
        return [(_HF_TOP[name], rows)]
    _, n, rest = name.split(".", 2)
    layer = f"model.layers.{n}."
    if rest.startswith("mlp.experts."):
        return [(f"{layer}mlp.experts.{_HF_EXPERT_NAMES[rest.rsplit('.', 1)[1]]}", rows)]
    if rest.startswith("attn.qkv."):
        leaf = rest.rsplit(".", 1)[1]
        return [
            (f"{layer}self_attn.q_proj.{leaf}", config.q_dim),
            (f"{layer}self_attn.k_proj.{leaf}", config.kv_dim),
            (f"{layer}self_attn.v_proj.{leaf}", config.kv_dim),
        ]
    return [(layer + _HF_LAYER[rest], rows)]


def save_checkpoint(
    tensors: dict[str, torch.Tensor],
    config: ModelConfig,
    out_dir: str | Path,
    *,
    layout: Layout = "hf",
    max_shard_bytes: int | None = None,
) -> Path:
    """Writes internal tensors (float ones stored as bfloat16) in the given layout. With
    max_shard_bytes (hf layout), several files and an index, as on the hub."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stored: dict[str, torch.Tensor] = {}
    for spec in tensor_specs(config):
        if spec.name not in tensors:
            raise CheckpointError(f"cannot write the checkpoint: tensor {spec.name} is missing")
        t = tensors[spec.name]
        if tuple(t.shape) != spec.shape:
            raise CheckpointError(
                f"cannot write {spec.name}: shape {list(t.shape)}, expected {list(spec.shape)}"
            )
        t = t.to("cpu", torch.uint8 if spec.packed else torch.bfloat16).contiguous()
        start = 0
        for name, rows in stored_parts(layout, spec, config):
            stored[name] = t[start : start + rows].clone() if rows != t.shape[0] else t
            start += rows
    meta = {"format": "pt"}
    cfg = config.to_hf_dict() if layout == "hf" else config.to_original_dict()
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if layout == "original" or max_shard_bytes is None:
        save_file(stored, str(out / SINGLE_FILE), metadata=meta)
        return out
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in stored.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in stored.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return out


def model_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """A loaded model's tensors by internal name (the input of save_checkpoint)."""
    return {k: v.detach() for k, v in [*model.named_parameters(), *model.named_buffers()]}


def random_tensors(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random model in the exact shapes: float tensors in bfloat16, experts quantized to
    MXFP4. Scales keep activations and logits of order one, so greedy decoding is
    well-defined (no near-ties) and sampling is not uniform."""
    g = torch.Generator().manual_seed(seed)

    def normal(shape: tuple[int, ...], std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=g) * std + mean

    out: dict[str, torch.Tensor] = {}
    for spec in tensor_specs(config):
        leaf = spec.name.rsplit(".", 1)[1]
        if spec.name.endswith("_scales"):
            continue  # written with its blocks
        if spec.name.endswith("_blocks"):
            rows, cols = spec.shape[1], spec.shape[2] * mxfp4.BLOCK
            weight = normal((spec.shape[0], rows, cols), cols**-0.5)
            blocks, scales = mxfp4.quantize(weight)
            out[spec.name] = blocks
            out[spec.name.replace("_blocks", "_scales")] = scales
            continue
        if leaf == "scale":
            t = normal(spec.shape, 0.1, 1.0)
        elif leaf == "sinks":
            t = normal(spec.shape, 1.0)
        elif leaf == "bias" or leaf.endswith("_bias"):
            t = normal(spec.shape, 0.1)
        elif spec.name == "embedding.weight":
            t = normal(spec.shape, 1.0)
        elif spec.name == "unembedding.weight":
            t = normal(spec.shape, 3.0 * spec.shape[1] ** -0.5)
        else:  # [out, in] projections
            t = normal(spec.shape, spec.shape[1] ** -0.5)
        out[spec.name] = t.to(torch.bfloat16)
    return out


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fills a model in place, on its own device, with random weights of the same scales
    as `random_tensors` (random E2M1 codes under scales that give each expert weight the
    std of cols^-0.5): full-size models for benchmarks, without a checkpoint or a copy."""
    device = next(iter(model.buffers())).device
    g = torch.Generator(device=device).manual_seed(seed)
    code_rms = 2.93  # root mean square of the 16 E2M1 values
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        leaf = name.rsplit(".", 1)[-1]
        if leaf.endswith("_blocks"):
            t.copy_(torch.randint(0, 256, t.shape, generator=g, device=t.device))
        elif leaf.endswith("_scales"):
            cols = t.shape[-1] * mxfp4.BLOCK
            exponent = round(math.log2(cols**-0.5 / code_rms)) + 127
            t.copy_(
                torch.randint(exponent - 1, exponent + 1, t.shape, generator=g, device=t.device)
            )
        elif leaf == "scale":
            t.normal_(1.0, 0.1, generator=g)
        elif leaf == "sinks":
            t.normal_(0.0, 1.0, generator=g)
        elif leaf == "bias" or leaf.endswith("_bias"):
            t.normal_(0.0, 0.1, generator=g)
        elif name.endswith("embedding.weight") and not name.endswith("unembedding.weight"):
            t.normal_(0.0, 1.0, generator=g)
        elif name.endswith("unembedding.weight"):
            t.normal_(0.0, 3.0 * t.shape[1] ** -0.5, generator=g)
        else:  # [out, in] projections
            t.normal_(0.0, t.shape[-1] ** -0.5, generator=g)
    return model


def write_random_checkpoint(
    config: ModelConfig,
    out_dir: str | Path,
    *,
    seed: int = 0,
    layout: Layout = "hf",
    max_shard_bytes: int | None = None,
) -> Path:
    size = sum(_nbytes(s, config.num_experts) for s in tensor_specs(config))
    if size > 4 << 30:
        raise CheckpointError(
            f"a random checkpoint of this config would take {size / 2**30:.1f} GiB: random "
            "weights are for small configs; point --model at real gpt-oss weights instead"
        )
    return save_checkpoint(
        random_tensors(config, seed),
        config,
        out_dir,
        layout=layout,
        max_shard_bytes=max_shard_bytes,
    )


def _nbytes(spec: TensorSpec, num_experts: int) -> int:
    count = 1
    for d in spec.shape[1:] if spec.expert else spec.shape:
        count *= d
    if spec.expert:
        count *= num_experts
    return count * (1 if spec.packed else 2)

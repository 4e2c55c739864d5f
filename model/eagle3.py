"""The EAGLE-3 draft model for gpt-oss, in the layout the published drafts use
(`LlamaForCausalLMEagle3`: nvidia/gpt-oss-120b-Eagle3, SpecForge's, LumenRL's): one
Llama decoder layer that reads the target's residual stream at three of its layers.

At position p the draft takes the target's hidden states at p (the three taps
concatenated, projected by `fc`) and the embedding of the token at p + 1, and predicts
the token at p + 2. Its next step takes its own pre-norm output in place of the target's
hidden states. Its vocabulary may be a subset of the target's: `d2t` maps a draft id d
to the target id d + d2t[d].

Checkpoint names: `fc.weight`, `midlayer.{input_layernorm,hidden_norm,
post_attention_layernorm}.weight`, `midlayer.self_attn.{q,k,v,o}_proj.weight`,
`midlayer.mlp.{gate,up,down}_proj.weight`, `norm.weight`, `lm_head.weight`, and where
present `embed_tokens.weight` (else the target's embedding) and `d2t` (else the identity).
`t2d` (training only) is ignored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from gptoss_ray.model.config import ModelConfig
from gptoss_ray.model.eagle3_config import Eagle3Config
from gptoss_ray.model.model import RMSNorm, apply_rotary, attention_with_sinks
from gptoss_ray.model.model_folder import CheckpointError, safetensors_files

__all__ = ["Eagle3Config", "Eagle3Draft", "causal_attention", "load_draft", "write_random_draft"]


class LlamaRotary:
    """Llama's RoPE, with the llama3 frequency scaling where the config asks for it."""

    def __init__(self, config: Eagle3Config) -> None:
        d = config.dim
        inv = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
        scaling = config.rope_scaling or {}
        if scaling.get("rope_type", scaling.get("type")) == "llama3":
            factor = scaling["factor"]
            low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
            old = scaling["original_max_position_embeddings"]
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > old / low, inv / factor, inv)
            smooth = (old / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= old / high) & (wavelen <= old / low)
            inv = torch.where(medium, smoothed, scaled)
        self.inv_freq = inv

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, d/2] in float32."""
        angles = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]
        return angles.cos(), angles.sin()


# attend(q [T, Hq, d], k, v [T, Hkv, d]) -> [T, Hq, d]: stores k, v where the caller
# keeps the draft's keys and attends over them (shards/drafting.py)
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class DraftAttention(nn.Module):
    def __init__(self, config: Eagle3Config, dtype: torch.dtype) -> None:
        super().__init__()
        h, d = config.hidden_size, config.dim
        self.heads, self.kv_heads, self.dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            d,
        )
        # the queries read the embedding and the hidden state side by side: 2H wide
        self.q_proj = nn.Linear(2 * h, self.heads * d, bias=False, dtype=dtype)
        self.k_proj = nn.Linear(2 * h, self.kv_heads * d, bias=False, dtype=dtype)
        self.v_proj = nn.Linear(2 * h, self.kv_heads * d, bias=False, dtype=dtype)
        self.o_proj = nn.Linear(self.heads * d, h, bias=False, dtype=dtype)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend
    ) -> torch.Tensor:
        t = x.shape[0]
        q = apply_rotary(self.q_proj(x).view(t, self.heads, self.dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(t, self.kv_heads, self.dim), cos, sin)
        v = self.v_proj(x).view(t, self.kv_heads, self.dim)
        return self.o_proj(attend(q, k, v).reshape(t, self.heads * self.dim))


class DraftMLP(nn.Module):
    def __init__(self, config: Eagle3Config, dtype: torch.dtype) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(h, i, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(i, h, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    def __init__(self, config: Eagle3Config, dtype: torch.dtype) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)
        self.hidden_norm = RMSNorm(h, eps)
        self.self_attn = DraftAttention(config, dtype)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = DraftMLP(config, dtype)

    def forward(
        self,
        embeds: torch.Tensor,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attend: Attend,
    ) -> torch.Tensor:
        """embeds, hidden [T, H] -> the pre-norm output [T, H] (the residual stream)."""
        x = torch.cat((self.input_layernorm(embeds), self.hidden_norm(hidden)), dim=-1)
        residual = hidden + self.self_attn(x, cos, sin, attend)
        return residual + self.mlp(self.post_attention_layernorm(residual))


class Eagle3Draft(nn.Module):
    def __init__(
        self, config: Eagle3Config, *, dtype: torch.dtype = torch.bfloat16, own_embedding: bool
    ) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.fc = nn.Linear(3 * config.target_hidden, h, bias=False, dtype=dtype)
        self.midlayer = DraftLayer(config, dtype)
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.lm_head = nn.Linear(h, config.draft_vocab, bias=False, dtype=dtype)
        self.d2t = nn.Buffer(torch.zeros(config.draft_vocab, dtype=torch.long))
        # the target's embedding unless the checkpoint has its own (`share_embedding`)
        self.embed_tokens: nn.Embedding | None = (
            nn.Embedding(
                config.vocab_size, h, _weight=torch.empty(config.vocab_size, h, dtype=dtype)
            )
            if own_embedding
            else None
        )
        self.rope = LlamaRotary(config)
        self.requires_grad_(False)

    def share_embedding(self, embedding: nn.Embedding) -> None:
        if embedding.weight.shape != (self.config.vocab_size, self.config.hidden_size):
            raise CheckpointError(
                f"the draft has no embed_tokens.weight and the target's embedding is "
                f"{list(embedding.weight.shape)}, not [vocab_size, hidden_size] = "
                f"{[self.config.vocab_size, self.config.hidden_size]}"
            )
        self.__dict__["embed"] = embedding  # not a submodule: the target's to keep

    def combine(self, taps: torch.Tensor) -> torch.Tensor:
        """The target's three taps [T, 3 * H_target] -> the draft's hidden input [T, H]."""
        return self.fc(taps.to(self.fc.weight.dtype))

    def forward(
        self,
        tokens: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        attend: Attend,
    ) -> torch.Tensor:
        """tokens [T] (each the token after its row's position), hidden [T, H], positions
        [T] -> the pre-norm output [T, H]: the next step's hidden input, and the
        proposals' source (`propose`)."""
        embedding = self.embed_tokens if self.embed_tokens is not None else self.embed
        cos, sin = self.rope.cos_sin(positions)
        embeds = embedding(tokens).to(hidden.dtype)
        return self.midlayer(embeds, hidden, cos, sin, attend)

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """Pre-norm outputs [T, H] -> draft-vocabulary logits [T, V_draft], float32."""
        return self.lm_head(self.norm(out)).float()

    def propose(self, out: torch.Tensor) -> torch.Tensor:
        """Pre-norm outputs [T, H] -> each row's most likely next token, a target id [T]."""
        d = self.logits(out).argmax(-1)
        return d + self.d2t[d]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One sequence's plain causal attention, q at the last rows of k: q [n, Hq, d],
    k, v [L, Hkv, d] -> [n, Hq, d]; the target's attention with sinks that take no share
    (-inf) and no window."""
    no_sinks = torch.full((q.shape[1],), float("-inf"), device=q.device)
    return attention_with_sinks(q, k, v, no_sinks, q_offset=k.shape[0] - q.shape[0], window=None)


# the norms' weights are our RMSNorm's `scale`: parameter name -> checkpoint name
def _stored_name(param: str) -> str:
    return param[: -len("scale")] + "weight" if param.endswith("norm.scale") else param


def load_draft(
    folder: str | Path,
    target: ModelConfig,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> Eagle3Draft:
    """Reads an EAGLE-3 draft for `target` from its folder (config.json and
    safetensors), checking every tensor's name and shape against its config and the
    target's sizes."""
    folder = Path(folder)
    config = Eagle3Config.from_folder(folder)
    config.check_target(target, str(folder))
    files = safetensors_files(folder)
    if not files:
        raise CheckpointError(f"{folder}: no .safetensors files")
    stored: dict[str, tuple[Path, str]] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
                    stored[name] = (path, name)
        except SafetensorError as exc:
            raise CheckpointError(f"{path.name}: cannot read: {exc}") from exc
    model = Eagle3Draft(config, dtype=dtype, own_embedding="embed_tokens.weight" in stored)
    wanted = {_stored_name(n): t for n, t in model.state_dict().items()}
    optional = {"d2t"}
    for name, tensor in wanted.items():
        if name not in stored:
            if name in optional:
                continue
            raise CheckpointError(
                f"{folder}: missing tensor {name} (expected shape {list(tensor.shape)})"
            )
        path, key = stored[name]
        with safe_open(path, framework="pt") as f:
            value = f.get_tensor(key)
        if tuple(value.shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{name} in {path.name}: shape {list(value.shape)}, expected "
                f"{list(tensor.shape)} for this config.json"
            )
        tensor.copy_(value.to(tensor.dtype))
    if "d2t" not in stored and config.draft_vocab != config.vocab_size:
        raise CheckpointError(
            f"{folder}: draft_vocab_size {config.draft_vocab} differs from vocab_size "
            f"{config.vocab_size}, and there is no d2t tensor to map draft ids to the target's"
        )
    return model.to(device)


def write_random_draft(
    config: Eagle3Config,
    folder: str | Path,
    *,
    seed: int = 0,
    own_embedding: bool = False,
    d2t: torch.Tensor | None = None,
) -> Path:
    """A random draft in the published layout (tests and benchmarks): config.json and one
    model.safetensors; `d2t` maps its vocabulary where it is smaller than the target's."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    model = Eagle3Draft(config, dtype=torch.float32, own_embedding=own_embedding)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "d2t":
            continue
        if name.endswith("norm.scale"):
            value = 1 + 0.1 * torch.randn(tensor.shape, generator=g)
        else:
            fan_in = tensor.shape[-1]
            value = torch.randn(tensor.shape, generator=g) / math.sqrt(fan_in)
        tensors[_stored_name(name)] = value.to(torch.bfloat16).contiguous()
    if d2t is not None:
        tensors["d2t"] = d2t.to(torch.long).contiguous()
        t2d = torch.zeros(config.vocab_size, dtype=torch.bool)
        t2d[torch.arange(len(d2t)) + d2t] = True
        tensors["t2d"] = t2d
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    return folder

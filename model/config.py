"""Model hyperparameters: one pydantic class, read from presets or either checkpoint style.

Field names follow the original gpt-oss `config.json` (the reference implementation's
names); the Hugging Face style (`num_local_experts`, `rope_scaling` or `rope_parameters`)
is translated on the way in and out.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

LayerType = Literal["sliding_attention", "full_attention"]

MXFP4_BLOCK = 32  # elements that share one E8M0 scale

ORIGINAL_KEYS = (
    "num_hidden_layers",
    "num_experts",
    "experts_per_token",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "swiglu_limit",
    "head_dim",
    "num_attention_heads",
    "num_key_value_heads",
    "sliding_window",
    "initial_context_length",
    "rope_theta",
    "rope_scaling_factor",
    "rope_ntk_alpha",
    "rope_ntk_beta",
)


class ConfigError(ValueError):
    """A model configuration that cannot describe a gpt-oss model."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as a gpt-oss model; the message names what is wrong."""


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    num_hidden_layers: int = Field(ge=1)
    num_experts: int = Field(ge=1)
    experts_per_token: int = Field(ge=1)
    vocab_size: int = Field(ge=1)
    hidden_size: int = Field(ge=MXFP4_BLOCK)
    intermediate_size: int = Field(ge=MXFP4_BLOCK)
    swiglu_limit: float = Field(default=7.0, gt=0)
    swiglu_alpha: float = 1.702
    head_dim: int = Field(ge=2)
    num_attention_heads: int = Field(ge=1)
    num_key_value_heads: int = Field(ge=1)
    sliding_window: int = Field(ge=1)
    initial_context_length: int = Field(default=4096, ge=1)
    max_context_length: int = Field(default=131072, ge=1)
    rope_theta: float = Field(default=150000.0, gt=1)
    rope_scaling_factor: float = Field(default=32.0, ge=1)
    rope_ntk_alpha: float = Field(default=1.0, gt=0)  # YaRN beta_slow
    rope_ntk_beta: float = Field(default=32.0, gt=0)  # YaRN beta_fast
    rms_norm_eps: float = Field(default=1e-5, gt=0)
    # None means the gpt-oss pattern: sliding on even layers, full on odd ones.
    layer_types: list[LayerType] | None = None
    eos_token_ids: list[int] = Field(default_factory=lambda: [200002, 200012])
    pad_token_id: int = 199999

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.hidden_size % MXFP4_BLOCK or self.intermediate_size % MXFP4_BLOCK:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) and intermediate_size "
                f"({self.intermediate_size}) must be multiples of {MXFP4_BLOCK} for MXFP4 experts"
            )
        if self.experts_per_token > self.num_experts:
            raise ValueError(
                f"experts_per_token ({self.experts_per_token}) exceeds num_experts ({self.num_experts})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for "
                f"{self.num_hidden_layers} layers"
            )
        return self

    # -- derived -------------------------------------------------------------------------

    def layer_type(self, layer: int) -> LayerType:
        if self.layer_types is not None:
            return self.layer_types[layer]
        return "sliding_attention" if layer % 2 == 0 else "full_attention"

    def is_sliding(self, layer: int) -> bool:
        return self.layer_type(layer) == "sliding_attention"

    @property
    def attention_window(self) -> int | None:
        """The sliding layers' window; None where every layer sees the whole context."""
        sliding = any(self.is_sliding(i) for i in range(self.num_hidden_layers))
        return self.sliding_window if sliding else None

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def qkv_dim(self) -> int:
        return self.q_dim + 2 * self.kv_dim

    # -- reading -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> ModelConfig:
        """Reads our own style, the original gpt-oss style or the Hugging Face style."""
        try:
            if "num_local_experts" in raw or raw.get("model_type") == "gpt_oss":
                return cls(**_from_hf(raw))
            return cls(**{k: v for k, v in raw.items() if k in cls.model_fields})
        except KeyError as exc:
            raise ConfigError(f"{source}: missing field {exc}") from exc
        except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
            raise ConfigError(f"{source}: not a valid gpt-oss configuration: {exc}") from exc

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(read_json_object(path), source=str(path))

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        names = preset_names()
        if name not in names:
            raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(names)}")
        text = resources.files("gptoss_ray.configs").joinpath("models", f"{name}.json").read_text()
        return cls.from_dict(json.loads(text), source=f"preset {name}")

    # -- writing -------------------------------------------------------------------------

    def to_original_dict(self) -> dict[str, Any]:
        """The original layout's config.json: exactly its sixteen fields."""
        out: dict[str, Any] = {k: getattr(self, k) for k in ORIGINAL_KEYS}
        return out

    def to_hf_dict(self) -> dict[str, Any]:
        """A Hugging Face config.json as on the hub's gpt-oss repositories."""

        def in_vocab(token: int) -> int | None:
            return token if token < self.vocab_size else None

        return {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "attention_bias": True,
            "attention_dropout": 0.0,
            "eos_token_id": in_vocab(self.eos_token_ids[0]) if self.eos_token_ids else None,
            "pad_token_id": in_vocab(self.pad_token_id),
            "experts_per_token": self.experts_per_token,
            "num_experts_per_tok": self.experts_per_token,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initial_context_length": self.initial_context_length,
            "intermediate_size": self.intermediate_size,
            "layer_types": [self.layer_type(i) for i in range(self.num_hidden_layers)],
            "max_position_embeddings": self.max_context_length,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "num_local_experts": self.num_experts,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": {
                "beta_fast": self.rope_ntk_beta,
                "beta_slow": self.rope_ntk_alpha,
                "factor": self.rope_scaling_factor,
                "original_max_position_embeddings": self.initial_context_length,
                "rope_type": "yarn",
                "truncate": False,
            },
            "rope_theta": self.rope_theta,
            "sliding_window": self.sliding_window,
            "swiglu_limit": self.swiglu_limit,
            "tie_word_embeddings": False,
            "use_cache": True,
            "vocab_size": self.vocab_size,
            "quantization_config": {
                "quant_method": "mxfp4",
                "modules_to_not_convert": [
                    "model.layers.*.self_attn",
                    "model.layers.*.mlp.router",
                    "model.embed_tokens",
                    "lm_head",
                ],
            },
        }


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A config file's JSON object; a missing file, bad JSON or another value is a
    ConfigError that names the file."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such file") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return raw


def field_error(source: str, exc: ValidationError) -> ConfigError:
    """pydantic's first complaint about a config, as one line naming the field."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    return ConfigError(f"{source}: {where}: {first['msg']}")


def preset_names() -> list[str]:
    folder = resources.files("gptoss_ray.configs").joinpath("models")
    return sorted(
        p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json")
    )


def _from_hf(raw: dict[str, Any]) -> dict[str, Any]:
    # The hub's files carry `rope_scaling` + `rope_theta`; transformers 5 writes
    # `rope_parameters` (with rope_theta inside). Either may be absent: gpt-oss defaults.
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if rope.get("truncate", False):
        raise ValueError(
            "rope_scaling.truncate=true is not gpt-oss's YaRN (its range is not rounded)"
        )
    if rope.get("rope_type", rope.get("type", "yarn")) != "yarn":
        raise ValueError(f"rope type {rope.get('rope_type')!r} is not yarn")
    out: dict[str, Any] = {
        "num_hidden_layers": raw["num_hidden_layers"],
        "num_experts": raw["num_local_experts"],
        "experts_per_token": raw.get("num_experts_per_tok", raw.get("experts_per_token", 4)),
        "vocab_size": raw["vocab_size"],
        "hidden_size": raw["hidden_size"],
        "intermediate_size": raw["intermediate_size"],
        "swiglu_limit": raw.get("swiglu_limit", 7.0),
        "swiglu_alpha": raw.get("swiglu_alpha", 1.702),
        "head_dim": raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"],
        "num_attention_heads": raw["num_attention_heads"],
        "num_key_value_heads": raw.get("num_key_value_heads") or raw["num_attention_heads"],
        "sliding_window": raw["sliding_window"],
        "initial_context_length": rope.get(
            "original_max_position_embeddings", raw.get("initial_context_length", 4096)
        ),
        "max_context_length": raw.get("max_position_embeddings", 131072),
        "rope_theta": rope.get("rope_theta", raw.get("rope_theta", 150000.0)),
        "rope_scaling_factor": rope.get("factor", 32.0),
        "rope_ntk_alpha": rope.get("beta_slow", 1.0),
        "rope_ntk_beta": rope.get("beta_fast", 32.0),
        "rms_norm_eps": raw.get("rms_norm_eps", 1e-5),
        "layer_types": raw.get("layer_types"),
    }
    if raw.get("pad_token_id") is not None:
        out["pad_token_id"] = raw["pad_token_id"]
    return out

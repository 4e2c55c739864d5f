"""An EAGLE-3 draft's config.json (`LlamaForCausalLMEagle3`: Hugging Face's Llama fields
plus EAGLE-3's), read without torch: the coordinator sizes the KV cache from it.
The model itself is model/eagle3.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gptoss_ray.model.config import ConfigError, ModelConfig, field_error, read_json_object

ARCHITECTURE = "LlamaForCausalLMEagle3"


class Eagle3Config(BaseModel):
    """The draft's config.json (Hugging Face's Llama fields, plus EAGLE-3's)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    head_dim: int | None = Field(None, gt=0)
    num_hidden_layers: int = 1
    rms_norm_eps: float = Field(1e-5, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    rope_scaling: dict[str, Any] | None = None
    vocab_size: int = Field(gt=0)
    draft_vocab_size: int | None = Field(None, gt=0)
    target_hidden_size: int | None = Field(None, gt=0)
    hidden_act: str = "silu"
    # the target layers whose input the draft reads (vLLM's reading of the same field)
    aux_layers: tuple[int, ...] | None = None

    @model_validator(mode="after")
    def _check(self) -> Eagle3Config:
        if self.num_hidden_layers != 1:
            raise ValueError(
                f"num_hidden_layers {self.num_hidden_layers}: an EAGLE-3 draft has one layer"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r}: only 'silu' drafts are known")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        kind = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type"))
        if kind not in (None, "default", "llama3"):
            raise ValueError(f"rope_scaling type {kind!r}: known are none, default and llama3")
        if self.aux_layers is not None and len(self.aux_layers) != 3:
            raise ValueError(f"eagle_aux_hidden_state_layer_ids {list(self.aux_layers)}: need 3")
        return self

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def draft_vocab(self) -> int:
        return self.draft_vocab_size or self.vocab_size

    @property
    def target_hidden(self) -> int:
        return self.target_hidden_size or self.hidden_size

    def taps(self, target_layers: int) -> tuple[int, ...]:
        """The target layers read, the config's or vLLM's default (2, L/2, L-3)."""
        taps = self.aux_layers or (2, target_layers // 2, target_layers - 3)
        if not all(0 <= t < target_layers for t in taps):
            raise ConfigError(
                f"eagle_aux_hidden_state_layer_ids {list(taps)}: the target has layers "
                f"0..{target_layers - 1}"
            )
        return taps

    def check_target(self, target: ModelConfig, source: str = "the draft") -> tuple[int, ...]:
        """That the draft reads this target (its hidden states and vocabulary) -> the
        target layers it taps."""
        if self.target_hidden != target.hidden_size:
            raise ConfigError(
                f"{source} reads hidden states of size {self.target_hidden} "
                f"(target_hidden_size, else hidden_size); the target's are {target.hidden_size}"
            )
        if self.vocab_size != target.vocab_size:
            raise ConfigError(
                f"{source}: vocab_size {self.vocab_size}, the target's is {target.vocab_size}"
            )
        return self.taps(target.num_hidden_layers)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> Eagle3Config:
        archs = raw.get("architectures") or [ARCHITECTURE]
        if not any("Eagle3" in a or "Eagle" in a for a in archs):
            raise ConfigError(f"{source}: architectures {archs}, expected {ARCHITECTURE}")
        eagle = raw.get("eagle_config") or {}
        taps = raw.get("eagle_aux_hidden_state_layer_ids") or eagle.get(
            "eagle_aux_hidden_state_layer_ids"
        )
        try:
            return cls.model_validate({**raw, "aux_layers": taps})
        except ValidationError as exc:
            raise field_error(source, exc) from exc

    @classmethod
    def for_target(cls, target: ModelConfig, draft_vocab: int = 32000) -> Eagle3Config:
        """The published gpt-oss drafts' geometry for a target: its attention's heads, an
        MLP 6 hidden sizes wide, a vocabulary of up to 32000 ids (benchmarks' random
        drafts)."""
        return cls(
            hidden_size=target.hidden_size,
            intermediate_size=6 * target.hidden_size,
            num_attention_heads=target.num_attention_heads,
            num_key_value_heads=target.num_key_value_heads,
            head_dim=target.head_dim,
            vocab_size=target.vocab_size,
            draft_vocab_size=min(draft_vocab, target.vocab_size),
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> Eagle3Config:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{folder}: no config.json (an EAGLE-3 draft's folder has one)")
        return cls.from_dict(read_json_object(path), str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        out = self.model_dump(exclude={"aux_layers"}, exclude_none=True)
        out["architectures"] = [ARCHITECTURE]
        out["model_type"] = "llama"
        if self.aux_layers is not None:
            out["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(self.aux_layers)}
        return out

    def kv_bytes_per_token(self, bytes_per_value: int) -> int:
        """One token's keys and values in the draft's layer."""
        return 2 * self.num_key_value_heads * self.dim * bytes_per_value

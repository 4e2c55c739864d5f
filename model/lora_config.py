"""A PEFT LoRA adapter's adapter_config.json, read without torch: the engine checks an
adapter where it enters (serve, a load request) before any shard reads its weights. The
weights and their math are model/lora.py."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gptoss_ray.model.config import ConfigError, field_error, read_json_object

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")


class LoraConfig(BaseModel):
    """The fields of PEFT's adapter_config.json that decide the math; the ones that would
    change it in ways not served here are refused by name."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    peft_type: str = "LORA"
    r: int = Field(gt=0)
    lora_alpha: float = Field(gt=0)
    use_rslora: bool = False
    target_modules: list[str] | str | None = None
    target_parameters: list[str] | None = None
    bias: str = "none"
    use_dora: bool = False
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    rank_pattern: dict[str, Any] = Field(default_factory=dict)
    alpha_pattern: dict[str, Any] = Field(default_factory=dict)
    lora_bias: bool = False

    @field_validator("peft_type")
    @classmethod
    def _lora(cls, value: str) -> str:
        if value.upper() != "LORA":
            raise ValueError(f"peft_type {value!r}: only LORA adapters are served")
        return value

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def check(self, source: str) -> None:
        """Refuses, by field, what this loader would not apply exactly."""
        unsupported = {
            "bias": self.bias != "none",
            "use_dora": self.use_dora,
            "fan_in_fan_out": self.fan_in_fan_out,
            "modules_to_save": bool(self.modules_to_save),
            "layers_to_transform": self.layers_to_transform is not None,
            "rank_pattern": bool(self.rank_pattern),
            "alpha_pattern": bool(self.alpha_pattern),
            "lora_bias": self.lora_bias,
        }
        for name, bad in unsupported.items():
            if bad:
                value = getattr(self, name)
                raise ConfigError(f"{source}: {name}={value!r} is not supported (LoRA A/B only)")
        for module in self._modules():
            if module not in ATTENTION_MODULES:
                raise ConfigError(
                    f"{source}: target_modules names {module!r}; gpt-oss LoRA targets "
                    f"{', '.join(ATTENTION_MODULES)} and target_parameters "
                    f"{', '.join('mlp.experts.' + p for p in EXPERT_PARAMETERS)}"
                )
        for parameter in self.target_parameters or []:
            if parameter.rsplit(".", 1)[-1] not in EXPERT_PARAMETERS:
                raise ConfigError(
                    f"{source}: target_parameters names {parameter!r}; expected "
                    f"{', '.join('mlp.experts.' + p for p in EXPERT_PARAMETERS)}"
                )

    def expert_wrappers(self, experts: str) -> list[tuple[str, str]]:
        """(module path, parameter) of each targeted expert parameter's factors. PEFT
        wraps the experts' module once per target parameter, in the order the module
        defines them (gate_up_proj, then down_proj; not the config's order), each
        wrapper around the one before: the first sits deepest, a `base_layer` below the
        next (saved names: `experts.base_layer.lora_A...` for gate_up_proj when both are
        targeted, `experts.lora_A...` for down_proj)."""
        targeted = {p.rsplit(".", 1)[-1] for p in self.target_parameters or []}
        params = [p for p in EXPERT_PARAMETERS if p in targeted]
        depth = len(params)
        return [
            (experts + ".base_layer" * (depth - 1 - j), param) for j, param in enumerate(params)
        ]

    def _modules(self) -> list[str]:
        if self.target_modules is None:
            return []
        if isinstance(self.target_modules, str):  # PEFT: a regex over module names
            return [m for m in ATTENTION_MODULES if re.search(self.target_modules, m)] or [
                self.target_modules
            ]
        return list(self.target_modules)

    @classmethod
    def from_folder(cls, folder: str | Path) -> LoraConfig:
        path = Path(folder) / CONFIG_FILE
        if not path.is_file():
            raise ConfigError(f"{folder}: no {CONFIG_FILE} (a PEFT adapter's folder has one)")
        try:
            config = cls.model_validate(read_json_object(path))
        except ValidationError as exc:
            raise field_error(str(path), exc) from exc
        config.check(str(path))
        return config


def read_adapter_config(folder: str | Path, max_rank: int, name: str) -> LoraConfig:
    """An adapter's config, checked, and its rank against the engine's max_lora_rank."""
    config = LoraConfig.from_folder(folder)
    if config.r > max_rank:
        raise ConfigError(
            f"LoRA {name}: rank {config.r} exceeds max_lora_rank {max_rank} (--max-lora-rank)"
        )
    return config

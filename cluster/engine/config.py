"""One engine's configuration, validated once where it enters (the CLI, `Engine.start`,
a Serve config's `engine`, `gptoss-ray serve`), with errors that name the field; the
coordinator takes it whole. Importable without torch."""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gptoss_ray.cluster.engine.drafts import Drafter, NgramDrafter, ShardDrafts
from gptoss_ray.model.types import COLLECTIVE_ENV


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field("gpt-oss-tiny", min_length=1, description="checkpoint folder or preset")
    shards: int = Field(2, ge=1, description="expert-parallel shards (a GPU each on cuda)")
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    kv_budget_mb: float | None = Field(
        None,
        gt=0,
        description="KV cache per shard; default: on cuda from free memory, on cpu 256",
    )
    gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="share of each shard's memory for weights, activations and KV (cuda "
        "default 0.9; given on cpu, the host's memory is read)",
    )
    block_size: int = Field(16, ge=1, description="tokens per KV block")
    token_budget: int = Field(256, ge=1, description="tokens per step, prefill chunks too")
    max_seqs: int = Field(64, ge=1, description="sequences decoding at once, per shard")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="longer prompts are refused (default: what the context allows)"
    )
    prefix_cache: bool = Field(True, description="reuse the KV of prompts' cached prefixes")
    cpus_per_shard: float = Field(1, ge=0)
    gpus_per_shard: float | None = Field(None, ge=0, description="default: 1 on cuda, 0 on cpu")
    placement_timeout: float = Field(120, gt=0, description="seconds to place the shards")
    recovery_timeout: float = Field(120, gt=0, description="seconds to replace a lost shard")
    collective_timeout: float = Field(
        60,
        gt=0,
        description="seconds a step's collective may wait for the other shards; a hang "
        "that no lost shard announces ends there (NCCL: the shard's process ends)",
    )
    kernels: bool | None = Field(None, description="Triton kernels; default: on cuda")
    decode_graphs: bool | None = Field(
        None, description="decode steps from CUDA graphs; default: on cuda with the kernels"
    )
    threads_per_shard: int | None = Field(
        None, ge=1, description="torch threads of a CPU shard; default: cores / shards"
    )
    compiled_steps: bool | None = Field(
        None, description="steps through a Ray compiled graph; default: on cuda"
    )
    overlap: bool | None = Field(
        None, description="plan each step while the one before runs; default: on cuda"
    )
    speculative: Literal["ngram", "eagle3"] | None = Field(
        None,
        description="speculative decoding: 'ngram' drafts each decode's next tokens by "
        "prompt lookup, 'eagle3' by an EAGLE-3 draft model on each shard (`draft_model`); "
        "either is verified exactly in the same step",
    )
    draft_model: str | None = Field(
        None,
        min_length=1,
        description="the EAGLE-3 draft's folder (config.json and safetensors), for "
        "speculative 'eagle3'; reachable at the same path on every node",
    )
    num_draft_tokens: int = Field(4, ge=1, le=16, description="draft tokens per decode at most")
    ngram_min: int = Field(2, ge=1, description="shortest n-gram looked up (ngram drafts)")
    ngram_max: int = Field(4, ge=1, description="longest n-gram looked up (ngram drafts)")
    loras: dict[str, str] = Field(
        default_factory=dict,
        description="LoRA adapters to serve: name -> PEFT folder (adapter_config.json and "
        "adapter_model.safetensors, the same path on every node); a request names one as "
        "its model",
    )
    enable_lora: bool = Field(
        False,
        description="LoRA adapters load and unload while serving (/v1/load_lora_adapter: "
        "folders on the engines' machines), with `loras` or none at the start",
    )
    max_loras: int = Field(4, ge=1, description="LoRA adapters resident on a shard at once")
    max_lora_rank: int = Field(16, ge=1, description="the largest LoRA rank served")
    null_model: bool = Field(False, description="shards that do no model work (benchmarks)")
    harmony_frame: Literal["strict", "off"] = Field(
        "strict", description="constrain every chat reply to a well-formed harmony frame"
    )

    env: dict[str, str] = Field(
        default_factory=dict,
        description="environment variables of every shard (NCCL_*, ...), through Ray's "
        "runtime_env; the starting process's NCCL_*, GLOO_*, FI_* and UCX_* are added "
        "unless given (`forwarding_env`)",
    )

    @model_validator(mode="after")
    def _ngram_lengths(self) -> EngineConfig:
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"ngram_min {self.ngram_min} exceeds ngram_max {self.ngram_max}")
        if self.speculative == "eagle3" and self.draft_model is None:
            raise ValueError("speculative 'eagle3' needs draft_model, an EAGLE-3 draft's folder")
        if self.speculative != "eagle3" and self.draft_model is not None:
            raise ValueError(
                f"draft_model is for speculative 'eagle3' (speculative is {self.speculative!r})"
            )
        return self

    def drafter(self) -> tuple[Drafter | None, int]:
        """The engine's drafter and its draft tokens per decode (None, 0: no speculation)."""
        if self.speculative == "ngram":
            return NgramDrafter(self.ngram_min, self.ngram_max), self.num_draft_tokens
        if self.speculative == "eagle3":  # the shards draft (`draft_model`)
            return ShardDrafts(), self.num_draft_tokens
        return None, 0

    @field_validator("env")
    @classmethod
    def _names(cls, env: dict[str, str]) -> dict[str, str]:
        for name in env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"{name!r} is not an environment variable's name")
        return env

    def forwarding_env(self, environ: dict[str, str] | None = None) -> EngineConfig:
        """This config with the collectives' settings of `environ` (this process's
        environment: the shell that runs `serve`) in `env`, where `env` does not set
        them: on a cluster, the coordinator's own environment is the raylet's, not the
        user's."""
        environ = dict(os.environ if environ is None else environ)
        taken = {k: v for k, v in environ.items() if k.startswith(COLLECTIVE_ENV)}
        return self.model_copy(update={"env": taken | self.env})

    def shard_bundle(self) -> dict[str, float]:
        """The Ray resources each shard holds (its placement group's bundle)."""
        gpus = self.gpus_per_shard
        if gpus is None:
            gpus = 1 if self.device == "cuda" else 0
        return {"CPU": self.cpus_per_shard} | ({"GPU": gpus} if gpus else {})

    @property
    def lora_on(self) -> bool:
        return self.enable_lora or bool(self.loras)

    @property
    def kv_budget_bytes(self) -> int | None:
        return None if self.kv_budget_mb is None else int(self.kv_budget_mb * 2**20)

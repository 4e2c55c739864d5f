"""Single-process generation: the baseline that distributed runs must match token for token."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from gptoss_ray.model.kv_cache import SequenceBatch, SequenceKV
from gptoss_ray.model.model import Transformer
from gptoss_ray.model.sampling import Sampler
from gptoss_ray.model.types import RequestError, SamplingParams, check_prompt


@dataclass
class Completion:
    token_ids: list[int]  # generated ids only; a stop token that ended it is included
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams],
) -> list[Completion]:
    """Runs every prompt to a stop token or max_tokens, all in one batch per step."""
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    if len(params) != len(prompts):
        raise RequestError(f"{len(params)} sampling parameter sets for {len(prompts)} prompts")
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        check_prompt(prompt, p.max_tokens, model.config, f"prompt {i}")

    config, device = model.config, model.device
    caches = [
        SequenceKV(
            config.num_hidden_layers,
            config.num_key_value_heads,
            config.head_dim,
            dtype=model.dtype,
            device=device,
            capacity=len(prompt) + p.max_tokens,
        )
        for prompt, p in zip(prompts, params, strict=True)
    ]
    samplers = [Sampler(p) for p in params]
    stops = [p.stop_ids(config.eos_token_ids) for p in params]
    out: list[list[int]] = [[] for _ in prompts]
    finish: list[str | None] = [None] * len(prompts)
    feed = {i: list(prompt) for i, prompt in enumerate(prompts)}

    while feed:
        active = list(feed)
        tokens = torch.tensor([t for i in active for t in feed[i]], dtype=torch.long, device=device)
        batch = SequenceBatch([caches[i] for i in active], [len(feed[i]) for i in active])
        logits = model(tokens, batch)  # [S, V]
        for row, i in enumerate(active):
            token = samplers[i](logits[row])
            out[i].append(token)
            if token in stops[i]:
                finish[i] = "stop"
            elif len(out[i]) >= params[i].max_tokens:
                finish[i] = "length"
            if finish[i] is None:
                feed[i] = [token]
            else:
                del feed[i]
    return [
        Completion(token_ids=out[i], finish_reason=finish[i], prompt_tokens=len(prompts[i]))  # type: ignore[arg-type]
        for i in range(len(prompts))
    ]

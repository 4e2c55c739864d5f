"""Single-process generation: the baseline that distributed runs must match token for token."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from gptoss_ray.model.grammar import Matchers
from gptoss_ray.model.kv_cache import SequenceBatch, SequenceKV
from gptoss_ray.model.model import Transformer
from gptoss_ray.model.sampling import Draw, sample_rows
from gptoss_ray.model.types import RequestError, SamplingParams, TokenLogprob, check_prompt


@dataclass
class Completion:
    token_ids: list[int]  # generated ids only; a stop token that ended it is included
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None  # one per token, when params.logprobs is set


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
    seeds = [p.seed if p.seed is not None else secrets.randbits(63) for p in params]
    stops = [p.stop_ids(config.eos_token_ids) for p in params]
    out: list[list[int]] = [[] for _ in prompts]
    logprobs: list[list[TokenLogprob]] = [[] for _ in prompts]
    finish: list[str | None] = [None] * len(prompts)
    feed = {i: list(prompt) for i, prompt in enumerate(prompts)}
    matchers = Matchers()  # of the prompts whose replies follow a grammar
    for i, p in enumerate(params):
        if p.grammar is not None:
            matchers.start(str(i), p.grammar, [])

    while feed:
        active = list(feed)
        tokens = torch.tensor([t for i in active for t in feed[i]], dtype=torch.long, device=device)
        batch = SequenceBatch([caches[i] for i in active], [len(feed[i]) for i in active])
        logits = model(tokens, batch)  # [S, V]
        constrained = [str(i) if params[i].grammar is not None else None for i in active]
        masks = matchers.masks(constrained) if any(constrained) else None
        draws = [
            Draw(
                params[i],
                seeds[i],
                len(out[i]),
                prompts[i],
                out[i],
                stops[i],
                masks[row] if masks is not None and constrained[row] else None,
            )
            for row, i in enumerate(active)
        ]
        drawn, drawn_logprobs = sample_rows(logits, draws, owned=True)
        for i, token, lp in zip(active, drawn, drawn_logprobs, strict=True):
            matchers.consume(str(i), token)
            out[i].append(token)
            if lp is not None:
                logprobs[i].append(lp)
            if token in stops[i]:
                finish[i] = "stop"
            elif len(out[i]) >= params[i].max_tokens:
                finish[i] = "length"
            if finish[i] is None:
                feed[i] = [token]
            else:
                del feed[i]
    return [
        Completion(
            token_ids=out[i],
            finish_reason=finish[i],  # type: ignore[arg-type]
            prompt_tokens=len(prompts[i]),
            logprobs=logprobs[i] if params[i].logprobs is not None else None,
        )
        for i in range(len(prompts))
    ]

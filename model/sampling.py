"""Sampling parameters (validated at the edge) and the per-sequence sampler.

Each sequence draws from its own seeded generator, so its tokens do not depend on which
other sequences share its batch, or on how many shards serve it.
"""

from __future__ import annotations

import secrets

import torch
from pydantic import BaseModel, ConfigDict, Field


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(default=16, ge=1, description="new tokens at most")
    temperature: float = Field(default=1.0, ge=0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0, description="0 = no top-k cut")
    seed: int | None = Field(default=None, ge=0)
    stop_token_ids: list[int] | None = Field(
        default=None, description="None = the model's stop ids (<|return|>, <|call|>)"
    )
    ignore_eos: bool = False

    def stop_ids(self, model_stop_ids: list[int]) -> frozenset[int]:
        if self.ignore_eos:
            return frozenset(self.stop_token_ids or ())
        return frozenset(self.stop_token_ids if self.stop_token_ids is not None else model_stop_ids)


class Sampler:
    """Draws one sequence's tokens under its parameters."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if params.temperature > 0:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """logits [V] (float32, any device) -> the next token id."""
        p = self.params
        if p.temperature == 0:
            return int(torch.argmax(logits))
        logits = logits.detach().float().cpu() / p.temperature
        if p.top_k and p.top_k < logits.shape[0]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always).
            drop = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
            logits = logits.index_fill(0, order[drop], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))

"""The per-sequence sampler (its parameters, validated at the edge, are in `types`).

The draw for a sequence's n-th token comes from a generator seeded with (seed, n) alone:
no state carries from one step to the next, so a sequence's tokens do not depend on which
other sequences share its batch, on how many shards serve it, or on a preemption that
recomputes it elsewhere.
"""

from __future__ import annotations

import secrets

import torch

from gptoss_ray.model.types import SamplingParams

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads (seed, n) over the seed space


def step_seed(seed: int, n: int) -> int:
    return (seed * _MIX + (n + 1) * 0xBF58476D1CE4E5B9) % (1 << 63)


class Sampler:
    """Draws one sequence's tokens under its parameters."""

    def __init__(self, params: SamplingParams, seed: int | None = None) -> None:
        self.params = params
        self.seed = seed if seed is not None else params.seed
        if self.seed is None:
            self.seed = secrets.randbits(63)
        self.drawn = 0  # tokens drawn so far: the step index of the next draw

    def __call__(self, logits: torch.Tensor) -> int:
        """logits [V] (float32, any device) -> the next token id."""
        token = self.draw(logits, self.drawn)
        self.drawn += 1
        return token

    def draw(self, logits: torch.Tensor, n: int) -> int:
        """The n-th token (0-based) of the sequence, from its logits."""
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
        generator = torch.Generator().manual_seed(step_seed(self.seed, n))
        return int(torch.multinomial(probs, 1, generator=generator))


def sample_rows(logits: torch.Tensor, draws: list[tuple[SamplingParams, int, int]]) -> list[int]:
    """logits [S, V] (any device) and each row's (params, seed, n) -> the S tokens, each
    exactly what `Sampler(params, seed).draw(row, n)` gives. Greedy rows take one argmax
    over the batch, the others one copy to the host: two waits for the device per step
    instead of one per row."""
    if logits.shape[0] != len(draws):
        raise ValueError(f"{logits.shape[0]} rows of logits for {len(draws)} draws")
    greedy = [i for i, (p, _, _) in enumerate(draws) if p.temperature == 0]
    rest = [i for i, (p, _, _) in enumerate(draws) if p.temperature != 0]
    tokens = [0] * len(draws)
    if greedy:
        picked = logits if len(greedy) == len(draws) else logits[greedy]
        for i, t in zip(greedy, torch.argmax(picked, dim=-1).tolist(), strict=True):
            tokens[i] = t
    if rest:
        host = logits[rest].float().cpu()
        for row, i in enumerate(rest):
            params, seed, n = draws[i]
            tokens[i] = Sampler(params, seed=seed).draw(host[row], n)
    return tokens

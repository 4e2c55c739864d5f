"""Sampling a step's rows (each row's parameters, validated at the edge, are in `types`).

One pass over the step's logits [S, V], batched for any mix of settings: a grammar's mask
(the tokens it forbids at -inf), logit bias, the stop ids masked until min_tokens (unless
the grammar allows nothing else: the grammar wins), repetition / frequency / presence penalties (vLLM's
definitions: repetition over prompt and output, the other two over the output); then the
logprobs of those asking (of these processed logits, before temperature, as vLLM's
default), then the draw: greedy rows an argmax, the others temperature, min_p, top_k,
top_p and a seeded draw on the host, row by row.

The draw for a sequence's n-th token comes from random numbers seeded with (seed, n) alone:
no state carries from one step to the next, so a sequence's tokens do not depend on which
other sequences share its batch, on how many shards serve it, or on a preemption that
recomputes it elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from math import inf

import numpy
import torch

from gptoss_ray.model.types import SamplingParams, TokenLogprob

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads (seed, n) over the seed space


def step_seed(seed: int, n: int) -> int:
    return (seed * _MIX + (n + 1) * 0xBF58476D1CE4E5B9) % (1 << 63)


@dataclass
class Draw:
    """One row's draw: the sequence's n-th token (0-based) under its parameters. The
    prompt and the tokens drawn before are needed only with penalties, the stop ids only
    while n < min_tokens; `allowed` is a grammar's bitmask of the tokens allowed next
    ([words] int32, `model.grammar`), None without one."""

    params: SamplingParams
    seed: int
    n: int
    prompt: Sequence[int] = ()
    output: Sequence[int] = ()
    stop_ids: frozenset[int] = field(default_factory=frozenset)
    allowed: torch.Tensor | None = None


def sample_rows(
    logits: torch.Tensor, draws: Sequence[Draw], *, owned: bool = False
) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits [S, V] (any device) and each row's draw -> the S tokens, and each row's
    logprobs (None for rows that did not ask). Only the chosen and the top-k values leave
    the device. owned: the caller is done with `logits`, which may be overwritten (a
    step's logits are [64, 201088] floats: a copy costs more than the masks)."""
    if logits.shape[0] != len(draws):
        raise ValueError(f"{logits.shape[0]} rows of logits for {len(draws)} draws")
    x = _process(logits, draws, owned)
    tokens = [0] * len(draws)
    greedy = [i for i, d in enumerate(draws) if d.params.temperature == 0]
    rest = [i for i, d in enumerate(draws) if d.params.temperature != 0]
    if greedy:
        picked = x if len(greedy) == len(draws) else x[greedy]
        for i, t in zip(greedy, torch.argmax(picked, dim=-1).tolist(), strict=True):
            tokens[i] = t
    if rest:
        host = x[rest].float().cpu()
        for row, i in enumerate(rest):
            tokens[i] = _draw(host[row], draws[i])
    return tokens, _logprobs(x, draws, tokens)


def draw_one(logits: torch.Tensor, draw: Draw) -> int:
    """logits [V] -> the token `sample_rows` draws for this row."""
    return sample_rows(logits[None], [draw])[0][0]


def _process(logits: torch.Tensor, draws: Sequence[Draw], owned: bool) -> torch.Tensor:
    """Grammar masks, bias, min_tokens and penalties on float32 logits (a copy unless
    `owned`; the logits untouched when no row has any)."""
    constrained = [i for i, d in enumerate(draws) if d.allowed is not None]
    biased = [i for i, d in enumerate(draws) if d.params.logit_bias]
    held = [i for i, d in enumerate(draws) if d.n < d.params.min_tokens and d.stop_ids]
    penalized = [i for i, d in enumerate(draws) if d.params.penalized]
    if not (constrained or biased or held or penalized):
        return logits
    x = logits.float()
    if x is logits and not owned:
        x = x.clone()
    device, vocab = x.device, x.shape[1]
    if constrained:
        masks = torch.stack([draws[i].allowed for i in constrained])  # type: ignore[misc]
        if len(constrained) == len(draws):
            apply_masks_(x, masks)
        else:
            rows = x[constrained]
            apply_masks_(rows, masks)
            x[constrained] = rows
    if biased:
        rows, cols, values = [], [], []
        for i in biased:
            for token, bias in draws[i].params.logit_bias.items():  # type: ignore[union-attr]
                if token < vocab:
                    rows.append(i), cols.append(token), values.append(bias)
        x.index_put_(
            (torch.tensor(rows, device=device), torch.tensor(cols, device=device)),
            torch.tensor(values, device=device),
            accumulate=True,
        )
    cells = [(i, t) for i in held for t in sorted(draws[i].stop_ids) if t < vocab]
    if cells:
        at = tuple(torch.tensor(list(c), device=device) for c in zip(*cells, strict=True))
        kept = x[at]
        x[at] = float("-inf")
        both = [i for i in held if draws[i].allowed is not None]
        if both:  # a grammar that allows only a stop id now ends the reply regardless
            alive = (x[both] > -inf).any(1).tolist()
            dead = {i for i, a in zip(both, alive, strict=True) if not a}
            back = torch.tensor([i in dead for i, _ in cells], device=device)
            x[at[0][back], at[1][back]] = kept[back]
    if penalized:
        x[penalized] = _penalize(x[penalized], [draws[i] for i in penalized])
    return x


def apply_masks_(x: torch.Tensor, bitmask: torch.Tensor) -> None:
    """x [R, V] float32, in place: each row keeps only the tokens its grammar's bitmask
    ([R, words] int32, token t is bit t % 32 of word t // 32: `model.grammar`) allows.
    Unpacked by numpy on the host (4x faster than torch's bit ops there) and by torch's on
    a device; llguidance's own kernel is faster still but needs torch.compile, whose
    first call costs every shard seconds."""
    vocab = x.shape[1]
    if x.device.type == "cpu":
        unpacked = numpy.unpackbits((~bitmask).numpy().view(numpy.uint8), axis=1, bitorder="little")
        forbidden = torch.from_numpy(unpacked).view(torch.bool)[:, :vocab]
    else:
        bits = bitmask.to(x.device)[:, :, None] >> torch.arange(
            32, device=x.device, dtype=torch.int32
        )
        forbidden = ((bits & 1) == 0).view(x.shape[0], -1)[:, :vocab]
    x.masked_fill_(forbidden, -inf)


def _penalize(x: torch.Tensor, draws: list[Draw]) -> torch.Tensor:
    """x [R, V] float32 -> with each row's penalties applied (vLLM's: a repeated token's
    positive logit divided by repetition_penalty, a negative one multiplied; then
    frequency x its count and presence x (count > 0) subtracted)."""
    rows, vocab = len(draws), x.shape[1]
    device = x.device

    def counts(lists: list[Sequence[int]]) -> torch.Tensor:
        """[R, V] how many times each token is in each row's list."""
        width = max(1, max(len(t) for t in lists))
        padded = torch.full((rows, width), vocab, dtype=torch.long)  # vocab: a spare column
        for r, t in enumerate(lists):
            padded[r, : len(t)] = torch.as_tensor(list(t), dtype=torch.long)
        out = torch.zeros(rows, vocab + 1, device=device)
        out.scatter_add_(1, padded.to(device), torch.ones(padded.shape, device=device))
        return out[:, :vocab]

    output = counts([d.output for d in draws])

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, device=device)[:, None]

    rep = column([d.params.repetition_penalty for d in draws])
    if (rep != 1).any():
        seen = (output > 0) | (counts([d.prompt for d in draws]) > 0)
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    x = x - column([d.params.frequency_penalty for d in draws]) * output
    return x - column([d.params.presence_penalty for d in draws]) * (output > 0).float()


def _draw(logits: torch.Tensor, draw: Draw) -> int:
    """One row on the host (float32 [V]), temperature > 0."""
    p = draw.params
    logits = logits / p.temperature
    if p.min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    if p.top_k and p.top_k < logits.shape[0]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always).
        drop = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
        logits = logits.index_fill(0, order[drop], float("-inf"))
    # The exponential race: argmax p_i / q_i, q_i ~ Exp(1), draws token i with
    # probability p_i, never one without mass, and unlike an inverse CDF (where a change
    # of 1e-7 anywhere moves every later boundary) it flips only when two leaders tie to
    # that precision, so seeded replies stay put under float noise (chunking, shards).
    # Uniforms from numpy's PCG64: 0.8 ms a row at 201k tokens where torch's generator
    # takes 5 ms (torch.multinomial, the same race, 7 ms).
    probs = torch.softmax(logits, dim=-1)
    rng = numpy.random.Generator(numpy.random.PCG64(step_seed(draw.seed, draw.n)))
    q = torch.from_numpy(rng.random(len(probs), dtype=numpy.float32)).log_().neg_()
    return int(probs.div_(q).argmax())


def _logprobs(
    x: torch.Tensor, draws: Sequence[Draw], tokens: list[int]
) -> list[TokenLogprob | None]:
    asking = [i for i, d in enumerate(draws) if d.params.logprobs is not None]
    out: list[TokenLogprob | None] = [None] * len(draws)
    if asking:
        ks = [draws[i].params.logprobs or 0 for i in asking]
        scored = token_logprobs(x[asking], [tokens[i] for i in asking], ks)
        for i, lp in zip(asking, scored, strict=True):
            out[i] = lp
    return out


def token_logprobs(x: torch.Tensor, tokens: list[int], ks: list[int]) -> list[TokenLogprob]:
    """logits [R, V] -> each row's logprob of its token and its top ks[r] alternatives
    (log_softmax in float32; one copy of what is asked to the host)."""
    lp = torch.log_softmax(x.float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()
    k = max(ks, default=0)
    values, indices = ([[]] * len(tokens), [[]] * len(tokens))
    if k:
        top = lp.topk(k, dim=-1)
        values, indices = top.values.tolist(), top.indices.tolist()
    return [  # a token a grammar forbids is no alternative
        TokenLogprob(
            t, c, [(i, v) for i, v in zip(indices[r][:n], values[r][:n], strict=True) if v > -inf]
        )
        for r, (t, c, n) in enumerate(zip(tokens, chosen, ks, strict=True))
    ]

"""Sampling a step's rows on the step's device (each row's parameters, validated at the
edge, are in `types`).

One batched pass over the step's logits [S, V] for any mix of settings, each row's
parameters a column: a grammar's mask (the tokens it forbids at -inf), logit bias, the
stop ids masked until min_tokens (unless the grammar allows nothing else: the grammar
wins), repetition / frequency / presence penalties (vLLM's definitions: repetition over
prompt and output, the other two over the output); then the logprobs of those asking (of
these processed logits, before temperature, as vLLM's default); then the draw: greedy
rows an argmax, the others temperature, min_p, top_k, top_p and an exponential race. No
row is visited by a Python loop and no logits leave the device: only the drawn ids (and
the logprobs asked for) are read back, once.

A sequence's n-th token is drawn with random numbers that are a hash of (seed, n, token)
alone, computed on the device: no state carries from one step to the next, so a
sequence's tokens do not depend on which other sequences share its batch, on how many
shards serve it, or on a preemption that recomputes it elsewhere.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from math import inf

import numpy
import torch

from gptoss_ray.model.types import SamplingParams, TokenLogprob


def _signed(value: int) -> int:
    """A 64-bit constant as the int64 that torch multiplies by (wrapping)."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads counters over the key space
_MIX1, _MIX2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)  # SplitMix64's


def step_seed(seed: int, n: int) -> int:
    """The key of a sequence's n-th draw (63 bits, an int64 on the device)."""
    return (seed * _GOLDEN + (n + 1) * 0xBF58476D1CE4E5B9) % (1 << 63)


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical shift of int64 (torch's >> keeps the sign)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def uniforms(keys: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """keys [S] int64 -> [S, count] float32 uniforms in (0, 1), number c of row r a
    SplitMix64 hash of (keys[r], start + c): counter-based, so the same on any batch and
    any device. 23 bits each: u + 1/2 needs 24, all a float32 holds, so no u is 0 or 1."""
    counters = torch.arange(start, start + count, dtype=torch.long, device=keys.device)
    z = keys[:, None] + counters * _signed(_GOLDEN)
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    z = z ^ _shift_right(z, 31)
    return (_shift_right(z, 41).float() + 0.5) * 2.0**-23


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
    logprobs (None for rows that did not ask). owned: the caller is done with `logits`,
    which may be overwritten (a step's logits are [64, 201088] floats: on a CPU a copy
    costs more than the draw)."""
    if logits.shape[0] != len(draws):
        raise ValueError(f"{logits.shape[0]} rows of logits for {len(draws)} draws")
    x, writable = _process(logits, draws, owned)
    asking = [i for i, d in enumerate(draws) if d.params.logprobs is not None]
    scores = torch.log_softmax(x[asking], dim=-1) if asking else None  # before the draw
    keys = [step_seed(d.seed, d.n) for d in draws]
    tokens = choose(x, [d.params for d in draws], keys, writable)
    host = tokens.tolist()  # the step's one read of the draw
    out: list[TokenLogprob | None] = [None] * len(draws)
    if scores is not None:
        ks = [draws[i].params.logprobs or 0 for i in asking]
        for i, lp in zip(
            asking, _read_logprobs(scores, [host[i] for i in asking], ks), strict=True
        ):
            out[i] = lp
    return host, out


def draw_one(logits: torch.Tensor, draw: Draw) -> int:
    """logits [V] -> the token `sample_rows` draws for this row."""
    return sample_rows(logits[None], [draw])[0][0]


def choose(
    x: torch.Tensor,
    params: Sequence[SamplingParams],
    keys: Sequence[int],
    writable: bool,
) -> torch.Tensor:
    """Processed float32 logits [S, V] -> the S drawn tokens on their device: greedy rows
    (temperature 0) the argmax, the others drawn under their temperature, min_p, top_k and
    top_p with the row's key. writable: x may be overwritten."""
    hot = [i for i, p in enumerate(params) if p.temperature > 0]
    if not hot:
        return _argmax(x)
    greedy = _argmax(x) if len(hot) < len(params) else None
    weights = x if greedy is None and writable else x[hot]
    chosen = [params[i] for i in hot]
    drawn = _draw(
        _truncate(weights, chosen),
        torch.tensor([keys[i] for i in hot], dtype=torch.long, device=x.device),
        torch.tensor([[p.top_p] for p in chosen], device=x.device)
        if any(p.top_p < 1 for p in chosen)
        else None,
    )
    if greedy is None:
        return drawn
    return greedy.index_copy_(0, torch.tensor(hot, device=x.device), drawn)


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """Each row's first largest: on a CPU max's indices, 5x faster there than argmax on
    [64, 201088]; elsewhere argmax, whose first-of-ties is documented."""
    return x.max(dim=-1).indices if x.device.type == "cpu" else x.argmax(dim=-1)


def _truncate(y: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """y [S, V] logits, overwritten -> each row's weights after temperature (in a scale of
    its own), zero where min_p or top_k cut the token (vLLM's order: min_p, then top_k on
    what it kept; top_p is the draw's). Both keep a row's weights from a floor up."""
    vocab = y.shape[1]

    def column(values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=y.device)[:, None]

    y.sub_(y.amax(dim=-1, keepdim=True))
    temperatures = [p.temperature for p in params]
    if any(t != 1 for t in temperatures):
        y.div_(column(temperatures))
    y.exp_()  # the largest weight of a row is 1
    floor = None
    if any(p.min_p for p in params):
        floor = column([p.min_p for p in params])
    ks = [p.top_k if p.top_k < vocab else 0 for p in params]
    if any(ks):
        k = column(ks, torch.long)
        kth = y.topk(max(ks), dim=-1).values.gather(1, (k - 1).clamp_(min=0))
        kth = torch.where(k > 0, kth, 0.0)
        floor = kth if floor is None else torch.maximum(floor, kth)
    if floor is not None:  # above the float just under the floor: from the floor up
        _keep_above(y, torch.nextafter(floor, torch.zeros_like(floor)))
    return y


def _keep_above(y: torch.Tensor, level: torch.Tensor) -> None:
    """Zeroes each row's weights at or under its level [S, 1], and scales the row by
    1 / level: w / level > 1 exactly when w > level (IEEE division), and the race does not
    mind a row's scale, so it is two passes, where a mask costs an allocation. A level
    under 2^-100 is taken as 2^-100: the row loses weights under 1e-30 of its top one
    (below float32's resolution of its sum), and no sum of 201088 weights overflows."""
    torch.nn.functional.threshold_(y.div_(level.clamp(min=2.0**-100)), 1.0, 0.0)


@cache
def _block(vocab: int) -> int:
    """The race's block: the largest power of two up to 128 that divides the vocabulary
    (o200k's 201088 = 128 x 1571)."""
    return next(b for b in (128, 64, 32, 16, 8, 4, 2, 1) if vocab % b == 0)


def _draw(weights: torch.Tensor, keys: torch.Tensor, top_p: torch.Tensor | None) -> torch.Tensor:
    """weights [S, V] (overwritten), keys [S], top_p [S, 1] or None -> each row's token i
    with probability weight_i / the kept mass: top_p keeps the most likely tokens while
    the mass before them is under top_p of the row's (the first always; tokens of equal
    weight together).

    Without a sort: a token drawn from a set of the most likely tokens is kept when the
    mass above it is under top_p; if not, neither is any token as light, and the next
    round draws again from the heavier ones only. Each round's draw is in proportion to
    weight within a set that holds the nucleus, so the token kept has the nucleus's
    distribution; each round is two passes over the weights, and the top token always
    ends its row's rounds."""
    rows, vocab = weights.shape
    size = _block(vocab)
    blocks = weights.view(rows, vocab // size, size)
    mass = blocks.sum(dim=-1)
    token = _race(blocks, mass, keys, 0)
    if top_p is None:
        return token
    limit = top_p * mass.sum(dim=-1, keepdim=True)
    chosen = token
    done = torch.zeros(rows, dtype=torch.bool, device=weights.device)
    for round in itertools.count(1):
        level = weights.gather(1, token[:, None])
        _keep_above(weights, level)  # what is heavier than the drawn token, in its units
        limit.div_(level.clamp(min=2.0**-100))
        mass = blocks.sum(dim=-1)
        kept = mass.sum(dim=-1) < limit[:, 0]
        chosen = torch.where(kept & ~done, token, chosen)
        done |= kept
        if bool(done.all()):  # a host read a round: the rounds a batch needs are its own
            return chosen
        token = _race(blocks, mass, keys, round)
    raise AssertionError("unreachable")


def _race(blocks: torch.Tensor, mass: torch.Tensor, keys: torch.Tensor, round: int) -> torch.Tensor:
    """blocks [S, V / size, size] weights (not all zero in a row) and their sums [S, V /
    size], keys [S] -> each row's token i with probability weight_i / sum: the exponential
    race, argmax w_i / q_i with q_i ~ Exp(1). Unlike an inverse CDF (where a change of 1e-7
    anywhere moves every later boundary) it flips only when two leaders tie to that
    precision, so seeded replies stay put under float noise. Run in two steps, blocks by
    their mass and then a token of the winning block by its weight (the same
    distribution), it needs V/128 + 128 random numbers a row instead of V; each `round`
    of a draw has numbers of its own."""
    rows, count, size = blocks.shape
    start = round * (count + size)
    block = (mass / -uniforms(keys, start, count).log_()).argmax(dim=-1)
    within = blocks.gather(1, block[:, None, None].expand(rows, 1, size))[:, 0]
    token = (within / -uniforms(keys, start + count, size).log_()).argmax(dim=-1)
    return block * size + token


def _process(logits: torch.Tensor, draws: Sequence[Draw], owned: bool) -> tuple[torch.Tensor, bool]:
    """Grammar masks, bias, min_tokens and penalties on float32 logits -> (them, whether
    they may be overwritten). A copy unless `owned`; the logits themselves when no row
    has any."""
    constrained = [i for i, d in enumerate(draws) if d.allowed is not None]
    biased = [i for i, d in enumerate(draws) if d.params.logit_bias]
    held = [i for i, d in enumerate(draws) if d.n < d.params.min_tokens and d.stop_ids]
    penalized = [i for i, d in enumerate(draws) if d.params.penalized]
    x = logits.float()
    writable = owned or x is not logits
    if not (constrained or biased or held or penalized):
        return x, writable
    if not writable:
        x, writable = x.clone(), True
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
        cells = [
            (i, token, bias)
            for i in biased
            for token, bias in draws[i].params.logit_bias.items()  # type: ignore[union-attr]
            if token < vocab
        ]
        rows, cols, values = zip(*cells, strict=True) if cells else ((), (), ())
        x.index_put_(
            (torch.tensor(rows, device=device), torch.tensor(cols, device=device)),
            torch.tensor(values, device=device, dtype=x.dtype),
            accumulate=True,
        )
    cells = [(h, i, t) for h, i in enumerate(held) for t in sorted(draws[i].stop_ids) if t < vocab]
    if cells:
        which, rows, cols = (torch.tensor(c, device=device) for c in zip(*cells, strict=True))
        kept = x[rows, cols]
        x[rows, cols] = -inf
        # a row left with nothing (a grammar that allows only a stop id) draws it anyway
        dead = ~(x[held] > -inf).any(dim=1)
        x[rows, cols] = torch.where(dead[which], kept, -inf)
    if penalized:
        _penalize_(x, penalized, draws)
    return x, writable


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


def _penalize_(x: torch.Tensor, penalized: list[int], draws: Sequence[Draw]) -> None:
    """x [S, V] float32, in place: rows `penalized` with their penalties applied (vLLM's: a
    repeated token's positive logit divided by repetition_penalty, a negative one
    multiplied; then frequency x its count and presence x (count > 0) subtracted). Only
    the cells of the rows' histories are touched: no [S, V] pass, no host read."""
    vocab, device = x.shape[1], x.device
    rows = [draws[i] for i in penalized]

    def occurrences(lists: list[list[int]], *values: list[float]) -> list[torch.Tensor]:
        """Every token of each row's list under the vocabulary: [row, token, *values]."""
        lengths = torch.tensor([len(t) for t in lists])
        tokens = torch.tensor(list(itertools.chain.from_iterable(lists)), dtype=torch.long)
        columns = [torch.tensor(penalized), *(torch.tensor(v) for v in values)]
        kept = tokens < vocab
        out = [c.repeat_interleave(lengths)[kept] for c in columns]
        return [t.to(device) for t in (out[0], tokens[kept], *out[1:])]

    if any(d.params.repetition_penalty != 1 for d in rows):
        seen = [list(d.prompt) + list(d.output) for d in rows]
        row, token, rep = occurrences(seen, [d.params.repetition_penalty for d in rows])
        value = x[row, token]  # a token seen twice is written twice, with the same value
        x[row, token] = torch.where(value > 0, value / rep, value * rep)
    row, token, frequency, presence = occurrences(
        [list(d.output) for d in rows],
        [d.params.frequency_penalty for d in rows],
        [d.params.presence_penalty for d in rows],
    )
    # each (row, token) once, at the first of its run in sorted order, with its count
    cell, order = (row * vocab + token).sort()
    first = torch.ones_like(cell, dtype=torch.bool)
    first[1:] = cell[1:] != cell[:-1]
    position = torch.arange(len(cell), device=device)
    start = torch.where(first, position, 0).cummax(0).values
    count = torch.zeros(len(cell), device=device).index_add_(
        0, start, torch.ones(len(cell), device=device)
    )
    delta = torch.where(first, frequency[order] * count + presence[order], 0.0)
    x.index_put_((row[order], token[order]), -delta, accumulate=True)  # adding 0 is exact


def token_logprobs(x: torch.Tensor, tokens: list[int], ks: list[int]) -> list[TokenLogprob]:
    """logits [R, V] -> each row's logprob of its token and its top ks[r] alternatives
    (log_softmax in float32; one copy of what is asked to the host)."""
    return _read_logprobs(torch.log_softmax(x.float(), dim=-1), tokens, ks)


def _read_logprobs(lp: torch.Tensor, tokens: list[int], ks: list[int]) -> list[TokenLogprob]:
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

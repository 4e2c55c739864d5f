"""The batched sampler against a direct computation, row by row: logit bias, min_tokens,
repetition / frequency / presence penalties, min_p, and the logprobs of what the draw
used (after penalties and bias, before temperature)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from pydantic import ValidationError

from gptoss_ray.model.sampling import Draw, draw_one, sample_rows
from gptoss_ray.model.types import SamplingParams

VOCAB = 64
STOPS = frozenset({60, 61})


def logits_for(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def by_hand(row: torch.Tensor, d: Draw) -> torch.Tensor:
    """What vLLM's documentation says each setting does, one token at a time."""
    x = row.clone().tolist()
    p = d.params
    for token, bias in (p.logit_bias or {}).items():
        x[token] += bias
    if d.n < p.min_tokens:
        for t in d.stop_ids:
            x[t] = float("-inf")
    seen = set(d.prompt) | set(d.output)
    for t in range(VOCAB):
        if t in seen and p.repetition_penalty != 1:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        count = list(d.output).count(t)
        x[t] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
    return torch.tensor(x)


def mixed_draws() -> list[Draw]:
    prompt, output = [1, 2, 3, 3, 7], [3, 9, 9, 9, 12]
    return [
        Draw(SamplingParams(temperature=0, logprobs=5), 1, 0),
        Draw(SamplingParams(temperature=0, logit_bias={4: 7.5, 8: -30}, logprobs=3), 2, 2),
        Draw(
            SamplingParams(
                temperature=0.9, presence_penalty=1.5, frequency_penalty=0.7, logprobs=0
            ),
            3,
            5,
            prompt,
            output,
        ),
        Draw(
            SamplingParams(temperature=0, repetition_penalty=1.8, logprobs=20), 4, 5, prompt, output
        ),
        Draw(SamplingParams(temperature=1.2, min_tokens=4, logprobs=2), 5, 1, stop_ids=STOPS),
        Draw(SamplingParams(temperature=0.7, min_p=0.1, top_k=10), 6, 3),
        Draw(
            SamplingParams(
                temperature=0,
                repetition_penalty=0.6,
                frequency_penalty=-1.0,
                logit_bias={3: 2.0},
                min_tokens=8,
                logprobs=4,
            ),
            7,
            5,
            prompt,
            output,
            STOPS,
        ),
    ]


def test_every_setting_matches_a_direct_computation_in_a_mixed_batch():
    logits = logits_for(7)
    draws = mixed_draws()
    tokens, logprobs = sample_rows(logits, draws)
    for i, d in enumerate(draws):
        want = by_hand(logits[i], d)
        if d.params.temperature == 0:
            assert tokens[i] == int(want.argmax())
        # each row alone draws what it draws in the batch
        assert draw_one(logits[i], d) == tokens[i]
        if d.params.logprobs is None:
            assert logprobs[i] is None
            continue
        lp = torch.log_softmax(want, dim=-1)
        got = logprobs[i]
        assert got.token == tokens[i]
        assert got.logprob == pytest.approx(float(lp[tokens[i]]), abs=1e-5)
        top = torch.topk(lp, d.params.logprobs)
        assert [t for t, _ in got.top] == top.indices.tolist()
        assert [v for _, v in got.top] == pytest.approx(top.values.tolist(), abs=1e-5)


def test_a_bias_of_minus_100_bans_a_token_and_plus_100_forces_it():
    logits = logits_for(1, seed=3)[0]
    favourite = int(logits.argmax())
    banned = SamplingParams(temperature=1.0, logit_bias={favourite: -100})
    assert all(draw_one(logits, Draw(banned, s, 0)) != favourite for s in range(300))
    forced = SamplingParams(temperature=0, logit_bias={17: 100})
    assert {draw_one(logits_for(1, seed=s)[0], Draw(forced, s, 0)) for s in range(50)} == {17}


def test_min_tokens_holds_back_the_stop_ids_until_then():
    logits = logits_for(1, seed=4)[0]
    logits[60] = 50.0  # a stop id the model wants badly
    params = SamplingParams(temperature=1.0, min_tokens=3)
    before = {
        draw_one(logits, Draw(params, s, n, stop_ids=STOPS)) for s in range(50) for n in (0, 2)
    }
    assert 60 not in before and 61 not in before
    assert draw_one(logits, Draw(params, 0, 3, stop_ids=STOPS)) == 60


def test_min_p_keeps_only_tokens_near_the_top():
    logits = torch.tensor([4.0, 3.9, 1.0, 0.0] + [-5.0] * (VOCAB - 4))
    params = SamplingParams(temperature=1.0, min_p=0.5)
    assert {draw_one(logits, Draw(params, s, 0)) for s in range(200)} == {0, 1}


def test_penalties_steer_away_from_repeats():
    logits = torch.full((VOCAB,), 0.3)
    logits[5] = 1.0
    output = [5, 5, 5]
    plain = SamplingParams(temperature=0)
    assert draw_one(logits, Draw(plain, 0, 3, (), output)) == 5
    for params in (
        SamplingParams(temperature=0, frequency_penalty=1.0),
        SamplingParams(temperature=0, presence_penalty=2.0),
        SamplingParams(temperature=0, repetition_penalty=5.0),
    ):
        assert draw_one(logits, Draw(params, 0, 3, (), output)) != 5


def test_bad_sampling_fields_name_the_field():
    for kwargs, field in [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"logprobs": 21}, "logprobs"),
        ({"min_tokens": 20, "max_tokens": 4}, "min_tokens 20 exceeds max_tokens 4"),
        ({"logit_bias": {5: 150}}, r"logit_bias\[5\]: 150"),
        ({"logit_bias": {-1: 1}}, "token id -1"),
    ]:
        with pytest.raises(ValidationError, match=field):
            SamplingParams(**kwargs)


def test_penalties_see_the_whole_history_after_preemption_and_prefix_hits():
    """A shard learns a penalized sequence's earlier tokens when it is placed (`context`):
    recomputed after a preemption, or starting from another request's cached blocks, it
    draws what the single-process baseline draws."""
    from gptoss_ray.model.generate import generate
    from gptoss_ray.model.types import KVLayout
    from tests.engine_cases import baseline_model, prompts, tiny_core

    shared = prompts()[4][:48]  # three whole blocks that later requests find cached
    ps = [shared + p for p in prompts()[:6]]
    params = SamplingParams(
        max_tokens=12,
        temperature=0.8,
        seed=3,
        ignore_eos=True,
        repetition_penalty=1.5,
        frequency_penalty=0.8,
        presence_penalty=0.4,
        logprobs=2,
    )
    layout = KVLayout(16, 14, 24)  # too few blocks for all six: preemptions
    core = tiny_core(layout, token_budget=40)
    first = core.submit(ps[0], params)
    core.run_until_done()  # its blocks are cached when the others come
    ids = [first] + [core.submit(p, params) for p in ps[1:]]
    core.run_until_done()
    assert core.stats.preemptions > 0
    assert sum(s["hit_tokens"] for s in core.snapshot()["prefix_cache"]) > 0
    want = generate(baseline_model(), ps, params)
    for rid, w in zip(ids, want, strict=True):
        out = core.output(rid)
        assert out.token_ids == w.token_ids
        assert [lp.token for lp in out.logprobs] == w.token_ids
        assert [lp.logprob for lp in out.logprobs] == pytest.approx(
            [lp.logprob for lp in w.logprobs], abs=1e-5
        )


@pytest.mark.parametrize("full_blocks", [64, 9], ids=["roomy", "preempting"])
def test_prompt_logprobs_match_transformers_across_chunks(full_blocks):
    """Every prompt token's logprob (and top 5) from the shard, the prompt computed in
    chunks (each chunk's last row scores the next chunk's first token) and, with few
    blocks, again after preemptions (each position kept once): log_softmax of the
    oracle's logits. A scored prompt takes no cached prefix: cached blocks have no
    logits."""
    from gptoss_ray.model.types import KVLayout
    from tests.engine_cases import assert_logprobs_match_transformers, prompts, tiny_core

    layout = KVLayout(16, full_blocks, 32)
    core = tiny_core(layout, token_budget=24)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, prompt_logprobs=5)
    ps = [prompts()[2], prompts()[4]]  # 70 and 100 tokens
    core.submit(ps[0], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    core.run_until_done()  # ps[0]'s blocks are cached: the scored request must not use them
    ids = [core.submit(p, params) for p in ps]
    core.run_until_done()
    if full_blocks == 9:
        assert core.stats.preemptions > 0
    for rid, prompt in zip(ids, ps, strict=True):
        scored = core.output(rid).prompt_logprobs
        assert scored[0] is None and len(scored) == len(prompt)
        assert_logprobs_match_transformers(prompt[:1], prompt[1:], scored[1:])


# -- the draw's distribution and its independence from the batch -------------------------
def exact_probabilities(x: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """What each setting's definition gives for logits x [V], in float64: temperature,
    then min_p on those probabilities, top_k on what min_p kept, top_p on what top_k kept
    (sorted, kept while the mass before a token is under top_p)."""
    probs = torch.softmax(x.double() / p.temperature, dim=-1)
    keep = probs >= p.min_p * probs.max()
    if p.top_k:
        keep &= probs >= probs.masked_fill(~keep, 0).topk(p.top_k).values[-1]
    kept = probs.masked_fill(~keep, 0)
    ordered, order = kept.sort(descending=True)
    before = ordered.cumsum(0) - ordered
    nucleus = torch.zeros_like(keep)
    nucleus[order] = before < p.top_p * ordered.sum()
    final = kept.masked_fill(~nucleus, 0)
    return final / final.sum()


def chi_square_bound(dof: int, z: float = 4.265) -> float:
    """The chi-square quantile with `dof` degrees of freedom at the normal quantile z
    (4.265: a false alarm once in 100 000 runs), by Wilson and Hilferty."""
    return dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.6),
        SamplingParams(temperature=1.3, top_p=0.7),
        SamplingParams(temperature=1.0, top_k=9),
        SamplingParams(temperature=0.9, min_p=0.05),
        SamplingParams(temperature=1.1, min_p=0.02, top_k=20, top_p=0.8),
    ],
    ids=["t1", "t0.6", "top_p", "top_k", "min_p", "all"],
)
def test_draws_follow_the_exact_distribution(params):
    """20 000 seeded draws from one row of 48 logits (three blocks of the race's two
    rounds) against the definition's probabilities: never a token without mass, and a
    chi-square test over the tokens expected at least 5 times."""
    x = torch.randn(48, generator=torch.Generator().manual_seed(7)) * 1.5
    want = exact_probabilities(x, params)
    draws = [Draw(params, seed, 0) for seed in range(20_000)]
    tokens, _ = sample_rows(x.expand(len(draws), -1).contiguous(), draws, owned=True)
    counts = torch.bincount(torch.tensor(tokens), minlength=48).double()
    assert counts[want == 0].sum() == 0
    expected = want * len(draws)
    big = expected >= 5
    stat = float(((counts[big] - expected[big]) ** 2 / expected[big]).sum())
    rest = counts[~big].sum() - expected[~big].sum()
    if expected[~big].sum() > 0:
        stat += float(rest**2 / expected[~big].sum())
    dof = int(big.sum()) - (0 if expected[~big].sum() > 0 else 1)
    assert stat < chi_square_bound(max(dof, 1)), (stat, dof)


def test_the_random_numbers_are_the_hash_of_key_and_counter():
    """SplitMix64 of key + counter x golden ratio, computed here with Python's integers:
    the device's wrapping int64 arithmetic gives the same bits."""
    from gptoss_ray.model.sampling import uniforms

    def splitmix(z: int) -> int:
        m = (1 << 64) - 1
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return z ^ (z >> 31)

    keys = [0, 1, (1 << 63) - 1, 0x5DEECE66D]
    got = uniforms(torch.tensor(keys), 5, 4)
    for r, key in enumerate(keys):
        for c in range(4):
            bits = splitmix((key + (5 + c) * 0x9E3779B97F4A7C15) & ((1 << 64) - 1)) >> 41
            assert float(got[r, c]) == (bits + 0.5) / 2**23


def batch_invariance_failures(sample) -> list[str]:
    """Rows drawn alone vs in batches of 16 in two orders (greedy and sampled rows, every
    setting mixed): the failures, as text. `sample(logits, draws)` -> tokens."""
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(16, 300, generator=g) * 2
    settings = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, top_p=0.9),
        SamplingParams(temperature=0.7, top_k=40),
        SamplingParams(temperature=1.2, min_p=0.05, presence_penalty=0.5),
    ]
    draws = [Draw(settings[i % 4], 100 + i, i, [1, 2, 3], [5, 5, 7], STOPS) for i in range(16)]
    alone = [sample(logits[i : i + 1].clone(), [d])[0] for i, d in enumerate(draws)]
    order = torch.randperm(16, generator=g).tolist()
    failures = []
    for name, rows in [("in order", list(range(16))), ("shuffled", order)]:
        got = sample(logits[rows].clone(), [draws[i] for i in rows])
        failures += [
            f"{name}: row {i} drew {t}, alone {alone[i]}"
            for i, t in zip(rows, got, strict=True)
            if t != alone[i]
        ]
    return failures


def test_a_row_draws_the_same_alone_and_in_any_batch():
    assert batch_invariance_failures(lambda x, d: sample_rows(x, d)[0]) == []


def test_the_batch_invariance_test_catches_rows_swapped_in_the_batch():
    """The mutation: the sampler hands the draws' seeds to the wrong rows."""

    def swapped(x, draws):
        if len(draws) > 1:
            a, b = draws[0], draws[1]
            draws = [replace(a, seed=b.seed, n=b.n), replace(b, seed=a.seed, n=a.n), *draws[2:]]
        return sample_rows(x, draws)[0]

    assert batch_invariance_failures(swapped) != []


@pytest.mark.parametrize("world", [1, 2])
def test_a_seeded_reply_is_the_same_alone_in_a_batch_of_16_and_after_preemption(world):
    """float32, on `world` shard processes: a seeded, sampled request (temperature 1,
    top-p 0.9) alone, then among 15 others, then among them with too few KV blocks (its
    tokens recomputed after preemptions): the same tokens each time."""
    from gptoss_ray.cluster.engine.core import EngineCore
    from gptoss_ray.model.model_folder import read_config, resolve_model
    from gptoss_ray.model.types import KVLayout
    from gptoss_ray.shards.local_group import LocalShardGroup
    from tests.engine_cases import prompts

    mine = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=42, ignore_eos=True)
    others = [mine.model_copy(update={"seed": s, "max_tokens": 20}) for s in range(15)]
    config = read_config(resolve_model("gpt-oss-tiny"))

    def run(layout: KVLayout, group, batch: bool) -> tuple[list[int], int]:
        core = EngineCore(config, world, layout, launch_step=group.launch, token_budget=48)
        rid = core.submit(prompts()[4], mine)
        if batch:
            for i, p in enumerate(others):
                core.submit(prompts()[i % 10], p)
        core.run_until_done()
        return core.output(rid).token_ids, core.stats.preemptions

    roomy, tight = KVLayout(16, 160, 160), KVLayout(16, 14, 40)
    with LocalShardGroup("gpt-oss-tiny", world, dtype=torch.float32, kv_layout=roomy) as group:
        alone, _ = run(roomy, group, False)
        in_batch, _ = run(roomy, group, True)
    with LocalShardGroup("gpt-oss-tiny", world, dtype=torch.float32, kv_layout=tight) as group:
        preempted, preemptions = run(tight, group, True)
    assert preemptions > 0
    assert in_batch == alone and preempted == alone

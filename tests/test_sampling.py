"""The batched sampler against a direct computation, row by row: logit bias, min_tokens,
repetition / frequency / presence penalties, min_p, and the logprobs of what the draw
used (after penalties and bias, before temperature)."""

from __future__ import annotations

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

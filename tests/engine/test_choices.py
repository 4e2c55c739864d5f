"""n choices of one prompt: the prompt is prefilled once, the choices share its whole KV
blocks and each gets its own copy of the block the prompt ends in; choice i draws what a
request for one choice with seed + i draws."""

from __future__ import annotations

import pytest

from gptoss_ray.cluster.engine.core import EngineCore, choice_ids
from gptoss_ray.model.generate import generate
from gptoss_ray.model.types import KVLayout, SamplingParams
from tests.engine_cases import baseline_model, prompts, tiny_core

HOT = dict(max_tokens=10, temperature=1.0, top_k=40, ignore_eos=True)


def core_on(layout: KVLayout, overlap: bool, token_budget: int = 48) -> EngineCore:
    return tiny_core(layout, overlap=overlap, token_budget=token_budget)


def one_by_one(prompt: list[int], seed: int, n: int, **params) -> list[tuple[list[int], list]]:
    """The single-process baseline: n requests of one choice, seeds seed .. seed+n-1."""
    out = []
    for i in range(n):
        (c,) = generate(baseline_model(), [prompt], SamplingParams(seed=seed + i, **params))
        out.append((c.token_ids, [lp.logprob for lp in c.logprobs or []]))
    return out


# 40 tokens: the prompt ends inside a block (copied); 64: on a block's end (all shared);
# 100: longer than the token budget (chunked) and than the sliding window
@pytest.mark.parametrize("length", [40, 64, 100])
@pytest.mark.parametrize("overlap", [False, True], ids=["one-at-a-time", "overlapped"])
def test_n_choices_equal_n_seeded_requests_and_prefill_once(length, overlap):
    prompt = (prompts()[4] * 2)[:length]
    core = core_on(KVLayout(16, 64, 64), overlap)
    rid = core.submit(prompt, SamplingParams(n=4, seed=20, logprobs=2, **HOT))
    core.run_until_done()
    out = core.output(rid)
    assert out.finished and len(out.choices) == 4
    assert [c.request_id for c in out.choices] == choice_ids(rid, 4)
    want = one_by_one(prompt, 20, 4, logprobs=2, **HOT)
    got = [(c.token_ids, [lp.logprob for lp in c.logprobs]) for c in out.choices]
    for (tokens, lps), (want_tokens, want_lps) in zip(got, want, strict=True):
        assert tokens == want_tokens
        # float32 rounding of other batch shapes, which varies with the CPU's vector width
        # (1.0e-5 seen on an AVX-512 EPYC)
        assert lps == pytest.approx(want_lps, abs=5e-5)
    assert len({tuple(t) for t, _ in got}) > 1  # the choices differ
    assert core.stats.prefill_tokens == length  # the prompt was computed once
    assert core.scheduler.free_blocks(0)[0] == 64  # every block came back
    core.forget(rid)
    assert not core.requests


def test_choices_with_penalties_preemption_late_arrivals_and_cancel():
    """Too few blocks for everything at once: choices and other requests are preempted
    and recomputed, and still draw what they draw alone; cancel ends every choice."""
    params = SamplingParams(n=3, seed=5, repetition_penalty=1.4, presence_penalty=0.5, **HOT)
    core = core_on(KVLayout(16, 14, 40), overlap=True, token_budget=32)
    ps = [prompts()[i] for i in (1, 2, 7)]
    ids = [core.submit(p, params) for p in ps[:2]]
    for _ in range(3):
        core.step()
    ids.append(core.submit(ps[2], params))
    doomed = core.submit(prompts()[4], SamplingParams(n=2, max_tokens=30, ignore_eos=True))
    core.step()
    core.cancel(doomed)
    core.run_until_done()
    assert core.stats.preemptions > 0
    penalties = dict(repetition_penalty=1.4, presence_penalty=0.5, **HOT)
    for rid, prompt in zip(ids, ps, strict=True):
        got = [c.token_ids for c in core.output(rid).choices]
        assert got == [t for t, _ in one_by_one(prompt, 5, 3, **penalties)]
    cancelled = core.output(doomed).choices
    assert [c.finish_reason for c in cancelled] == ["cancelled", "cancelled"]
    assert core.scheduler.free_blocks(0)[0] == 14

"""The expert-parallel engine on Ray with CPU shards and gloo: token-identical to the
single-process baseline for any shard count."""

from __future__ import annotations

import time

import pytest

from gptoss_ray.cluster.client.engine import Engine
from gptoss_ray.model.types import RequestError, SamplingParams
from tests.engine_cases import GREEDY, baseline, prompts

SEEDED = SamplingParams(max_tokens=8, temperature=0.8, top_k=50, seed=11, ignore_eos=True)


# (shards, steps through a Ray compiled graph or plain actor calls, overlapped steps or
# one at a time): both ways of driving the shards, each with an even and an odd shard
# count, each overlapped and not
@pytest.fixture(
    scope="module", params=[(1, False, True), (2, True, True), (3, True, False), (4, False, False)]
)
def engine(request, ray_session):
    shards, compiled, overlap = request.param
    eng = Engine.start(
        "gpt-oss-tiny",
        shards=shards,
        dtype="float32",
        token_budget=64,
        compiled_steps=compiled,
        overlap=overlap,
    )
    yield eng
    eng.shutdown()


def test_greedy_tokens_match_the_baseline_with_late_arrivals(engine):
    ps = prompts()
    early = [engine.submit(p, GREEDY) for p in ps[:5]]
    # wait until the first requests are decoding, then add the rest
    while engine.stats()["generated_tokens"] == 0:
        time.sleep(0.01)
    late = [engine.submit(p, GREEDY) for p in ps[5:]]
    outs = [engine.result(s) for s in early + late]
    assert tuple(tuple(o.token_ids) for o in outs) == baseline()
    assert all(o.finish_reason == "length" for o in outs)


def test_seeded_sampling_is_the_same_for_every_shard_count(engine):
    outs = engine.generate(prompts(), SEEDED)
    assert tuple(tuple(o.token_ids) for o in outs) == baseline(SEEDED)


MIXED = [
    SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=20),
    SamplingParams(
        max_tokens=8,
        temperature=0.9,
        seed=5,
        ignore_eos=True,
        presence_penalty=1.2,
        frequency_penalty=0.5,
        repetition_penalty=1.3,
        logit_bias={17: 5.0, 99: -100.0},
        min_p=0.05,
        logprobs=3,
    ),
    SamplingParams(max_tokens=8, temperature=0, min_tokens=8, repetition_penalty=0.7),
    SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0, prompt_logprobs=5),
]


def test_mixed_sampling_settings_and_logprobs_in_one_step(engine):
    """Any mix of penalties, bias, min_p, min_tokens and logprobs in one batch: each
    request gets what the single-process baseline gives it alone, and plain logprobs
    (top 20) equal log_softmax of transformers' logits for the same prefix."""
    from gptoss_ray.model.generate import generate
    from tests.engine_cases import assert_logprobs_match_transformers, baseline_model

    ps = [prompts()[i] for i in (1, 4, 8, 2)]  # the last, 70 tokens, is scored in chunks
    outs = engine.generate(ps, MIXED)
    for prompt, params, out in zip(ps, MIXED, outs, strict=True):
        (want,) = generate(baseline_model(), [prompt], params)
        assert out.token_ids == want.token_ids
        if params.logprobs is None:
            assert out.logprobs is None
            continue
        for got, lp in zip(out.logprobs, want.logprobs, strict=True):
            assert got.token == lp.token and abs(got.logprob - lp.logprob) < 1e-5
            assert [t for t, _ in got.top] == [t for t, _ in lp.top]
    assert_logprobs_match_transformers(ps[0], outs[0].token_ids, outs[0].logprobs)
    assert_logprobs_match_transformers(ps[3], outs[3].token_ids, outs[3].logprobs)
    scored = outs[3].prompt_logprobs  # the prompt's own tokens, as echo reports them
    assert scored[0] is None and len(scored) == len(ps[3])
    assert_logprobs_match_transformers(ps[3][:1], ps[3][1:], scored[1:])


def test_n_choices_are_prefilled_once_and_equal_seeded_requests(engine):
    from gptoss_ray.model.generate import generate
    from tests.engine_cases import baseline_model

    # 40 tokens no other test sends (none cached): the prompt ends inside a block (copied)
    prompt = prompts()[1][::-1]
    hot = dict(max_tokens=6, temperature=1.0, ignore_eos=True)
    before = engine.stats()["prefill_tokens"]
    (out,) = engine.generate([prompt], SamplingParams(n=3, seed=9, **hot))
    assert engine.stats()["prefill_tokens"] - before == len(prompt)
    want = [
        generate(baseline_model(), [prompt], SamplingParams(seed=9 + i, **hot)) for i in range(3)
    ]
    assert [c.token_ids for c in out.choices] == [w[0].token_ids for w in want]


def test_shards_with_nothing_local_still_take_part(engine):
    # one request: with W > 1 every other shard has no sequence, yet its experts serve it
    (out,) = engine.generate([prompts()[1]], GREEDY)
    assert tuple(out.token_ids) == baseline()[1]
    info = engine.info()
    assert len(info["expert_ranges"]) == info["shards"]


def test_a_bad_request_is_rejected_alone(engine):
    ps = prompts()
    requests = [ps[0], [5, 300000], ps[2], [], ps[3]]
    outs = engine.generate(requests, GREEDY)
    assert isinstance(outs[1], RequestError) and "300000" in str(outs[1])
    assert isinstance(outs[3], RequestError) and "empty" in str(outs[3])
    assert [tuple(outs[i].token_ids) for i in (0, 2, 4)] == [baseline()[i] for i in (0, 2, 3)]


def test_stream_yields_tokens_as_they_come(engine):
    deltas = list(engine.stream(prompts()[0], GREEDY))
    assert tuple(t for d in deltas for t in d) == baseline()[0]
    assert len(deltas) > 1


def test_chat_returns_a_parsed_reply_with_usage(engine):
    request = {
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 6,
        "temperature": 0,
    }
    bad = [
        {"messages": [{"role": "wizard", "content": "x"}]},
        {**request, "max_tokens": -1},
        {**request, "top_p": 0},
        {**request, "max_tokens": 131072},  # prompt + max_tokens beyond the context
    ]
    reply, *errors = engine.chat([request, *bad])
    assert reply["usage"]["completion_tokens"] == 6
    assert reply["finish_reason"] == "length"  # random weights: it never says <|return|>
    assert reply["message"]["role"] == "assistant"
    assert "messages[0].role" in str(errors[0])
    assert "max_tokens: Input should be greater than or equal to 1" in str(errors[1])
    assert "top_p: Input should be greater than 0" in str(errors[2])
    assert "exceed the context length 131072" in str(errors[3])


def test_an_idle_engine_parks_its_shards_and_wakes_them(engine):
    """Idle is idle: after a second without work the shards are parked in a blocking call
    (a compiled graph, whose readers poll, is torn down, and gloo shards leave their
    process group); `status` still answers, and the next request wakes them (forming the
    group and building the graph again) and is exact."""
    import time

    import ray

    def coordinator(fn):
        return ray.get(engine.coordinator.__ray_call__.remote(fn))

    engine.generate([prompts()[0]], GREEDY)
    time.sleep(2.5)  # past IDLE_AFTER_S
    assert coordinator(lambda c: (c._idle, c._wake.is_set(), c._dag)) == (True, False, None)
    start = time.monotonic()
    status = ray.get(engine.coordinator.status.remote(), timeout=30)
    assert time.monotonic() - start < 10
    assert len(status["shards_detail"]) == engine.info()["shards"]
    assert not any(d["in_process_group"] for d in status["shards_detail"])
    assert coordinator(lambda c: c._wake.is_set()) is False  # parked again
    expected = baseline()[1]  # (computed once, in this process: it may take a while)
    # long enough to be still running when the engine is asked whether it woke (asked
    # after the reply, a loaded machine could let it go idle again first)
    tokens = []
    for new_ids in engine.stream(prompts()[1], GREEDY.model_copy(update={"max_tokens": 64})):
        if not tokens:
            awake = coordinator(
                lambda c: not c._idle and not (c._compiled_steps and c._dag is None)
            )
        tokens += new_ids
    assert awake
    assert tuple(tokens[: len(expected)]) == expected  # several shards: group formed again

import pytest
import torch
from pydantic import ValidationError

from gptoss_ray.model.checkpoint import Checkpoint, write_random_checkpoint
from gptoss_ray.model.generate import generate
from gptoss_ray.model.sampling import Draw, draw_one
from gptoss_ray.model.types import RequestError, SamplingParams
from tests.tiny import tiny_config

CONFIG = tiny_config(vocab_size=320)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = write_random_checkpoint(CONFIG, tmp_path_factory.mktemp("gen"), seed=11)
    return Checkpoint(folder).load(dtype=torch.float32)


PROMPTS = [[1, 2, 3], list(range(40, 61)), [7], list(range(100, 112))]


def test_batched_equals_one_at_a_time(model):
    params = SamplingParams(max_tokens=12, temperature=0)
    together = generate(model, PROMPTS, params)
    for prompt, c in zip(PROMPTS, together, strict=True):
        (alone,) = generate(model, [prompt], params)
        assert alone.token_ids == c.token_ids
        assert c.prompt_tokens == len(prompt) and len(c.token_ids) == 12


def test_stops_at_a_stop_token_and_includes_it(model):
    (free,) = generate(model, [PROMPTS[1]], SamplingParams(max_tokens=10, temperature=0))
    stop = free.token_ids[4]
    first = free.token_ids.index(stop)
    (c,) = generate(
        model, [PROMPTS[1]], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop])
    )
    assert c.token_ids == free.token_ids[: first + 1] and c.finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(model):
    params = [
        SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=s) for s in (1, 2, 3, 4)
    ]
    a = generate(model, PROMPTS, params)
    b = generate(model, PROMPTS, params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    (alone,) = generate(model, [PROMPTS[2]], params[2])
    assert alone.token_ids == a[2].token_ids
    other_seed = generate(model, [PROMPTS[2]], params[2].model_copy(update={"seed": 99}))
    assert other_seed[0].token_ids != a[2].token_ids


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    greedy = generate(model, PROMPTS, SamplingParams(max_tokens=8, temperature=0))
    k1 = generate(model, PROMPTS, SamplingParams(max_tokens=8, temperature=2.0, top_k=1, seed=0))
    p0 = generate(model, PROMPTS, SamplingParams(max_tokens=8, temperature=2.0, top_p=1e-6, seed=0))
    assert [c.token_ids for c in k1] == [c.token_ids for c in greedy]
    assert [c.token_ids for c in p0] == [c.token_ids for c in greedy]


def test_sampler_respects_top_k_and_top_p():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, -1.0])
    draws = lambda **kw: {draw_one(logits, Draw(SamplingParams(**kw), s, 0)) for s in range(200)}  # noqa: E731
    assert draws(top_k=2) == {0, 1}
    # probabilities ~ .64 .24 .09 .03: top_p 0.8 keeps the first two, 0.9 the first three
    assert draws(top_p=0.8) == {0, 1}
    assert draws(top_p=0.9) == {0, 1, 2}
    assert len(draws()) >= 4


def test_bad_requests_name_the_problem(model):
    with pytest.raises(ValidationError, match="max_tokens"):
        SamplingParams(max_tokens=-1)
    with pytest.raises(ValidationError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValidationError, match="temperature"):
        SamplingParams(temperature=-0.5)
    with pytest.raises(RequestError, match="prompt 1: token id 320 at position 2"):
        generate(model, [[1], [1, 2, 320]], SamplingParams())
    with pytest.raises(RequestError, match="prompt 0 is empty"):
        generate(model, [[]], SamplingParams())
    with pytest.raises(RequestError, match="exceed the context length 131072"):
        generate(model, [[1, 2]], SamplingParams(max_tokens=131071))

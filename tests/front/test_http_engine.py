"""The HTTP API on the real expert-parallel engine (2 Ray CPU shards): replies equal
the single-process baseline, and 64 concurrent streaming clients all complete."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from gptoss_ray.cluster.engine.config import EngineConfig
from gptoss_ray.cluster.front.serve import serve, stop
from tests.engine_cases import expected_reply

NAME = "test-http-engine"


@pytest.fixture(scope="module")
def url(ray_session):
    info = serve(
        EngineConfig(model="gpt-oss-tiny", shards=2, dtype="float32"),
        name=NAME,
        http=("127.0.0.1", 0, None),
    )
    yield info["url"]
    stop(NAME)


def test_greedy_reply_equals_the_baseline(url):
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    body = {
        "model": "gpt-oss-tiny",
        "messages": [{"role": "user", "content": "Hi there"}],
        "max_tokens": 6,
        "temperature": 0,
    }
    r = client.chat.completions.create(**body)
    expected = expected_reply(body)
    message = r.choices[0].message.model_dump()  # (with the client's own extra fields)
    assert {key: message.get(key) for key in expected["message"]} == expected["message"]
    assert r.usage.model_dump(exclude_none=True) == expected["usage"]
    assert r.choices[0].finish_reason == expected["finish_reason"]


def test_64_concurrent_streaming_clients_complete(url):
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)

    def one(i: int) -> tuple[str | None, int]:
        stream = client.chat.completions.create(
            model="gpt-oss-tiny",
            messages=[{"role": "user", "content": f"Question {i}"}],
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        return finish, chunks[-1].usage.completion_tokens

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    assert results == [("length", 8)] * 64


def test_stored_responses_outlive_the_engine(url):
    """A conversation stored by one coordinator continues on the next one (`gptoss-ray
    stop`, then `serve` again): the store is the Ray cluster's, and the continued turn's
    greedy tokens equal those of the whole conversation sent again. Last in this module:
    it replaces the module's server."""
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    args = dict(model="gpt-oss-tiny", max_output_tokens=5, temperature=0)
    first = client.responses.create(input="Hi there", **args)
    stop(NAME)
    again = serve(
        EngineConfig(model="gpt-oss-tiny", shards=2, dtype="float32"),
        name=NAME,
        http=("127.0.0.1", 0, None),
    )
    client = openai.OpenAI(base_url=again["url"], api_key="unused", max_retries=0)
    assert client.responses.retrieve(first.id).id == first.id
    second = client.responses.create(input="And then?", previous_response_id=first.id, **args)
    history = [{"role": "user", "content": "Hi there"}]
    history += [item.model_dump(exclude_none=True) for item in first.output]
    resent = client.responses.create(
        input=[*history, {"role": "user", "content": "And then?"}], **args
    )
    assert second.usage.input_tokens == resent.usage.input_tokens
    assert [i.model_dump(exclude={"id"}) for i in second.output] == [
        i.model_dump(exclude={"id"}) for i in resent.output
    ]

"""The front's side of an engine (`cluster.client.engine_client`), over an engine loop of this
process whose shards speak scripted harmony: replies built from pushed token deltas, stop
strings that abort the sequence in the engine, n choices, a failed engine, a front gone."""

from __future__ import annotations

import asyncio
import time

import pytest

from gptoss_ray.cluster.client.chat import chat_request
from gptoss_ray.cluster.client.engine_client import (
    LocalEngineClient,
    LoopThread,
    RequestStream,
    TokenReply,
    token_output,
)
from gptoss_ray.cluster.engine.messages import EngineRequest
from gptoss_ray.model import tokenizer as tok
from gptoss_ray.model.types import EngineUnavailable, RequestError, SamplingParams
from tests.scripted_engine import REPLIES, scripted_engine


@pytest.fixture
def loop():
    thread = LoopThread()
    yield thread
    thread.stop()


def start(loop: LoopThread, client: LocalEngineClient, body: dict) -> RequestStream:
    request, replies = chat_request(body, client.engine.info())
    (stream,) = loop.run(client.submit([request], [replies]))
    return stream


@pytest.mark.parametrize("overlap", [False, True])
def test_a_stop_string_ends_generation_in_the_engine_within_one_step_of_the_match(loop, overlap):
    """The front finds the stop string in the deltas of the step that drew its last token
    and aborts; the engine draws for the sequence in no step planned after that news:
    one more token at most (the step planned before it came), two with overlapped steps
    (one more was already running when the match was drawn)."""
    engine, shards = scripted_engine(overlap=overlap)
    client = LocalEngineClient(engine)
    try:
        answer = "la " * 400
        for stop in ("a", " la la"):  # within a token, across three
            body = {"messages": [{"role": "user", "content": "count slowly"}], "stop": [stop]}
            stream = start(loop, client, body)
            reply = loop.run(stream.result(), 30)
            assert (reply["message"]["content"] or "") == answer[: answer.index(stop)]
            assert reply["finish_reason"] == "stop"
            kept = reply["usage"]["completion_tokens"]  # up to the one that completed it
            script = tok.encode(REPLIES["slow"], allow_special=True)
            head = script.index(tok.encode("<|message|>", allow_special=True)[0]) + 1
            text = tok.decode(script[head:kept])  # the answer up to the last token kept
            assert stop in text and stop not in tok.decode(script[head : kept - 1])
            deadline = time.monotonic() + 10
            while stream.request_id not in shards.released and time.monotonic() < deadline:
                time.sleep(0.01)
            assert stream.request_id in shards.released  # its KV went at once
            assert kept <= shards.sampled[stream.request_id] <= kept + 1 + overlap
            assert kept + 300 < len(script)  # it would have gone on
            assert not engine.core.requests  # forgotten by the engine
    finally:
        engine.shutdown()


def test_n_choices_each_stopped_alone_and_a_failure_reaches_every_reader(loop):
    engine, shards = scripted_engine()
    client = LocalEngineClient(engine)
    try:
        body = {"messages": [{"role": "user", "content": "Hi"}], "n": 3, "stop": ["there"]}
        reply = loop.run(start(loop, client, body).result(), 30)
        assert [c["message"]["content"] for c in reply["choices"]] == ["Hello "] * 3
        assert (
            reply["usage"]["completion_tokens"]
            == 3 * reply["choices"][0]["usage"]["completion_tokens"]
        )
        slow = start(loop, client, {"messages": [{"role": "user", "content": "count slowly"}]})
        while not shards.sampled.get(slow.request_id):
            time.sleep(0.01)
        engine.core.fail("a shard died")
        with pytest.raises(EngineUnavailable, match="a shard died"):
            loop.run(slow.result(), 30)
    finally:
        engine.shutdown()


def test_a_reader_that_leaves_or_a_front_that_ends_frees_the_engine(loop):
    engine, shards = scripted_engine()
    client = LocalEngineClient(engine)
    try:
        slow = start(loop, client, {"messages": [{"role": "user", "content": "count slowly"}]})
        while not shards.sampled.get(slow.request_id):
            time.sleep(0.01)
        loop.loop.call_soon_threadsafe(slow.close)  # the reader left: aborted
        deadline = time.monotonic() + 10
        while slow.request_id not in shards.released and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not engine.core.requests and slow.request_id in shards.released
        other = start(loop, client, {"messages": [{"role": "user", "content": "count slowly"}]})
        while not shards.sampled.get(other.request_id):
            time.sleep(0.01)
        front = next(iter(engine.core._outboxes))
        engine.core.close_outbox(front)  # what the end of its stream does (a front gone)
        assert not engine.core.requests and not engine.core.scheduler.live
        assert shards.sampled[other.request_id] < 400
    finally:
        engine.shutdown()


def test_requests_submitted_at_once_go_in_one_call_and_a_bad_one_fails_alone(loop):
    """What a front's handlers submit in one turn of its event loop reaches the engine as
    one call; each request is queued or refused apart from the others."""
    engine, _ = scripted_engine()
    client = LocalEngineClient(engine)
    calls = []
    add = engine.add
    engine.add = lambda groups, front: calls.append(len(groups)) or add(groups, front)
    try:
        hi = {"messages": [{"role": "user", "content": "Hi"}]}
        good = [chat_request(hi, engine.info()) for _ in range(3)]
        bad = EngineRequest("bad", [1, 10**9], SamplingParams(max_tokens=4))

        async def at_once() -> list:
            submits = [client.submit([r], [rs]) for r, rs in good]
            submits.append(client.submit([bad], [[TokenReply()]], token_output))
            return await asyncio.gather(*submits, return_exceptions=True)

        got = loop.run(at_once(), 30)
        assert calls == [4]
        assert isinstance(got[3], RequestError) and "position 1 is outside" in str(got[3])
        for (stream,) in got[:3]:
            assert loop.run(stream.result(), 30)["message"]["content"] == "Hello there, friend!"
    finally:
        engine.shutdown()

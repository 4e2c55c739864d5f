"""The OpenAI-compatible HTTP API, driven with the official `openai` client against an
engine whose shards speak scripted harmony (reasoning, answers, tool calls)."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import openai
import pytest

from gptoss_ray.model import tokenizer as tok
from tests.conftest import API_KEY
from tests.scripted_engine import REPLIES

KEY = API_KEY
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {
            "type": "object",
            "properties": {"loc": {"type": "string"}},
            "required": ["loc"],
        },
    },
}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_models_and_health(scripted_api, scripted_client):
    assert [m.id for m in scripted_client.models.list()] == ["gpt-oss-tiny"]
    req = urllib.request.Request(
        scripted_api[0].removesuffix("/v1") + "/health", headers={"Authorization": f"Bearer {KEY}"}
    )
    assert json.loads(urllib.request.urlopen(req).read()) == {"status": "ok"}


def test_chat_returns_reasoning_separately_from_content(scripted_client):
    r = scripted_client.chat.completions.create(
        model="gpt-oss-tiny", messages=user("Hi"), reasoning_effort="low"
    )
    msg = r.choices[0].message
    assert msg.content == "Hello there, friend!"
    assert msg.model_extra["reasoning_content"] == "Thinking about it."
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 50


def test_streaming_chat_adds_up_to_the_whole_reply(scripted_client):
    chunks = list(
        scripted_client.chat.completions.create(
            model="gpt-oss-tiny",
            messages=user("Hi"),
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(
        (c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
        for c in chunks
        if c.choices
    )
    assert content == "Hello there, friend!" and reasoning == "Thinking about it."
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 2  # token by token
    assert chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


@pytest.mark.parametrize("stop", ["friend", "o th"])  # in one token, across two
def test_a_stop_string_ends_the_stream_and_the_sequence_at_once(
    scripted_api, scripted_client, stop
):
    """No streamed delta holds text at or past the stop string, and at most one token is
    drawn after the one that completed it (by the step planned while it was found; the
    answer has 6 more tokens to go)."""
    _, _, shards = scripted_api
    chunks = list(
        scripted_client.chat.completions.create(
            model="gpt-oss-tiny",
            messages=user("Hi"),
            stop=[stop],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    shown = ""
    for delta in deltas:
        shown += delta
        assert stop not in shown
    assert shown == "Hello there, friend!"[: "Hello there, friend!".index(stop)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    (seq_id,) = [s for s in shards.sampled if s.startswith(chunks[0].id.removeprefix("chatcmpl-"))]
    completion = chunks[-1].usage.completion_tokens
    # decoding stopped at the stop string (one overlapped step past it at most)
    assert completion <= shards.sampled[seq_id] <= completion + 1
    script = tok.encode(REPLIES["answer"], allow_special=True)
    assert stop in tok.decode(script[:completion]) and completion < len(script)
    deadline = time.monotonic() + 10
    while seq_id not in shards.released and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seq_id in shards.released  # its cache was dropped


def test_tool_call_round_trip(scripted_client):
    messages = user("What is the weather in SF?")
    r = scripted_client.chat.completions.create(
        model="gpt-oss-tiny", messages=messages, tools=[WEATHER_TOOL]
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"loc": "SF"}
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 20}'},
    ]
    r2 = scripted_client.chat.completions.create(
        model="gpt-oss-tiny", messages=messages, tools=[WEATHER_TOOL]
    )
    assert r2.choices[0].message.content == "It is 20C in SF."
    # streamed, the call arrives as a tool_calls delta with its arguments in pieces
    chunks = list(
        scripted_client.chat.completions.create(
            model="gpt-oss-tiny", messages=user("weather?"), tools=[WEATHER_TOOL], stream=True
        )
    )
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert deltas[0].function.name == "get_weather" and deltas[0].id
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"loc": "SF"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_responses_api(scripted_client):
    r = scripted_client.responses.create(
        model="gpt-oss-tiny", input="Hi", reasoning={"effort": "high"}
    )
    kinds = [item.type for item in r.output]
    assert kinds == ["reasoning", "message"]
    assert r.output_text == "Hello there, friend!"
    assert r.status == "completed" and r.usage.output_tokens > 0
    r = scripted_client.responses.create(
        model="gpt-oss-tiny",
        input="weather?",
        tools=[{"type": "function", **WEATHER_TOOL["function"]}],
    )
    call = next(item for item in r.output if item.type == "function_call")
    assert call.name == "get_weather" and json.loads(call.arguments) == {"loc": "SF"}
    follow = scripted_client.responses.create(
        model="gpt-oss-tiny",
        input=[
            {"role": "user", "content": "weather?"},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "20C"},
        ],
        tools=[{"type": "function", **WEATHER_TOOL["function"]}],
    )
    assert follow.output_text == "It is 20C in SF."


def test_responses_streaming_events(scripted_client):
    events = list(scripted_client.responses.create(model="gpt-oss-tiny", input="Hi", stream=True))
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "Hello there, friend!"
    assert "response.reasoning_text.delta" in types
    assert events[-1].response.output[-1].content[0].text == text
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_logprobs_of_the_answer_streamed_and_not(scripted_client):
    """The answer's tokens with their logprobs and top alternatives, in OpenAI's shapes;
    the streamed chunks' logprobs add up to the whole reply's, reasoning tokens apart."""
    args = dict(model="gpt-oss-tiny", messages=user("Hi"), logprobs=True, top_logprobs=3)
    r = scripted_client.chat.completions.create(**args)
    content = r.choices[0].logprobs.content
    assert "".join(e.token for e in content) == r.choices[0].message.content
    answer = tok.encode("Hello there, friend!")
    assert [tok.encode(e.token) for e in content] == [[t] for t in answer]
    assert all(bytes(e.bytes).decode() == e.token for e in content)
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token for e in content)
    assert all(e.top_logprobs[0].logprob == e.logprob for e in content)
    chunks = list(scripted_client.chat.completions.create(**args, stream=True))
    streamed = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    plain = scripted_client.chat.completions.create(model="gpt-oss-tiny", messages=user("Hi"))
    assert plain.choices[0].logprobs is None


def test_n_choices_streamed_and_not(scripted_client):
    r = scripted_client.chat.completions.create(
        model="gpt-oss-tiny", messages=user("Hi"), n=3, logprobs=True, seed=4
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert {c.message.content for c in r.choices} == {"Hello there, friend!"}
    assert all(len(c.logprobs.content) == len(r.choices[0].logprobs.content) for c in r.choices)
    one = scripted_client.chat.completions.create(model="gpt-oss-tiny", messages=user("Hi"))
    assert r.usage.prompt_tokens == one.usage.prompt_tokens
    assert r.usage.completion_tokens == 3 * one.usage.completion_tokens
    chunks = list(
        scripted_client.chat.completions.create(
            model="gpt-oss-tiny",
            messages=user("Hi"),
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    for i in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert "".join(ch.delta.content or "" for ch in mine) == "Hello there, friend!"
        assert mine[-1].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens == 2 * one.usage.completion_tokens


def test_responses_logprobs_streamed_and_not(scripted_client):
    args = dict(model="gpt-oss-tiny", input="Hi", include=["message.output_text.logprobs"])
    r = scripted_client.responses.create(**args, top_logprobs=2)
    part = r.output[-1].content[0]
    assert "".join(e.token for e in part.logprobs) == part.text == "Hello there, friend!"
    assert all(len(e.top_logprobs) == 2 for e in part.logprobs)
    events = list(scripted_client.responses.create(**args, top_logprobs=2, stream=True))
    deltas = [e for ev in events if ev.type == "response.output_text.delta" for e in ev.logprobs]
    assert [e.model_dump() for e in deltas] == [e.model_dump() for e in part.logprobs]
    final = events[-1].response.output[-1].content[0]
    assert [e.model_dump() for e in final.logprobs] == [e.model_dump() for e in part.logprobs]
    assert scripted_client.responses.create(model="gpt-oss-tiny", input="Hi").output[-1].content[
        0
    ].logprobs in (None, [])


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"model": "gpt-5"}, 404, "model_not_found"),
        ({"top_p": 0}, 400, "invalid_request"),
        ({"max_tokens": -3}, 400, "invalid_request"),
        ({"max_tokens": 131072}, 400, "context_length_exceeded"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_request"),
    ],
)
def test_bad_requests_get_openai_style_errors(scripted_client, kwargs, status, code):
    args = {"model": "gpt-oss-tiny", "messages": user("Hi"), **kwargs}
    with pytest.raises(openai.APIStatusError) as info:
        scripted_client.chat.completions.create(**args)
    assert info.value.status_code == status
    assert info.value.body["code"] == code and info.value.body["message"]


def raw(url: str, body: bytes | None, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_invalid_json_wrong_key_and_unknown_route(scripted_api):
    url = scripted_api[0]
    status, body = raw(url + "/chat/completions", b"{not json")
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body = raw(url + "/models", None, key="wrong")
    assert status == 401 and body["error"]["type"] == "authentication_error"
    status, body = raw(url + "/embeddings", b"{}")
    assert status == 404


def test_metrics(scripted_api, scripted_client):
    scripted_client.chat.completions.create(model="gpt-oss-tiny", messages=user("Hi"))
    req = urllib.request.Request(
        scripted_api[0].removesuffix("/v1") + "/metrics", headers={"Authorization": f"Bearer {KEY}"}
    )
    text = urllib.request.urlopen(req).read().decode()
    for name in (
        "gptoss_requests_total",
        "gptoss_generated_tokens_total",
        "gptoss_queue_depth",
        "gptoss_step_seconds_total",
        "gptoss_kv_blocks_used_ratio",
        "gptoss_prefix_cache_hit_tokens_total",
        "gptoss_prefix_cache_queried_tokens_total",
        "gptoss_prefix_cache_evictions_total",
        "gptoss_prefix_cache_blocks",
    ):
        assert f"\n{name}" in "\n" + text or f"{name}{{" in text, name


def test_a_client_that_leaves_mid_stream_frees_its_sequence(scripted_api):
    url, engine, shards = scripted_api
    before = engine.core.stats.generated_tokens
    host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
    body = json.dumps(
        {
            "model": "gpt-oss-tiny",
            "messages": user("count slowly"),
            "stream": True,
            "max_tokens": 1000,
        }
    ).encode()
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    received = b""
    while b'"content": "la' not in received:  # the answer is streaming
        chunk = sock.recv(4096)
        assert chunk, f"the stream ended before its answer: {received[-300:]!r}"
        received += chunk
    request_id = received.split(b'"id": "chatcmpl-')[1].split(b'"')[0].decode()
    sock.close()
    left = time.monotonic()
    while time.monotonic() - left < 10:
        if any(seq_id.startswith(request_id) for seq_id in shards.released):
            break
        time.sleep(0.02)
    freed_after = time.monotonic() - left
    assert any(seq_id.startswith(request_id) for seq_id in shards.released)  # KV released
    assert freed_after < 5  # at once: the server polls for a gone client every 0.5 s
    with engine.core._lock:
        assert not any(s.running for s in engine.core.scheduler.shards)
    generated = engine.core.stats.generated_tokens - before
    assert generated < 200  # it stopped long before its 400 "la"
    assert engine.error is None
    r = openai.OpenAI(base_url=url, api_key=KEY).chat.completions.create(
        model="gpt-oss-tiny", messages=user("Hi")
    )
    assert r.choices[0].message.content == "Hello there, friend!"  # the engine serves on


def test_stored_responses_continue_a_conversation_as_if_it_were_resent(
    scripted_api, scripted_client
):
    """previous_response_id sends the model the tokens of the whole conversation sent
    again by the client; GET, input_items and DELETE on the stored response."""
    _, _, shards = scripted_api
    tools = [{"type": "function", **WEATHER_TOOL["function"]}]
    first = scripted_client.responses.create(
        model="gpt-oss-tiny", input="Hi", instructions="Be brief."
    )
    assert first.store is True
    second = scripted_client.responses.create(
        model="gpt-oss-tiny", input="weather?", tools=tools, previous_response_id=first.id
    )
    assert second.previous_response_id == first.id
    call = next(item for item in second.output if item.type == "function_call")
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "20C"}
    third = scripted_client.responses.create(
        model="gpt-oss-tiny", input=[output], tools=tools, previous_response_id=second.id
    )
    assert third.output_text == "It is 20C in SF."
    # the whole conversation by hand: the same prompt tokens for the last turn
    history = [{"role": "user", "content": "Hi"}]
    history += [item.model_dump(exclude_none=True) for item in first.output]
    history += [{"role": "user", "content": "weather?"}]
    history += [item.model_dump(exclude_none=True) for item in second.output] + [output]
    resent = scripted_client.responses.create(model="gpt-oss-tiny", input=history, tools=tools)
    seen = lambda r: shards.prompts[r.id.removeprefix("resp_")]  # noqa: E731
    assert seen(third) == seen(resent)
    assert "Be brief." not in tok.decode(seen(third))  # instructions are not carried over

    assert scripted_client.responses.retrieve(third.id).output_text == third.output_text
    items = scripted_client.responses.input_items.list(third.id, order="asc").data
    assert [i.type for i in items][-1] == "function_call_output"
    assert len(items) == len(history)
    scripted_client.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        scripted_client.responses.retrieve(second.id)
    with pytest.raises(openai.NotFoundError) as info:
        scripted_client.responses.create(
            model="gpt-oss-tiny", input="x", previous_response_id=second.id
        )
    assert info.value.body["param"] == "previous_response_id"
    unstored = scripted_client.responses.create(model="gpt-oss-tiny", input="Hi", store=False)
    with pytest.raises(openai.NotFoundError):
        scripted_client.responses.retrieve(unstored.id)
    streamed = list(scripted_client.responses.create(model="gpt-oss-tiny", input="Hi", stream=True))
    final = streamed[-1].response
    assert scripted_client.responses.retrieve(final.id).output_text == final.output_text

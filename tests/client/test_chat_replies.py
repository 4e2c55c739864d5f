"""The one reply builder: typed events as tokens come, the reply at the end, and stop
strings that end the answer where they begin (also across tokens), never shown."""

from __future__ import annotations

import pytest

from gptoss_ray.cluster.client.chat import (
    MessageEnd,
    ReplyBuilder,
    TextDelta,
    ToolCallStart,
    chat_reply,
)
from gptoss_ray.model import tokenizer as tok

ANSWER = (
    "<|channel|>analysis<|message|>Thinking about it.<|end|><|start|>assistant"
    "<|channel|>final<|message|>Hello there, friend!<|return|>"
)
CALL = (
    "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
    '{"loc": "SF"}<|call|>'
)


def ids(text: str) -> list[int]:
    return tok.encode(text, allow_special=True)


def fed_one_by_one(text: str, stop=()) -> ReplyBuilder:
    builder = ReplyBuilder(stop)
    for token in ids(text):
        builder.feed([token])
    return builder


def shown(builder: ReplyBuilder, kind: str) -> str:
    return "".join(e.text for e in builder.events if isinstance(e, TextDelta) and e.kind == kind)


def test_events_add_up_to_the_reply():
    builder = fed_one_by_one(ANSWER)
    reply = builder.finish("stop", request_id="r", prompt_tokens=7)
    assert shown(builder, "reasoning") == "Thinking about it."
    assert shown(builder, "content") == "Hello there, friend!"
    assert [e.kind for e in builder.events if isinstance(e, MessageEnd)] == [
        "reasoning",
        "content",
    ]
    assert reply["message"] == {
        "role": "assistant",
        "content": "Hello there, friend!",
        "reasoning_content": "Thinking about it.",
        "tool_calls": [],
    }
    assert reply["finish_reason"] == "stop" and reply["token_ids"] == ids(ANSWER)
    assert reply["usage"] == {
        "prompt_tokens": 7,
        "completion_tokens": len(ids(ANSWER)),
        "total_tokens": 7 + len(ids(ANSWER)),
    }
    assert builder.finish("length", request_id="r", prompt_tokens=7) is reply  # once


def test_a_tool_call_keeps_the_id_it_was_streamed_with():
    builder = fed_one_by_one(CALL)
    reply = builder.finish("stop", request_id="r", prompt_tokens=1)
    (start,) = [e for e in builder.events if isinstance(e, ToolCallStart)]
    assert start.name == "get_weather"
    assert "".join(e.text for e in builder.events if getattr(e, "call", None) == 0) == (
        '{"loc": "SF"}'
    )
    (call,) = reply["message"]["tool_calls"]
    assert call["id"] == start.call_id and reply["finish_reason"] == "tool_calls"


@pytest.mark.parametrize(
    ("stop", "content"),
    [
        (["friend"], "Hello there, "),  # inside one token
        (["o th"], "Hell"),  # across two tokens ("Hello" + " there")
        (["xyz", "there,"], "Hello "),  # the earliest of several, over a token end
    ],
)
def test_a_stop_string_ends_the_answer_and_is_never_shown(stop, content):
    builder = fed_one_by_one(ANSWER, stop)
    assert builder.stopped
    deltas = [e.text for e in builder.events if isinstance(e, TextDelta) and e.kind == "content"]
    assert "".join(deltas) == content
    shown_so_far = ""
    for delta in deltas:  # no delta, nor the text up to it, reaches into a stop string
        shown_so_far += delta
        assert not any(s in shown_so_far for s in stop)
    reply = builder.finish("length", request_id="r", prompt_tokens=1)
    assert reply["message"]["content"] == content and reply["finish_reason"] == "stop"
    # the ids end with the token that completed the stop string: nothing sampled after
    assert reply["token_ids"] == builder.tokens
    assert any(s in tok.decode(reply["token_ids"]) for s in stop)
    assert not any(s in tok.decode(reply["token_ids"][:-1]) for s in stop)


def test_text_held_for_a_stop_string_that_never_comes_is_shown():
    builder = fed_one_by_one(ANSWER, ["there!"])  # "there" could begin it; "," says no
    assert not builder.stopped
    assert shown(builder, "content") == "Hello there, friend!"
    assert chat_reply(ids(ANSWER), "stop", stop=["there!"])["message"]["content"] == (
        "Hello there, friend!"
    )


def test_stop_strings_apply_to_the_answer_only():
    builder = fed_one_by_one(ANSWER, ["about"])  # in the reasoning, not the answer
    assert not builder.stopped and shown(builder, "reasoning") == "Thinking about it."


@pytest.mark.parametrize("end", ["eos", "end"])
def test_a_character_cut_by_the_message_end_streams_as_the_whole_has_it(end):
    """A reply cut (max_tokens) or a message ended (<|end|>) inside a multi-byte
    character: the whole reply holds U+FFFD for it, and so does the stream."""
    # a three-byte character as one token per byte, so that a token can end inside it
    byte_tokens = [tok.get_encoding().encode_single_token(bytes([b])) for b in "☃".encode()]
    head = ids("<|channel|>analysis<|message|>so ") + byte_tokens[:2]
    if end == "end":
        head += ids("<|end|><|start|>assistant<|channel|>final<|message|>ok ") + byte_tokens[:1]
    builder = ReplyBuilder()
    for token in head:
        builder.feed([token])
    reply = builder.finish("length", request_id="r", prompt_tokens=1)
    assert shown(builder, "reasoning") == reply["message"]["reasoning_content"] == "so \ufffd"
    if end == "end":
        assert shown(builder, "content") == reply["message"]["content"] == "ok \ufffd"

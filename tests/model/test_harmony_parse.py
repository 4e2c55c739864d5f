"""Parsing completions: strict mode agrees with openai-harmony's parser (messages and
where it raises), the streaming parser agrees with it at every token, and lenient mode
recovers the malformed output real models produce."""

from __future__ import annotations

import json

import openai_harmony as oh
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptoss_ray.model import harmony as h
from gptoss_ray.model import tokenizer as tok
from gptoss_ray.model.harmony.messages import HarmonyError
from tests import harmony_strategies as hs
from tests.support import harmony_oracle as oracle


def ids(text: str) -> list[int]:
    return tok.encode(text, allow_special=True)


def as_dicts(messages) -> list[dict]:
    return [json.loads(m.to_json()) for m in messages]


def compare_strict(tokens: list[int], role: oh.Role | None) -> None:
    """Our strict parser raises exactly when openai-harmony's does, else same messages."""
    try:
        expected = oracle().parse_messages_from_completion_tokens(tokens, role)
    except Exception:
        with pytest.raises(HarmonyError):
            h.parse_completion(tokens, None if role is None else role.value, strict=True)
        return
    got = h.parse_completion(tokens, None if role is None else role.value, strict=True)
    assert as_dicts(got) == as_dicts(expected)


def completion(messages: list[dict]) -> list[int]:
    out = []
    for m in messages:
        out += oracle().render(oh.Message.from_dict(m))
    return out


ASSISTANT_PREFIX = [tok.START, *tok.encode("assistant")]
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))


@SETTINGS
@given(hs.assistant_messages(), st.data())
def test_well_formed_completions_parse_as_openai_harmony_does(messages, data):
    tokens = completion(messages)
    compare_strict(tokens, None)
    assert tokens[:2] == ASSISTANT_PREFIX
    body = tokens[2:]
    compare_strict(body, oh.Role.ASSISTANT)
    # cut off anywhere (max_tokens), strict outcome still identical
    cut = data.draw(st.integers(0, len(body)))
    compare_strict(body[:cut], oh.Role.ASSISTANT)
    # lenient mode gives the same messages on well-formed input (plus `malformed` notes
    # only where openai-harmony's own result has no channel)
    lenient = h.parse_completion(body, "assistant", strict=False)
    strict = h.parse_completion(body, "assistant", strict=True)
    assert [m.model_copy(update={"malformed": None}) for m in lenient] == strict


SOUP = [
    tok.START,
    tok.END,
    tok.CHANNEL,
    tok.MESSAGE,
    tok.RETURN,
    tok.CALL,
    tok.CONSTRAIN,
    tok.END_OF_TEXT,
    *ids("assistant"),
    *ids("user"),
    *ids("analysis"),
    *ids("final"),
    *ids("commentary"),
    *ids(" to=functions.f"),
    *ids(" json"),
    *ids(" "),
    *ids("hello"),
    *ids("to=x"),
    *ids("functions.lookup"),
    *ids("<"),
    *[tok.get_encoding().encode_single_token(bytes([b])) for b in (0xE2, 0x82, 0xAC, 0xFF)],
]


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.sampled_from(SOUP), max_size=24), st.sampled_from([None, oh.Role.ASSISTANT]))
def test_token_soup_raises_exactly_where_openai_harmony_raises(tokens, role):
    compare_strict(tokens, role)
    # lenient never raises, whatever the ids
    h.parse_completion(tokens, None if role is None else role.value, strict=False)


HEADER_WORDS = [
    tok.CHANNEL,
    tok.CONSTRAIN,
    tok.START,
    *ids("assistant"),
    *ids("tool"),
    *ids("analysis"),
    *ids("final"),
    *ids(" to=functions.f"),
    *ids(" json"),
    *ids(" "),
    *ids("functions.f"),
    *ids(" to=assistant"),
    *ids("<"),
    *ids("\t"),
    *ids(":bob"),
    *ids("to="),
    *ids("\u3000"),
]


@st.composite
def headered(draw):
    """Messages whose headers are random arrangements of header words."""
    out = []
    for _ in range(draw(st.integers(1, 3))):
        if out or draw(st.booleans()):
            out.append(tok.START)
        out += draw(st.lists(st.sampled_from(HEADER_WORDS), max_size=7))
        out += [tok.MESSAGE, *ids("body")]
        out.append(draw(st.sampled_from([tok.END, tok.RETURN, tok.CALL])))
    return out


@st.composite
def mutated(draw):
    """A well-formed completion with a few tokens deleted, doubled or inserted."""
    tokens = completion(draw(hs.assistant_messages()))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(tokens)))
        edit = draw(st.sampled_from(["delete", "double", "insert"]))
        if edit == "delete" and at < len(tokens):
            del tokens[at]
        elif edit == "double" and at < len(tokens):
            tokens.insert(at, tokens[at])
        else:
            tokens.insert(at, draw(st.sampled_from(SOUP)))
    return tokens


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(headered(), mutated()), st.sampled_from([None, oh.Role.ASSISTANT]))
def test_near_miss_completions_parse_or_raise_as_openai_harmony_does(tokens, role):
    if role is not None and tokens[:2] == ASSISTANT_PREFIX:
        tokens = tokens[2:]
    compare_strict(tokens, role)
    h.parse_completion(tokens, None if role is None else role.value, strict=False)


@pytest.mark.parametrize(
    "text",
    [
        "<|channel|>analysis<|message|>Think é🎉 more<|end|><|start|>assistant<|channel|>final"
        "<|message|>Answer 中文<|return|>",
        "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
        '{"loc": "SF"}<|call|>',
        " to=functions.f<|channel|>commentary json<|message|>{}<|call|>",
        "<|channel|>final<|message|>cut off mid-answ",
    ],
)
def test_streaming_state_matches_openai_harmony_at_every_token(text):
    tokens = ids(text)
    # split a multi-byte character across tokens too
    tokens[-1:-1] = [tok.get_encoding().encode_single_token(bytes([b])) for b in (0xE2, 0x82)]
    theirs = oh.StreamableParser(oracle(), oh.Role.ASSISTANT)
    ours = h.StreamParser("assistant")
    for t in tokens:
        theirs.process(t)
        ours.process(t)
        assert ours.state.value == theirs.state.value
        assert ours.current_role == (theirs.current_role and theirs.current_role.value)
        assert ours.current_channel == theirs.current_channel
        assert ours.current_recipient == theirs.current_recipient
        assert ours.current_content_type == theirs.current_content_type
        assert ours.current_content == theirs.current_content
        assert ours.last_content_delta == theirs.last_content_delta
        assert as_dicts(ours.messages) == as_dicts(theirs.messages)
    theirs.process_eos()
    ours.process_eos()
    assert as_dicts(ours.messages) == as_dicts(theirs.messages)


@SETTINGS
@given(hs.assistant_messages(), st.booleans())
def test_streaming_agrees_with_the_whole_sequence_parser_at_every_prefix(messages, strict):
    tokens = completion(messages)[2:]
    whole = h.parse_completion(tokens, "assistant", strict=strict)
    parser = h.StreamParser("assistant", strict=strict)
    deltas = ""
    for i, t in enumerate(tokens):
        parser.process(t)
        # finished messages so far are a prefix of the final answer
        assert parser.messages == whole[: len(parser.messages)]
        if parser.state == h.StreamState.CONTENT:
            deltas += parser.last_content_delta or ""
            assert parser.current_content == deltas
            # what the stream shows now is what a completion cut here would parse to
            partial = h.parse_completion(tokens[: i + 1], "assistant", strict=strict)
            assert partial[-1].text.startswith(parser.current_content)
            assert partial[-1].channel == parser.current_channel
            assert partial[-1].recipient == parser.current_recipient
        else:
            deltas = ""
    assert parser.process_eos().messages == whole


# -- lenient mode: the malformed output seen from real models ----------------------------


def lenient(text: str, role: str | None = "assistant") -> list[h.Message]:
    return h.parse_completion(ids(text), role, strict=False)


def test_channel_spelled_as_text():
    with pytest.raises(AssertionError):  # strict reads "analysis" as a recipient
        assert h.parse_completion(ids("analysis<|message|>x<|end|>"))[0].recipient is None
    (m,) = lenient("analysis<|message|>We need to think<|end|>")
    assert (m.channel, m.recipient, m.text) == ("analysis", None, "We need to think")
    assert "channel name without <|channel|>" in m.malformed


def test_doubled_start():
    text = (
        "<|channel|>analysis<|message|>a<|end|><|start|><|start|>assistant<|channel|>final"
        "<|message|>b<|return|>"
    )
    with pytest.raises(HarmonyError, match="Unknown role"):
        h.parse_completion(ids(text))
    first, second = lenient(text)
    assert (first.channel, first.text, first.malformed) == ("analysis", "a", None)
    assert (second.channel, second.text) == ("final", "b")
    assert "doubled <|start|>" in second.malformed


def test_missing_channel():
    (m,) = lenient("<|message|>just text<|return|>")
    assert (m.channel, m.text, m.malformed) == (None, "just text", "no channel")


def test_stray_tokens_between_messages():
    text = "<|channel|>final<|message|>a<|end|>junk<|start|>assistant<|channel|>final<|message|>b<|end|>"
    with pytest.raises(HarmonyError, match="Unexpected token"):
        h.parse_completion(ids(text))
    parser = h.StreamParser("assistant", strict=False)
    for t in ids(text):
        parser.process(t)
    msgs = parser.process_eos().messages
    assert [m.text for m in msgs] == ["a", "b"]
    assert any("junk" in p for p in parser.problems)
    # a stray <|end|> is dropped
    assert [m.text for m in lenient("<|channel|>final<|message|>a<|end|><|end|>")] == ["a"]


def test_missing_start_before_a_header():
    (_, b) = lenient("<|channel|>analysis<|message|>a<|end|><|channel|>final<|message|>b<|return|>")
    assert (b.channel, b.text) == ("final", "b") and "missing <|start|>" in b.malformed


def test_missing_end_before_the_next_message():
    a, b = lenient(
        "<|channel|>analysis<|message|>think<|start|>assistant<|channel|>final"
        "<|message|>answer<|return|>"
    )
    assert (a.channel, a.text, b.channel, b.text) == ("analysis", "think", "final", "answer")
    assert "missing <|end|>" in a.malformed
    a, b = lenient("<|channel|>analysis<|message|>think<|channel|>final<|message|>answer")
    assert (a.text, b.channel, b.text) == ("think", "final", "answer")


def test_recipient_after_the_channel_and_constrain_missing_or_plain():
    for text in [
        "<|channel|>commentary to=functions.f <|constrain|>json<|message|>{}<|call|>",
        "<|channel|>commentary to=functions.f json<|message|>{}<|call|>",
        "<|channel|>commentary to=functions.f<|message|>{}<|call|>",
        " to=functions.f<|channel|>commentary<|message|>{}<|call|>",
    ]:
        (m,) = lenient(text)
        assert (m.recipient, m.channel, m.text) == ("functions.f", "commentary", "{}"), text
        assert m.malformed is None
        assert h.parse_completion(ids(text)) == [m]  # strict reads these too


def test_call_on_analysis_and_missing_functions_prefix():
    (m,) = lenient("<|channel|>analysis to=get_weather <|constrain|>json<|message|>{}<|call|>")
    assert (m.channel, m.recipient) == ("analysis", "get_weather")


def test_header_never_finished():
    with pytest.raises(HarmonyError, match="Unexpected EOS"):
        h.parse_completion(ids("<|channel|>fin"))
    assert lenient("<|channel|>fin") == []
    (m,) = lenient("<|channel|>final<|return|>")
    assert (m.channel, m.text) == ("final", "") and "no <|message|>" in m.malformed


def test_unknown_role_and_extra_header_words():
    with pytest.raises(HarmonyError, match="Unknown role: User"):
        h.parse_completion(ids("<|start|>User<|message|>x<|end|>"), None)
    (m,) = lenient("<|start|>User<|message|>x<|end|>", None)
    assert m.author.role == "assistant" and "unknown role" in m.malformed
    with pytest.raises(HarmonyError, match="unexpected tokens remaining"):
        h.parse_completion(ids("<|channel|>final extra stuff here<|message|>x<|end|>"))
    (m,) = lenient("<|channel|>final extra stuff here<|message|>x<|end|>")
    assert (m.channel, m.text) == ("final", "x") and "ignored header text" in m.malformed


def test_token_ids_out_of_range_are_named():
    for bad in (-1, tok.VOCAB_SIZE, 10**9):
        with pytest.raises(HarmonyError, match=rf"token id {bad} at index 1 is outside"):
            h.parse_completion([tok.CHANNEL, bad], strict=False)


def test_invalid_utf8_becomes_replacement_characters():
    byte = tok.get_encoding().encode_single_token
    tokens = [*ids("<|channel|>final<|message|>"), byte(b"\xff"), *ids("ok"), byte(b"\xe2")]
    (m,) = h.parse_completion(tokens)
    (ref,) = oracle().parse_messages_from_completion_tokens(tokens, oh.Role.ASSISTANT)
    assert m.text == ref.content[0].text == "\ufffdok\ufffd"

"""Rendering is token-identical to openai-harmony (the oracle) on generated conversations."""

from __future__ import annotations

import json

import openai_harmony as oh
import pytest
from hypothesis import HealthCheck, given, settings

from gptoss_ray.model import harmony as h
from gptoss_ray.model import tokenizer as tok
from gptoss_ray.model.harmony.messages import HarmonyError
from tests import harmony_strategies as hs
from tests.support import harmony_oracle as oracle


def both(conv: dict) -> tuple[oh.Conversation, h.Conversation]:
    theirs = oh.Conversation.from_json(json.dumps(conv))
    ours = h.Conversation.from_json(theirs.to_json())
    assert json.loads(ours.to_json()) == json.loads(theirs.to_json())  # same JSON both ways
    return theirs, ours


def same_outcome(reference, ours):
    """Both raise, or both give the same ids."""
    try:
        expected = reference()
    except Exception:  # openai-harmony raises its own HarmonyError / ValueError
        with pytest.raises(HarmonyError):
            ours()
        return
    assert ours() == expected


SLOW = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SLOW
@given(hs.conversation())
def test_render_for_completion_matches(conv):
    theirs, ours = both(conv)
    for role in (oh.Role.ASSISTANT, oh.Role.USER):
        same_outcome(
            lambda role=role: oracle().render_conversation_for_completion(theirs, role),
            lambda role=role: h.render_for_completion(ours.messages, h.Role(role.value)),
        )


@SLOW
@given(hs.conversation())
def test_render_for_training_and_without_dropping_match(conv):
    theirs, ours = both(conv)
    same_outcome(
        lambda: oracle().render_conversation_for_training(theirs),
        lambda: h.render_for_training(ours.messages),
    )
    keep = oh.RenderConversationConfig(auto_drop_analysis=False)
    same_outcome(
        lambda: oracle().render_conversation(theirs, keep),
        lambda: h.render_conversation(ours.messages, auto_drop_analysis=False),
    )


def test_spec_example_renders_exactly():
    conv = {
        "messages": [
            {
                "role": "system",
                "content": [
                    h.SystemContent(
                        conversation_start_date="2026-11-23", reasoning_effort="high"
                    ).model_dump(mode="json", exclude_none=True)
                ],
            },
            {
                "role": "developer",
                "content": [
                    {
                        "type": "developer_content",
                        "instructions": "Be brief",
                        "tools": {
                            "functions": {
                                "name": "functions",
                                "tools": [
                                    {
                                        "name": "get_weather",
                                        "description": "Gets weather",
                                        "parameters": {
                                            "type": "object",
                                            "properties": {"loc": {"type": "string"}},
                                            "required": ["loc"],
                                        },
                                    }
                                ],
                            }
                        },
                    }
                ],
            },
            {"role": "user", "content": "Weather in SF?"},
            {"role": "assistant", "channel": "analysis", "content": "need tool"},
            {
                "role": "assistant",
                "channel": "commentary",
                "recipient": "functions.get_weather",
                "content_type": "<|constrain|>json",
                "content": '{"loc":"SF"}',
            },
            {
                "role": "tool",
                "name": "functions.get_weather",
                "channel": "commentary",
                "recipient": "assistant",
                "content": '{"t":20}',
            },
        ]
    }
    ids = h.render_for_completion(h.Conversation.from_dict(conv).messages)
    text = tok.decode(ids)
    assert text.startswith("<|start|>system<|message|>You are ChatGPT")
    assert "Reasoning: high\n\n# Valid channels: analysis, commentary, final." in text
    assert "Calls to these tools must go to the commentary channel: 'functions'.<|end|>" in text
    assert "type get_weather = (_: {\nloc: string,\n}) => any;" in text
    assert text.endswith(
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
        '<|message|>{"loc":"SF"}<|call|><|start|>functions.get_weather to=assistant'
        '<|channel|>commentary<|message|>{"t":20}<|end|><|start|>assistant'
    )
    theirs, _ = both(conv)
    assert ids == oracle().render_conversation_for_completion(theirs, oh.Role.ASSISTANT)


def test_analysis_before_the_first_final_is_dropped_only_when_the_last_reply_is_final():
    msgs = [
        h.Message.from_role_and_content("user", "q1"),
        h.Message(
            author=h.Author(role="assistant"),
            channel="analysis",
            content=[h.TextContent(text="think1")],
        ),
        h.Message(
            author=h.Author(role="assistant"), channel="final", content=[h.TextContent(text="a1")]
        ),
        h.Message.from_role_and_content("user", "q2"),
        h.Message(
            author=h.Author(role="assistant"),
            channel="analysis",
            content=[h.TextContent(text="think2")],
        ),
    ]
    ongoing = tok.decode(h.render_for_completion(msgs))
    assert "think1" in ongoing and "think2" in ongoing  # mid tool loop: nothing dropped
    done = [
        *msgs,
        h.Message(
            author=h.Author(role="assistant"), channel="final", content=[h.TextContent(text="a2")]
        ),
    ]
    text = tok.decode(h.render_for_completion(done))
    assert "think1" not in text and "think2" in text
    assert h.render_for_training(done)[-1] == tok.RETURN


@pytest.mark.parametrize("value", [0.5, 3.0, -2.25, 1e-3, 1e-5, 1e-6, 1e15, 1e16, 1e21, 2.5e-7])
def test_float_defaults_print_as_serde_json_does(value):
    conv = {
        "messages": [
            {
                "role": "developer",
                "content": [
                    {
                        "type": "developer_content",
                        "tools": {
                            "functions": {
                                "name": "functions",
                                "tools": [
                                    {
                                        "name": "f",
                                        "description": "",
                                        "parameters": {
                                            "type": "object",
                                            "properties": {
                                                "x": {"type": "number", "default": value}
                                            },
                                        },
                                    }
                                ],
                            }
                        },
                    }
                ],
            }
        ]
    }
    theirs, ours = both(conv)
    assert h.render_conversation(ours.messages) == oracle().render_conversation(theirs)


def test_stop_tokens():
    assert h.stop_token_ids() == [200002, 200012]
    assert set(h.stop_token_ids()) == set(oracle().stop_tokens_for_assistant_actions())


@pytest.mark.parametrize("text", ["\r", "a\r", "a\r\nb", "x\n", "\n\n", "a\u2028b", "a\x0bb\x1c"])
def test_multi_line_descriptions_split_as_openai_harmony_splits_them(text):
    conv = {
        "messages": [
            {
                "role": "developer",
                "name": None,
                "content": [
                    {
                        "type": "developer_content",
                        "tools": {
                            "browser": {
                                "name": "browser",
                                "description": text,
                                "tools": [{"name": "A", "description": text}],
                            },
                            "notes": {"name": "notes", "description": text, "tools": []},
                        },
                    }
                ],
            }
        ]
    }
    theirs, ours = both(conv)
    assert h.render_conversation(ours.messages) == oracle().render_conversation(theirs)


def test_response_formats_render_as_the_harmony_guide_shows_them():
    """openai-harmony 0.0.8 has no response formats, so the oracle is OpenAI's harmony
    guide (the cookbook's structured-output example), character for character."""
    from gptoss_ray.model.harmony.messages import DeveloperContent, ResponseFormat

    schema = {
        "properties": {
            "items": {
                "type": "array",
                "description": "entries on the shopping list",
                "items": {"type": "string"},
            }
        },
        "type": "object",
    }
    developer = DeveloperContent(
        instructions="You are a helpful shopping assistant",
        response_formats=[ResponseFormat(name="shopping_list", schema=schema)],
    )
    messages = [
        h.Message(author=h.Author(role=h.Role.DEVELOPER), content=[developer]),
        h.Message.from_role_and_content(h.Role.USER, "I need to buy coffee, soda and eggs"),
    ]
    guide = (
        "<|start|>developer<|message|># Instructions\n\nYou are a helpful shopping assistant"
        "\n\n# Response Formats\n\n## shopping_list\n\n"
        '{"properties":{"items":{"type":"array","description":"entries on the shopping list",'
        '"items":{"type":"string"}}},"type":"object"}<|end|>'
        "<|start|>user<|message|>I need to buy coffee, soda and eggs<|end|><|start|>assistant"
    )
    assert tok.decode(h.render_for_completion(messages)) == guide
    described = ResponseFormat(name="s", description="one line", schema={"type": "object"})
    developer = DeveloperContent(response_formats=[described])
    text = tok.decode(
        h.render_for_completion(
            [h.Message(author=h.Author(role=h.Role.DEVELOPER), content=[developer])]
        )
    )
    assert '# Response Formats\n\n## s\n\n// one line\n{"type":"object"}<|end|>' in text

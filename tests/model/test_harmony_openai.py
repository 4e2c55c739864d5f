"""OpenAI chat requests <-> harmony, and bad input named by message index and field."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import openai_harmony as oh
import pytest

from gptoss_ray.model import harmony as h
from gptoss_ray.model import tokenizer as tok
from gptoss_ray.model.harmony.openai_chat import ChatRequest, from_harmony, to_harmony
from tests.support import harmony_oracle as oracle

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Gets the weather",
        "parameters": {
            "type": "object",
            "properties": {
                "loc": {"type": "string", "description": "city"},
                "unit": {"type": "string", "enum": ["c", "f"], "default": "c"},
            },
            "required": ["loc"],
        },
    },
}
REQUEST = {
    "model": "gpt-oss-20b",
    "reasoning_effort": "high",
    "tools": [WEATHER],
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Use metric."}]},
        {"role": "user", "content": "Weather in SF?"},
        {
            "role": "assistant",
            "reasoning_content": "Need the tool.",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"loc":"SF"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"t": 20}'},
    ],
}


def test_chat_request_renders_as_the_harmony_conversation_openai_describes():
    ours = h.render_for_completion(to_harmony(REQUEST, conversation_start_date="2026-11-24"))
    system = (
        oh.SystemContent.new()
        .with_reasoning_effort(oh.ReasoningEffort.HIGH)
        .with_conversation_start_date("2026-11-24")
    )
    developer = (
        oh.DeveloperContent.new()
        .with_instructions("Be brief.\n\nUse metric.")
        .with_function_tools(
            [
                oh.ToolDescription.new(
                    "get_weather", "Gets the weather", WEATHER["function"]["parameters"]
                )
            ]
        )
    )
    A = oh.Role.ASSISTANT
    conv = oh.Conversation.from_messages(
        [
            oh.Message.from_role_and_content(oh.Role.SYSTEM, system),
            oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer),
            oh.Message.from_role_and_content(oh.Role.USER, "Weather in SF?"),
            oh.Message.from_role_and_content(A, "Need the tool.").with_channel("analysis"),
            oh.Message.from_role_and_content(A, "Checking.").with_channel("commentary"),
            oh.Message.from_role_and_content(A, '{"loc":"SF"}')
            .with_channel("commentary")
            .with_recipient("functions.get_weather")
            .with_content_type("<|constrain|>json"),
            oh.Message.from_author_and_content(
                oh.Author.new(oh.Role.TOOL, "functions.get_weather"), '{"t": 20}'
            )
            .with_channel("commentary")
            .with_recipient("assistant"),
        ]
    )
    assert ours == oracle().render_conversation_for_completion(conv, A)


def test_history_final_answers_and_reasoning_drop():
    req = {
        "messages": [
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
            {"role": "user", "content": "q2"},
        ]
    }
    text = tok.decode(h.render_for_completion(to_harmony(req)))
    assert "<|start|>assistant<|channel|>final<|message|>a1<|end|>" in text
    assert "r1" not in text  # reasoning of finished turns is dropped
    # in the middle of a tool-call loop it stays: the model needs its own reasoning
    text = tok.decode(h.render_for_completion(to_harmony(REQUEST)))
    assert "<|channel|>analysis<|message|>Need the tool.<|end|>" in text


def test_completion_back_to_an_openai_message():
    completion = tok.encode(
        "<|channel|>analysis<|message|>Let me call.<|end|><|start|>assistant"
        "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
        '{"loc":"SF"}<|call|>',
        allow_special=True,
    )
    ids = (f"call_{i}" for i in itertools.count())
    msg = from_harmony(h.parse_completion(completion, strict=False), call_id=lambda: next(ids))
    assert msg.reasoning_content == "Let me call."
    assert msg.content is None
    assert msg.tool_calls[0].model_dump() == {
        "id": "call_0",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"loc":"SF"}'},
    }
    final = tok.encode("<|channel|>final<|message|>It is 20C.<|return|>", allow_special=True)
    msg = from_harmony(h.parse_completion(final))
    assert (msg.content, msg.reasoning_content, msg.tool_calls) == ("It is 20C.", None, None)


def test_tool_choice_none_hides_the_tools():
    text = tok.decode(h.render_for_completion(to_harmony({**REQUEST, "tool_choice": "none"})))
    assert "namespace functions" not in text and "# Instructions" in text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda r: r["messages"].append({"role": "bot", "content": "x"}),
            r"messages\[5\]\.role: Input should be 'system'",
        ),
        (
            lambda r: r["messages"].append({"role": "tool", "content": "x"}),
            r"messages\[5\]: a tool message needs a tool_call_id",
        ),
        (
            lambda r: r["messages"].append(
                {"role": "tool", "tool_call_id": "nope", "content": "x"}
            ),
            r"messages\[5\].*tool_call_id='nope'",
        ),
        (
            lambda r: r["tools"][0]["function"]["parameters"]["properties"].update(
                {"n": {"type": "int"}}
            ),
            r"tools\[0\]\.parameters: malformed JSON schema: properties\.n\.type: 'int' is not",
        ),
        (lambda r: r.update(reasoning_effort="max"), r"reasoning_effort: Input should be 'low'"),
        (lambda r: r.update(messages=[]), r"messages: List should have at least 1 item"),
        (lambda r: r.update(top_p=0), r"top_p: Input should be greater than 0"),
        (
            lambda r: r.update(tool_choice={"type": "function", "function": {"name": "nope"}}),
            r"tool_choice: the function 'nope' is not among the tools",
        ),
    ],
)
def test_bad_requests_name_the_message_and_field(change, message):
    request = json.loads(json.dumps(REQUEST))
    change(request)
    with pytest.raises(h.HarmonyError, match=message):
        to_harmony(ChatRequest.parse(request))


@pytest.mark.parametrize(
    ("conv", "message"),
    [
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "x"}]},
            r"messages\[1\]\.role: unknown role 'bot'",
        ),
        (
            {"messages": [{"role": "tool", "content": "x"}]},
            r"messages\[0\]\.name: a tool message needs the tool's name",
        ),
        (
            {
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
                                                "parameters": {"type": "object", "properties": []},
                                            }
                                        ],
                                    }
                                },
                            }
                        ],
                    }
                ]
            },
            r"messages\[0\]\.content\[0\]\.tools\.functions\.tools\[0\]\.parameters: malformed "
            r"JSON schema: properties: expected an object",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "url": "x"}]}]},
            r"messages\[0\]\.content\[0\]\.type: unknown content type 'image'",
        ),
        (
            {
                "messages": [
                    {
                        "role": "system",
                        "content": [{"type": "system_content", "reasoning_effort": "extreme"}],
                    }
                ]
            },
            r"messages\[0\]\.content\[0\]\.reasoning_effort: reasoning effort 'extreme'",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "system_content"}]}]},
            r"messages\[0\]: content\[0\]: system content is only allowed in system messages",
        ),
    ],
)
def test_bad_conversations_name_the_message_and_field(conv, message):
    with pytest.raises(h.HarmonyError, match=message):
        h.render_for_completion(h.Conversation.from_dict(conv).messages)


def test_json_round_trips_through_openai_harmony():
    messages = to_harmony(REQUEST, conversation_start_date="2026-11-24")
    payload = h.Conversation.from_messages(messages).to_json()
    theirs = oh.Conversation.from_json(payload)
    assert json.loads(theirs.to_json()) == json.loads(payload)
    assert h.Conversation.from_json(theirs.to_json()) == h.Conversation.from_json(payload)


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gptoss_ray.cluster.cli.main", "harmony", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_render_and_parse(tmp_path):
    conv = {"messages": [{"role": "user", "content": "What is 2+2?"}]}
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(conv))
    out = cli("render", str(path))
    assert out.returncode == 0, out.stderr
    theirs = oh.Conversation.from_json(json.dumps(conv))
    assert json.loads(out.stdout) == oracle().render_conversation_for_completion(
        theirs, oh.Role.ASSISTANT
    )
    text = cli("render", str(path), "--text").stdout
    assert text.strip() == "<|start|>user<|message|>What is 2+2?<|end|><|start|>assistant"

    req = tmp_path / "req.json"
    req.write_text(json.dumps(REQUEST))
    out = cli("render", str(req), "--openai", "--date", "2026-11-24")
    assert json.loads(out.stdout) == h.render_for_completion(
        to_harmony(REQUEST, conversation_start_date="2026-11-24")
    )

    completion = tok.encode(
        "<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final"
        "<|message|>4<|return|>",
        allow_special=True,
    )
    out = cli("parse", stdin=json.dumps(completion))
    assert out.returncode == 0, out.stderr
    expected = oracle().parse_messages_from_completion_tokens(completion, oh.Role.ASSISTANT)
    assert json.loads(out.stdout) == [json.loads(m.to_json()) for m in expected]


def test_cli_errors_are_one_clear_line(tmp_path):
    out = cli("parse", stdin="[200005, 300000]")
    assert out.returncode == 2
    assert out.stderr.strip() == "error: token id 300000 at index 1 is outside 0..201087"
    out = cli("render", str(tmp_path / "missing.json"))
    assert out.returncode == 2 and "missing.json" in out.stderr
    out = cli(
        "parse", "--strict", stdin=json.dumps(tok.encode("<|channel|>fin", allow_special=True))
    )
    assert out.returncode == 2 and "Unexpected EOS" in out.stderr

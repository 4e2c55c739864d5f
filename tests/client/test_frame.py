"""The harmony frame: with `--harmony-frame strict` (the default) every chat reply is
constrained to well-formed harmony, so that on the random-weight model at temperature 1
(which left alone writes no harmony at all) every reply parses in openai-harmony's strict
mode; tool_choice required / named / none and strict tool arguments are enforced by the
same grammar; the masks are llguidance's, applied exactly as its own kernel does."""

from __future__ import annotations

import json
import os
import random

import jsonschema
import llguidance.torch
import numpy
import openai
import openai_harmony as oh
import pytest
import torch

from gptoss_ray.cluster.client.chat import chat_prompt, chat_reply
from gptoss_ray.model import harmony
from gptoss_ray.model import tokenizer as tok
from gptoss_ray.model.grammar import reply_grammar
from gptoss_ray.model.harmony.messages import DeveloperContent, ToolDescription
from gptoss_ray.model.sampling import Draw, apply_masks_, sample_rows
from gptoss_ray.model.types import KVLayout, SamplingParams
from tests.engine_cases import GREEDY, baseline, prompts, tiny_core

# replies per run; GPTOSS_TEST_FRAMES=1000 for the count (RESULTS.md)
FRAMES = int(os.environ.get("GPTOSS_TEST_FRAMES", "80"))

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["c", "f"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}},
    "required": ["zone"],
    "additionalProperties": False,
}


def tool(name: str, schema: dict, strict: bool) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": schema, "strict": strict}}


def random_body(rng: random.Random, seed: int) -> dict:
    """A chat request with a random mix of what shapes the frame: tools (strict or not),
    tool_choice, a JSON answer, reasoning budgets and efforts, max_tokens."""
    body: dict = {
        "messages": [{"role": "user", "content": rng.choice(["Hi", "Weather in Oslo?", "Time?"])}],
        "temperature": 1.0,
        "seed": seed,
        "max_tokens": rng.choice([16, 32, 64]),
        "reasoning_effort": rng.choice(["low", "medium", "high"]),
    }
    budget = rng.choice([None, 0, 2, 8])
    if budget is not None:
        body["max_reasoning_tokens"] = budget
    tools = rng.choice([[], [("get_weather", WEATHER)], [("get_weather", WEATHER), ("now", TIME)]])
    if tools:
        body["tools"] = [tool(n, s, rng.random() < 0.5) for n, s in tools]
        body["tool_choice"] = rng.choice(
            ["auto", "none", "required", {"type": "function", "function": {"name": tools[-1][0]}}]
        )
    if rng.random() < 0.25:
        body["response_format"] = {"type": "json_object"}
    return body


def strictly_parsed(encoding, tokens: list[int]) -> list[oh.Message]:
    return encoding.parse_messages_from_completion_tokens(tokens, oh.Role.ASSISTANT, strict=True)


@pytest.fixture(scope="module")
def encoding():
    return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


def test_every_reply_parses_in_strict_mode(encoding):
    """FRAMES random requests at temperature 1 on random weights, few KV blocks
    (preempted sequences replay their grammar): every reply parses in openai-harmony's
    strict mode, and ours agrees; what each request asked of the frame holds. The same
    requests unframed mostly do not parse at all."""
    rng = random.Random(0)
    bodies = [random_body(rng, i) for i in range(FRAMES)]
    core = tiny_core(KVLayout(16, 64, 128))
    ids = []
    for body in bodies:
        prompt, params, stops = chat_prompt(body, 131072)
        assert params.grammar is not None
        assert not stops  # the reply below is built from the whole output
        ids.append(core.submit(prompt, params))
    core.run_until_done()
    assert core.stats.preemptions > 0
    finishes = {"stop": 0, "length": 0, "cut in a header": 0}
    for rid, body in zip(ids, bodies, strict=True):
        seq = core.output(rid)
        tokens = seq.token_ids
        reply = chat_reply(tokens, seq.finish_reason, request_id=rid)
        try:
            messages = strictly_parsed(encoding, tokens)
        except oh.HarmonyError as exc:
            # max_tokens can end a reply anywhere, also inside a message's few header
            # tokens, which strict parsing refuses by definition; a reply that stopped
            # never ends there
            assert seq.finish_reason == "length" and "header" in str(exc), (exc, tokens)
            # ...within the header it had begun: every message before it is whole
            starts = [i for i, t in enumerate(tokens) if t == tok.START]
            assert len(tokens) - (starts[-1] if starts else 0) <= 16, tokens
            whole = tokens[: starts[-1] - 1] if starts else []  # up to its <|end|>
            strictly_parsed(encoding, whole)
            finishes["cut in a header"] += 1
            continue
        ours = harmony.parse_completion(tokens, "assistant", strict=True)
        assert [json.loads(m.to_json()) for m in ours] == [
            json.loads(m.to_json()) for m in messages
        ]
        assert reply["problems"] == []
        finishes[seq.finish_reason] += 1
        check_what_was_asked(body, reply, tokens, seq.finish_reason)
    print(f"{FRAMES} framed replies: {finishes}")
    # calls and JSON stop; free text on random weights never ends (1 token in 200k)
    assert finishes["stop"] >= FRAMES // 10

    unframed = 0
    plain = [b for b in bodies if "tools" not in b and "response_format" not in b]
    core = tiny_core(KVLayout(16, 256, 128))
    ids = [core.submit(*chat_prompt(b, 131072, frame=False)[:2]) for b in plain]
    core.run_until_done()
    for rid in ids:
        try:
            strictly_parsed(encoding, core.output(rid).token_ids)
            unframed += 1
        except oh.HarmonyError:
            pass
    print(f"unframed: {unframed} of {len(plain)} parse")
    assert unframed < len(plain) // 2


def check_what_was_asked(body: dict, reply: dict, tokens: list[int], finish: str) -> None:
    choice = body.get("tool_choice", "auto")
    calls = reply["message"].get("tool_calls") or []
    names = [t["function"]["name"] for t in body.get("tools", [])]
    if choice == "none" or not names:
        assert not calls
    # an analysis message comes first, if at all: <|channel|>analysis<|message|>...<|end|>
    analysis = tokens[: tokens.index(tok.END)] if tok.END in tokens else []
    budget = body.get("max_reasoning_tokens")
    if budget is not None and analysis:
        assert budget > 0 and len(analysis) - analysis.index(tok.MESSAGE) - 1 <= budget
    if finish != "stop":
        return
    for call in calls:
        spec = next(
            t["function"]
            for t in body["tools"]
            if t["function"]["name"] == call["function"]["name"]
        )
        arguments = json.loads(call["function"]["arguments"])  # always a JSON object
        assert isinstance(arguments, dict)
        if spec["strict"]:
            jsonschema.validate(arguments, spec["parameters"])
    if choice == "required":
        assert len(calls) == 1
    elif isinstance(choice, dict):
        assert [c["function"]["name"] for c in calls] == [choice["function"]["name"]]
    elif "response_format" in body and not calls:
        assert isinstance(json.loads(reply["message"]["content"]), dict)


def test_greedy_replies_the_grammar_allows_are_unchanged():
    """A grammar that allows what the model writes anyway changes nothing: each greedy
    baseline reply under a grammar that allows, at each position, its own token and
    another reply's there, is the same token for token (a mask a step late or on the
    wrong row would force the other)."""
    want = baseline()
    core = tiny_core(KVLayout(16, 256, 128))
    ids = []
    for i, (prompt, reply) in enumerate(zip(prompts(), want, strict=True)):
        other = want[(i + 1) % len(want)]
        steps = " ".join(f"(<[{t}]> | <[{o}]>)" for t, o in zip(reply, other, strict=True))
        params = GREEDY.model_copy(update={"grammar": f"start: {steps}"})
        ids.append(core.submit(prompt, params))
    core.run_until_done()
    assert tuple(tuple(core.output(i).token_ids) for i in ids) == want


def test_masks_are_applied_as_llguidance_applies_them():
    """Our unpacking against llguidance's own kernel (its oracle): words all allowed, all
    forbidden and mixed, on a batch where only some rows are constrained."""
    g = torch.Generator().manual_seed(0)
    words = (tok.VOCAB_SIZE + 31) // 32
    bitmask = torch.randint(-(2**31), 2**31 - 1, (4, words), generator=g, dtype=torch.int32)
    bitmask[0, :100] = 0
    bitmask[1, 100:] = -1
    bitmask[2] = 0
    bitmask[2, 5] = 1 << 7  # one token allowed
    logits = torch.randn(4, tok.VOCAB_SIZE, generator=g)
    want = logits.clone()
    llguidance.torch.apply_token_bitmask_inplace(want, bitmask)
    got = logits.clone()
    apply_masks_(got, bitmask)
    assert torch.equal(got, want)
    greedy = SamplingParams(temperature=0, logprobs=3)
    draws = [Draw(greedy, 0, 0, allowed=bitmask[i] if i % 2 == 0 else None) for i in range(4)]
    tokens, logprobs = sample_rows(logits, draws)
    assert tokens[2] == 5 * 32 + 7 and [t for t, _ in logprobs[2].top] == [5 * 32 + 7]
    assert tokens[0] == int(want[0].argmax()) and tokens[1] == int(logits[1].argmax())


def test_a_grammar_ends_the_reply_even_while_min_tokens_holds_the_stop_ids():
    only_return = torch.zeros((tok.VOCAB_SIZE + 31) // 32, dtype=torch.int32)
    only_return[tok.RETURN // 32] = 1 << (tok.RETURN % 32)
    held = SamplingParams(temperature=0, min_tokens=5)
    stops = frozenset({tok.RETURN, tok.CALL})
    logits = torch.zeros(2, tok.VOCAB_SIZE)
    logits[:, tok.RETURN] = 10.0
    draws = [
        Draw(held, 0, 1, stop_ids=stops, allowed=only_return),
        Draw(held, 0, 1, stop_ids=stops),
    ]
    tokens, _ = sample_rows(logits, draws)
    assert tokens[0] == tok.RETURN and tokens[1] != tok.RETURN


def test_what_the_frame_covers():
    plain = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 100}
    assert chat_prompt(plain, 131072)[1].grammar is not None
    assert chat_prompt(plain, 131072, frame=False)[1].grammar is None
    assert chat_prompt({**plain, "ignore_eos": True}, 131072)[1].grammar is None
    asked = {**plain, "response_format": {"type": "json_object"}}
    assert chat_prompt(asked, 131072, frame=False)[1].grammar is not None
    # the default reasoning budget: by effort, at most half of max_tokens
    assert "thought[max_tokens=50]" in chat_prompt(plain, 131072)[1].grammar
    high = {**plain, "max_tokens": 100000, "reasoning_effort": "high"}
    assert "thought[max_tokens=16384]" in chat_prompt(high, 131072)[1].grammar
    # a harmony conversation may call the functions its developer message defines
    developer = DeveloperContent().with_function_tools([ToolDescription(name="f", description="")])
    conversation = harmony.Conversation.from_messages(
        [
            harmony.Message(
                author=harmony.Author(role=harmony.Role.DEVELOPER), content=[developer]
            ),
            harmony.Message.from_role_and_content(harmony.Role.USER, "x"),
        ]
    )
    grammar = chat_prompt({"conversation": conversation.to_dict()}, 131072)[1].grammar
    assert '" to=functions.f"' in grammar
    assert reply_grammar(reasoning=0).startswith("start: ending")


def test_tool_choice_and_strict_arguments_through_the_official_client(tiny_client):
    tools = [tool("get_weather", WEATHER, True), tool("now", TIME, False)]
    ask = dict(
        model="gpt-oss-tiny",
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=tools,
        temperature=1.0,
        max_tokens=120,
        extra_body={"max_reasoning_tokens": 4},
    )
    for seed in range(6):
        r = tiny_client.chat.completions.create(tool_choice="required", seed=seed, **ask).choices[0]
        assert r.finish_reason == "tool_calls" and len(r.message.tool_calls) == 1
        call = r.message.tool_calls[0].function
        if call.name == "get_weather":
            jsonschema.validate(json.loads(call.arguments), WEATHER)
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = tiny_client.chat.completions.create(tool_choice=named, seed=7, **ask).choices[0]
    (call,) = r.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    r = tiny_client.chat.completions.create(tool_choice="none", seed=7, **ask).choices[0]
    assert not r.message.tool_calls
    # streamed the same as whole
    whole = tiny_client.chat.completions.create(tool_choice=named, seed=8, **ask).choices[0].message
    chunks = list(
        tiny_client.chat.completions.create(tool_choice=named, seed=8, stream=True, **ask)
    )
    streamed = "".join(
        c.choices[0].delta.tool_calls[0].function.arguments or ""
        for c in chunks
        if c.choices and c.choices[0].delta.tool_calls
    )
    assert streamed == whole.tool_calls[0].function.arguments
    # Responses: function tools are strict by default there; tool_choice is flat
    resp = tiny_client.responses.create(
        model="gpt-oss-tiny",
        input="Weather?",
        tools=[{"type": "function", "name": "get_weather", "parameters": WEATHER}],
        tool_choice={"type": "function", "name": "get_weather"},
        temperature=1.0,
        max_output_tokens=120,
        # seeded: some random-weight replies write a commentary preamble that never ends
        extra_body={"max_reasoning_tokens": 4, "seed": 0},
    )
    (item,) = [o for o in resp.output if o.type == "function_call"]
    jsonschema.validate(json.loads(item.arguments), WEATHER)
    assert resp.tool_choice.name == "get_weather"


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        (
            {
                "tools": [tool("a", TIME, False)],
                "tool_choice": {"type": "function", "function": {"name": "b"}},
            },
            "tool_choice",
            "'b' is not among the tools (a)",
        ),
        (
            {"tools": [tool("a", TIME, False), tool("b", {"$ref": "#/nowhere"}, True)]},
            "tools[1].function.parameters",
            "/nowhere",
        ),
        (
            {"response_format": {"type": "json_object"}, "ignore_eos": True},
            "ignore_eos",
            "<|return|>",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {
                            "type": "object",
                            "properties": {"tags": {"type": "array", "uniqueItems": True}},
                        },
                    },
                }
            },
            "response_format.json_schema.schema",
            "uniqueItems cannot be enforced (at /properties/tags)",
        ),
    ],
)
def test_what_the_frame_cannot_do_is_a_400_naming_the_field(tiny_client, fields, param, says):
    with pytest.raises(openai.BadRequestError) as info:
        tiny_client.chat.completions.create(
            model="gpt-oss-tiny", messages=[{"role": "user", "content": "x"}], extra_body=fields
        )
    assert info.value.body["param"] == param
    assert says in info.value.body["message"]


def test_a_failed_grammar_ends_its_reply_and_spares_the_engine(capsys):
    from gptoss_ray.model.grammar import Matchers

    matchers = Matchers()
    matchers.start("a", reply_grammar(reasoning=4), [])
    matchers.start("b", reply_grammar(reasoning=4), [])
    matchers.consume("a", 12345)  # not <|channel|>: the frame refuses it
    masks = matchers.masks(["a", "b", None])
    bits = numpy.unpackbits(masks.numpy().view(numpy.uint8), axis=1, bitorder="little")
    allowed = [numpy.flatnonzero(row).tolist() for row in bits]
    assert allowed[0] == [tok.RETURN]
    assert allowed[1] == [tok.CHANNEL]
    assert len(allowed[2]) == 32 * masks.shape[1]
    assert "sequence a: its grammar failed" in capsys.readouterr().out

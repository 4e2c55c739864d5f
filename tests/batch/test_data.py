"""The Ray Data processor: a dataset of 200 rows through 2 engines of 2 shards gives each
row the tokens `Engine.chat` (or `Engine.generate`, for a prompt) gives it with the same
seed; bad rows become error rows while the rest complete; tool calls and JSON answers
parse; the engines it started are gone after the run. Running engines are used by name,
and without should_continue_on_error a bad row fails the run, named."""

from __future__ import annotations

import json
import time

import jsonschema
import pytest
import ray.data as ray_data

from gptoss_ray.cluster.batch.data import (
    ENGINE_PREFIX,
    ERROR_COLUMN,
    GptOssProcessorConfig,
    build_processor,
    row_body,
)
from gptoss_ray.cluster.client.chat import chat_reply
from gptoss_ray.cluster.client.engine import Engine
from gptoss_ray.model import harmony
from gptoss_ray.model import tokenizer as tok
from gptoss_ray.model.types import RequestError, SamplingParams

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "weather", "parameters": WEATHER, "strict": True}}
]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
HARMONY_PROMPT = tok.decode(
    harmony.render_for_completion([harmony.Message.from_role_and_content("user", "Hi there")])
)


def rows() -> list[dict]:
    """Chats (greedy, seeded at temperature 0.8), raw and harmony prompts, tool calls, JSON
    answers and three bad rows; every row has every column (Ray Data's blocks are tables)."""
    out = []
    for i in range(200):
        row = {
            "id": i,
            "messages": [{"role": "user", "content": f"Question number {i} " * (1 + i % 5)}],
            "prompt": None,
            "tools": None,
            "tool_choice": None,
            "response_format": None,
            "sampling_params": {"max_tokens": 4 + i % 3, "temperature": 0.0},
        }
        if i % 2:
            row["sampling_params"] = {"max_tokens": 5, "temperature": 0.8, "seed": i}
        if i % 10 == 3:
            row["messages"], row["prompt"] = None, f"Plain text number {i}"
        if i % 10 == 7:
            row["messages"], row["prompt"] = None, HARMONY_PROMPT
        if i in (11, 12):
            row["tools"], row["tool_choice"] = json.dumps(TOOLS), "required"
            row["sampling_params"] = {"max_tokens": 80, "temperature": 1.0, "seed": i}
        if i in (21, 22):
            fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
            row["response_format"] = json.dumps(fmt)
            row["sampling_params"] = {"max_tokens": 120, "temperature": 1.0, "seed": i}
        out.append(row)
    out[40]["messages"] = [{"role": "wizard", "content": "x"}]
    out[41]["sampling_params"] = {"max_tokens": 4, "detokenize": False}
    out[42]["prompt"] = "both a prompt and messages"
    return out


BAD = {40: "messages[0].role", 41: "detokenize", 42: "both"}


def expected(engine: Engine, data: list[dict]) -> dict[int, list[int]]:
    """Each good row's tokens through the Python API, the same engine settings."""
    chats, prompts = {}, {}
    for row in data:
        if row["id"] in BAD:
            continue
        params = {k: v for k, v in row["sampling_params"].items() if v is not None}
        if row["messages"] is not None:
            body = {"messages": row["messages"], **params, "max_reasoning_tokens": 8}
            for column in ("tools", "tool_choice", "response_format"):
                if row[column] is not None:
                    value = row[column]
                    body[column] = json.loads(value) if column != "tool_choice" else value
            chats[row["id"]] = body
        else:
            ids = tok.encode(row["prompt"], allow_special=True)
            prompts[row["id"]] = (ids, SamplingParams(**params))
    replies = engine.chat(list(chats.values()))
    out = {i: r["token_ids"] for i, r in zip(chats, replies, strict=True)}
    generated = engine.generate([p for p, _ in prompts.values()], [s for _, s in prompts.values()])
    out |= {i: g.token_ids for i, g in zip(prompts, generated, strict=True)}
    return out


ENGINE = {"model": "gpt-oss-tiny", "shards": 2, "dtype": "float32", "kv_budget_mb": 64}


def with_budget(row: dict) -> dict:
    if row["messages"] is not None:
        row["sampling_params"] = {**row["sampling_params"], "max_reasoning_tokens": 8}
    return row


@pytest.fixture(scope="module")
def reference(ray_session):
    """A running engine, by name, and each good row's tokens through its Python API."""
    with Engine.start(**ENGINE, name="data-test-engine") as engine:
        yield engine, expected(engine, rows())


def test_rows_through_two_engines_equal_the_python_api_and_the_engines_end(ray_session, reference):
    ray, (_, want) = ray_session, reference
    data = rows()
    cpus = ray.available_resources()["CPU"]
    config = GptOssProcessorConfig(
        **ENGINE,
        cpus_per_shard=0.5,
        concurrency=2,
        batch_size=16,
        should_continue_on_error=True,
    )
    processor = build_processor(
        config,
        preprocess=with_budget,
        postprocess=lambda row: {**row, "answer": f"post: {row['generated_text']}"},
    )
    out = {r["id"]: r for r in processor(ray_data.from_items(data)).take_all()}
    assert sorted(out) == list(range(200))
    for i, says in BAD.items():
        assert says in out[i][ERROR_COLUMN] and out[i]["generated_tokens"] is None
        assert out[i].get("answer") is None  # failed rows skip postprocess
    got = {i: r["generated_tokens"] for i, r in out.items() if i not in BAD}
    assert {i for i in got if got[i] != want[i]} == set()
    for i, r in out.items():
        if i in BAD:
            continue
        assert r[ERROR_COLUMN] == "" and r["answer"] == f"post: {r['generated_text']}"
        assert r["num_generated_tokens"] == len(r["generated_tokens"]) > 0
        assert r["num_input_tokens"] > 0 and r["finish_reason"] in ("stop", "length", "tool_calls")
    for i in (11, 12):  # tool_choice required: a call, its arguments valid
        (call,) = out[i]["tool_calls"]
        assert out[i]["finish_reason"] == "tool_calls" and call["function"]["name"] == "weather"
        jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER)
    for i in (21, 22):
        assert out[i]["finish_reason"] == "stop"
        jsonschema.validate(json.loads(out[i]["generated_text"]), PERSON)
    raw = out[3]  # a raw prompt: its text, as /v1/completions
    assert raw["reasoning"] is None and raw["generated_text"] == tok.decode(
        [t for t in raw["generated_tokens"] if t < tok.NUM_BASE_TOKENS]
    )
    for i in range(7, 200, 10):  # a harmony prompt: read as a chat's reply is read
        r = out[i]
        reply = chat_reply(r["generated_tokens"], r["finish_reason"])["message"]
        assert (r["generated_text"], r["reasoning"]) == (
            reply["content"],
            reply["reasoning_content"],
        )
        assert len(r["tool_calls"]) == len(reply["tool_calls"])
        assert r["generated_text"] != tok.decode(
            [t for t in r["generated_tokens"] if t < tok.NUM_BASE_TOKENS]
        )
    # the engines it started are gone, their shards' CPUs back
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        named = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
        if ray.available_resources()["CPU"] == cpus and not any(
            n.startswith(ENGINE_PREFIX) for n in named
        ):
            break
        time.sleep(0.2)
    assert ray.available_resources()["CPU"] == cpus
    assert not any(n.startswith(ENGINE_PREFIX) for n in named), named


def test_running_engines_by_name_and_a_bad_row_without_continue(reference):
    engine, want = reference
    data = [with_budget(r) for r in rows()[:24] if r["id"] not in BAD]
    config = GptOssProcessorConfig(**ENGINE, engine_names=["data-test-engine"], batch_size=8)
    out = build_processor(config)(ray_data.from_items(data)).take_all()
    assert {r["id"]: r["generated_tokens"] for r in out} == {r["id"]: want[r["id"]] for r in data}
    assert ERROR_COLUMN not in out[0]  # as Ray's processors: only with continue
    assert engine.info()["healthy"]  # used, not stopped
    bad = [{**data[0], "messages": [{"role": "wizard", "content": "x"}]}]
    with pytest.raises(Exception, match=r"the row .*wizard.* failed: .*messages\[0\]\.role"):
        build_processor(config)(ray_data.from_items(bad)).take_all()
    assert engine.info()["healthy"]


@pytest.mark.parametrize(
    ("row", "says"),
    [
        ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "has both"),
        ({"id": 1}, "has neither"),
        ({"prompt": "x", "sampling_params": {"best_of": 2}}, "best_of not supported"),
        ({"prompt": "x", "sampling_params": {"n": 2}}, "one reply"),
        ({"prompt": "x", "tools": "[]"}, "tools: for a chat"),
        ({"prompt": "x", "sampling_params": {"max_reasoning_tokens": 4}}, "max_reasoning_tokens"),
        ({"messages": [{"role": "user", "content": "y"}], "tools": "[{"}, "tools: not JSON"),
    ],
)
def test_a_bad_row_is_named(row, says):
    with pytest.raises(RequestError, match=says):
        row_body(row)


def test_arrow_nulls_are_absent_keys():
    """A struct column gives every row every key: nulls are dropped, a JSON string is
    read as it is (a schema's literal null kept)."""
    row = {
        "messages": [{"role": "user", "content": "y", "name": None}],
        "sampling_params": {"max_tokens": 3, "seed": None, "temperature": 0.5},
        "response_format": json.dumps(
            {"type": "json_schema", "json_schema": {"name": "n", "schema": {"default": None}}}
        ),
        "tools": None,
    }
    body = row_body(row)
    assert body["messages"] == [{"role": "user", "content": "y"}]
    assert body["max_tokens"] == 3 and "seed" not in body and "tools" not in body
    assert body["response_format"]["json_schema"]["schema"] == {"default": None}


def test_a_batch_over_scripted_harmony_fills_every_column():
    """Without Ray: a pyarrow batch through `generate_batch` over an engine whose shards
    speak harmony (`tests.scripted_engine`): a chat's reasoning and answer, a tool call,
    a harmony prompt parsed as a chat, a raw prompt's text, an error row; and an empty
    batch still gets every column, typed."""
    import asyncio

    import pyarrow as pa

    from gptoss_ray.cluster.batch.data import generate_batch, output_schema
    from gptoss_ray.cluster.client.engine_client import EnginePool, LocalEngineClient
    from tests.scripted_engine import REPLIES, scripted_engine

    tool = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}
    raw = "<|start|>user<|message|>Hi<|end|>"  # no assistant turn: a raw completion
    table = pa.Table.from_pylist(
        [
            {"k": "chat", "messages": [{"role": "user", "content": "Hi"}], "prompt": None},
            {"k": "tool", "messages": [{"role": "user", "content": "Weather?"}], "prompt": None},
            {"k": "harmony", "messages": None, "prompt": HARMONY_PROMPT},
            {"k": "raw", "messages": None, "prompt": raw},
            {"k": "bad", "messages": [{"role": "wizard", "content": "x"}], "prompt": None},
        ]
    ).append_column("tools", pa.array([None, json.dumps([tool]), None, None, None]))
    # a completion's max_tokens is 16 unless asked (OpenAI's and vLLM's default)
    asked = pa.array([None, None, {"max_tokens": 64}, {"max_tokens": 64}, None])
    table = table.append_column("sampling_params", asked)
    engine, _ = scripted_engine()

    async def main(batch):
        engines = EnginePool([LocalEngineClient(engine)])
        return await generate_batch(batch, engines, engine.info(), keep_errors=True)

    ids = pa.Table.from_pylist(  # a prompt of token ids: a column of its own type
        [{"prompt": tok.encode(HARMONY_PROMPT, allow_special=True), "sampling_params": None}]
    )
    try:
        out = {r["k"]: r for r in asyncio.run(main(table)).to_pylist()}
        (by_ids,) = asyncio.run(main(ids)).to_pylist()
        empty = asyncio.run(main(table.slice(0, 0)))
    finally:
        engine.shutdown()
    chat = out["chat"]
    assert (chat["generated_text"], chat["reasoning"]) == (
        "Hello there, friend!",
        "Thinking about it.",
    )
    assert chat["finish_reason"] == "stop" and chat[ERROR_COLUMN] == ""
    assert chat["generated_tokens"] == tok.encode(REPLIES["answer"], allow_special=True)
    assert chat["num_generated_tokens"] == len(chat["generated_tokens"])
    (call,) = out["tool"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"loc": "SF"}'}
    assert out["tool"]["finish_reason"] == "tool_calls" and out["tool"]["generated_text"] is None
    harmony_row = out["harmony"]
    assert (harmony_row["generated_text"], harmony_row["reasoning"]) == (
        "Hello there, friend!",
        "Thinking about it.",
    )
    assert harmony_row["finish_reason"] == "stop"
    # 16 tokens (a completion's default max_tokens) of the same reply, parsed the same way
    assert by_ids["generated_tokens"] == harmony_row["generated_tokens"][:16]
    assert by_ids["finish_reason"] == "length" and by_ids["reasoning"] == "Thinking about it."
    assert out["raw"]["reasoning"] is None and out["raw"]["finish_reason"] == "stop"
    assert (
        out["raw"]["generated_text"]
        == "analysisThinking about it.assistantfinalHello there, friend!"
    )
    assert "messages[0].role" in out["bad"][ERROR_COLUMN] and out["bad"]["generated_text"] is None
    assert empty.num_rows == 0 and empty.schema.names[-8:] == output_schema().names


def test_engines_that_leave_ray_data_no_cpu_are_warned_of(monkeypatch):
    import ray

    from gptoss_ray.cluster.batch.data import _check_room

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    _check_room(GptOssProcessorConfig(shards=2, concurrency=1))  # 2 of 4 CPUs: room
    with pytest.warns(UserWarning, match=r"hold 4 CPU; this Ray cluster has 4 CPU"):
        _check_room(GptOssProcessorConfig(shards=2, concurrency=2))
    with pytest.warns(UserWarning, match=r"hold 2 CPU, 2 GPU; .* has 4 CPU, 0 GPU"):
        _check_room(GptOssProcessorConfig(shards=2, device="cuda"))

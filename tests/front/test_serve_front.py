"""The HTTP front as a Ray Serve application over two engines (one CPU shard each): replies
equal the single-process baseline whichever engine serves them, requests spread over the
engines and a conversation returns to the engine that holds its prefix, a client that
leaves has its sequence cancelled through Serve, the metrics name both engines, and the
front keeps serving when an engine is lost."""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gptoss_ray.cluster.client.engine_client import EngineClient, EnginePool, prefix_keys
from gptoss_ray.cluster.front.serve import stop
from gptoss_ray.cluster.front.serve_app import AppArgs, build_app
from gptoss_ray.cluster.runtime.ray_instance import NAMESPACE
from tests.engine_cases import expected_reply

NAME = "test-front"
KEY = "front-key"
CONFIGS = sorted((Path(__file__).parents[2] / "configs" / "serve").glob("*.yaml"))


@pytest.fixture(scope="module")
def front(ray_session):
    """The tiny config's application, as `serve run configs/serve/tiny-cpu.yaml` builds it,
    on a free port, with smaller engines and an API key."""
    from ray import serve as ray_serve

    from gptoss_ray.cluster.front.serve import start_front

    app = yaml.safe_load((CONFIGS[0].parent / "tiny-cpu.yaml").read_text())["applications"][0]
    engine = app["args"]["engine"] | {"shards": 1, "dtype": "float32", "kv_budget_mb": 64}
    args = app["args"] | {"name": NAME, "engine": engine, "front": {"api_key": KEY}}
    build_app(args)  # starts the engines
    spec = AppArgs(**args)
    url = start_front(NAME, [NAME, f"{NAME}-1"], "127.0.0.1", 0, spec.front, replicas=1)
    yield url
    stop(NAME)
    assert NAME not in ray_serve.status().applications


def engine_requests() -> list[int]:
    import ray

    return [
        ray.get(ray.get_actor(n, namespace=NAMESPACE).stats.remote())["requests"]
        for n in (NAME, f"{NAME}-1")
    ]


def ask(client: openai.OpenAI, messages: list[dict], **fields) -> dict:
    body = {"model": "gpt-oss-tiny", "messages": messages, "max_tokens": 5, "temperature": 0}
    r = client.chat.completions.create(**body, **fields)
    return {"reply": r, "expected": expected_reply(body)}


def test_replies_equal_the_baseline_on_both_engines(front):
    client = openai.OpenAI(base_url=front, api_key=KEY, max_retries=0, timeout=120)
    before = engine_requests()
    questions = [[{"role": "user", "content": f"Question number {i}"}] for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda m: ask(client, m), questions))
    for got in results:
        message = got["reply"].choices[0].message.model_dump()
        assert {k: message.get(k) for k in got["expected"]["message"]} == got["expected"]["message"]
    after = engine_requests()
    spread = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(spread) == 8 and min(spread) >= 2, spread


def test_a_conversation_returns_to_the_engine_holding_its_prefix(front):
    client = openai.OpenAI(base_url=front, api_key=KEY, max_retries=0, timeout=120)
    history = [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "A long shared opening question " * 8},
    ]
    first = engine_requests()
    ask(client, history)
    second = engine_requests()
    home = [b - a for a, b in zip(first, second, strict=True)].index(1)
    for turn in range(3):  # ties would alternate the engines; the prefix keeps them home
        history += [
            {"role": "assistant", "content": "Fine."},
            {"role": "user", "content": f"Again {turn}"},
        ]
        ask(client, history)
    third = engine_requests()
    assert third[home] - second[home] == 3 and sum(third) - sum(second) == 3


def open_stream(url: str, text: str, max_tokens: int):
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=120)
    return client.chat.completions.create(
        model="gpt-oss-tiny",
        messages=[{"role": "user", "content": text}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )


def test_a_client_that_leaves_has_its_request_cancelled(front):
    import ray

    stream = open_stream(front, "Talk for a long while", 2000)
    chunks = iter(stream)
    next(chunks), next(chunks)
    stream.close()
    engines = [ray.get_actor(n, namespace=NAMESPACE) for n in (NAME, f"{NAME}-1")]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = ray.get([e.stats.remote() for e in engines])
        if all(s["waiting"] == 0 and sum(s["running"]) == 0 for s in stats):
            break
        time.sleep(0.1)
    generated = sum(s["generated_tokens"] for s in stats)
    assert all(s["waiting"] == 0 and sum(s["running"]) == 0 for s in stats), stats
    assert generated < 1500  # cancelled, not run to max_tokens


def get(url: str, path: str, key: str | None = KEY) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    req = urllib.request.Request(url.removesuffix("/v1") + path, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_metrics_count_http_answers_latencies_and_both_engines(front):
    assert get(front, "/v1/models", key="wrong")[0] == 401
    status, raw = get(front, "/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(raw.decode())}
    codes = {
        (s.labels["route"], s.labels["code"]): s.value
        for s in families["gptoss_http_requests"].samples
        if s.name.endswith("_total")
    }
    assert codes[("/v1/chat/completions", "200")] >= 8 and codes[("/v1/models", "401")] >= 1
    ttft = [
        s
        for s in families["gptoss_time_to_first_token_seconds"].samples
        if s.name.endswith("_count")
    ]
    assert ttft[0].value >= 8
    engines = {s.labels["engine"] for s in families["gptoss_generated_tokens"].samples}
    assert engines == {"0", "1"}
    load = [s for s in families["gptoss_expert_tokens"].samples if s.labels["engine"] == "1"]
    assert sum(s.value for s in load) > 0
    assert {
        "gptoss_kv_blocks_used_ratio",
        "gptoss_prefix_cache_hit_tokens",
        "gptoss_queue_depth",
    } <= set(families)


def batch_line(i: int, **body) -> dict:
    body = {
        "model": "gpt-oss-tiny",
        "messages": [{"role": "user", "content": f"Batch question {i % 7}"}],
        "max_tokens": 4,
        "temperature": 0,
        **body,
    }
    return {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}


def run_batch(client: openai.OpenAI, tmp_path, lines: list, during=None, when=None) -> tuple:
    """Runs the lines as a batch through the API -> (batch, output lines, error lines).
    `during()` is called once while the batch runs, as soon as `when()` holds (default:
    four lines are done)."""
    src = tmp_path / "input.jsonl"
    src.write_bytes(
        b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines)
    )
    uploaded = client.files.create(file=src.open("rb"), purpose="batch")
    assert uploaded.bytes == src.stat().st_size and uploaded.purpose == "batch"
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"run": "test"},
    )
    assert batch.status == "in_progress" and batch.metadata == {"run": "test"}
    deadline = time.monotonic() + 300
    while batch.status in ("validating", "in_progress", "finalizing", "cancelling"):
        if during is not None and (
            when() if when is not None else batch.request_counts.completed >= 4
        ):
            during()
            during = None
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    assert during is None, "the batch ended before `during` could run"
    ok = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    failed = [json.loads(x) for x in client.files.content(batch.error_file_id).text.splitlines()]
    return batch, ok, failed


def test_the_batch_api_with_bad_lines_through_the_official_client(front, tmp_path):
    client = openai.OpenAI(base_url=front, api_key=KEY, max_retries=0, timeout=120)
    lines = [batch_line(i) for i in range(24)]
    lines[5] = b"{not json"
    lines[9] = batch_line(9, model="gpt-4o")  # not the model served
    lines[14] = {**batch_line(14), "url": "/v1/embeddings"}
    batch, ok, failed = run_batch(client, tmp_path, lines)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed) == (24, 21)
    assert batch.request_counts.failed == 3
    assert sorted(r["custom_id"] for r in ok) == sorted(
        f"q{i}" for i in range(24) if i not in (5, 9, 14)
    )
    assert sorted(r["error"]["code"] for r in failed) == [
        "invalid_json",
        "invalid_url",
        "model_not_found",
    ]
    for record in ok:  # equal to the baseline, whichever engine ran it
        i = int(record["custom_id"][1:])
        want = expected_reply(batch_line(i)["body"])["message"]
        assert record["response"]["body"]["choices"][0]["message"] == want
    assert batch.id in [b.id for b in client.batches.list(limit=100)]
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nothere")
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(
            input_file_id=batch.input_file_id, endpoint="/v1/embeddings", completion_window="24h"
        )


def test_files_listed_retrieved_deleted_and_a_batch_cancelled(front, tmp_path):
    client = openai.OpenAI(base_url=front, api_key=KEY, max_retries=0, timeout=120)
    src = tmp_path / "long.jsonl"
    lines = [batch_line(i, max_tokens=200) for i in range(40)]
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    uploaded = client.files.create(file=src.open("rb"), purpose="batch")
    assert client.files.retrieve(uploaded.id).filename == "long.jsonl"
    assert uploaded.id in [f.id for f in client.files.list(purpose="batch")]
    assert client.files.content(uploaded.id).text == src.read_text()
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=src.open("rb"), purpose="fine-tune")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    deadline = time.monotonic() + 60
    while cancelled.status == "cancelling" and time.monotonic() < deadline:
        time.sleep(0.2)
        cancelled = client.batches.retrieve(batch.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at is not None
    done = client.files.content(cancelled.output_file_id).text.splitlines()
    assert len(done) == cancelled.request_counts.completed < 40  # what finished stays
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_an_engine_killed_mid_batch_loses_no_line_and_the_front_keeps_serving(front, tmp_path):
    """Last in this module: it kills an engine, whose lines in flight go to the other."""
    import ray

    client = openai.OpenAI(base_url=front, api_key=KEY, max_retries=0, timeout=120)
    lines = [batch_line(i, max_tokens=24) for i in range(64)]

    victim = ray.get_actor(f"{NAME}-1", namespace=NAMESPACE)

    def decoding() -> bool:  # lines decode together: wait for some in flight on the victim
        return sum(ray.get(victim.stats.remote())["running"]) > 0

    batch, ok, failed = run_batch(
        client, tmp_path, lines, during=lambda: ray.kill(victim), when=decoding
    )
    assert batch.status == "completed" and not failed, batch
    ids = [r["custom_id"] for r in ok]
    assert sorted(ids) == sorted(f"q{i}" for i in range(64))  # every line exactly once
    for i in range(4):  # whichever engine each is routed to, the live one answers
        got = ask(client, [{"role": "user", "content": f"After the loss {i}"}])
        assert got["reply"].choices[0].message.content == got["expected"]["message"]["content"]
    status, raw = get(front, "/health")
    assert status == 200 and f"{NAME}-1" in json.loads(raw)["degraded"][0]


class FakeLink(EngineClient):
    def __init__(self, name: str, outstanding: int = 0, answer=None) -> None:
        super().__init__(name)
        self.outstanding = outstanding
        self._answer = answer

    async def _call(self, method, *args):
        return await self._answer(method, *args)


def test_routing_by_least_work_then_by_prefix_within_slack():
    a, b = FakeLink("a"), FakeLink("b")
    pool = EnginePool([a, b], prefix_slack=2)
    chat = {"messages": [{"role": "user", "content": "x"}]}
    assert [pool.pick({"prompt": str(i)}).name for i in range(4)] == ["a", "b", "a", "b"]
    assert pool.pick(chat) is a
    a.outstanding = 2
    longer = {"messages": [*chat["messages"], {"role": "user", "content": "y"}]}
    assert pool.pick(longer) is a  # its prefix is on a, within the slack
    a.outstanding = 3
    assert pool.pick(longer) is b  # past it: the least loaded
    b.down, b.down_at = "gone", time.monotonic()
    assert pool.pick({"prompt": "z"}) is a  # a lost engine is left alone for a while
    assert prefix_keys(longer)[0] == prefix_keys(chat)[0]


def test_a_front_whose_first_question_finds_an_engine_lost_asks_the_others():
    """The model and context are asked of the engines once, on the first request: one
    already gone then is left out, not the reason for a 503 (all gone: the error)."""
    import asyncio

    from gptoss_ray.cluster.front.app import FrontSettings, FrontState
    from gptoss_ray.model.types import EngineUnavailable

    async def lost(method, *args):
        raise EngineUnavailable("the engine b is unreachable")

    async def alive(method, *args):
        return {"model_id": "gpt-oss-tiny", "max_context_length": 131072}

    front = FrontState(
        EnginePool([FakeLink("b", answer=lost), FakeLink("a", answer=alive)]), FrontSettings()
    )
    assert asyncio.run(front.info())["model_id"] == "gpt-oss-tiny"
    gone = FrontState(EnginePool([FakeLink("b", answer=lost)]), FrontSettings())
    with pytest.raises(EngineUnavailable, match="b is unreachable"):
        asyncio.run(gone.info())


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_serve_configs_validate(path):
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(config)
    for app in config["applications"]:
        assert app["import_path"] == "gptoss_ray.cluster.front.serve_app:build_app"
        AppArgs(**app["args"])


def test_stopping_the_front_lets_a_stream_in_flight_finish(front):
    """After the engine loss above: `stop` deletes the Serve application, whose replica
    drains (graceful_shutdown_timeout_s) before the engines stop; the stream that was
    running ends whole, with its [DONE]."""
    import threading

    chunks = iter(open_stream(front, "A stream that runs while the front stops", 40))
    got = [next(chunks), next(chunks)]
    stopping = threading.Thread(target=stop, args=(NAME,), kwargs={"address": None})
    stopping.start()
    got += list(chunks)  # ends with the usage chunk, not a torn connection
    stopping.join(timeout=120)
    assert got[-1].usage.completion_tokens == 40
    assert [c.choices[0].finish_reason for c in got if c.choices][-1] == "length"

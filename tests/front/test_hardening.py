"""Probes of a careless client and an attacker, replayed (bounded, on loopback): the HTTP
API against an engine with scripted shards, and the batch input and output files."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import time

import openai
import pytest

from gptoss_ray.cluster.batch.format import OutputBusy, OutputWriter, error_record, read_input
from gptoss_ray.cluster.front.endpoints import chat_completions as chat_endpoint
from gptoss_ray.cluster.front.state import MAX_BODY_BYTES
from tests.conftest import API_KEY
from tests.scripted_engine import scripted_engine
from tests.support import served

KEY = API_KEY


def raw_request(url: str, head: str, body: bytes = b"", timeout: float = 10) -> tuple[int, bytes]:
    """Sends bytes as given; -> (status, body)."""
    host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head.encode() + b"\r\n\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        header, rest = data.split(b"\r\n\r\n", 1)
        length = next(
            (
                int(line.split(b":")[1])
                for line in header.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        while len(rest) < length and not head.startswith("HEAD"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    return int(header.split()[1]), rest


def post(url: str, body: dict | bytes, key: str = KEY) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\nConnection: close"
    )
    status, raw = raw_request(url, head, data)
    return status, json.loads(raw)


def chat(**fields) -> dict:
    return {
        "model": "gpt-oss-tiny",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 60,
        **fields,
    }


def idle(engine) -> bool:
    with engine.core._lock:
        return not engine.core.requests and not engine.core.scheduler.has_work()


def wait_idle(engine, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if idle(engine):
            return True
        time.sleep(0.02)
    return idle(engine)


# -- 1: descriptors past 1024, idle connections, a connection cap -------------------------
def test_a_stream_works_on_descriptors_past_1024(scripted_api):
    url, engine, _ = scripted_api
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2400:
        pytest.skip(f"the descriptor limit ({hard}) is too low to reach 1024")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2400), hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
        slow = [{"role": "user", "content": "count slowly"}]  # long enough to poll the client
        chunks = list(client.chat.completions.create(**chat(stream=True, messages=slow)))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.startswith("la la") and chunks[-1].choices[0].finish_reason == "length"
    finally:
        for fd in filler:
            os.close(fd)
    assert wait_idle(engine)


def test_idle_connections_never_block_requests_and_are_closed_after_a_reply():
    engine, _ = scripted_engine()
    with served(engine, KEY, idle_timeout_s=1.0) as url:
        host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
        try:
            idlers = [socket.create_connection((host, int(port))) for _ in range(300)]
            status, body = post(url, chat())  # an event loop, not a thread per connection
            assert (
                status == 200 and body["choices"][0]["message"]["content"] == "Hello there, friend!"
            )
            for s in idlers:
                s.close()
            # a kept-alive connection idle past the timeout is closed by the server
            data = json.dumps(chat()).encode()
            head = (
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
            )
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(head.encode() + data)
                got = b""
                while b"Hello there, friend!" not in got:
                    got += sock.recv(65536)
                time.sleep(1.5)
                assert sock.recv(1) == b""
        finally:
            engine.shutdown()


def test_past_its_limit_a_front_answers_429_with_retry_after():
    engine, _ = scripted_engine()
    with served(engine, KEY, max_outstanding=1, retry_after_s=3) as url:
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
        try:
            slow = client.chat.completions.create(
                **chat(stream=True, messages=[{"role": "user", "content": "slowly"}])
            )
            next(iter(slow))  # one request in the engine, still running
            head = (
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close"
            )
            data = json.dumps(chat()).encode()
            status, raw = raw_request(url, head % len(data), data)
            assert status == 429 and json.loads(raw)["error"]["code"] == "server_busy"
            with pytest.raises(openai.RateLimitError) as caught:
                client.chat.completions.create(**chat())
            assert caught.value.response.headers["retry-after"] == "3"
            slow.close()  # the client leaves: its request is cancelled, and room is made
            assert wait_idle(engine)
            assert client.chat.completions.create(**chat()).choices[0].finish_reason == "stop"
        finally:
            engine.shutdown()


def test_requests_at_once_with_one_key_are_capped():
    engine, _ = scripted_engine()
    with served(engine, KEY, max_concurrent_per_key=1) as url:
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
        try:
            slow = client.chat.completions.create(
                **chat(stream=True, messages=[{"role": "user", "content": "slowly"}])
            )
            next(iter(slow))
            with pytest.raises(openai.RateLimitError, match="its limit") as caught:
                client.models.list()
            assert caught.value.response.headers["retry-after"] == "1"
            slow.close()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the stream's end frees its slot
                try:
                    assert client.models.list().data[0].id == "gpt-oss-tiny"
                    break
                except openai.RateLimitError:
                    time.sleep(0.05)
            else:
                raise AssertionError("the slot was never freed")
        finally:
            engine.shutdown()


# -- 2: a failure after the request was queued ---------------------------------------------
def test_a_handler_failing_after_submit_cancels_and_forgets(scripted_api, monkeypatch):
    url, engine, _ = scripted_api

    def broken(*args):
        raise AttributeError("a bug past submit")

    monkeypatch.setattr(chat_endpoint, "chat_completion", broken)
    status, body = post(url, chat(messages=[{"role": "user", "content": "slowly"}]))
    assert status == 500 and "a bug past submit" in body["error"]["message"]
    assert wait_idle(engine, timeout=5)  # cancelled and forgotten
    # in a stream the error is its last event, in the same shape
    monkeypatch.setattr(chat_endpoint, "_chat_delta", broken)
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
    stream = client.chat.completions.create(
        **chat(stream=True, messages=[{"role": "user", "content": "slowly"}])
    )
    with pytest.raises(openai.APIError, match="a bug past submit"):
        list(stream)
    assert wait_idle(engine, timeout=5)  # not running to max_tokens


def test_bad_stream_options_are_a_400_and_queue_nothing(scripted_api):
    url, engine, _ = scripted_api
    status, body = post(url, chat(stream=True, stream_options="x"))
    assert status == 400 and body["error"]["param"] == "stream_options"
    assert idle(engine)


# -- 7 and 8: limits, and the shape of every error --------------------------------------
@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": "1"}, "temperature"),
        ({"stream": "yes"}, "stream"),
        ({"n": 17}, "n"),
        ({"n": 0}, "n"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"hello": 1}}, "logit_bias"),
        ({"logit_bias": {"201088": 1}}, "logit_bias"),
        ({"model": 123}, "model"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ],
)
def test_bad_fields_are_400s_that_name_the_field(scripted_api, fields, param):
    status, body = post(scripted_api[0], chat(**fields))
    assert status == 400, body
    assert body["error"]["param"] == param and body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"top_logprobs": 3}, "top_logprobs needs logprobs: true"),
        ({"min_tokens": 9, "max_tokens": 4}, "min_tokens 9 exceeds the max_tokens 4"),
    ],
)
def test_fields_that_disagree_are_400s_that_say_why(scripted_api, fields, says):
    status, body = post(scripted_api[0], chat(**fields))
    assert status == 400 and says in body["error"]["message"], body


def test_fields_at_their_defaults_are_accepted(scripted_api):
    fields = {"n": 1, "logprobs": False, "presence_penalty": 0, "frequency_penalty": 0.0}
    status, body = post(scripted_api[0], chat(**fields, logit_bias={}, stream_options=None))
    assert status == 200, body


def test_an_unknown_model_is_a_404(scripted_api):
    status, body = post(scripted_api[0], chat(model="gpt-4o"))
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert body["error"]["param"] == "model"


def test_bodies_too_large_badly_sized_or_too_deep(scripted_api):
    url, engine, _ = scripted_api
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
    status, body = raw_request(url, head + f"Content-Length: {MAX_BODY_BYTES + 1}")
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    status, body = raw_request(url, head + "Content-Length: ten")
    assert status == 400  # (uvicorn's answer: the request never reaches the API)
    status, body = post(url, b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and body["error"]["code"] == "invalid_json"
    assert idle(engine)


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
def test_other_methods_need_the_key_and_get_json(scripted_api, method):
    url = scripted_api[0]
    status, body = raw_request(url, f"{method} /v1/chat/completions HTTP/1.1\r\nHost: x")
    assert status == 401
    head = f"{method} /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k"
    status, body = raw_request(url, head)
    assert status == 405
    if method != "HEAD":  # (a HEAD answer has no body)
        assert json.loads(body)["error"]["code"] == "method_not_allowed"


# -- 9: replies keep their keys; counters count what they say ------------------------------
def test_a_reply_has_every_message_key(scripted_api):
    status, body = post(scripted_api[0], chat())
    assert status == 200
    message = body["choices"][0]["message"]
    assert message == {
        "role": "assistant",
        "content": "Hello there, friend!",
        "reasoning_content": "Thinking about it.",
        "tool_calls": [],
    }


def test_prefill_tokens_count_the_prompt_only(scripted_api):
    url, engine, _ = scripted_api
    before = engine.stats()
    status, body = post(url, chat())
    after = engine.stats()
    assert status == 200
    assert after["prefill_tokens"] - before["prefill_tokens"] == body["usage"]["prompt_tokens"]
    assert (
        after["generated_tokens"] - before["generated_tokens"]
        == (body["usage"]["completion_tokens"])
    )


def test_harmony_parse_reads_a_file(tmp_path):
    ids = tmp_path / "ids.json"
    ids.write_text("[200005, 35644, 200008, 2500, 200007]")  # <|channel|>analysis<|message|>...
    cmd = [sys.executable, "-m", "gptoss_ray.cluster.cli.main", "harmony", "parse", str(ids)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["channel"] == "analysis"


def test_cuda_where_there_is_none_is_a_one_line_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cmd = [
        sys.executable,
        "-m",
        "gptoss_ray.cluster.cli.main",
        "generate",
        "--model",
        "gpt-oss-tiny",
    ]
    cmd += ["--device", "cuda", "--prompt-ids", "1,2,3", "--max-tokens", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: device cuda: this machine has none")
    assert "Traceback" not in r.stderr


# -- 3 and 4: batch files ----------------------------------------------------------------
def test_an_invalid_utf8_line_is_that_lines_error(tmp_path):
    good = {"custom_id": "a", "url": "/v1/chat/completions", "body": chat()}
    text = [{"role": "user", "content": "\u2028"}]
    also = {**good, "custom_id": "b", "body": chat(messages=text)}
    src = tmp_path / "in.jsonl"
    src.write_bytes(
        json.dumps(good).encode()
        + b'\n{"custom_id": "\xff"}\n'
        # a raw U+2028 inside a string is one JSON line, not two
        + json.dumps(also, ensure_ascii=False).encode()
        + b"\n"
    )
    lines = read_input(src)
    assert [(x.line, x.custom_id, x.error and x.error["code"]) for x in lines] == [
        (1, "a", None),
        (2, None, "invalid_utf8"),
        (3, "b", None),
    ]
    assert "0xff" in lines[1].error["message"]


def test_one_writer_per_output_and_a_rerun_skips_every_error(tmp_path):
    out = tmp_path / "out.jsonl"
    first = OutputWriter(out)
    with pytest.raises(OutputBusy, match="being written by another job"):
        OutputWriter(out)
    first.write(error_record(None, {"code": "invalid_utf8", "message": "x", "line": 2}))
    first.write(error_record(None, {"code": "invalid_request", "message": "x", "line": 5}))
    first.close()
    again = OutputWriter(out)  # the lock went with the first writer
    assert again.done_lines == {2, 5}
    again.close()


def test_a_prompt_over_the_servers_limit_is_refused():
    from gptoss_ray.cluster.engine.core import EngineCore
    from gptoss_ray.model.types import ContextLengthExceeded, SamplingParams

    engine, shards = scripted_engine()
    core = EngineCore(engine.config, 1, engine.layout, shards, max_prompt_tokens=100)
    core.submit(list(range(1, 101)), SamplingParams(max_tokens=4))
    with pytest.raises(ContextLengthExceeded, match="at most 100") as err:
        core.submit(list(range(1, 102)), SamplingParams(max_tokens=4))
    assert err.value.param == "messages"
    engine.shutdown()


def test_the_readmes_openai_snippet_runs(scripted_api, capsys):
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    after = readme.split("Existing clients work unchanged:", 1)[1]
    snippet = after.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'base_url="http://127.0.0.1:8000/v1", api_key="KEY"' in snippet
    snippet = snippet.replace("http://127.0.0.1:8000/v1", scripted_api[0]).replace(
        '"KEY"', f'"{KEY}"'
    )
    exec(compile(snippet, "README.md", "exec"), {})
    assert capsys.readouterr().out == "Hello there, friend! Thinking about it.\n"


@pytest.mark.parametrize(
    ("completion", "message"),
    [
        ("<|channel|>final<|message|>Hi<|return|>", {"content": "Hi", "reasoning_content": None}),
        ("<|channel|>analysis<|message|>Hm", {"content": None, "reasoning_content": "Hm"}),
        (" gibberish in a header", {"content": None, "reasoning_content": None}),
    ],
)
def test_a_message_keeps_its_keys_when_they_are_empty(completion, message):
    from gptoss_ray.cluster.client.chat import chat_reply
    from gptoss_ray.model import tokenizer as tok

    reply = chat_reply(tok.encode(completion, allow_special=True), "length")
    assert reply["message"] == {"role": "assistant", **message, "tool_calls": []}
    assert reply["message"]["reasoning_content"] == message["reasoning_content"]  # no KeyError


@pytest.mark.parametrize("spec", ["2.0", "2.4"])  # Starlette's disconnect listener; a cancel
def test_a_stream_cut_while_it_sends_closes_its_request_at_once(spec):
    """Cut while a chunk is being sent (not while the handler waits for tokens), the
    response's generator is suspended at a `yield` where no cancel reaches it: its request
    is closed by the response, not at some later garbage collection (the race that left a
    stream running to max_tokens for nobody behind Ray Serve)."""
    import asyncio
    import gc

    from gptoss_ray.cluster.front.state import event_stream

    closed = []

    async def chunks():
        try:
            while True:
                yield "data: x\n\n"
        finally:
            closed.append(True)  # where `submitted` aborts the engine's request

    async def main():
        sent, disconnect = 0, asyncio.Event()

        async def send(message):
            nonlocal sent
            sent += message["type"] == "http.response.body"
            if sent == 2:  # the client leaves while its second chunk is on the way
                disconnect.set()
                await asyncio.Event().wait()

        async def receive():
            await disconnect.wait()
            return {"type": "http.disconnect"}

        response = await event_stream(chunks())
        scope = {"type": "http", "asgi": {"spec_version": spec}}
        task = asyncio.ensure_future(response(scope, receive, send))
        await disconnect.wait()
        if spec == "2.4":  # no listener: Ray Serve's proxy cancels the handler
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return closed[:]

    gc.disable()  # a collection would close an abandoned generator by chance
    try:
        assert asyncio.run(main()) == [True]
    finally:
        gc.enable()

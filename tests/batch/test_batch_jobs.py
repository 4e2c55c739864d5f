"""Batch jobs through a served engine on 2 CPU shards: results equal the engine's,
bad lines become error records, a killed coordinator loses nothing, two clients share
the engine."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time

import pytest

from gptoss_ray.cluster.batch.client import Client
from gptoss_ray.cluster.batch.format import BatchInputError, OutputBusy
from gptoss_ray.cluster.batch.jobs import JOB_PREFIX
from gptoss_ray.cluster.engine.config import EngineConfig
from gptoss_ray.cluster.front.serve import serve
from tests.engine_cases import expected_reply

ENGINE = "test-batch-engine"


@pytest.fixture(scope="module")
def engine(ray_session):
    serve(EngineConfig(model="gpt-oss-tiny", shards=2, dtype="float32"), name=ENGINE)
    yield ray_session.get_actor(ENGINE, namespace="gptoss-ray")
    from gptoss_ray.cluster.front.serve import stop

    stop(ENGINE)


def request_line(i: int, **body) -> dict:
    body = {
        "messages": [{"role": "user", "content": f"Question number {i % 17}?"}],
        "max_tokens": 4,
        "temperature": 0,
        **body,
    }
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}


def write_jsonl(path, items) -> None:
    def line(x) -> bytes:
        return x if isinstance(x, bytes) else (x if isinstance(x, str) else json.dumps(x)).encode()

    path.write_bytes(b"".join(line(x) + b"\n" for x in items))


def test_a_job_of_200_lines_with_bad_ones(engine, tmp_path):
    # the last ten ask for two choices and logprobs: the records carry them in OpenAI's shape
    extras = dict(n=2, logprobs=True, top_logprobs=2)
    items: list = [request_line(i, **(extras if i >= 190 else {})) for i in range(200)]
    bad = {
        7: "{oops",  # not JSON
        20: {"method": "POST", "url": "/v1/chat/completions", "body": {}},  # no custom_id
        33: {**request_line(5)},  # duplicate custom_id
        48: {**request_line(1000), "url": "/v1/embeddings"},  # unknown url
        61: request_line(1001, max_tokens=-1),  # negative max tokens
        75: request_line(1002, max_tokens=131072),  # over the context length
        90: request_line(1003, messages=[{"role": "wizard", "content": "x"}]),
        104: request_line(1004, model="gpt-4o"),  # not the model served
        118: b'{"custom_id": "\xff"}',  # not UTF-8
    }
    for at, item in sorted(bad.items()):
        items.insert(at, item)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, items)
    job = Client(name=ENGINE).submit(src, out)
    info = job.wait()
    assert info["status"] == "completed", info
    records = list(job.results())
    assert len(records) == len(items) == 209
    ok = {r["custom_id"]: r for r in records if r["error"] is None}
    failed = [r for r in records if r["error"] is not None]
    assert set(ok) == {f"req-{i}" for i in range(200)}
    codes = collections.Counter(r["error"]["code"] for r in failed)
    assert codes == {
        "invalid_json": 1,
        "missing_custom_id": 1,
        "duplicate_custom_id": 1,
        "invalid_url": 1,
        "invalid_request": 2,
        "context_length_exceeded": 1,
        "model_not_found": 1,
        "invalid_utf8": 1,
    }
    by_code = {r["error"]["code"]: r for r in failed}
    assert by_code["model_not_found"]["response"]["status_code"] == 404
    assert by_code["model_not_found"]["error"]["param"] == "model"
    assert by_code["invalid_request"]["error"]["line"] in (62, 91)
    messages = " | ".join(r["error"]["message"] for r in failed)
    assert "max_tokens: Input should be greater than or equal to 1" in messages
    assert "exceed the context length" in messages and "messages[0].role" in messages
    assert len((tmp_path / "out.errors.jsonl").read_text().splitlines()) == 9
    # contents equal the engine's for the same request (17 distinct bodies)
    for i in range(17):
        body = ok[f"req-{i}"]["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["usage"]["completion_tokens"] == 4
        assert body["choices"][0]["message"] == expected_reply(request_line(i)["body"])["message"]
        assert ok[f"req-{i + 17}"]["response"]["body"]["choices"] == body["choices"]
        assert body["choices"][0]["logprobs"] is None
    for i in range(190, 200):
        body = ok[f"req-{i}"]["response"]["body"]
        assert [c["index"] for c in body["choices"]] == [0, 1]
        assert all(isinstance(c["logprobs"]["content"], list) for c in body["choices"])
        assert body["usage"]["completion_tokens"] == 8


def test_killing_the_coordinator_mid_job_loses_nothing(engine, ray_session, tmp_path):
    import ray

    name = "test-batch-killed"
    serve(EngineConfig(model="gpt-oss-tiny", shards=2, dtype="float32"), name=name)
    items = [request_line(i, max_tokens=6) for i in range(80)]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, items)
    client = Client(name=name)
    job = client.submit(src, out, max_in_flight=4)
    while job.status()["done"] < 12:
        time.sleep(0.05)
    ray.kill(ray.get_actor(name, namespace="gptoss-ray"))  # the coordinator process dies
    info = job.wait(timeout=60)
    assert info["status"] == "failed" and info["done"] < 80, info
    written = len(out.read_text().splitlines())
    assert written >= 12
    serve(
        EngineConfig(model="gpt-oss-tiny", shards=2, dtype="float32"), name=name
    )  # start it again
    again = Client(name=name).submit(src, out)
    info = again.wait(timeout=300)
    assert info["status"] == "completed" and info["skipped"] == written
    ids = [r["custom_id"] for r in again.results()]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(80))  # each exactly once
    from gptoss_ray.cluster.front.serve import stop

    stop(name)


def test_a_job_that_waits_for_its_engine_resumes_when_it_is_back(engine, ray_session, tmp_path):
    """As batches over HTTP run: the coordinator dies mid-job, the job waits, the engine is
    started again under its name, and the job ends completed with every line once."""
    import ray

    from gptoss_ray.cluster.front.serve import stop

    name = "test-batch-waits"
    serve(EngineConfig(model="gpt-oss-tiny", shards=2, dtype="float32"), name=name)
    items = [request_line(i, max_tokens=6) for i in range(60)]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, items)
    job = Client(name=name).submit(src, out, max_in_flight=4, wait_for_engine_s=180)
    while job.status()["done"] < 12:
        time.sleep(0.05)
    ray.kill(ray.get_actor(name, namespace="gptoss-ray"))
    time.sleep(2)
    assert job.status()["status"] == "running"  # waiting for an engine, not failed
    serve(EngineConfig(model="gpt-oss-tiny", shards=2, dtype="float32"), name=name)
    info = job.wait(timeout=300)
    assert info["status"] == "completed", info
    ids = [r["custom_id"] for r in job.results()]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(60))  # each exactly once
    stop(name)


def test_two_clients_at_once(engine, ray_session, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    procs = []
    for k in range(2):
        src, out = tmp_path / f"in{k}.jsonl", tmp_path / f"out{k}.jsonl"
        write_jsonl(src, [request_line(i + 100 * k) for i in range(30)])
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gptoss_ray.cluster.cli.main",
                    "batch",
                    "submit",
                    str(src),
                    "--output",
                    str(out),
                    "--wait",
                    "--address",
                    address,
                    "--name",
                    ENGINE,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=os.environ.copy(),
            )
        )
    for k, p in enumerate(procs):
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-2000:]
        assert "completed, 30 done, 0 failed" in stdout
        records = [json.loads(x) for x in (tmp_path / f"out{k}.jsonl").read_text().splitlines()]
        assert sorted(r["custom_id"] for r in records) == sorted(
            f"req-{i + 100 * k}" for i in range(30)
        )
    assert len(Client(name=ENGINE).jobs()) >= 3


def test_cancel_stops_a_job_and_keeps_what_finished(engine, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [request_line(i, max_tokens=8) for i in range(60)])
    job = Client(name=ENGINE).submit(src, out, max_in_flight=2)
    while job.status()["done"] < 4:
        time.sleep(0.05)
    job.cancel()
    info = job.wait(timeout=60)
    assert info["status"] == "cancelled" and 4 <= info["done"] < 60
    assert len(list(job.results())) == info["done"]


def test_a_second_job_on_the_same_output_is_refused(engine, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [request_line(i, max_tokens=8) for i in range(20)])
    client = Client(name=ENGINE)
    first = client.submit(src, out, max_in_flight=2)
    with pytest.raises(OutputBusy, match=f"job {first.job_id} is writing"):
        client.submit(src, out)
    # a race past that check meets the first job's lock on the output
    with pytest.raises(BatchInputError, match="being written by another job"):
        client.jobs = lambda: []
        client.submit(src, out)
    assert first.wait()["status"] == "completed"
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["custom_id"] for r in records) == sorted(f"req-{i}" for i in range(20))


def test_an_ended_job_leaves_a_record_not_a_process(engine, ray_session, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [request_line(i) for i in range(3)])
    client = Client(name=ENGINE)
    job = client.submit(src, out)
    assert job.wait()["status"] == "completed"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ray_session.get_actor(JOB_PREFIX + job.job_id, namespace="gptoss-ray")
        except ValueError:
            break  # its process ended
        time.sleep(0.2)
    else:
        pytest.fail("the job's actor is still alive 30 s after it ended")
    again = client.job(job.job_id)  # from its record
    assert again.actor is None and again.status()["done"] == 3
    assert len(list(again.results())) == 3
    assert job.job_id in [j.job_id for j in client.jobs()]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "gptoss_ray.cluster.cli.main",
            "batch",
            "delete",
            job.job_id,
            "--address",
            ray_session.get_runtime_context().gcs_address,
            "--name",
            ENGINE,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "deleted" in r.stdout, r.stderr[-2000:]
    with pytest.raises(KeyError):
        client.job(job.job_id)
    assert out.exists()  # the output stays
    # resubmitted, it has nothing left to do: it ends at once, and says so
    rerun = client.submit(src, out)
    info = rerun.wait(timeout=60)
    assert info["status"] == "completed" and info["skipped"] == 3 and info["done"] == 0


def test_status_command_shows_shards_load_and_jobs(engine, ray_session):
    address = ray_session.get_runtime_context().gcs_address
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "gptoss_ray.cluster.cli.main",
            "status",
            "--json",
            "--address",
            address,
            "--name",
            ENGINE,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    status = json.loads(r.stdout)
    assert [s["experts"] for s in status["shards_detail"]] == [[0, 8], [8, 16]]
    assert all(s["kv_total_blocks"]["full"] > 0 for s in status["shards_detail"])
    assert sum(map(sum, status["expert_load"])) > 0  # jobs above routed tokens
    assert status["jobs"] and status["healthy"]

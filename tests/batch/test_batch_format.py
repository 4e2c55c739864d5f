"""Batch files without an engine: reading lines, error records, resumable output."""

from __future__ import annotations

import json
import os

import pytest

from gptoss_ray.cluster.batch.format import (
    BatchInputError,
    OutputWriter,
    check_writable,
    error_record,
    errors_path,
    read_input,
)


def line(custom_id="a", url="/v1/chat/completions", body=None):
    body = body if body is not None else {"messages": [{"role": "user", "content": "hi"}]}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def test_every_bad_line_becomes_an_error_that_says_why(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(
        "\n".join(
            [
                line("a"),
                "{not json",
                json.dumps({"url": "/v1/chat/completions", "body": {}}),
                line("a"),
                line("e", url="/v1/embeddings"),
                line("b", body=[1]),
                "",
                line("c"),
            ]
        )
        + "\n"
    )
    lines = read_input(src)
    assert [(entry.line, entry.custom_id) for entry in lines] == [
        (1, "a"),
        (2, None),
        (3, None),
        (4, None),
        (5, "e"),
        (6, "b"),
        (8, "c"),
    ]
    codes = [entry.error and entry.error["code"] for entry in lines]
    assert codes == [
        None,
        "invalid_json",
        "missing_custom_id",
        "duplicate_custom_id",
        "invalid_url",
        "invalid_request",
        None,
    ]
    assert "custom_id 'a' appears on an earlier line" in lines[3].error["message"]
    assert "'/v1/embeddings' is not supported" in lines[4].error["message"]


def test_unreadable_input_and_unwritable_output_fail_before_anything_runs(tmp_path):
    with pytest.raises(BatchInputError, match=r"cannot read the input .*missing\.jsonl"):
        read_input(tmp_path / "missing.jsonl")
    with pytest.raises(BatchInputError, match=r"folder .* does not exist"):
        check_writable(tmp_path / "nope" / "out.jsonl")
    with pytest.raises(BatchInputError, match="is a directory"):
        check_writable(tmp_path)
    if os.geteuid() != 0:  # root can write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(BatchInputError, match="permission denied"):
            check_writable(locked / "out.jsonl")


def test_output_resumes_and_cuts_a_torn_last_line(tmp_path):
    out = tmp_path / "out.jsonl"
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join([line("a"), line("b"), "{bad", line("c")]) + "\n")
    lines = read_input(src)
    writer = OutputWriter(out)
    writer.write({"custom_id": "a", "response": {}, "error": None})
    writer.write(error_record(None, lines[2].error))
    writer.close()
    with open(out, "a") as f:
        f.write('{"custom_id": "b", "resp')  # killed mid-write
    again = OutputWriter(out)
    assert [again.is_done(entry) for entry in lines] == [True, False, True, False]
    assert out.read_text().endswith("\n") and again.count == 2
    again.close()
    assert errors_path(out).name == "out.errors.jsonl"
    assert len(errors_path(out).read_text().splitlines()) == 1

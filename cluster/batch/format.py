"""OpenAI Batch API files: input lines in, output records out, resumable.

Input line: {"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {...}}.
Output line: {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}.
A line that cannot run becomes an error record that says why ("error": {"code",
"message", "line"}); failed lines also go to `<output>.errors.jsonl`. Every record is
appended and flushed as it finishes; running the same input into the same output again
skips what is already there."""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptoss_ray.cluster.client.chat import chat_completion

SUPPORTED_URLS = ("/v1/chat/completions",)


class BatchInputError(ValueError):
    """The job cannot start: an unreadable input or an unwritable output."""


class OutputBusy(BatchInputError):
    """Another job is writing the same output now."""


@dataclass
class BatchLine:
    line: int  # 1-based line number in the input (or index + 1 for a list)
    custom_id: str | None
    body: dict[str, Any] | None  # None when the line is invalid
    error: dict[str, Any] | None = None  # {"code", "message", "line"}


def _error(code: str, message: str, line: int) -> dict[str, Any]:
    return {"code": code, "message": message, "line": line}


def read_input(source: str | Path | list[dict[str, Any]]) -> list[BatchLine]:
    """Every line of the input, valid or not (invalid ones carry their error)."""
    if isinstance(source, list):
        raw: list[Any] = source
    else:
        path = Path(source)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BatchInputError(f"cannot read the input {path}: {exc.strerror}") from None
        # JSONL lines end at b"\n" only: str.splitlines would also split a line at a
        # U+2028 inside a JSON string
        raw = data.split(b"\n")
    out: list[BatchLine] = []
    seen: set[str] = set()
    for n, item in enumerate(raw, start=1):
        if isinstance(item, bytes):
            if not item.strip():
                continue
            try:
                item = json.loads(item.decode("utf-8"))
            except UnicodeDecodeError as exc:
                message = f"not UTF-8: byte {exc.start + 1} of the line is {item[exc.start]:#04x}"
                out.append(BatchLine(n, None, None, _error("invalid_utf8", message, n)))
                continue
            except json.JSONDecodeError as exc:
                out.append(BatchLine(n, None, None, _error("invalid_json", f"not JSON: {exc}", n)))
                continue
        out.append(_check_line(item, n, seen))
    return out


def _check_line(item: Any, n: int, seen: set[str]) -> BatchLine:
    if not isinstance(item, dict):
        return BatchLine(n, None, None, _error("invalid_request", "a line is a JSON object", n))
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return BatchLine(
            n, None, None, _error("missing_custom_id", "the line has no custom_id string", n)
        )
    if custom_id in seen:
        # The first line with this id owns it; this one is recorded by its line number.
        return BatchLine(
            n,
            None,
            None,
            _error("duplicate_custom_id", f"custom_id {custom_id!r} appears on an earlier line", n),
        )
    seen.add(custom_id)
    url = item.get("url")
    if url not in SUPPORTED_URLS:
        message = f"url {url!r} is not supported (supported: {', '.join(SUPPORTED_URLS)})"
        return BatchLine(n, custom_id, None, _error("invalid_url", message, n))
    method = item.get("method", "POST")
    if method != "POST":
        return BatchLine(n, custom_id, None, _error("invalid_method", f"method {method!r}", n))
    body = item.get("body")
    if not isinstance(body, dict):
        return BatchLine(n, custom_id, None, _error("invalid_request", "body must be an object", n))
    return BatchLine(n, custom_id, body)


def success_record(custom_id: str, reply: dict[str, Any], model: str) -> dict[str, Any]:
    """A finished request -> its output line (the body is a chat.completion)."""
    request_id = f"req_{uuid.uuid4().hex}"
    body = chat_completion(reply, model, f"chatcmpl-{uuid.uuid4().hex[:24]}")
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": request_id, "body": body},
        "error": None,
    }


def error_record(custom_id: str | None, error: dict[str, Any], status: int = 400) -> dict[str, Any]:
    body_error = {"message": error["message"], "code": error["code"], "param": error.get("param")}
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {
            "status_code": status,
            "request_id": f"req_{uuid.uuid4().hex}",
            "body": {"error": {**body_error, "type": "invalid_request_error"}},
        },
        "error": error,
    }


def errors_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name.removesuffix(".jsonl") + ".errors.jsonl")


class OutputWriter:
    """Appends records to the output (and failed ones to the errors file), flushed and
    synced one by one. Opening it reads what an earlier run already wrote, so that a rerun
    skips those lines; a torn last line (a kill mid-write) is cut off first."""

    def __init__(self, output: str | Path) -> None:
        self.path = Path(output)
        self.errors = errors_path(self.path)
        check_writable(self.path)
        self.done_ids: set[str] = set()
        self.done_lines: set[int] = set()  # invalid lines (no custom_id of their own)
        self.count = 0
        self._out = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        try:  # one writer per output, or records would be written twice
            fcntl.flock(self._out, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._out.close()
            raise OutputBusy(
                f"the output {self.path} is being written by another job; follow that one, "
                "or wait for it to end and submit again to resume"
            ) from None
        self._read_existing()
        self._err = open(self.errors, "a", encoding="utf-8")  # noqa: SIM115

    def _read_existing(self) -> None:
        data = self.path.read_bytes()
        keep = data[: data.rfind(b"\n") + 1]  # everything up to the last whole line
        if len(keep) != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(len(keep))
        for raw in keep.split(b"\n"):  # (records may hold U+2028: not splitlines)
            try:
                record = json.loads(raw.decode("utf-8", errors="replace"))
            except json.JSONDecodeError:
                continue
            self.count += 1
            error = record.get("error") or {}
            if record.get("custom_id"):
                self.done_ids.add(record["custom_id"])
            elif error.get("line") is not None:  # a line without a custom_id of its own
                self.done_lines.add(error["line"])

    def is_done(self, line: BatchLine) -> bool:
        if line.custom_id is not None:
            return line.custom_id in self.done_ids
        return line.line in self.done_lines

    def write(self, record: dict[str, Any]) -> None:
        text = json.dumps(record, ensure_ascii=False) + "\n"
        self._append(self._out, text)
        if record.get("error"):
            self._append(self._err, text)
        self.count += 1

    @staticmethod
    def _append(f, text: str) -> None:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())

    def close(self) -> None:
        self._err.close()
        self._out.close()  # and its lock


def check_writable(output: str | Path) -> None:
    """Fail before anything runs if the output cannot be written."""
    path = Path(output)
    if path.is_dir():
        raise BatchInputError(f"the output {path} is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise BatchInputError(f"cannot write the output {path}: folder {parent} does not exist")
    target = path if path.exists() else parent
    if not os.access(target, os.W_OK):
        raise BatchInputError(f"cannot write the output {path}: permission denied")

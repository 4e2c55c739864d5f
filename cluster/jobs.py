"""A batch job as a detached Ray actor: it reads the input, keeps up to `max_in_flight`
requests in the engine, and appends each record to the output as it finishes.

Request-level failures (a bad line, a bad body) become error records. An engine failure
(the coordinator or a shard died) is not the request's fault: nothing is written for the
requests in flight, the job stops as `failed`, and submitting the same input to the same
output again picks up where it stopped."""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Any

import ray

from gptoss_ray.cluster.batch import (
    BatchLine,
    OutputWriter,
    error_record,
    read_input,
    success_record,
)
from gptoss_ray.cluster.ray_instance import NAMESPACE

JOB_PREFIX = "gptoss-ray-job-"


class BatchJob:
    def __init__(
        self,
        job_id: str,
        coordinator: str,
        source: str | list[dict[str, Any]],
        output: str,
        *,
        max_in_flight: int = 64,
    ) -> None:
        self.job_id = job_id
        self.coordinator_name = coordinator
        self.source = source if isinstance(source, list) else str(source)
        self.output = str(output)
        self.max_in_flight = max_in_flight
        self.lines = read_input(source)
        self.writer = OutputWriter(output)
        self.total = len(self.lines)
        self.skipped = sum(self.writer.is_done(line) for line in self.lines)
        self.done = 0
        self.failed = 0
        self.tokens = 0
        self.status = "running"
        self.error: str | None = None
        self.started = time.time()
        self.finished_at: float | None = None
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"job-{job_id}", daemon=True)
        self._thread.start()

    # -- what clients ask ----------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        elapsed = (self.finished_at or time.time()) - self.started
        finished = self.done + self.failed
        remaining = self.total - self.skipped - finished
        rate = finished / elapsed if elapsed > 0 else 0.0
        return {
            "job_id": self.job_id,
            "status": self.status,
            "input": self.source if isinstance(self.source, str) else f"<{self.total} requests>",
            "output": self.output,
            "errors_file": str(self.writer.errors),
            "total": self.total,
            "skipped": self.skipped,
            "done": self.done,
            "failed": self.failed,
            "tokens": self.tokens,
            "elapsed_s": elapsed,
            "tokens_per_s": self.tokens / elapsed if elapsed > 0 else 0.0,
            "eta_s": remaining / rate if rate > 0 and self.status == "running" else None,
            "error": self.error,
        }

    def cancel(self) -> None:
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        self._thread.join(timeout)
        return self.info()

    # -- the loop ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._run_lines()
            if self.status == "running":
                self.status = "cancelled" if self._cancel.is_set() else "completed"
        except Exception as exc:
            traceback.print_exc()
            self.status = "failed"
            self.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        finally:
            self.finished_at = time.time()
            self.writer.close()

    def _run_lines(self) -> None:
        coordinator = ray.get_actor(self.coordinator_name, namespace=NAMESPACE)
        model = Path(ray.get(coordinator.info.remote())["model"]).name
        todo = deque(line for line in self.lines if not self.writer.is_done(line))
        in_flight: dict[ray.ObjectRef, tuple[BatchLine, str]] = {}
        while (todo or in_flight) and not self._cancel.is_set():
            while todo and len(in_flight) < self.max_in_flight:
                line = todo.popleft()
                if line.error is not None:
                    self._record(error_record(line.custom_id, line.error))
                    continue
                try:
                    rid, _ = ray.get(coordinator.submit_chat.remote(line.body))
                except ray.exceptions.RayTaskError as exc:
                    cause = getattr(exc, "cause", None)
                    if not isinstance(cause, ValueError):  # RequestError, HarmonyError, ...
                        raise
                    message = str(cause)
                    self._record(
                        error_record(
                            line.custom_id,
                            {"code": "invalid_request", "message": message, "line": line.line},
                        )
                    )
                    continue
                in_flight[coordinator.wait_chat.remote(rid)] = (line, rid)
            if not in_flight:
                continue
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            for ref in ready:
                line, rid = in_flight.pop(ref)
                reply = ray.get(ref)  # an engine failure raises here: the job stops
                body_model = (line.body or {}).get("model") or model
                self._record(success_record(line.custom_id or "", reply, body_model))
                self.tokens += reply["usage"]["completion_tokens"]
                coordinator.forget.remote(rid)
        for _, rid in in_flight.values():  # cancelled: stop the engine's work too
            coordinator.cancel.remote(rid)

    def _record(self, record: dict[str, Any]) -> None:
        self.writer.write(record)
        if record.get("error"):
            self.failed += 1
        else:
            self.done += 1

"""A batch job as a detached Ray actor: it reads the input, keeps up to `max_in_flight`
requests in the engine, and appends each record to the output as it finishes. When the
job ends its last status goes to Ray's key-value store (`JobRecords`) and the actor exits:
its records are all in the output already, and a finished job should not hold a process.

Request-level failures (a bad line, a bad body) become error records. An engine failure
(the coordinator died) is not the request's fault: nothing is written for the requests
it had in flight, which go to another of the job's engines; with none left, the job
waits up to `wait_for_engine_s` for one to be back (the same name started again), and
then stops as `failed`. Submitting the same input to the same output again picks up
where it stopped. Either way each line is written exactly once."""

from __future__ import annotations

import asyncio
import collections
import json
import threading
import time
import traceback
from collections import deque
from typing import Any

import ray

from gptoss_ray.cluster.batch.format import (
    BatchLine,
    OutputWriter,
    error_record,
    read_input,
    success_record,
)
from gptoss_ray.cluster.client.chat import chat_request
from gptoss_ray.cluster.client.engine_client import RayEngineClient, RequestStream
from gptoss_ray.cluster.runtime.ray_instance import NAMESPACE
from gptoss_ray.model.types import EngineUnavailable

JOB_PREFIX = "gptoss-ray-job-"
RECORD_TTL_S = 7 * 24 * 3600  # a finished job's status is kept a week, or until deleted


class JobRecords:
    """The last status of each finished job, in the Ray cluster's key-value store (the GCS):
    it outlives the job's process and the engine, not the Ray cluster. Records are small
    (one status dict) and expire after `RECORD_TTL_S`."""

    PREFIX = b"gptoss-ray-job/"

    @staticmethod
    def _kv():
        from ray.experimental import internal_kv

        return internal_kv

    def put(self, info: dict[str, Any]) -> None:
        key = self.PREFIX + info["job_id"].encode()
        self._kv()._internal_kv_put(key, json.dumps(info).encode(), namespace=NAMESPACE)

    def get(self, job_id: str) -> dict[str, Any] | None:
        raw = self._kv()._internal_kv_get(self.PREFIX + job_id.encode(), namespace=NAMESPACE)
        return json.loads(raw) if raw else None

    def delete(self, job_id: str) -> bool:
        return bool(self._kv()._internal_kv_del(self.PREFIX + job_id.encode(), namespace=NAMESPACE))

    def ids(self) -> list[str]:
        """Every recorded job; expired ones are deleted on the way."""
        kv, now, out = self._kv(), time.time(), []
        for key in kv._internal_kv_list(self.PREFIX, namespace=NAMESPACE):
            job_id = key.removeprefix(self.PREFIX).decode()
            info = self.get(job_id)
            if info is None:
                continue
            if now - (info.get("finished_at") or now) > RECORD_TTL_S:
                self.delete(job_id)
            else:
                out.append(job_id)
        return out


class BatchJob:
    def __init__(
        self,
        job_id: str,
        coordinator: str | list[str],
        source: str | list[dict[str, Any]],
        output: str,
        *,
        max_in_flight: int = 64,
        wait_for_engine_s: float = 0.0,
        batch: dict[str, Any] | None = None,
    ) -> None:
        """coordinator: the engine's name, or several (lines go to the one with the
        fewest of this job's requests). batch: what the Batch API keeps with the job
        (endpoint, input file, metadata), returned in `info`."""
        self.job_id = job_id
        self.engine_names = [coordinator] if isinstance(coordinator, str) else list(coordinator)
        self.wait_for_engine_s = wait_for_engine_s
        self.batch = batch
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
            "started_at": self.started,
            "finished_at": self.finished_at,
            "cancelling": self._cancel.is_set() and self.status == "running",
            "batch": self.batch,
        }

    def cancel(self) -> None:
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        self._thread.join(timeout)
        return self.info()

    # -- the loop ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            asyncio.run(self._run_lines())
            if self.status == "running":
                self.status = "cancelled" if self._cancel.is_set() else "completed"
        except Exception as exc:
            traceback.print_exc()
            self.status = "failed"
            self.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        finally:
            self.finished_at = time.time()
            self.writer.close()
            self._retire()

    def _retire(self) -> None:
        """Records the final status, then ends this actor's process once the calls already
        queued (a client's `wait`) have their answer."""
        try:
            JobRecords().put(self.info())
        except Exception:  # without a record the actor stays, answering for the job
            traceback.print_exc()
            return
        ray.get_runtime_context().current_actor.__ray_terminate__.remote()

    async def _run_lines(self) -> None:
        engines = _Engines(self.engine_names, self.wait_for_engine_s)
        info = engines.info()
        todo = deque(line for line in self.lines if not self.writer.is_done(line))
        in_flight: dict[asyncio.Future, tuple[BatchLine, int, RequestStream]] = {}
        while (todo or in_flight) and not self._cancel.is_set():
            while todo and len(in_flight) < self.max_in_flight:
                line = todo.popleft()
                if line.error is not None:
                    self._record(error_record(line.custom_id, line.error))
                    continue
                busy = collections.Counter(e for _, e, _ in in_flight.values())
                e, client = engines.pick(busy)
                try:
                    # rendered here; a batch request yields to interactive ones (priority 1)
                    request, replies = chat_request(line.body, info, priority=1)
                    (stream,) = await client.submit([request], [replies])
                except EngineUnavailable:
                    todo.appendleft(line)
                    self._lost(e, engines, in_flight, todo)
                    continue
                except ValueError as exc:  # RequestError, HarmonyError, a bad field
                    error = {
                        "code": getattr(exc, "code", "invalid_request"),
                        "message": str(exc),
                        "param": getattr(exc, "param", None),
                        "line": line.line,
                    }
                    self._record(error_record(line.custom_id, error, getattr(exc, "status", 400)))
                    continue
                in_flight[asyncio.ensure_future(stream.result())] = (line, e, stream)
            if not in_flight:
                continue
            ready, _ = await asyncio.wait(in_flight, timeout=1.0, return_when="FIRST_COMPLETED")
            for task in ready:
                if task not in in_flight:
                    continue  # its engine was lost while this one was read
                line, e, stream = in_flight.pop(task)
                try:
                    reply = task.result()
                except EngineUnavailable:
                    todo.appendleft(line)
                    self._lost(e, engines, in_flight, todo)
                    continue
                model = stream.request.params.lora or info["model_id"]  # as the API names it
                self._record(success_record(line.custom_id or "", reply, model))
                self.tokens += reply["usage"]["completion_tokens"]
        for task, (_, _, stream) in in_flight.items():  # cancelled: stop the engine's work too
            stream.close()
            task.cancel()

    @staticmethod
    def _lost(e: int, engines: _Engines, in_flight: dict, todo: deque) -> None:
        """Engine `e` died: its lines in flight go back to the queue (nothing of them was
        written), and the job goes on with the others or waits for one to be back."""
        for task, (line, owner, stream) in list(in_flight.items()):
            if owner == e:
                del in_flight[task]
                stream.close()
                task.cancel()
                todo.appendleft(line)
        engines.lost(e)

    def _record(self, record: dict[str, Any]) -> None:
        self.writer.write(record)
        if record.get("error"):
            self.failed += 1
        else:
            self.done += 1


class _Engines:
    """A job's engines by name: a lost one is looked up again (the same name started
    again) once the others are gone too, for up to `wait_s`."""

    def __init__(self, names: list[str], wait_s: float) -> None:
        self.names, self.wait_s = names, wait_s
        self.clients: list[RayEngineClient | None] = [None] * len(names)
        for e in range(len(names)):
            self._find(e)
        if not any(self.clients):
            self._wait()

    def _find(self, e: int) -> bool:
        try:
            handle = ray.get_actor(self.names[e], namespace=NAMESPACE)
            if not ray.get(handle.info.remote(), timeout=60)["healthy"]:
                return False
        except (ValueError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return False
        self.clients[e] = RayEngineClient(handle, self.names[e])
        return True

    def info(self) -> dict[str, Any]:
        """The model's (the engines serve one model)."""
        client = next(c for c in self.clients if c is not None)
        return ray.get(client.handle.info.remote())

    def pick(self, busy: collections.Counter) -> tuple[int, RayEngineClient]:
        up = [e for e, c in enumerate(self.clients) if c is not None]
        e = min(up, key=lambda i: busy[i])
        return e, self.clients[e]  # type: ignore[return-value]

    def lost(self, e: int) -> None:
        self.clients[e] = None
        if not any(self.clients):
            self._wait()

    def _wait(self) -> None:
        deadline = time.monotonic() + self.wait_s
        while True:
            if any([self._find(e) for e in range(len(self.names))]):
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"no engine of this job is running ({', '.join(self.names)}); "
                    f"waited {self.wait_s:.0f} s"
                )
            time.sleep(1.0)

"""The batch client: connect to a running engine (started with `gptoss-ray serve`),
submit jobs, follow them, read their results.

    client = Client(address="auto")
    job = client.submit("requests.jsonl", output="results.jsonl")
    job.wait(progress=True)
    for record in job.results():
        ...
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from gptoss_ray.cluster.batch.format import BatchInputError, OutputBusy, check_writable, read_input
from gptoss_ray.cluster.batch.jobs import JOB_PREFIX, BatchJob, JobRecords
from gptoss_ray.cluster.runtime.ray_instance import NAMESPACE, EngineNotFound, connect

DEFAULT_ENGINE = "gptoss-ray"


class Job:
    """A batch job: its actor while it runs, its record in the cluster's key-value store
    once it ended (the actor is gone then)."""

    def __init__(self, job_id: str, actor: ray.actor.ActorHandle | None) -> None:
        self.job_id = job_id
        self.actor = actor

    def __repr__(self) -> str:
        return f"Job({self.job_id!r})"

    def status(self) -> dict[str, Any]:
        return self._ask("info")

    def _ask(self, method: str, *args: Any) -> dict[str, Any]:
        if self.actor is not None:
            try:
                return ray.get(getattr(self.actor, method).remote(*args))
            except ray.exceptions.RayActorError:  # it ended and left its record
                self.actor = None
        info = JobRecords().get(self.job_id)
        if info is None:
            raise KeyError(f"no job {self.job_id!r} on this cluster (deleted or expired)")
        return info

    def wait(self, progress: bool = False, timeout: float | None = None) -> dict[str, Any]:
        """Until the job ends (completed, failed or cancelled); with progress, a status
        line on stderr: done, failed, total, tokens/s, ETA."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            info = self._ask("wait", 1.0)
            if progress:
                print("\r" + progress_line(info), end="", file=sys.stderr, flush=True)
            if info["status"] != "running":
                if progress:
                    print(file=sys.stderr)
                return info
            if deadline is not None and time.monotonic() > deadline:
                return info

    def results(self) -> Iterator[dict[str, Any]]:
        """The output records written so far, in the order they finished."""
        yield from read_results(self.status()["output"])

    def cancel(self) -> None:
        if self.actor is not None:
            with contextlib.suppress(ray.exceptions.RayActorError):  # it had ended
                ray.get(self.actor.cancel.remote())

    def delete(self) -> None:
        """Forgets the job: a running one is cancelled first. Its output stays."""
        if self.actor is not None:
            with contextlib.suppress(ray.exceptions.RayActorError):
                ray.get(self.actor.cancel.remote())
                ray.get(self.actor.wait.remote(60))  # its thread ends, its record is written
                ray.kill(self.actor)
            self.actor = None
        JobRecords().delete(self.job_id)


def read_results(output: str | Path) -> Iterator[dict[str, Any]]:
    path = Path(output)
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):
                yield json.loads(line)


def progress_line(info: dict[str, Any]) -> str:
    total = info["total"] - info["skipped"]
    finished = info["done"] + info["failed"]
    width = 30
    filled = int(width * finished / total) if total else width
    eta = f"{info['eta_s']:.0f} s" if info.get("eta_s") is not None else "-"
    skipped = f", {info['skipped']} already done" if info["skipped"] else ""
    return (
        f"[{'#' * filled}{'.' * (width - filled)}] {finished}/{total} "
        f"({info['done']} done, {info['failed']} failed{skipped}) "
        f"{info['tokens_per_s']:.1f} tok/s, ETA {eta}, {info['status']}"
    )


class Client:
    def __init__(self, address: str | None = "auto", name: str = DEFAULT_ENGINE) -> None:
        connect(address)
        self.name = name
        try:
            self.coordinator = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            raise EngineNotFound(
                f"no engine named {name!r} on this Ray cluster; start one with "
                f"`gptoss-ray serve --name {name}`"
            ) from None

    def submit(
        self,
        source: str | Path | list[dict[str, Any]],
        output: str | Path,
        *,
        job_id: str | None = None,
        max_in_flight: int = 64,
        engines: list[str] | None = None,
        node: str | None = None,
        **job_options: Any,
    ) -> Job:
        """Starts a job. The input is a JSONL path (OpenAI batch format) or a list of such
        request dicts; an unreadable input or an unwritable output fails here, before
        anything runs. Submitting the same input and output again resumes. engines: the
        engines' names to spread its lines over (default: this client's); node: the Ray
        node whose files it reads and writes (default: this one); job_options:
        `BatchJob`'s wait_for_engine_s and batch."""
        if node is None:  # here: the files are checked before anything starts
            if not isinstance(source, list):
                source = str(Path(source).resolve())
            read_input(source)  # fails on an unreadable file
            output = Path(output).resolve()
            check_writable(output)
        # (on another node the job's own start checks them, and says so the same way)
        for job in self.jobs():  # (the job's lock on the output settles a race)
            info = job.status()
            if info["status"] == "running" and info["output"] == str(output):
                raise OutputBusy(
                    f"job {job.job_id} is writing {output} now: follow it with `gptoss-ray "
                    f"batch status {job.job_id}`, or submit again once it ended to resume"
                )
        job_id = job_id or uuid.uuid4().hex[:12]
        here = node or ray.get_runtime_context().get_node_id()
        actor = (
            ray.remote(BatchJob)
            .options(
                name=JOB_PREFIX + job_id,
                namespace=NAMESPACE,
                lifetime="detached",
                num_cpus=0,
                max_concurrency=8,
                # the job reads and writes files on the machine it was submitted from
                scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
            )
            .remote(
                job_id,
                engines or self.name,
                source,
                str(output),
                max_in_flight=max_in_flight,
                **job_options,
            )
        )
        try:
            ray.get(actor.info.remote())
        except ray.exceptions.RayActorError as exc:
            if JobRecords().get(job_id) is not None:  # it had nothing left to do, and ended
                return Job(job_id, None)
            raise BatchInputError(f"the job could not start: {_creation_error(exc)}") from None
        return Job(job_id, actor)

    def job(self, job_id: str) -> Job:
        """A job, running or ended (until deleted, or its record expired)."""
        try:
            return Job(job_id, ray.get_actor(JOB_PREFIX + job_id, namespace=NAMESPACE))
        except ValueError:
            if JobRecords().get(job_id) is None:
                raise KeyError(f"no job {job_id!r} on this cluster") from None
            return Job(job_id, None)

    def jobs(self) -> list[Job]:
        """Every job on the cluster: running ones, and ended ones not yet deleted."""
        names = ray.util.list_named_actors(all_namespaces=True)
        running = {
            n["name"].removeprefix(JOB_PREFIX): n["name"]
            for n in names
            if n["namespace"] == NAMESPACE and n["name"].startswith(JOB_PREFIX)
        }
        out = []
        for job_id in sorted(set(running) | set(JobRecords().ids())):
            with contextlib.suppress(KeyError):  # it ended and was deleted meanwhile
                out.append(self.job(job_id))
        return out


def _creation_error(exc: Exception) -> str:
    """The line that says why a job's actor could not start (its constructor's error), not
    Ray's whole report."""
    text = str(exc)
    for line in reversed(text.splitlines()):
        if ": " in line and line.split(":", 1)[0].strip().isidentifier():
            return line.strip()
    return text

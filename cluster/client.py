"""The batch client: connect to a running engine (started with `gptoss-ray serve`),
submit jobs, follow them, read their results.

    client = Client(address="auto")
    job = client.submit("requests.jsonl", output="results.jsonl")
    job.wait(progress=True)
    for record in job.results():
        ...
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from gptoss_ray.cluster.batch import BatchInputError, check_writable, read_input
from gptoss_ray.cluster.jobs import JOB_PREFIX, BatchJob
from gptoss_ray.cluster.ray_instance import NAMESPACE, EngineNotFound, connect

DEFAULT_ENGINE = "gptoss-ray"


class Job:
    def __init__(self, job_id: str, actor: ray.actor.ActorHandle) -> None:
        self.job_id = job_id
        self.actor = actor

    def __repr__(self) -> str:
        return f"Job({self.job_id!r})"

    def status(self) -> dict[str, Any]:
        return ray.get(self.actor.info.remote())

    def wait(self, progress: bool = False, timeout: float | None = None) -> dict[str, Any]:
        """Until the job ends (completed, failed or cancelled); with progress, a status
        line on stderr: done, failed, total, tokens/s, ETA."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            info = ray.get(self.actor.wait.remote(1.0))
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
        ray.get(self.actor.cancel.remote())

    def delete(self) -> None:
        """Forget a finished job (its output stays)."""
        ray.kill(self.actor)


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
    ) -> Job:
        """Starts a job. The input is a JSONL path (OpenAI batch format) or a list of such
        request dicts; an unreadable input or an unwritable output fails here, before
        anything runs. Submitting the same input and output again resumes."""
        if not isinstance(source, list):
            source = str(Path(source).resolve())
        read_input(source)  # fails on an unreadable file
        output = Path(output).resolve()
        check_writable(output)
        job_id = job_id or uuid.uuid4().hex[:12]
        here = ray.get_runtime_context().get_node_id()
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
            .remote(job_id, self.name, source, str(output), max_in_flight=max_in_flight)
        )
        job = Job(job_id, actor)
        try:
            job.status()
        except ray.exceptions.RayActorError as exc:
            raise BatchInputError(f"the job could not start: {exc}") from None
        return job

    def job(self, job_id: str) -> Job:
        try:
            return Job(job_id, ray.get_actor(JOB_PREFIX + job_id, namespace=NAMESPACE))
        except ValueError:
            raise KeyError(f"no job {job_id!r} on this cluster") from None

    def jobs(self) -> list[Job]:
        names = ray.util.list_named_actors(all_namespaces=True)
        ids = [
            n["name"].removeprefix(JOB_PREFIX)
            for n in names
            if n["namespace"] == NAMESPACE and n["name"].startswith(JOB_PREFIX)
        ]
        return [self.job(i) for i in sorted(ids)]

"""`gptoss-ray serve` / `stop`: a named, detached coordinator that outlives the command,
for clients and batch jobs to share."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import ray

from cluster.coordinator import Coordinator
from cluster.engine import here
from cluster.jobs import NAMESPACE


def ensure_cluster(address: str | None, num_cpus: int) -> None:
    """Connect to `address` ('auto': the cluster this machine belongs to). Without one, a
    local head node is started with `ray start --head`, so that the engine outlives this
    process (stop it with `ray stop`)."""
    from cluster.client import EngineNotFound, connect

    if address is not None:
        connect(address)
        return
    try:
        connect("auto")
    except EngineNotFound:
        print("starting a local Ray head node (stop it with `ray stop`)", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
             f"--num-cpus={num_cpus}", "--include-dashboard=false",
             "--disable-usage-stats", f"--object-store-memory={256 * 2**20}"],
            check=True, capture_output=True,
        )  # fmt: skip
        connect("auto")


def serve(
    model: str,
    shards: int,
    *,
    name: str = "gptoss-ray",
    address: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Starts the engine as the detached actor `name` and returns once it is ready."""
    ensure_cluster(address, max(os.cpu_count() or 1, shards + 1))
    try:
        ray.get_actor(name, namespace=NAMESPACE)
        raise RuntimeError(
            f"an engine named {name!r} is already running (gptoss-ray stop --name {name})"
        )
    except ValueError:
        pass
    actor = ray.remote(Coordinator).options(
        name=name, namespace=NAMESPACE, lifetime="detached", max_concurrency=256, num_cpus=0,
        scheduling_strategy=here(),
    )  # fmt: skip
    coordinator = actor.remote(model, shards, **options)
    try:
        return ray.get(coordinator.info.remote())
    except ray.exceptions.RayActorError as exc:
        raise RuntimeError(f"the engine failed to start: {exc}") from None


def stop(name: str = "gptoss-ray", address: str | None = "auto") -> bool:
    """Shuts the engine down; False when there was none."""
    from cluster.client import EngineNotFound, connect

    try:
        connect(address)
    except EngineNotFound:
        return False
    try:
        coordinator = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return False
    try:
        ray.get(coordinator.shutdown.remote(), timeout=60)
    finally:
        ray.kill(coordinator)
    return True

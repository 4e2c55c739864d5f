"""`gptoss-ray serve` / `stop`: a named, detached coordinator that outlives the command,
for clients and batch jobs to share."""

from __future__ import annotations

import os
from typing import Any

import ray

from gptoss_ray.cluster.coordinator import Coordinator
from gptoss_ray.cluster.engine import here
from gptoss_ray.cluster.ray_instance import NAMESPACE, EngineNotFound, connect, ensure_cluster


def serve(
    model: str,
    shards: int,
    *,
    name: str = "gptoss-ray",
    address: str | None = None,
    http: tuple[str, int, str | None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Starts the engine as the detached actor `name` and returns its info once it is
    ready; with `http` (host, port, API key), the OpenAI-compatible API too (its URL in
    the info's "url")."""
    ensure_cluster(address, max(os.cpu_count() or 1, shards + 1))
    try:
        ray.get_actor(name, namespace=NAMESPACE)
        raise RuntimeError(
            f"an engine named {name!r} is already running (gptoss-ray stop --name {name})"
        )
    except ValueError:
        pass
    actor = ray.remote(Coordinator).options(
        name=name,
        namespace=NAMESPACE,
        lifetime="detached",
        max_concurrency=256,
        num_cpus=0,
        scheduling_strategy=here(),
    )
    coordinator = actor.remote(model, shards, **options)
    try:
        info = ray.get(coordinator.info.remote())
    except ray.exceptions.RayActorError as exc:
        raise RuntimeError(f"the engine failed to start: {exc}") from None
    if http is not None:
        from gptoss_ray.cluster.http_api import serve_api

        info["url"] = ray.get(coordinator.attach.remote(serve_api, *http))
    return info


def stop(name: str = "gptoss-ray", address: str | None = "auto") -> bool:
    """Shuts the engine down; False when there was none."""
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

"""`gptoss-ray serve` / `stop`: named, detached engines (coordinator actors) that outlive
the command, for clients and batch jobs to share, and with `--http` the OpenAI API in
front of them as a Ray Serve application (`cluster.front.serve_app`)."""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any

import ray

from gptoss_ray.cluster.engine.config import EngineConfig
from gptoss_ray.cluster.front.app import FrontSettings
from gptoss_ray.cluster.runtime.coordinator import check_engine, engine_names, start_engines
from gptoss_ray.cluster.runtime.ray_instance import (
    NAMESPACE,
    EngineNotFound,
    connect,
    ensure_cluster,
)


def serve(
    config: EngineConfig,
    *,
    engines: int = 1,
    name: str = "gptoss-ray",
    address: str | None = None,
    http: tuple[str, int, str | None] | None = None,
    front: dict[str, Any] | None = None,
    ingress_replicas: int = 1,
) -> dict[str, Any]:
    """Starts `engines` engines of `config` each as detached actors (`engine_names`)
    and returns the first one's info once all are ready (their names in "engines"); with
    `http` (host, port, API key), the OpenAI-compatible API too, as the Ray Serve
    application `name` (its URL in "url"); `front`: the API's other limits
    (`FrontSettings`)."""
    if http is not None:  # a bad key or a public port without one: refused before starting
        host, port, api_key = http
        settings = FrontSettings(api_key=api_key, **(front or {}))
        settings.check_exposure(host)
    check_engine(config)  # a bad model or draft is said before a Ray instance starts
    ensure_cluster(address, max(os.cpu_count() or 1, engines * config.shards + 1))
    names = engine_names(name, engines)
    infos = start_engines(names, config.forwarding_env())  # the NCCL_* of this shell
    info = {**infos[0], "engines": names}
    if http is not None:
        try:
            info["url"] = start_front(name, names, host, port, settings, ingress_replicas)
        except BaseException:
            stop(name, address=None)
            raise
    return info


def start_front(
    app: str, engines: list[str], host: str, port: int, settings: FrontSettings, replicas: int
) -> str:
    """Deploys the API as the Serve application `app` at "/", on Serve's proxies at
    host:port (port 0: a free one), and returns its URL."""
    from ray import serve as ray_serve

    from gptoss_ray.cluster.front.serve_app import ingress

    if port == 0:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
    ray_serve.start(http_options={"host": host, "port": port})
    running = _http_address()
    if running != (host, port):
        raise RuntimeError(
            f"Ray Serve already serves HTTP at {running[0]}:{running[1]} on this cluster; "
            f"serve there (--host {running[0]} --port {running[1]}) or stop its applications"
        )
    taken = [a for a in ray_serve.status().applications if a != app]
    if taken:
        raise RuntimeError(
            f"the Serve application(s) {taken} already hold this cluster's HTTP routes; "
            "stop them first (gptoss-ray stop --name NAME, or serve shutdown)"
        )
    ray_serve.run(
        ingress(engines, settings, num_replicas=replicas),
        name=app,
        route_prefix="/",
        blocking=False,
    )
    return f"http://{_reachable(host)}:{port}/v1"


def _http_address() -> tuple[str, int]:
    from ray.serve.context import _get_global_client

    config = _get_global_client().http_config
    return config.host, config.port


def _reachable(host: str) -> str:
    # every interface: name one the user can reach
    return ray.util.get_node_ip_address() if host in ("0.0.0.0", "::") else host


def stop(name: str = "gptoss-ray", address: str | None = "auto") -> bool:
    """Shuts down the engines `name`, `name-1`, ... and the Serve application `name` (and
    Ray Serve itself once no application is left); False when there was none of them."""
    try:
        connect(address)
    except EngineNotFound:
        return False
    stopped = _stop_front(name)
    prefix = f"{name}-"
    for actor in ray.util.list_named_actors(all_namespaces=True):
        engine = actor["name"]
        suffix = engine.removeprefix(prefix)
        if actor["namespace"] != NAMESPACE or not (engine == name or suffix.isdigit()):
            continue
        try:
            coordinator = ray.get_actor(engine, namespace=NAMESPACE)
        except ValueError:
            continue
        # a coordinator that cannot say goodbye is killed all the same
        with contextlib.suppress(Exception):
            ray.get(coordinator.shutdown.remote(), timeout=60)
        ray.kill(coordinator)
        stopped = True
    return stopped


def _stop_front(app: str) -> bool:
    from ray import serve as ray_serve

    try:
        from ray.serve.context import _get_global_client

        _get_global_client()
    except Exception:  # Serve is not running on this cluster
        return False
    apps = ray_serve.status().applications
    if app not in apps:
        return False
    ray_serve.delete(app)
    if not set(apps) - {app}:
        ray_serve.shutdown()  # its proxies hold the port: the next serve may want another
    return True

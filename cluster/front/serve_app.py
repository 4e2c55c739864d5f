"""The HTTP front as a Ray Serve application: ingress replicas (`ApiIngress`) run the API
app (`http_api.api_app`) and reach the engines, named coordinator actors, through Ray
handles. HTTP parsing, JSON, rendering and tokenizing prompts, building replies from the
engines' token deltas, and streaming to clients happen in the replicas and Serve's
proxies; a coordinator's process runs its engine only.

`gptoss-ray serve --http` deploys it (`cluster.front.serve.serve`); so do `serve run` and
`serve deploy` with a config of `configs/serve/`, whose `import_path` is `build_app`."""

from __future__ import annotations

from typing import Any

import ray
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from gptoss_ray.cluster.client.engine_client import EnginePool, RayEngineClient
from gptoss_ray.cluster.engine.config import EngineConfig
from gptoss_ray.cluster.front.app import FrontSettings, api_app
from gptoss_ray.cluster.runtime.coordinator import engine_names, start_engines
from gptoss_ray.cluster.runtime.ray_instance import NAMESPACE

# A stream is an ongoing request for as long as it runs: a replica must hold thousands.
MAX_ONGOING_REQUESTS = 4096


@serve.deployment(
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=MAX_ONGOING_REQUESTS,
    graceful_shutdown_timeout_s=30,
)
@serve.ingress()
class ApiIngress:
    def __init__(self, engines: list[str], settings: dict[str, Any]) -> None:
        self.links = [
            RayEngineClient(ray.get_actor(name, namespace=NAMESPACE), name) for name in engines
        ]
        self.settings = FrontSettings(**settings)

    def __serve_build_asgi_app__(self) -> Any:
        return api_app(EnginePool(self.links), self.settings)


class AppArgs(BaseModel):
    """`args` of a `serve run` / `serve deploy` config (configs/serve/*.yaml)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("gptoss-ray", description="the first engine's actor name")
    engines: int = Field(1, ge=1, description="expert-parallel groups, data parallel between")
    engine: EngineConfig = Field(
        default_factory=EngineConfig,
        description="each engine: model, shards, device, dtype, KV sizing, ... (EngineConfig)",
    )
    front: FrontSettings = Field(default_factory=FrontSettings)


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application of a config's `args` (`AppArgs`): its engines are started where
    they are not running yet (detached: they outlive a redeploy of the front)."""
    spec = AppArgs(**args)
    host = _serve_host()
    if host is not None:  # a public port with no key (or a weak one) is refused here
        spec.front.check_exposure(host)
    names = engine_names(spec.name, spec.engines)
    start_engines(names, spec.engine, exist_ok=True)
    return ingress(names, spec.front)


def ingress(engines: list[str], settings: FrontSettings, **options: Any) -> serve.Application:
    return ApiIngress.options(**options).bind(engines, settings.model_dump())


def _serve_host() -> str | None:
    """The address Serve's proxies listen on (the config's http_options.host), where the
    running Serve instance says; None where it cannot tell (a Serve of another version)."""
    try:
        from ray.serve.context import _get_global_client

        return _get_global_client().http_config.host
    except Exception:
        return None

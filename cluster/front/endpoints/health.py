"""/health, /v1/models and /metrics (Prometheus)."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gptoss_ray.cluster.client.engine_client import EngineClient
from gptoss_ray.cluster.front.state import (
    ApiError,
    FrontState,
)


# -- endpoints ---------------------------------------------------------------------------
async def health(front: FrontState, request: Request) -> Response:
    infos = await asyncio.gather(
        *(link.call("info") for link in front.pool.links), return_exceptions=True
    )
    down = [
        f"{link.name}: {info if isinstance(info, Exception) else info['error']}"
        for link, info in zip(front.pool.links, infos, strict=True)
        if isinstance(info, Exception) or info["error"]
    ]
    if len(down) == len(infos):
        raise ApiError(503, f"unhealthy: {'; '.join(down)}", "engine_down")
    return JSONResponse({"status": "ok"} | ({"degraded": down} if down else {}))


async def models(front: FrontState, request: Request) -> Response:
    info = await front.info()
    base = {"object": "model", "created": front.started, "owned_by": "gptoss-ray"}
    data = [{"id": info["model_id"], **base}]
    # each LoRA adapter as a model of its own, its base named (vLLM's `parent`)
    data += [{"id": name, **base, "parent": info["model_id"]} for name in info.get("loras", [])]
    return JSONResponse({"object": "list", "data": data})


async def metrics(front: FrontState, request: Request) -> Response:
    async def read(link: EngineClient) -> dict[str, Any]:
        stats, info, load = await asyncio.gather(
            link.call("stats"), link.call("info"), link.call("expert_load")
        )
        return {
            "stats": stats,
            "layout": info["kv_layout"],
            "expert_load": load,
            "outstanding": link.outstanding,
        }

    engines = await asyncio.gather(*(read(link) for link in front.pool.links))
    return Response(front.metrics.render(list(engines)), media_type="text/plain; version=0.0.4")

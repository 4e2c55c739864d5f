"""vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter: LoRA adapters loaded and
unloaded while serving, on every engine behind this front (`EngineCore.add_lora`,
`remove_lora`). The path is a folder on the engines' machines, read there."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from gptoss_ray.cluster.front.state import ApiError, FrontState, read_json


def _field(body: object, name: str) -> str:
    value = body.get(name) if isinstance(body, dict) else None
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{name}: a non-empty string", "invalid_request", name)
    return value


async def _on_every_engine(front: FrontState, method: str, *args: str) -> list[object]:
    calls = (link.call(method, *args) for link in front.pool.links)
    return await asyncio.gather(*calls, return_exceptions=True)


async def load_lora_adapter(front: FrontState, request: Request) -> Response:
    """{"lora_name", "lora_path"}: served from now on, under that name, by every engine
    (all or none: one that refuses undoes the others)."""
    body = await read_json(front, request)
    name, path = _field(body, "lora_name"), _field(body, "lora_path")
    answers = await _on_every_engine(front, "load_lora", name, path)
    failed = [a for a in answers if isinstance(a, BaseException)]
    if failed:
        done = [link for link, a in zip(front.pool.links, answers, strict=True) if a is None]
        await asyncio.gather(*(link.call("unload_lora", name) for link in done))
        raise ApiError.of(failed[0])  # type: ignore[arg-type]
    front.forget_info()  # /v1/models and the requests' model names see it now
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


async def unload_lora_adapter(front: FrontState, request: Request) -> Response:
    """{"lora_name"}: no longer served; refused (409) while a request that uses it runs."""
    body = await read_json(front, request)
    name = _field(body, "lora_name")
    answers = await _on_every_engine(front, "unload_lora", name)
    front.forget_info()
    failed = [a for a in answers if isinstance(a, BaseException)]
    if failed:
        raise ApiError.of(failed[0])  # type: ignore[arg-type]
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

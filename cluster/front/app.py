"""The OpenAI-compatible HTTP API as an ASGI app (Starlette), in front of one or more
engines (`engine_client.EnginePool`). Ray Serve runs it in ingress replicas
(`cluster.front.serve_app`); tests run the same app over an engine of their own process
(`engine_client.LocalEngineClient`). The front owns text: requests are rendered and
tokenized here, the engines' token deltas become replies here, and a stop string found
here aborts its sequence in the engine.

/v1/chat/completions, /v1/completions, /v1/responses (stream: server-sent events),
/v1/models, vLLM's /tokenize, /detokenize, /tokenizer_info, /v1/load_lora_adapter and
/v1/unload_lora_adapter, /health, /metrics
(Prometheus). With an API key every request needs `Authorization: Bearer KEY`. Errors
have OpenAI's shape: {"error": {"message", "type", "param", "code"}}. A client that goes
away has its sequences cancelled at once. Limits (`FrontSettings`): the body's size (413),
max_tokens, and the requests this front keeps in each engine (past it: 429 with
Retry-After)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from gptoss_ray.cluster.client.engine_client import EnginePool
from gptoss_ray.cluster.front.endpoints import (
    batches,
    chat_completions,
    completions,
    health,
    loras,
    responses,
    tokenizer,
)
from gptoss_ray.cluster.front.response_store import ResponseStore
from gptoss_ray.cluster.front.state import ApiError, FrontSettings, FrontState
from gptoss_ray.model.types import EngineUnavailable, RequestError


# -- the app -----------------------------------------------------------------------------
def api_app(
    pool: EnginePool, settings: FrontSettings | None = None, responses: ResponseStore | None = None
) -> Starlette:
    """The API over `pool`'s engines; stored responses in `responses` (default: the Ray
    cluster's key-value store)."""
    front = FrontState(pool, settings or FrontSettings(), responses)

    def route(path: str, methods: list[str], handler: Callable[..., Awaitable[Response]]):
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(front, request)
            except (ApiError, RequestError, EngineUnavailable) as exc:
                return ApiError.of(exc).response()
            except ClientDisconnect:
                return Response(status_code=499)  # nobody reads it

        return Route(path, endpoint, methods=methods, name=handler.__name__)

    app = Starlette(
        routes=[route(path, methods, handler) for path, methods, handler in ROUTES],
        exception_handlers={HTTPException: _http_error, Exception: _internal_error},
    )
    app.state.front = front
    return _Guard(app, front)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 405:
        err = ApiError(
            405, f"{request.method} is not allowed on {request.url.path}", "method_not_allowed"
        )
    elif exc.status_code == 404:
        err = ApiError(404, f"no route {request.url.path}", "not_found")
    else:
        err = ApiError(exc.status_code, str(exc.detail), "invalid_request")
    return err.response()


async def _internal_error(request: Request, exc: Exception) -> Response:
    # never a traceback to the client (the server's log has it)
    return ApiError.of(exc).response()


class _Guard:
    """Before any route: the API key, and the count of answers by status code."""

    def __init__(self, app: Starlette, front: FrontState) -> None:
        self.app, self.front = app, front
        self.state = app.state
        self.key = front.settings.key()
        self.active: Counter[str] = Counter()  # requests being answered, by API key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})["started"] = time.monotonic()  # `request.state.started`
        key = self.key
        route = scope["path"]

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.front.metrics.http_requests.labels(
                    _route_label(route), str(message["status"])
                ).inc()
            await send(message)

        if key is not None:
            headers = dict(scope.get("headers") or [])
            if headers.get(b"authorization", b"") != f"Bearer {key}".encode():
                err = ApiError(
                    401, "missing or wrong API key (Authorization: Bearer KEY)", "invalid_api_key"
                )
                await err.response()(scope, receive, counted)
                return
            cap = self.front.settings.max_concurrent_per_key
            if cap is not None and self.active[key] >= cap:
                self.front.metrics.rejected.labels("key_concurrency").inc()
                err = ApiError(
                    429,
                    f"this API key has {cap} requests running, its limit; retry shortly",
                    "rate_limit_exceeded",
                    headers={"Retry-After": str(self.front.settings.retry_after_s)},
                )
                await err.response()(scope, receive, counted)
                return
            self.active[key] += 1
            try:
                await self.app(scope, receive, counted)
            finally:
                self.active[key] -= 1
            return
        await self.app(scope, receive, counted)


def _route_label(path: str) -> str:
    # the route, not the path: stored response ids must not become label values
    for pattern, _, _ in ROUTES:
        parts, want = path.rstrip("/").split("/"), pattern.split("/")
        if len(parts) == len(want) and all(
            w == p or w.startswith("{") for w, p in zip(want, parts, strict=True)
        ):
            return pattern
    return "other"


# each path and method, and its handler
ROUTES: list[tuple[str, list[str], Callable[[FrontState, Request], Awaitable[Response]]]] = [
    ("/health", ["GET"], health.health),
    ("/metrics", ["GET"], health.metrics),
    ("/v1/models", ["GET"], health.models),
    ("/v1/chat/completions", ["POST"], chat_completions.chat_completions),
    ("/v1/completions", ["POST"], completions.completions),
    ("/v1/responses", ["POST"], responses.responses),
    ("/v1/responses/{id}", ["GET"], responses.get_response),
    ("/v1/responses/{id}", ["DELETE"], responses.delete_response),
    ("/v1/responses/{id}/input_items", ["GET"], responses.response_input_items),
    ("/v1/load_lora_adapter", ["POST"], loras.load_lora_adapter),
    ("/v1/unload_lora_adapter", ["POST"], loras.unload_lora_adapter),
    ("/tokenize", ["POST"], tokenizer.tokenize),
    ("/detokenize", ["POST"], tokenizer.detokenize),
    ("/tokenizer_info", ["GET"], tokenizer.tokenizer_info),
    ("/v1/files", ["POST"], batches.upload_file),
    ("/v1/files", ["GET"], batches.list_files),
    ("/v1/files/{id}", ["GET"], batches.get_file),
    ("/v1/files/{id}", ["DELETE"], batches.delete_file),
    ("/v1/files/{id}/content", ["GET"], batches.file_content),
    ("/v1/batches", ["POST"], batches.create_batch),
    ("/v1/batches", ["GET"], batches.list_batches),
    ("/v1/batches/{id}", ["GET"], batches.get_batch),
    ("/v1/batches/{id}/cancel", ["POST"], batches.cancel_batch),
]

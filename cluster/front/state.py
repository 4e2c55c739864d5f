"""What every endpoint of the HTTP front shares: its settings and limits (`FrontSettings`),
errors in OpenAI's shape (`ApiError`), the engines and how a request reaches one and is
read back (`FrontState`: rendered here, added to an engine, its pushed deltas turned into
events), and reading JSON bodies and writing server-sent events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, Field, field_validator
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from gptoss_ray.cluster.client.chat import chat_request
from gptoss_ray.cluster.client.completions import completion_requests
from gptoss_ray.cluster.client.engine_client import (
    EngineClient,
    EnginePool,
    Finished,
    RequestStream,
)
from gptoss_ray.cluster.front.metrics import FrontMetrics
from gptoss_ray.cluster.front.response_store import ResponseStore
from gptoss_ray.model.types import EngineUnavailable, RequestError

MAX_BODY_BYTES = 8 << 20  # a 128k-token conversation is well under 1 MiB of JSON
MAX_FILE_BYTES = 200 << 20  # a batch input file, as OpenAI takes
POLL_S = 0.5  # how often a handler looks for its client gone (and so its request's end)


# Keys that docs and examples write: a front that takes one is open to whoever reads them
PLACEHOLDER_KEYS = frozenset(
    {"change-me", "changeme", "change_me", "your-api-key", "your-key", "your_api_key",
     "api-key", "apikey", "key", "secret", "password", "token", "test", "none", "null",
     "sk-xxx", "xxx", "placeholder", "example"}
)  # fmt: skip
MIN_PUBLIC_KEY = 16  # characters a key needs where the front listens beyond loopback


class ApiKeyError(ValueError):
    """An API key that protects nothing (a placeholder, none or a short one on a public
    port, an environment variable that is not set): the front refuses to start."""


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _placeholder(key: str) -> bool:
    return not key.strip() or key.strip().lower() in PLACEHOLDER_KEYS


class FrontSettings(BaseModel):
    """What a front allows: its API key and the limits that protect its engines."""

    api_key: str | None = None
    api_key_env: str | None = Field(
        None, description="the name of an environment variable holding the API key"
    )
    max_body_bytes: int = Field(MAX_BODY_BYTES, gt=0)
    max_file_bytes: int = Field(MAX_FILE_BYTES, gt=0, description="a batch input file's")
    max_tokens: int | None = Field(None, gt=0, description="the most a request may ask for")
    max_outstanding: int = Field(
        1024, gt=0, description="requests this front keeps in each engine; past it, 429"
    )
    max_concurrent_per_key: int | None = Field(
        None, gt=0, description="requests at once with one API key (in each replica); past it, 429"
    )
    retry_after_s: int = Field(1, ge=0)

    @field_validator("api_key")
    @classmethod
    def _not_a_placeholder(cls, key: str | None) -> str | None:
        if key is not None and _placeholder(key):
            raise ValueError(
                f"{key!r} is a placeholder, not a key: give a secret of your own (api_key_env "
                "names an environment variable that holds it), or leave the key out on loopback"
            )
        return key

    def key(self) -> str | None:
        """The API key; one named by api_key_env is read where the front runs."""
        if self.api_key_env is None:
            return self.api_key
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ApiKeyError(
                f"api_key_env: the environment variable {self.api_key_env} is not set here"
            )
        if _placeholder(key):
            raise ApiKeyError(
                f"api_key_env: {self.api_key_env} holds a placeholder ({key!r}), not a key"
            )
        return key

    def check_exposure(self, host: str) -> None:
        """A front that listens beyond loopback needs a real key (at least MIN_PUBLIC_KEY
        characters): refused here, before anything starts, otherwise."""
        if is_loopback(host):
            return
        key = self.key()
        if key is None:
            raise ApiKeyError(
                f"host {host}: the API would be open to anyone who reaches it; give an API "
                "key (front.api_key_env, --api-key) or bind 127.0.0.1 and put a proxy with "
                "TLS and authentication in front (README: Exposing the API)"
            )
        if len(key) < MIN_PUBLIC_KEY:
            raise ApiKeyError(
                f"host {host}: an API key of {len(key)} characters is too short for a public "
                f"port; use at least {MIN_PUBLIC_KEY} (e.g. `openssl rand -hex 24`)"
            )


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers

    @classmethod
    def of(cls, exc: Exception) -> ApiError:
        """An engine's or a parser's error as the API answers it."""
        if isinstance(exc, ApiError):
            return exc
        if isinstance(exc, RequestError | EngineUnavailable):  # harmony's errors among them
            return cls(exc.status, str(exc), exc.code, getattr(exc, "param", None))
        if isinstance(exc, ValueError):  # a field that only SamplingParams checks
            return cls(400, str(exc), RequestError.code)
        return cls(500, f"{type(exc).__name__}: {exc}", "internal_error")

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}
        kind = kind.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers=self.headers)


class FrontState:
    """What every request handler shares: the engines, the settings, the response store,
    the metrics, and the model's id and context (asked of the engines once)."""

    def __init__(
        self, pool: EnginePool, settings: FrontSettings, responses: ResponseStore | None = None
    ) -> None:
        self.pool, self.settings = pool, settings
        self.started = int(time.time())
        self.metrics = FrontMetrics()
        self._info: dict[str, Any] | None = None
        self._responses = responses
        self._batches: Any = None
        self._releases: set[asyncio.Task] = set()

    async def info(self, model: str | None = None) -> dict[str, Any]:
        """The engines' model and context, asked once of those that answer: an engine
        already lost when the front first asks must not take the front down with it.
        A `model` it does not know yet (a LoRA adapter loaded since, through any front
        replica) asks again."""
        info = self._info
        known = info and {info["model_id"], info["model"], *info.get("loras", ())}
        if model is not None and known and model not in known:
            self._info = None
        if self._info is None:
            calls = (link.call("info") for link in self.pool.links)
            answers = await asyncio.gather(*calls, return_exceptions=True)
            infos = [a for a in answers if not isinstance(a, BaseException)]
            if not infos:
                raise next(a for a in answers if isinstance(a, BaseException))
            models = {i["model_id"] for i in infos}
            if len(models) > 1:
                raise EngineUnavailable(f"the engines serve different models: {sorted(models)}")
            self._info = infos[0]
        return self._info

    def forget_info(self) -> None:
        """The engines' info is asked again when next needed (adapters changed)."""
        self._info = None

    @property
    def responses(self) -> ResponseStore:
        if self._responses is None:  # made here, in the replica, where Ray is
            self._responses = ResponseStore()
        return self._responses

    @property
    def batches(self) -> Any:
        """The Batch API (`batches_api.Batches`), where the engines are Ray actors."""
        if self._batches is None:
            names = [link.actor_name for link in self.pool.links]
            if None in names:
                raise ApiError(
                    501,
                    "the Batch API needs engines on a Ray cluster (gptoss-ray serve --http)",
                    "not_implemented",
                )
            from gptoss_ray.cluster.batch.service import Batches

            self._batches = Batches(names)
        return self._batches

    def engine_for(self, body: dict[str, Any], tried: list[EngineClient]) -> EngineClient:
        link = self.pool.pick(body, avoid=tried)
        if link.outstanding >= self.settings.max_outstanding:
            self.metrics.rejected.labels("at_capacity").inc()
            raise ApiError(
                429,
                f"the server is at capacity ({self.settings.max_outstanding} requests in each "
                "engine); retry shortly",
                "server_busy",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        return link

    def check_limits(self, body: dict[str, Any]) -> None:
        cap = self.settings.max_tokens
        for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            asked = body.get(field)
            if cap is not None and isinstance(asked, int) and asked > cap:
                raise ApiError(
                    400,
                    f"{field} {asked} exceeds this server's limit of {cap}",
                    "invalid_request",
                    field,
                )

    @contextlib.asynccontextmanager
    async def submitted(
        self, body: Any, kind: str, request: Request
    ) -> AsyncIterator[tuple[Any, list[RequestStream]]]:
        """Renders `body` here (kind "chat": a chat request; "text": a completions request,
        a stream per prompt) and adds it to an engine -> the parsed request (completions)
        and the streams; on the way out, whatever happened (a reply sent, an error, a
        client gone), every request still running is aborted."""
        if not isinstance(body, dict):
            raise ApiError(400, "the request body is a JSON object", "invalid_request")
        self.check_limits(body)
        model = body.get("model")
        info = await self.info(model if isinstance(model, str) else None)
        try:
            if kind == "chat":
                parsed, (one, replies) = None, chat_request(body, info)
                requests, replies = [one], [replies]
            else:
                parsed, requests, replies = completion_requests(body, info)
        except Exception as exc:
            raise ApiError.of(exc) from None
        tried: list[EngineClient] = []
        while True:  # an engine that cannot be reached: the next one, while there is one
            link = self.engine_for(body, tried)
            try:
                streams = await link.submit(requests, replies)
                break
            except EngineUnavailable as exc:
                tried.append(link)
                if len(tried) >= len(self.pool.links):
                    raise ApiError.of(exc) from None
            except Exception as exc:
                raise ApiError.of(exc) from None
        try:
            yield parsed, streams
        finally:
            for stream in streams:
                stream.close()

    async def model_name(self, stream: RequestStream) -> str:
        """The model a reply names: the LoRA adapter it ran with, else the engine's model
        (as vLLM answers for an adapter it serves)."""
        return stream.request.params.lora or (await self.info())["model_id"]

    async def events(self, stream: RequestStream, request: Request) -> AsyncIterator[Any]:
        """The reply's (choice, event) pairs as they come, then `Finished`; raises
        ClientDisconnect when the client has gone (the caller's `submitted` aborts)."""
        started, first = request.state.started, None
        asked = time.monotonic()  # when the client was last looked for
        while True:
            try:
                item = await asyncio.wait_for(stream.queue.get(), POLL_S)
            except TimeoutError:
                item = None
            # Also while tokens flow: a stream never waits out POLL_S then, and behind
            # Serve the proxy's cancel of a replica's handler can be lost (a race seen
            # in Ray's issues: the stream then ran to max_tokens for nobody).
            if item is None or time.monotonic() - asked > POLL_S:
                asked = time.monotonic()
                if await request.is_disconnected():
                    raise ClientDisconnect from None
            if item is None:
                continue
            if isinstance(item, BaseException):
                raise ApiError.of(item)
            if first is None:
                first = time.monotonic()
            if isinstance(item, Finished):
                tokens = item.reply["usage"]["completion_tokens"]
                self.metrics.observe_reply(started, first, time.monotonic(), tokens)
            yield item
            if isinstance(item, Finished):
                return

    async def reply(self, stream: RequestStream, request: Request) -> dict:
        async for item in self.events(stream, request):
            if isinstance(item, Finished):
                return item.reply
        raise AssertionError("a reply's events end with Finished")


async def read_json(front: FrontState, request: Request) -> Any:
    limit = front.settings.max_body_bytes
    header = request.headers.get("content-length")
    if header is not None and header.isdigit() and int(header) > limit:
        raise ApiError(
            413,
            f"the request body has {int(header)} bytes; at most {limit} are accepted",
            "request_too_large",
        )
    raw = bytearray()
    async for chunk in request.stream():  # a chunked body is counted as it comes
        raw += chunk
        if len(raw) > limit:
            raise ApiError(413, f"the request body is over {limit} bytes", "request_too_large")
    try:
        return json.loads(bytes(raw) or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ApiError(
            400, f"the request body is not valid JSON: {reason}", "invalid_json"
        ) from None


def sse(data: Any, event: str | None = None) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {text}\n\n"


async def event_stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events from `chunks`, whose first item is awaited here: the stream's
    request is submitted by then, so that a bad one is still a JSON error with its status.
    An error after the stream began is its last event, in the same shape."""
    first = await anext(chunks)

    async def events() -> AsyncIterator[str]:
        yield first
        try:
            async for chunk in chunks:
                yield chunk
        except ClientDisconnect:
            return
        except Exception as exc:
            yield sse(ApiError.of(exc).body())
        finally:
            await chunks.aclose()

    return EventStream(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


class EventStream(StreamingResponse):
    """A streaming response that closes its chunks however it ends. Starlette leaves them
    open when the response is cancelled during a `send` (the client gone, Serve's proxy
    cancelling the handler): the chunks' generator, suspended at a `yield`, sees no cancel,
    and its request would run on until a garbage collection happened to close it."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]

"""The OpenAI-compatible HTTP API as an ASGI app (Starlette), in front of one or more
engines (`engine_client.EnginePool`). Ray Serve runs it in ingress replicas
(`cluster.serve_app`); tests run the same app over an engine of their own process
(`engine_client.LocalEngineClient`). The front owns text: requests are rendered and
tokenized here, the engines' token deltas become replies here, and a stop string found
here aborts its sequence in the engine.

/v1/chat/completions, /v1/completions, /v1/responses (stream: server-sent events),
/v1/models, vLLM's /tokenize, /detokenize, /tokenizer_info, /health, /metrics
(Prometheus). With an API key every request needs `Authorization: Bearer KEY`. Errors
have OpenAI's shape: {"error": {"message", "type", "param", "code"}}. A client that goes
away has its sequences cancelled at once. Limits (`FrontSettings`): the body's size (413),
max_tokens, and the requests this front keeps in each engine (past it: 429 with
Retry-After)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gptoss_ray.cluster.chat import (
    TextDelta,
    ToolCallStart,
    chat_completion,
    chat_prompt,
    chat_request,
    logprob_entries,
)
from gptoss_ray.cluster.completions import (
    completion_choices,
    completion_object,
    completion_requests,
    legacy_logprobs,
)
from gptoss_ray.cluster.engine_client import EngineClient, EnginePool, Finished, RequestStream
from gptoss_ray.cluster.metrics import FrontMetrics
from gptoss_ray.cluster.response_store import ResponseStore
from gptoss_ray.cluster.responses_api import (
    ResponseStream,
    conversation,
    remember,
    response_object,
)
from gptoss_ray.model import tokenizer as tok
from gptoss_ray.model.types import EngineUnavailable, RequestError

MAX_BODY_BYTES = 8 << 20  # a 128k-token conversation is well under 1 MiB of JSON
MAX_FILE_BYTES = 200 << 20  # a batch input file, as OpenAI takes
POLL_S = 0.5  # how often a handler looks for its client gone (and so its request's end)


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

    def key(self) -> str | None:
        """The API key; one named by api_key_env is read where the front runs."""
        if self.api_key_env is None:
            return self.api_key
        key = os.environ.get(self.api_key_env)
        if not key:
            raise RuntimeError(
                f"api_key_env: the environment variable {self.api_key_env} is not set here"
            )
        return key


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

    def __init__(self, pool: EnginePool, settings: FrontSettings) -> None:
        self.pool, self.settings = pool, settings
        self.started = int(time.time())
        self.metrics = FrontMetrics()
        self._info: dict[str, Any] | None = None
        self._responses: ResponseStore | None = None
        self._batches: Any = None
        self._releases: set[asyncio.Task] = set()

    async def info(self) -> dict[str, Any]:
        """The engines' model and context, asked once of those that answer: an engine
        already lost when the front first asks must not take the front down with it."""
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

    @property
    def responses(self) -> ResponseStore:
        if self._responses is None:  # made here: Ray (or not) is known by now
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
            from gptoss_ray.cluster.batches_api import Batches

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
        info = await self.info()
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


# -- the app -----------------------------------------------------------------------------
def api_app(pool: EnginePool, settings: FrontSettings | None = None) -> Starlette:
    """The API over `pool`'s engines."""
    front = FrontState(pool, settings or FrontSettings())

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


async def _read_json(front: FrontState, request: Request) -> Any:
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


def _sse(data: Any, event: str | None = None) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {text}\n\n"


async def _event_stream(chunks: AsyncIterator[str]) -> StreamingResponse:
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
            yield _sse(ApiError.of(exc).body())
        finally:
            await chunks.aclose()

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
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
    model = {"id": info["model_id"], "object": "model", "created": front.started}
    return JSONResponse({"object": "list", "data": [model | {"owned_by": "gptoss-ray"}]})


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


async def chat_completions(front: FrontState, request: Request) -> Response:
    body = await _read_json(front, request)
    if isinstance(body, dict) and body.get("stream"):
        return await _event_stream(_stream_chat(front, body, request))
    async with front.submitted(body, "chat", request) as (_, (stream,)):
        reply = await front.reply(stream, request)
        model = (await front.info())["model_id"]
        return JSONResponse(chat_completion(reply, model, f"chatcmpl-{stream.request_id[:24]}"))


async def _stream_chat(
    front: FrontState, body: dict[str, Any], request: Request
) -> AsyncIterator[str]:
    async with front.submitted(body, "chat", request) as (_, (stream,)):
        # (read once the engine took the request: it checked them)
        n, rid = stream.request.params.n, stream.request_id
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        base = {
            "id": f"chatcmpl-{rid[:24]}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": (await front.info())["model_id"],
        }

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs=None):
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return _sse({**base, "choices": [choice]})

        yield "".join(chunk(i, {"role": "assistant", "content": ""}) for i in range(n))
        async for item in front.events(stream, request):
            if isinstance(item, Finished):
                reply = item.reply
                break
            choice, event = item
            out = _chat_delta(event)
            if out is not None:
                yield chunk(choice, *out)
        text = "".join(
            chunk(i, {}, c["finish_reason"]) for i, c in enumerate(reply.get("choices") or [reply])
        )
        if include_usage:
            text += _sse({**base, "choices": [], "usage": reply["usage"]})
        yield text + _sse("[DONE]")


def _chat_delta(ev: Any) -> tuple[dict[str, Any], None, Any] | None:
    """An event as a chunk's (delta, finish, logprobs), None for events chat does not show."""
    if isinstance(ev, ToolCallStart):
        call = {"name": ev.name, "arguments": ""}
        return (
            {
                "tool_calls": [
                    {"index": ev.index, "id": ev.call_id, "type": "function", "function": call}
                ]
            },
            None,
            None,
        )
    if isinstance(ev, TextDelta) and ev.kind == "call":
        return {"tool_calls": [{"index": ev.call, "function": {"arguments": ev.text}}]}, None, None
    if isinstance(ev, TextDelta) and ev.kind == "reasoning":
        return {"reasoning_content": ev.text}, None, None
    if isinstance(ev, TextDelta):
        # the answer's tokens' logprobs go with the text they wrote, when asked
        lps = {"content": logprob_entries(ev.logprobs), "refusal": None} if ev.logprobs else None
        return {"content": ev.text}, None, lps
    return None


async def completions(front: FrontState, request: Request) -> Response:
    body = await _read_json(front, request)
    if not isinstance(body, dict):
        raise ApiError(400, "the request body is a JSON object", "invalid_request")
    if body.get("stream") and body.get("echo") and body.get("logprobs") is not None:
        raise ApiError(
            400, "echo with logprobs is not streamed: leave out stream", "invalid_request", "echo"
        )
    if body.get("stream"):
        return await _event_stream(_stream_completions(front, body, request))
    async with front.submitted(body, "text", request) as (parsed, streams):
        n, cid = parsed.n or 1, f"cmpl-{streams[0].request_id[:24]}"
        choices, usage = [], Counter()
        for i, stream in enumerate(streams):
            reply = await front.reply(stream, request)
            choices += completion_choices(i * n, stream.request.prompt, reply, parsed)
            usage.update(reply["usage"])
        model = (await front.info())["model_id"]
        return JSONResponse(completion_object(cid, model, choices, dict(usage)))


async def _stream_completions(
    front: FrontState, body: dict[str, Any], request: Request
) -> AsyncIterator[str]:
    """Prompt after prompt (all run at once), each choice's text as it comes."""
    async with front.submitted(body, "text", request) as (parsed, streams):
        n, usage = parsed.n or 1, Counter()
        cid, model = f"cmpl-{streams[0].request_id[:24]}", (await front.info())["model_id"]

        def chunk(index: int, text: str, finish: str | None = None, logprobs: Any = None) -> str:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
            return _sse(completion_object(cid, model, [choice], {}) | {"usage": None})

        yield ""  # submitted: the answer's head goes now
        for i, stream in enumerate(streams):
            offsets = [0] * n
            if parsed.echo:
                text = tok.decode(stream.request.prompt)
                yield "".join(chunk(i * n + j, text) for j in range(n))
            async for item in front.events(stream, request):
                if isinstance(item, Finished):
                    reply = item.reply
                    break
                j, event = item
                lps = None
                if parsed.logprobs is not None:
                    tokens = [lp.token for lp in event.logprobs]
                    lps = legacy_logprobs(event.logprobs, tokens, offsets[j])
                offsets[j] += len(event.text)
                yield chunk(i * n + j, event.text, logprobs=lps)
            yield "".join(
                chunk(i * n + j, "", r["finish_reason"])
                for j, r in enumerate(reply.get("choices") or [reply])
            )
            usage.update(reply["usage"])
        if parsed.stream_options and parsed.stream_options.include_usage:
            yield _sse(completion_object(cid, model, [], dict(usage)))
        yield _sse("[DONE]")


async def responses(front: FrontState, request: Request) -> Response:
    body = await _read_json(front, request)
    try:
        items, chat = await run_in_threadpool(conversation, body, front.responses)
    except RequestError as exc:  # harmony's among them
        raise ApiError.of(exc) from None
    if body.get("stream"):
        return await _event_stream(_stream_responses(front, body, items, chat, request))
    async with front.submitted(chat, "chat", request) as (_, (stream,)):
        reply = await front.reply(stream, request)
        model = (await front.info())["model_id"]
        rid = stream.request_id
        response = response_object(reply, model, response_id=f"resp_{rid}", request=body)
    await run_in_threadpool(remember, front.responses, body, items, response)
    return JSONResponse(response)


async def _stream_responses(
    front: FrontState, body: dict[str, Any], items: list, chat: dict[str, Any], request: Request
) -> AsyncIterator[str]:
    async with front.submitted(chat, "chat", request) as (_, (stream,)):
        rid, out = stream.request_id, []
        seq = iter(range(1 << 62))

        def send(kind: str, **fields: Any) -> None:
            out.append(_sse({"type": kind, "sequence_number": next(seq), **fields}, event=kind))

        model = (await front.info())["model_id"]
        events = ResponseStream(send, f"resp_{rid}", model, bool(chat.get("logprobs")))
        yield "".join(out)  # response.created
        out.clear()
        async for item in front.events(stream, request):
            if isinstance(item, Finished):
                response = events.complete(item.reply, body)
            else:
                events.handle(item[1])
            yield "".join(out)
            out.clear()
    await run_in_threadpool(remember, front.responses, body, items, response)


# -- vLLM's tokenizer endpoints (evaluation harnesses count tokens with them) -------------
async def tokenize(front: FrontState, request: Request) -> Response:
    """{"prompt": text} or {"messages": chat} (rendered for completion) -> ids."""
    body = await _read_json(front, request)
    if not isinstance(body, dict) or not isinstance(
        body.get("prompt", body.get("messages")), str | list
    ):
        raise ApiError(
            400, "give a prompt (a string) or messages (a chat)", "invalid_request", "prompt"
        )
    context = (await front.info())["max_context_length"]
    try:
        if "messages" in body:
            tokens = chat_prompt(body, context)[0]
        elif isinstance(body["prompt"], str):
            tokens = tok.encode(body["prompt"], allow_special=True)  # as /v1/completions
        else:
            raise ApiError(400, "prompt: a string", "invalid_request", "prompt")
    except RequestError as exc:
        raise ApiError.of(exc) from None
    return JSONResponse({"count": len(tokens), "max_model_len": context, "tokens": tokens})


async def detokenize(front: FrontState, request: Request) -> Response:
    body = await _read_json(front, request)
    tokens = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise ApiError(400, "tokens: a list of token ids", "invalid_request", "tokens")
    try:
        return JSONResponse({"prompt": tok.decode(tokens)})
    except tok.TokenizerError as exc:
        raise ApiError(400, str(exc), "invalid_request", "tokens") from None


async def tokenizer_info(front: FrontState, request: Request) -> Response:
    return JSONResponse(
        {
            "tokenizer_class": "tiktoken:o200k_harmony",
            "eos_token": "<|return|>",
            "bos_token": None,
            "pad_token": "<|endoftext|>",
            "model_max_length": (await front.info())["max_context_length"],
            "vocab_size": tok.VOCAB_SIZE,
        }
    )


async def _stored(front: FrontState, request: Request) -> dict[str, Any]:
    rid = request.path_params["id"]
    entry = await run_in_threadpool(front.responses.get, rid)
    if entry is None:
        raise ApiError(404, f"no stored response {rid!r}", "not_found")
    return entry


async def get_response(front: FrontState, request: Request) -> Response:
    return JSONResponse((await _stored(front, request))["response"])


async def delete_response(front: FrontState, request: Request) -> Response:
    rid = request.path_params["id"]
    if not await run_in_threadpool(front.responses.delete, rid):
        raise ApiError(404, f"no stored response {rid!r}", "not_found")
    return JSONResponse({"id": rid, "object": "response.deleted", "deleted": True})


async def response_input_items(front: FrontState, request: Request) -> Response:
    entry = await _stored(front, request)
    data = entry["items"][: entry["inputs"]]
    if request.query_params.get("order", "desc") == "desc":
        data = data[::-1]  # OpenAI lists the newest first unless asked
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    body = {"object": "list", "data": data, "first_id": first, "last_id": last}
    return JSONResponse(body | {"has_more": False})


# -- the Batch API (cluster.batches_api) -----------------------------------------------------
async def _batches(front: FrontState, method: str, *args: Any) -> Any:
    service = await run_in_threadpool(lambda: front.batches)
    try:
        return await run_in_threadpool(getattr(service, method), *args)
    except (RequestError, ValueError) as exc:  # the job's own input errors among them
        raise ApiError.of(exc) from None


async def upload_file(front: FrontState, request: Request) -> Response:
    limit = front.settings.max_file_bytes
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit + 65536:
        raise ApiError(413, f"the file is over {limit} bytes", "request_too_large", "file")
    try:
        form = await request.form(max_files=1, max_fields=8)
    except Exception as exc:  # not multipart, or torn
        raise ApiError(
            400, f"a multipart form with file and purpose: {exc}", "invalid_request"
        ) from None
    upload, purpose = form.get("file"), form.get("purpose")
    if upload is None or isinstance(upload, str):
        raise ApiError(400, "file: the form has no file", "invalid_request", "file")
    if not isinstance(purpose, str):
        raise ApiError(400, "purpose: the form has no purpose", "invalid_request", "purpose")
    data = await upload.read()
    if len(data) > limit:
        raise ApiError(413, f"the file is over {limit} bytes", "request_too_large", "file")
    return JSONResponse(
        await _batches(front, "upload", upload.filename or "upload.jsonl", purpose, data)
    )


async def list_files(front: FrontState, request: Request) -> Response:
    service = await run_in_threadpool(lambda: front.batches)
    purpose = request.query_params.get("purpose")
    data = await service.files.list.remote(purpose)
    return JSONResponse({"object": "list", "data": data, "has_more": False})


async def _file(front: FrontState, request: Request, method: str) -> Any:
    service = await run_in_threadpool(lambda: front.batches)
    file_id = request.path_params["id"]
    got = await getattr(service.files, method).remote(file_id)
    if got is None or got is False:
        raise ApiError(404, f"no file {file_id!r}", "not_found", "file_id")
    return got


async def get_file(front: FrontState, request: Request) -> Response:
    return JSONResponse(await _file(front, request, "get"))


async def file_content(front: FrontState, request: Request) -> Response:
    return Response(await _file(front, request, "content"), media_type="application/jsonl")


async def delete_file(front: FrontState, request: Request) -> Response:
    await _file(front, request, "delete")
    return JSONResponse({"id": request.path_params["id"], "object": "file", "deleted": True})


async def create_batch(front: FrontState, request: Request) -> Response:
    return JSONResponse(await _batches(front, "create", await _read_json(front, request)))


async def list_batches(front: FrontState, request: Request) -> Response:
    limit = request.query_params.get("limit", "20")
    if not limit.isdigit() or not 1 <= int(limit) <= 100:
        raise ApiError(400, f"limit {limit!r}: 1 to 100", "invalid_request", "limit")
    after = request.query_params.get("after")
    return JSONResponse(await _batches(front, "list", after, int(limit)))


async def get_batch(front: FrontState, request: Request) -> Response:
    return JSONResponse(await _batches(front, "get", request.path_params["id"]))


async def cancel_batch(front: FrontState, request: Request) -> Response:
    return JSONResponse(await _batches(front, "cancel", request.path_params["id"]))


ROUTES: list[tuple[str, list[str], Callable[[FrontState, Request], Awaitable[Response]]]] = [
    ("/health", ["GET"], health),
    ("/metrics", ["GET"], metrics),
    ("/v1/models", ["GET"], models),
    ("/v1/chat/completions", ["POST"], chat_completions),
    ("/v1/completions", ["POST"], completions),
    ("/v1/responses", ["POST"], responses),
    ("/v1/responses/{id}", ["GET"], get_response),
    ("/v1/responses/{id}", ["DELETE"], delete_response),
    ("/v1/responses/{id}/input_items", ["GET"], response_input_items),
    ("/tokenize", ["POST"], tokenize),
    ("/detokenize", ["POST"], detokenize),
    ("/tokenizer_info", ["GET"], tokenizer_info),
    ("/v1/files", ["POST"], upload_file),
    ("/v1/files", ["GET"], list_files),
    ("/v1/files/{id}", ["GET"], get_file),
    ("/v1/files/{id}", ["DELETE"], delete_file),
    ("/v1/files/{id}/content", ["GET"], file_content),
    ("/v1/batches", ["POST"], create_batch),
    ("/v1/batches", ["GET"], list_batches),
    ("/v1/batches/{id}", ["GET"], get_batch),
    ("/v1/batches/{id}/cancel", ["POST"], cancel_batch),
]

"""The OpenAI-compatible HTTP API, attached to a running engine in its process
(`EngineLoop.attach(serve_api, host, port, api_key)`, as `gptoss-ray serve --http` does).

/v1/chat/completions (stream: server-sent events), /v1/responses (stream: typed events),
/v1/models, /health, /metrics (Prometheus text). Loopback unless told otherwise; with an
API key every request needs `Authorization: Bearer KEY`. Errors have OpenAI's shape:
{"error": {"message", "type", "param", "code"}}. A client that goes away mid-stream has
its sequence cancelled at once."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from gptoss_ray.cluster.chat import (
    EventCursor,
    TextDelta,
    ToolCallStart,
    chat_completion,
    chat_prompt,
    logprob_entries,
)
from gptoss_ray.cluster.completions import (
    CompletionRequest,
    completion_choices,
    completion_object,
    legacy_logprobs,
)
from gptoss_ray.cluster.response_store import ResponseStore
from gptoss_ray.cluster.responses_api import (
    ResponseStream,
    conversation,
    remember,
    response_object,
)
from gptoss_ray.model import tokenizer as tok
from gptoss_ray.model.types import EngineUnavailable, RequestError

if TYPE_CHECKING:
    from gptoss_ray.cluster.engine_loop import EngineLoop


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }


MAX_BODY_BYTES = 8 << 20  # a 128k-token conversation is well under 1 MiB of JSON


class ClientGone(Exception):
    pass


_BUSY = b"".join(
    (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n",
        b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n",
    )
)


class _Server(ThreadingHTTPServer):
    """A thread per connection, at most `max_connections` at once: past that a client gets
    503 with Retry-After at once (a flood of idle connections cannot exhaust the process's
    descriptors or threads); the handler closes a connection idle for its `timeout`."""

    daemon_threads = True
    request_queue_size = 1024  # the default backlog of 5 resets bursts of new clients

    def __init__(self, address: tuple[str, int], handler: type, max_connections: int) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            body = json.dumps(
                ApiError(503, "too many connections; retry shortly", "server_busy").body()
            ).encode()
            with contextlib.suppress(OSError):
                request.sendall(_BUSY % len(body) + body)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def serve_api(
    engine: EngineLoop, host: str, port: int, api_key: str | None, **limits: Any
) -> ApiServer:
    """Serves the API for `engine` from this process (a thread per connection); `limits`:
    max_connections, idle_timeout_s."""
    return ApiServer(engine, host, port, api_key, **limits)


class ApiServer:
    def __init__(
        self,
        engine: EngineLoop,
        host: str,
        port: int,
        api_key: str | None,
        *,
        max_connections: int = 512,
        idle_timeout_s: float = 30.0,
    ) -> None:
        self.engine = engine
        self.api_key = api_key
        self.started = int(time.time())
        self.http_requests = 0
        self.http_errors = 0
        self.responses = ResponseStore()  # stored responses: the cluster's, not this process's
        handler = type("Handler", (_Handler,), {"api": self, "timeout": idle_timeout_s})
        self.httpd = _Server((host, port), handler, max_connections)
        self.host, self.port = self.httpd.server_address[:2]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def model_id(self) -> str:
        return self.engine.model_id

    @property
    def url(self) -> str:
        host = self.host
        if host in ("0.0.0.0", "::"):  # every interface: name one the user can reach
            import ray

            host = ray.util.get_node_ip_address()
        return f"http://{host}:{self.port}/v1"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- metrics -------------------------------------------------------------------------
    def metrics(self) -> str:
        s = self.engine.stats()
        waiting, running, free, seconds = (
            s["waiting"],
            sum(s["running"]),
            s["free_blocks"],
            s["seconds"],
        )
        steps, requests = s["steps"], s["requests"]
        generated, prefill, preempted = s["generated_tokens"], s["prefill_tokens"], s["preemptions"]
        layout = self.engine.layout
        load = self.engine.expert_load()
        lines = [
            "# TYPE gptoss_requests_total counter",
            f"gptoss_requests_total {requests}",
            "# TYPE gptoss_http_requests_total counter",
            f"gptoss_http_requests_total {self.http_requests}",
            "# TYPE gptoss_http_errors_total counter",
            f"gptoss_http_errors_total {self.http_errors}",
            "# TYPE gptoss_generated_tokens_total counter",
            f"gptoss_generated_tokens_total {generated}",
            "# TYPE gptoss_prefill_tokens_total counter",
            f"gptoss_prefill_tokens_total {prefill}",
            "# TYPE gptoss_preemptions_total counter",
            f"gptoss_preemptions_total {preempted}",
            "# TYPE gptoss_queue_depth gauge",
            f"gptoss_queue_depth {waiting}",
            "# TYPE gptoss_running_sequences gauge",
            f"gptoss_running_sequences {running}",
            "# TYPE gptoss_steps_total counter",
            f"gptoss_steps_total {steps}",
            "# TYPE gptoss_step_seconds_total counter",
            f"gptoss_step_seconds_total {seconds.get('step', 0.0):.6f}",
            "# TYPE gptoss_phase_seconds_total counter",
        ]
        for phase, sec in sorted(seconds.items()):
            if phase != "step":
                lines.append(f'gptoss_phase_seconds_total{{phase="{phase}"}} {sec:.6f}')
        lines.append("# TYPE gptoss_kv_blocks_used_ratio gauge")
        for shard, (full, sliding) in enumerate(free):
            for kind, n_free, total in (
                ("full", full, layout.full_blocks),
                ("sliding", sliding, layout.sliding_blocks),
            ):
                used = 1 - n_free / total if total else 0.0
                lines.append(
                    f'gptoss_kv_blocks_used_ratio{{shard="{shard}",kind="{kind}"}} {used:.4f}'
                )
        cache_metrics = (
            ("gptoss_prefix_cache_queried_tokens_total", "counter", "queried_tokens"),
            ("gptoss_prefix_cache_hit_tokens_total", "counter", "hit_tokens"),
            ("gptoss_prefix_cache_evictions_total", "counter", "evictions"),
        )
        for name, kind, key in cache_metrics:
            lines.append(f"# TYPE {name} {kind}")
            for shard, cache in enumerate(s["prefix_cache"]):
                lines.append(f'{name}{{shard="{shard}"}} {cache[key]}')
        lines.append("# TYPE gptoss_prefix_cache_blocks gauge")
        for shard, cache in enumerate(s["prefix_cache"]):
            for kind in ("full", "sliding"):
                n = cache[f"cached_{kind}_blocks"]
                lines.append(f'gptoss_prefix_cache_blocks{{shard="{shard}",kind="{kind}"}} {n}')
        lines.append("# TYPE gptoss_expert_tokens_total counter")
        for layer, row in enumerate(load):
            for expert, n in enumerate(row):
                lines.append(f'gptoss_expert_tokens_total{{layer="{layer}",expert="{expert}"}} {n}')
        return "\n".join(lines) + "\n"


class _Handler(BaseHTTPRequestHandler):
    api: ApiServer
    protocol_version = "HTTP/1.1"
    timeout: float  # seconds a connection may sit idle, or stall a read or a write

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the actor log is no access log
        pass

    # -- plumbing ------------------------------------------------------------------------
    def _send_json(self, status: int, body: Any) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_error(self, err: ApiError) -> None:
        self.api.http_errors += 1
        self._send_json(err.status, err.body())

    def _authorized(self) -> bool:
        if self.api.api_key is None:
            return True
        return self.headers.get("Authorization", "") == f"Bearer {self.api.api_key}"

    def _read_json(self) -> Any:
        header = self.headers.get("Content-Length") or "0"
        if not header.isdigit():
            self.close_connection = True  # where this body ends is unknown
            raise ApiError(400, f"bad Content-Length {header!r}", "invalid_request")
        length = int(header)
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the body is left unread
            raise ApiError(
                413,
                f"the request body has {length} bytes; at most {MAX_BODY_BYTES} are accepted",
                "request_too_large",
            )
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise ApiError(
                400, f"the request body is not valid JSON: {reason}", "invalid_json"
            ) from None

    def _dispatch(self, method: str) -> None:
        self.api.http_requests += 1
        try:
            if not self._authorized():
                raise ApiError(
                    401, "missing or wrong API key (Authorization: Bearer KEY)", "invalid_api_key"
                )
            path, _, query = self.path.partition("?")
            self.query = dict(urllib.parse.parse_qsl(query))
            route, pattern, self.path_params = _route(method, path.rstrip("/"))
            if route is None:
                if pattern is not None:
                    raise ApiError(405, f"{method} is not allowed on {path}", "method_not_allowed")
                raise ApiError(404, f"no route {path}", "not_found")
            route(self)
        except ApiError as err:
            self._send_error(err)
        except (BrokenPipeError, ConnectionResetError, TimeoutError, ClientGone):
            self.close_connection = True
        except Exception as exc:  # never a traceback to the client, never a dead server
            self._send_error(ApiError(500, f"{type(exc).__name__}: {exc}", "internal_error"))

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # Every other method gets the key check and a JSON 405 or 404, not http.server's 501 page.
    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    # -- endpoints (route_*: BaseHTTPRequestHandler owns names like `responses`) ----------
    def route_health(self) -> None:
        error = self.api.engine.error
        if error:
            raise ApiError(503, f"unhealthy: {error}", "engine_down")
        self._send_json(200, {"status": "ok"})

    def route_models(self) -> None:
        self._send_json(
            200,
            {
                "object": "list",
                "data": [
                    {
                        "id": self.api.model_id,
                        "object": "model",
                        "created": self.api.started,
                        "owned_by": "gptoss-ray",
                    }
                ],
            },
        )

    def route_metrics(self) -> None:
        data = self.api.metrics().encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    @contextlib.contextmanager
    def _submitted(self, chat: Any) -> Iterator[str]:
        """Submits the request; whatever happens after (a reply sent, an error, a client
        gone), the engine is done with it on the way out: never a sequence left running
        with nobody to read it."""
        if not isinstance(chat, dict):
            raise ApiError(400, "the request body is a JSON object", "invalid_request")
        with self._submitting(lambda: [self.api.engine.submit_chat(chat)[0]]) as (rid,):
            yield rid

    @contextlib.contextmanager
    def _submitting(self, submit: Callable[[], list[Any]]) -> Iterator[list[Any]]:
        """Runs `submit` (-> request ids, or (id, ...) tuples), its errors as API errors;
        on the way out the engine is done with every request it made."""
        engine = self.api.engine
        try:
            submitted = submit()
        except (RequestError, EngineUnavailable) as exc:  # harmony's errors among them
            raise ApiError(exc.status, str(exc), exc.code, getattr(exc, "param", None)) from None
        except ValueError as exc:  # a field that only SamplingParams checks
            raise ApiError(400, str(exc), RequestError.code) from None
        try:
            yield submitted
        finally:
            for item in submitted:
                rid = item[0] if isinstance(item, tuple) else item
                engine.cancel(rid)  # a no-op once it finished
                engine.forget(rid)

    def route_completions(self) -> None:
        body = self._read_json()
        if not isinstance(body, dict):
            raise ApiError(400, "the request body is a JSON object", "invalid_request")
        if body.get("stream") and body.get("echo") and body.get("logprobs") is not None:
            raise ApiError(
                400,
                "echo with logprobs is not streamed: leave out stream",
                "invalid_request",
                "echo",
            )
        with self._submitting(lambda: self.api.engine.submit_text(body)) as submitted:
            request = CompletionRequest.parse(body)
            n, cid = request.n or 1, f"cmpl-{submitted[0][0][:24]}"
            if request.stream:
                self._stream_completions(cid, submitted, request)
                return
            choices, usage = [], Counter()
            for i, (rid, prompt) in enumerate(submitted):
                reply = self._wait_reply(rid, n)
                choices += completion_choices(i * n, prompt, reply, request)
                usage.update(reply["usage"])
            self._send_json(200, completion_object(cid, self.api.model_id, choices, dict(usage)))

    def _stream_completions(
        self, cid: str, submitted: list[tuple[str, list[int]]], request: CompletionRequest
    ) -> None:
        """Prompt after prompt (all run at once), each choice's text as it comes."""
        n, usage = request.n or 1, Counter()

        def chunk(index: int, text: str, finish: str | None = None, logprobs: Any = None):
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
            self._event(completion_object(cid, self.api.model_id, [choice], {}) | {"usage": None})

        self._start_events()
        for i, (rid, prompt) in enumerate(submitted):
            offsets = [0] * n
            if request.echo:
                for j in range(n):
                    chunk(i * n + j, tok.decode(prompt))

            def delta(ev: Any, i: int = i, offsets: list[int] = offsets) -> None:
                j, event = ev
                lps = None
                if request.logprobs is not None:
                    tokens = [lp.token for lp in event.logprobs]
                    lps = legacy_logprobs(event.logprobs, tokens, offsets[j])
                offsets[j] += len(event.text)
                chunk(i * n + j, event.text, logprobs=lps)

            reply = yield_from(self._events(rid, n), delta)
            for j, r in enumerate(reply.get("choices") or [reply]):
                chunk(i * n + j, "", r["finish_reason"])
            usage.update(reply["usage"])
        if request.stream_options and request.stream_options.include_usage:
            self._event(completion_object(cid, self.api.model_id, [], dict(usage)))
        self._event("[DONE]")

    def route_chat_completions(self) -> None:
        body = self._read_json()
        with self._submitted(body) as rid:
            if body.get("stream"):
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                self._stream_chat(rid, include_usage, body.get("n") or 1)
                return
            reply = self._wait_reply(rid)
            self._send_json(200, chat_completion(reply, self.api.model_id, f"chatcmpl-{rid[:24]}"))

    def route_responses(self) -> None:
        body = self._read_json()
        try:
            items, chat = conversation(body, self.api.responses)
        except RequestError as exc:  # harmony's among them
            raise ApiError(exc.status, str(exc), exc.code, exc.param) from None
        with self._submitted(chat) as rid:
            if body.get("stream"):
                response = self._stream_responses(rid, body, bool(chat.get("logprobs")))
            else:
                reply = self._wait_reply(rid)
                response = response_object(
                    reply, self.api.model_id, response_id=f"resp_{rid}", request=body
                )
                self._send_json(200, response)
            remember(self.api.responses, body, items, response)

    # -- vLLM's tokenizer endpoints (evaluation harnesses count tokens with them) ----------
    def route_tokenize(self) -> None:
        """{"prompt": text} or {"messages": chat} (rendered for completion) -> ids."""
        body = self._read_json()
        if not isinstance(body, dict) or not isinstance(
            body.get("prompt", body.get("messages")), str | list
        ):
            raise ApiError(
                400, "give a prompt (a string) or messages (a chat)", "invalid_request", "prompt"
            )
        try:
            if "messages" in body:
                tokens = chat_prompt(body, self.api.engine.config.max_context_length)[0]
            elif isinstance(body["prompt"], str):
                tokens = tok.encode(body["prompt"], allow_special=True)  # as /v1/completions
            else:
                raise ApiError(400, "prompt: a string", "invalid_request", "prompt")
        except RequestError as exc:
            raise ApiError(exc.status, str(exc), exc.code, exc.param) from None
        context = self.api.engine.config.max_context_length
        self._send_json(200, {"count": len(tokens), "max_model_len": context, "tokens": tokens})

    def route_detokenize(self) -> None:
        body = self._read_json()
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise ApiError(400, "tokens: a list of token ids", "invalid_request", "tokens")
        try:
            self._send_json(200, {"prompt": tok.decode(tokens)})
        except tok.TokenizerError as exc:
            raise ApiError(400, str(exc), "invalid_request", "tokens") from None

    def route_tokenizer_info(self) -> None:
        self._send_json(
            200,
            {
                "tokenizer_class": "tiktoken:o200k_harmony",
                "eos_token": "<|return|>",
                "bos_token": None,
                "pad_token": "<|endoftext|>",
                "model_max_length": self.api.engine.config.max_context_length,
                "vocab_size": tok.VOCAB_SIZE,
            },
        )

    def _stored(self) -> dict[str, Any]:
        entry = self.api.responses.get(self.path_params["id"])
        if entry is None:
            raise ApiError(404, f"no stored response {self.path_params['id']!r}", "not_found")
        return entry

    def route_get_response(self) -> None:
        self._send_json(200, self._stored()["response"])

    def route_delete_response(self) -> None:
        rid = self.path_params["id"]
        if not self.api.responses.delete(rid):
            raise ApiError(404, f"no stored response {rid!r}", "not_found")
        self._send_json(200, {"id": rid, "object": "response.deleted", "deleted": True})

    def route_response_input_items(self) -> None:
        entry = self._stored()
        data = entry["items"][: entry["inputs"]]
        if self.query.get("order", "desc") == "desc":
            data = data[::-1]  # OpenAI lists the newest first unless asked
        first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
        body = {"object": "list", "data": data, "first_id": first, "last_id": last}
        self._send_json(200, body | {"has_more": False})

    # -- waiting and streaming -------------------------------------------------------------
    def _client_gone(self) -> bool:
        # poll, not select: select fails for descriptors past 1024
        poller = select.poll()
        poller.register(self.connection, select.POLLIN)
        if not poller.poll(0):
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _events(self, rid: str, n: int = 1):
        """Yields the reply's events as they come, as (choice, event), then returns the
        reply; raises ClientGone when the client leaves (`_submitted` then cancels the
        request)."""
        engine = self.api.engine
        cursor = EventCursor(n)
        while True:
            events, reply = engine.wait_events(rid, cursor.after, timeout=0.5)
            yield from cursor.advance(events)
            if reply is not None:
                return reply
            if engine.error:
                raise ApiError(503, f"the engine stopped: {engine.error}", "engine_down")
            if self._client_gone():
                raise ClientGone

    def _wait_reply(self, rid: str, n: int = 1) -> dict[str, Any]:
        return yield_from(self._events(rid, n), lambda event: None)

    def _start_events(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def _event(self, data: Any, event: str | None = None) -> None:
        text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        prefix = f"event: {event}\n" if event else ""
        self.wfile.write(f"{prefix}data: {text}\n\n".encode())
        self.wfile.flush()

    def _stream_chat(self, rid: str, include_usage: bool, n: int) -> None:
        base = {
            "id": f"chatcmpl-{rid[:24]}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.api.model_id,
        }

        def chunk(
            index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None
        ) -> None:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            self._event({**base, "choices": [choice]})

        self._start_events()
        for i in range(n):
            chunk(i, {"role": "assistant", "content": ""})
        reply = yield_from(
            self._events(rid, n), lambda ev: self._chat_delta(ev[1], partial(chunk, ev[0]))
        )
        for i, choice in enumerate(reply.get("choices") or [reply]):
            chunk(i, {}, choice["finish_reason"])
        if include_usage:
            self._event({**base, "choices": [], "usage": reply["usage"]})
        self._event("[DONE]")

    @staticmethod
    def _chat_delta(ev: Any, chunk) -> None:
        if isinstance(ev, ToolCallStart):
            call = {"name": ev.name, "arguments": ""}
            chunk(
                {
                    "tool_calls": [
                        {"index": ev.index, "id": ev.call_id, "type": "function", "function": call}
                    ]
                }
            )
        elif isinstance(ev, TextDelta) and ev.kind == "call":
            chunk({"tool_calls": [{"index": ev.call, "function": {"arguments": ev.text}}]})
        elif isinstance(ev, TextDelta) and ev.kind == "reasoning":
            chunk({"reasoning_content": ev.text})
        elif isinstance(ev, TextDelta):
            # the answer's tokens' logprobs go with the text they wrote, when asked
            lps = (
                {"content": logprob_entries(ev.logprobs), "refusal": None} if ev.logprobs else None
            )
            chunk({"content": ev.text}, logprobs=lps)

    def _stream_responses(self, rid: str, request: dict[str, Any], logprobs: bool) -> dict:
        seq = iter(range(1 << 62))

        def send(kind: str, **fields: Any) -> None:
            self._event({"type": kind, "sequence_number": next(seq), **fields}, event=kind)

        self._start_events()
        stream = ResponseStream(send, f"resp_{rid}", self.api.model_id, logprobs)
        reply = yield_from(self._events(rid), lambda ev: stream.handle(ev[1]))
        return stream.complete(reply, request)


def yield_from(events, handle) -> Any:
    """Hands each event of a generator to `handle`, and returns what the generator returns."""
    while True:
        try:
            handle(next(events))
        except StopIteration as done:
            return done.value


ROUTES = {
    ("GET", "/health"): _Handler.route_health,
    ("GET", "/v1/models"): _Handler.route_models,
    ("GET", "/metrics"): _Handler.route_metrics,
    ("POST", "/v1/chat/completions"): _Handler.route_chat_completions,
    ("POST", "/v1/responses"): _Handler.route_responses,
    ("POST", "/v1/completions"): _Handler.route_completions,
    ("POST", "/tokenize"): _Handler.route_tokenize,
    ("POST", "/detokenize"): _Handler.route_detokenize,
    ("GET", "/tokenizer_info"): _Handler.route_tokenizer_info,
    ("GET", "/v1/responses/{id}"): _Handler.route_get_response,
    ("DELETE", "/v1/responses/{id}"): _Handler.route_delete_response,
    ("GET", "/v1/responses/{id}/input_items"): _Handler.route_response_input_items,
}


def _route(method: str, path: str) -> tuple[Any, str | None, dict[str, str]]:
    """-> the route for (method, path), the pattern the path matched (for a 405 when the
    method is wrong), and the path's `{name}` parts."""
    parts, matched = path.split("/"), None
    for (m, pattern), route in ROUTES.items():
        want = pattern.split("/")
        if len(want) != len(parts):
            continue
        params = {w[1:-1]: p for w, p in zip(want, parts, strict=True) if w.startswith("{")}
        if all(w == p or w.startswith("{") for w, p in zip(want, parts, strict=True)):
            if m == method:
                return route, pattern, params
            matched = pattern
    return None, matched, {}

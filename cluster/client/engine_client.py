"""How a front's process reaches an engine: it adds typed token requests, reads the token
deltas the engine pushes for all of its requests on one stream, and turns each request's
deltas into its reply here, in the front's process (`RequestStream`: the reply builders of
`cluster.client.chat` and `cluster.client.completions`, or bare tokens). A stop string found here aborts
the choice in the engine; nothing drawn past it is shown.

`EngineClient` speaks to a coordinator actor (`RayEngineClient`: one actor call per
request, one Ray streaming generator per front) or to an engine loop of this process
(`LocalEngineClient`, for tests and tools that run an engine in-process). `EnginePool`
picks the engine of a new request. The HTTP front, the Python `Engine`, batch jobs and
the CLI all use these; sync callers run them on a `LoopThread`."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from gptoss_ray.cluster.engine.messages import EngineRequest, RequestOutput, TokenDelta
from gptoss_ray.model.types import EngineUnavailable, TokenLogprob

RETRY_DOWN_S = 5.0  # an engine that could not be reached is tried again after this long
# Deltas a front's stream may have in flight before the engine's sender waits (the step
# loop never does: what waits meanwhile is sent as one bigger batch).
BACKPRESSURE = 16

T = TypeVar("T")


class Reply(Protocol):
    """What a request's tokens are fed to in the front (`cluster.client.chat.ReplyBuilder`,
    `cluster.client.completions.TextReply`, `TokenReply`): it may find a stop string; readers
    take its events and, at the end, the reply."""

    stopped: bool
    events: list[Any]

    def feed(self, tokens: Sequence[int], logprobs: Sequence[TokenLogprob] | None) -> None: ...

    def finish(self, finish_reason: str | None, *, request_id: str, prompt_tokens: int) -> Any: ...


class Finished:
    """The last item of a request's stream: the whole reply."""

    def __init__(self, reply: Any) -> None:
        self.reply = reply


class TokenReply:
    """A request read as token ids (`Engine.generate`, `Engine.stream`): each event is the
    new ids; the reply a `RequestOutput`."""

    stopped = False

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] | None = None
        self.events: list[list[int]] = []
        self.preemptions = 0
        self.started = time.monotonic()
        self.first: float | None = None

    def feed(self, tokens: Sequence[int], logprobs: Sequence[TokenLogprob] | None) -> None:
        if tokens:
            self.first = self.first or time.monotonic()
            self.tokens += tokens
            self.events.append(list(tokens))
        if logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs += logprobs  # in place: a copy per delta would be quadratic

    def finish(
        self, finish_reason: str | None, *, request_id: str, prompt_tokens: int
    ) -> RequestOutput:
        now, n = time.monotonic(), len(self.tokens)
        return RequestOutput(
            request_id=request_id,
            prompt_tokens=prompt_tokens,
            token_ids=list(self.tokens),
            finished=True,
            finish_reason=finish_reason,
            preemptions=self.preemptions,
            time_to_first_token=None if self.first is None else self.first - self.started,
            inter_token_latency=(now - self.first) / (n - 1) if self.first and n > 1 else None,
            logprobs=self.logprobs,
        )


def token_output(outs: list[RequestOutput], prompt_logprobs: list | None) -> RequestOutput:
    """The `RequestOutput` of a token request's choices (every one in `choices` when n > 1)."""
    out = outs[0]
    out.prompt_logprobs = prompt_logprobs
    if len(outs) > 1:
        out.choices = outs
    return out


def with_drafts(reply: Any, proposed: int, accepted: int) -> Any:
    """A finished reply with its choice's speculative-decoding counts, where it had
    drafts: a `RequestOutput`'s fields, or in a text reply's usage OpenAI's
    `completion_tokens_details` (accepted and rejected prediction tokens)."""
    if not proposed:
        return reply
    if isinstance(reply, RequestOutput):
        reply.drafts_proposed, reply.drafts_accepted = proposed, accepted
    else:
        reply["usage"]["completion_tokens_details"] = {
            "accepted_prediction_tokens": accepted,
            "rejected_prediction_tokens": proposed - accepted,
        }
    return reply


def combined_reply(replies: list[dict[str, Any]], prompt_logprobs: list | None) -> dict[str, Any]:
    """A chat or completion request's reply: choice 0's, with every choice's in `choices`
    and the usage summed when n > 1, and the prompt's logprobs when asked."""
    if prompt_logprobs is not None:
        replies[0]["prompt_logprobs"] = prompt_logprobs
    if len(replies) == 1:
        return replies[0]
    completion = sum(r["usage"]["completion_tokens"] for r in replies)
    prompt = replies[0]["usage"]["prompt_tokens"]
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    details = [r["usage"].get("completion_tokens_details") for r in replies]
    if any(details):
        usage["completion_tokens_details"] = {
            key: sum((d or {}).get(key, 0) for d in details)
            for key in ("accepted_prediction_tokens", "rejected_prediction_tokens")
        }
    return {**replies[0], "usage": usage, "choices": replies}


class RequestStream:
    """One request as its front reads it: a queue of (choice, event) as the tokens come,
    then `Finished` with the reply (or the exception that ended it)."""

    def __init__(
        self,
        client: EngineClient,
        request: EngineRequest,
        replies: list[Reply],
        combine: Callable[[list[Any], list | None], Any] = combined_reply,
    ) -> None:
        self.client = client
        self.request = request
        self.request_id = request.request_id
        self.replies = replies
        self.combine = combine
        self.drafts = [(0, 0)] * len(replies)  # each choice's drafts proposed, kept
        self.queue: asyncio.Queue = asyncio.Queue()
        self.ended: list[str | None] = [None] * len(replies)  # each choice's finish reason
        self._shown = [0] * len(replies)  # events queued, per choice
        self._prompt_logprobs: list | None = None
        self.finished = False

    def take(self, delta: TokenDelta) -> None:
        """A delta from the engine: its choice's reply is fed, its new events queued; a
        stop string found aborts that choice in the engine."""
        i = delta.choice
        if self.finished or self.ended[i] is not None:
            return  # what the engine sent before it heard of the abort
        if delta.error is not None:
            self.fail(EngineUnavailable(f"the engine failed: {delta.error}"))
            return
        if delta.prompt_logprobs is not None:
            self._prompt_logprobs = delta.prompt_logprobs
        reply = self.replies[i]
        reply.feed(delta.token_ids, delta.logprobs)
        self.drafts[i] = (delta.drafts_proposed, delta.drafts_accepted)
        if isinstance(reply, TokenReply):
            reply.preemptions = delta.preemptions
        events = reply.events
        for event in events[self._shown[i] :]:
            self.queue.put_nowait((i, event))
        self._shown[i] = len(events)
        if reply.stopped and not delta.finished:
            self.client.abort(self.request_id, i)
            self._end(i, "stop")
        elif delta.finished:
            self._end(i, delta.finish_reason)

    def _end(self, i: int, reason: str | None) -> None:
        self.ended[i] = reason
        if any(r is None for r in self.ended):
            return
        n, prompt = len(self.replies), len(self.request.prompt)
        ids = [self.request_id] + [f"{self.request_id}#{c}" for c in range(1, n)]
        replies = []
        for c, reply in enumerate(self.replies):
            before = len(reply.events)
            replies.append(
                with_drafts(
                    reply.finish(self.ended[c], request_id=ids[c], prompt_tokens=prompt),
                    *self.drafts[c],
                )
            )
            for event in reply.events[before:]:  # finishing can add text (a cut character)
                self.queue.put_nowait((c, event))
        self._over()
        self.queue.put_nowait(Finished(self.combine(replies, self._prompt_logprobs)))

    def _over(self) -> None:
        self.finished = True
        self.client.forget(self)

    def fail(self, exc: Exception) -> None:
        if not self.finished:
            self._over()
            self.queue.put_nowait(exc)

    async def items(self) -> AsyncIterator[Any]:
        """(choice, event) pairs, then the `Finished` reply; an error is raised."""
        while True:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, Finished):
                return

    async def result(self) -> Any:
        async for item in self.items():
            if isinstance(item, Finished):
                return item.reply
        raise AssertionError("a stream ends with Finished")

    def close(self) -> None:
        """The reader is done: a request still running is aborted."""
        if not self.finished:
            self._over()
            self.client.abort(self.request_id)


class EngineClient:
    """One engine as a front's process sees it. `call` reaches its API (info, stats,
    ...); errors come back as the engine raised them (RequestError and its kinds), and
    one that cannot be reached is EngineUnavailable."""

    def __init__(self, name: str, actor_name: str | None = None) -> None:
        self.name = name
        self.actor_name = actor_name  # a named coordinator actor, where it is one
        self.outstanding = 0  # requests this front has in the engine
        self.down: str | None = None  # why the last call could not reach it
        self.down_at = 0.0
        self.last_pick = 0  # when the pool last chose it (ties go to the longest unchosen)
        self._front = uuid.uuid4().hex
        self._streams: dict[str, RequestStream] = {}
        self._reader: asyncio.Task | None = None
        self._sending: set[asyncio.Task] = set()  # calls sent without a waiter
        self._adds: list[tuple[list[EngineRequest], asyncio.Future]] = []  # not sent yet

    async def _call(self, method: str, *args: Any) -> Any:
        raise NotImplementedError

    def _outputs(self, front: str) -> AsyncIterator[list[TokenDelta]]:
        raise NotImplementedError

    async def call(self, method: str, *args: Any) -> Any:
        try:
            out = await self._call(method, *args)
        except EngineUnavailable as exc:
            self.down, self.down_at = str(exc), time.monotonic()
            raise
        self.down = None
        return out

    async def submit(
        self,
        requests: list[EngineRequest],
        replies: list[list[Reply]],
        combine: Callable[[list[Any], list | None], Any] = combined_reply,
    ) -> list[RequestStream]:
        """Adds requests to the engine, all or none (one call), each with the reply of
        each of its choices; -> their streams, whose deltas come from now on."""
        streams = [
            RequestStream(self, r, rs, combine) for r, rs in zip(requests, replies, strict=True)
        ]
        for s in streams:
            self._streams[s.request_id] = s
        loop = asyncio.get_running_loop()
        if self._reader is None or self._reader.done():
            self._reader = loop.create_task(self._read(self._front))
        added = loop.create_future()
        if not self._adds:  # the first of this turn of the event loop: it sends them all
            loop.call_soon(self._send_adds)
        self._adds.append((requests, added))
        try:
            await added
        except BaseException:
            for s in streams:
                self._streams.pop(s.request_id, None)
            raise
        self.outstanding += len(streams)
        return streams

    def _send_adds(self) -> None:
        """What every handler submitted in this turn of the event loop goes in one call
        (a burst of requests is one message to the engine, not one each); each group
        is queued or refused apart from the others."""
        adds, self._adds = self._adds, []

        async def send() -> None:
            try:
                errors = await self.call("add", [requests for requests, _ in adds], self._front)
            except BaseException as exc:
                for _, added in adds:
                    if not added.done():
                        added.set_exception(exc)
                return
            for (requests, added), error in zip(adds, errors, strict=True):
                if added.cancelled() and error is None:  # its handler left meanwhile
                    for request in requests:
                        self.abort(request.request_id)
                if added.done():
                    continue
                if error is None:
                    added.set_result(None)
                else:
                    added.set_exception(error)

        task = asyncio.ensure_future(send())
        self._sending.add(task)  # held until done
        task.add_done_callback(self._sending.discard)

    def forget(self, stream: RequestStream) -> None:
        if self._streams.pop(stream.request_id, None) is not None:
            self.outstanding -= 1

    def abort(self, request_id: str, choice: int | None = None) -> None:
        """Stops a request in the engine, without waiting (an engine gone forgot it)."""
        task = asyncio.ensure_future(self.call("abort", request_id, choice))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _read(self, front: str) -> None:
        """Hands each delta to its request's stream until the engine's stream ends; then
        every request still open hears why, and the next request opens a new stream."""
        try:
            async for batch in self._outputs(front):
                for delta in batch:
                    stream = self._streams.get(delta.request_id)
                    if stream is not None:
                        stream.take(delta)
            error: Exception = EngineUnavailable(f"the engine {self.name} stopped")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = (
                exc
                if isinstance(exc, EngineUnavailable)
                else EngineUnavailable(f"the engine {self.name} failed: {exc}")
            )
        self.down, self.down_at = str(error), time.monotonic()
        if self._front == front:
            self._front = uuid.uuid4().hex  # the engine dropped the old front's requests
        for stream in list(self._streams.values()):
            stream.fail(error)


class RayEngineClient(EngineClient):
    """A coordinator actor (`cluster.runtime.coordinator.Coordinator`)."""

    def __init__(self, handle: Any, name: str) -> None:
        super().__init__(name, actor_name=name)
        self.handle = handle

    async def _call(self, method: str, *args: Any) -> Any:
        import ray

        try:
            return await getattr(self.handle, method).remote(*args)
        except ray.exceptions.RayTaskError as exc:
            raise actor_error(exc) from None
        except ray.exceptions.RayActorError as exc:
            raise EngineUnavailable(f"the engine {self.name} is unreachable: {exc}") from None

    async def _outputs(self, front: str) -> AsyncIterator[list[TokenDelta]]:
        import ray

        stream = self.handle.outputs.options(
            num_returns="streaming", _generator_backpressure_num_objects=BACKPRESSURE
        ).remote(front)
        try:
            async for ref in stream:
                yield await ref
        except ray.exceptions.RayActorError as exc:
            raise EngineUnavailable(f"the engine {self.name} is unreachable: {exc}") from None
        finally:
            with contextlib.suppress(Exception):
                ray.cancel(stream)  # ends the engine's side: its requests are cancelled


class LocalEngineClient(EngineClient):
    """An engine loop in this process (`cluster.engine.loop.EngineLoop`): its calls run on
    threads of their own, never on the event loop; its stream is read by a thread."""

    def __init__(self, engine: Any, name: str = "local") -> None:
        super().__init__(name)
        self.engine = engine
        self._pool = ThreadPoolExecutor(8, thread_name_prefix=f"engine-{name}")

    async def _call(self, method: str, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: getattr(self.engine, method)(*args))

    async def _outputs(self, front: str) -> AsyncIterator[list[TokenDelta]]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def pump() -> None:
            try:
                for batch in self.engine.outputs(front):
                    if loop.is_closed():
                        return
                    loop.call_soon_threadsafe(queue.put_nowait, batch)
            finally:
                with contextlib.suppress(RuntimeError):  # the reader's loop was closed
                    loop.call_soon_threadsafe(queue.put_nowait, None)

        threading.Thread(target=pump, name=f"outputs-{self.name}", daemon=True).start()
        while (batch := await queue.get()) is not None:
            yield batch


class LoopThread:
    """An event loop on a thread of its own, for sync callers of the clients (the Python
    `Engine`, batch jobs)."""

    def __init__(self, name: str = "engine-client") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


def prefix_keys(body: dict[str, Any]) -> list[str]:
    """Keys of what a request's prompt starts with, longest last: its instructions and each
    longer run of its messages (chat), of its input items (responses), or the first
    kilobytes of its prompt (completions). Requests sharing a key share that much of
    their prompt, and an engine that served one has it in its prefix cache."""
    head = [body.get(k) for k in ("model", "tools", "instructions", "reasoning_effort")]
    items = body.get("messages") or body.get("input")
    if isinstance(items, list):
        runs = [items[:i] for i in range(1, len(items) + 1)]
    else:
        text = items if isinstance(items, str) else body.get("prompt")
        if not isinstance(text, str):
            return []
        runs = [text[:i] for i in range(1024, len(text) + 1, 1024)] or [text]
    return [
        hashlib.blake2b(
            json.dumps([head, run], sort_keys=True, default=str).encode(), digest_size=16
        ).hexdigest()
        for run in runs
    ]


class EnginePool:
    """The engines behind one front, and which one takes a new request: the one with the
    least outstanding work from this front, unless an engine holds the request's longest
    cached prefix and is within `prefix_slack` requests of the least loaded."""

    def __init__(self, links: list[EngineClient], *, prefix_slack: int = 8, keys: int = 65536):
        if not links:
            raise ValueError("a front needs at least one engine")
        self.links = links
        self.prefix_slack = prefix_slack
        self._homes: OrderedDict[str, EngineClient] = OrderedDict()  # prefix key -> engine
        self._max_keys = keys
        self.prefix_routed = 0
        self._picks = 0

    def usable(self) -> list[EngineClient]:
        """The engines to route to: those not found down lately (all, if every one was)."""
        now = time.monotonic()
        up = [k for k in self.links if k.down is None or now - k.down_at > RETRY_DOWN_S]
        return up or list(self.links)

    def pick(self, body: dict[str, Any], avoid: Sequence[EngineClient] = ()) -> EngineClient:
        alive = [link for link in self.usable() if link not in avoid] or self.usable()
        least = min(alive, key=lambda link: (link.outstanding, link.last_pick))
        keys = prefix_keys(body) if len(self.links) > 1 else []
        for key in reversed(keys):
            home = self._homes.get(key)
            if home is not None and home in alive:
                if home.outstanding <= least.outstanding + self.prefix_slack:
                    self.prefix_routed += home is not least
                    least = home
                break
        self._picks += 1
        least.last_pick = self._picks
        for key in keys:
            self._homes[key] = least
            self._homes.move_to_end(key)
        while len(self._homes) > self._max_keys:
            self._homes.popitem(last=False)
        return least


def actor_error(exc: Any) -> Exception:
    """The exception an actor's method raised, which Ray wrapped."""
    original = getattr(exc, "cause", None)
    return original if isinstance(original, Exception) else exc.as_instanceof_cause()

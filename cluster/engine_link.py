"""How a front reaches its engines: each engine's calls made awaitable (`EngineLink`:
through a Ray actor handle, or a thread for an engine loop in this process), the events
of every reply a front streams read by one long poll per engine (`ReplyWatcher`), and the
choice of engine for a new request (`EnginePool`: least outstanding work, with a
preference for the engine that last served the request's prefix).

The front's event loop never blocks on an engine, and an engine never keeps a thread per
stream: a thousand streams of one front cost its engine one waiting call, not a thousand."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gptoss_ray.cluster.chat import EventCursor
from gptoss_ray.model.types import EngineUnavailable, RequestError

POLL_S = 0.5  # a poll's longest wait: how soon an engine's death is noticed by its streams
RETRY_DOWN_S = 5.0  # an engine that could not be reached is tried again after this long


class Finished:
    """The last item of a reply's event queue: the whole reply."""

    def __init__(self, reply: dict[str, Any]) -> None:
        self.reply = reply


class EngineLink:
    """One engine, as a front calls it: `await link.call("submit_chat", body)`. Errors
    come back as the engine raised them (RequestError and its kind, EngineUnavailable);
    an engine that cannot be reached is EngineUnavailable."""

    def __init__(
        self, name: str, call: Callable[..., Awaitable[Any]], *, actor: bool = False
    ) -> None:
        self.name = name
        self.actor_name = name if actor else None  # a named coordinator actor
        self._call = call
        self.outstanding = 0  # requests this front has in the engine
        self.watcher = ReplyWatcher(self)
        self.down: str | None = None  # why the last call could not reach it
        self.down_at = 0.0
        self.last_pick = 0  # when the pool last chose it (ties go to the longest unchosen)

    @classmethod
    def local(cls, engine: Any, name: str = "local") -> EngineLink:
        """An engine loop in this process (tests, the Python API): its blocking calls
        run on threads of their own, never on the event loop."""
        pool = ThreadPoolExecutor(64, thread_name_prefix=f"engine-{name}")

        async def call(method: str, *args: Any) -> Any:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(pool, lambda: getattr(engine, method)(*args))

        return cls(name, call)

    @classmethod
    def actor(cls, handle: Any, name: str) -> EngineLink:
        """A coordinator actor (`cluster.coordinator.Coordinator`)."""
        import ray

        from gptoss_ray.cluster.engine import actor_error

        async def call(method: str, *args: Any) -> Any:
            try:
                return await getattr(handle, method).remote(*args)
            except ray.exceptions.RayTaskError as exc:
                raise actor_error(exc) from None
            except ray.exceptions.RayActorError as exc:
                raise EngineUnavailable(f"the engine {name} is unreachable: {exc}") from None

        return cls(name, call, actor=True)

    async def call(self, method: str, *args: Any) -> Any:
        try:
            out = await self._call(method, *args)
        except EngineUnavailable as exc:
            self.down, self.down_at = str(exc), time.monotonic()
            raise
        self.down = None
        return out

    async def release(self, request_id: str) -> None:
        """The front is done with a request: cancelled if still running, then forgotten."""
        with contextlib.suppress(EngineUnavailable):  # an engine gone forgot it anyway
            await self.call("release", request_id)


class ReplyWatcher:
    """The events of every reply a front reads from one engine, fetched by one long poll
    (`EngineLoop.wait_replies`) and handed to each reader's queue. A reader that starts
    while a poll is out nudges the engine (`EngineLoop.nudge`), which ends that poll, so
    that the next one covers it too."""

    def __init__(self, link: EngineLink) -> None:
        self.link = link
        self.id = uuid.uuid4().hex
        self._cursors: dict[str, EventCursor] = {}
        self._queues: dict[str, asyncio.Queue] = {}
        self._polling = False
        self._task: asyncio.Task | None = None

    def open(self, request_id: str, n: int = 1) -> asyncio.Queue:
        """A queue that gets the reply's events as (choice, event) as they come, then
        `Finished` (or the exception that ended it); `close` it when done reading."""
        queue: asyncio.Queue = asyncio.Queue()
        self._cursors[request_id], self._queues[request_id] = EventCursor(n), queue
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._pump())
        elif self._polling:
            self._nudge()
        return queue

    def close(self, request_id: str) -> None:
        self._cursors.pop(request_id, None)
        self._queues.pop(request_id, None)

    def _nudge(self) -> None:
        task = asyncio.ensure_future(self.link.call("nudge", self.id))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # nothing to tell

    async def _pump(self) -> None:
        while self._cursors:
            asked = {rid: cursor.after for rid, cursor in self._cursors.items()}
            self._polling = True
            try:
                news = await self.link.call("wait_replies", asked, POLL_S, self.id)
            except Exception as exc:  # the engine is gone or broken: every reader hears it
                self._fail(list(asked), exc)
                continue
            finally:
                self._polling = False
            for rid, got in news.items():
                queue, cursor = self._queues.get(rid), self._cursors.get(rid)
                if queue is None or cursor is None:
                    continue  # its reader left meanwhile
                if got is None:
                    self._fail([rid], EngineUnavailable(f"the engine lost request {rid}"))
                    continue
                events, reply = got
                for item in cursor.advance(events):
                    queue.put_nowait(item)
                if reply is not None:
                    queue.put_nowait(Finished(reply))
                    del self._cursors[rid]  # nothing more to ask for it

    def _fail(self, request_ids: list[str], exc: Exception) -> None:
        if not isinstance(exc, RequestError | EngineUnavailable):
            exc = EngineUnavailable(f"the engine {self.link.name} failed: {exc}")
        for rid in request_ids:
            self._cursors.pop(rid, None)
            queue = self._queues.get(rid)
            if queue is not None:
                queue.put_nowait(exc)


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

    def __init__(self, links: list[EngineLink], *, prefix_slack: int = 8, keys: int = 65536):
        if not links:
            raise ValueError("a front needs at least one engine")
        self.links = links
        self.prefix_slack = prefix_slack
        self._homes: OrderedDict[str, EngineLink] = OrderedDict()  # prefix key -> engine
        self._max_keys = keys
        self.prefix_routed = 0
        self._picks = 0

    def usable(self) -> list[EngineLink]:
        """The engines to route to: those not found down lately (all, if every one was)."""
        now = time.monotonic()
        up = [k for k in self.links if k.down is None or now - k.down_at > RETRY_DOWN_S]
        return up or list(self.links)

    def pick(self, body: dict[str, Any], avoid: list[EngineLink] | tuple = ()) -> EngineLink:
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

"""The engine's API without Ray: a thread steps an `EngineCore` while requests (token ids
or chat) come and go. `Coordinator` runs it on Ray shards; tests drive it with any
`run_step`. Fronts reach it from above: the HTTP API on Ray Serve through a coordinator's
actor handle (`cluster.engine_link`), or, for an engine loop of one process (tests), in
that process (`attach`, `http_api.serve_api`). The engine knows nothing of the layers that
use it."""

from __future__ import annotations

import os
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from gptoss_ray.cluster.chat import ReplyBuilder, chat_prompt
from gptoss_ray.cluster.completions import CompletionRequest, TextReply
from gptoss_ray.cluster.engine_core import EngineCore, RequestOutput
from gptoss_ray.model.config import ModelConfig
from gptoss_ray.model.harmony.openai_chat import ChatRequest
from gptoss_ray.model.types import EngineUnavailable, KVLayout, ModelNotFound, SamplingParams

IDLE_AFTER_S = 1.0


class Front(Protocol):
    """Something attached to an engine loop in its process (`http_api.serve_api`):
    stopped with it."""

    url: str

    def stop(self) -> None: ...


class EngineLoop:
    def __init__(
        self,
        model_path: str,
        config: ModelConfig,
        layout: KVLayout,
        core: EngineCore,
        *,
        expert_load: Callable[[], list[list[int]]] | None = None,
        harmony_frame: str = "strict",
    ) -> None:
        """expert_load: reads the rows routed to each expert of each layer, where the
        shards count them. harmony_frame: "strict" constrains every chat reply to a
        well-formed harmony frame (`model.grammar.reply_grammar`); "off" only those that
        ask for a format or a tool call."""
        if harmony_frame not in ("strict", "off"):
            raise ValueError(f"harmony_frame {harmony_frame!r}: expected strict or off")
        self.harmony_frame = harmony_frame
        self.model_path = model_path
        self.config = config
        self.layout = layout
        self.core = core
        self.shards = core.world_size
        self.error: str | None = None
        self.fronts: list[Front] = []
        self._expert_load = expert_load
        self._stop = threading.Event()
        self._loop = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._loop.start()

    def _run(self) -> None:
        try:
            # Asleep until a request comes (submit wakes it) or shutdown does; after
            # IDLE_AFTER_S without work, `went_idle` once, and `woke` when work comes (the
            # coordinator lets its shards sleep too).
            idle = False
            while not self._stop.is_set():
                if self.core.wait_for_work(timeout=None if idle else IDLE_AFTER_S):
                    if idle:
                        self.woke()
                    idle = False
                    self.core.step()
                elif not idle and not self._stop.is_set():
                    idle = True
                    self.went_idle()
        except Exception as exc:
            traceback.print_exc()  # the whole story goes to the actor's log
            self.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self.core.fail(self.error)

    def went_idle(self) -> None:
        """Called on the loop's thread when it has had no work for IDLE_AFTER_S."""

    def woke(self) -> None:
        """Called on the loop's thread when work comes after `went_idle`."""

    def _alive(self) -> None:
        if self.error is not None:
            raise EngineUnavailable(f"the engine loop stopped: {self.error}")

    @property
    def model_id(self) -> str:
        """The model's name for clients: its folder's name (`-seed0` of a built-in left off)."""
        return Path(self.model_path).name.removesuffix("-seed0")

    def check_model(self, model: str | None) -> None:
        """A request that names a model must name this one (its id or its path)."""
        if model is not None and model not in (self.model_id, self.model_path):
            raise ModelNotFound(
                f"the model {model!r} does not exist; this engine serves {self.model_id!r}",
                param="model",
            )

    # -- API ---------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {
            "model": self.model_path,
            "model_id": self.model_id,
            "shards": self.shards,
            "kv_layout": vars(self.layout),
            "harmony_frame": self.harmony_frame,
            "max_context_length": self.config.max_context_length,
            "healthy": self.error is None,
            "error": self.error,
            "pid": os.getpid(),
        }

    def stats(self) -> dict[str, Any]:
        return self.core.snapshot()

    def expert_load(self) -> list[list[int]]:
        """[layer][expert] rows routed to each expert ([] where nobody counts them)."""
        return self._expert_load() if self._expert_load is not None else []

    def submit(
        self, prompt: list[int], params: SamplingParams, request_id: str | None = None
    ) -> str:
        self._alive()
        return self.core.submit(prompt, params, request_id)

    def wait(
        self, request_id: str, after: int | None = None, timeout: float | None = None
    ) -> RequestOutput:
        out = self.core.wait(request_id, after=after, timeout=timeout)
        if not out.finished:
            self._alive()
        return out

    def forget(self, request_id: str) -> None:
        self.core.forget(request_id)

    def cancel(self, request_id: str) -> None:
        self.core.cancel(request_id)

    # -- chat --------------------------------------------------------------------------
    def submit_chat(
        self,
        request: dict[str, Any] | ChatRequest,
        request_id: str | None = None,
        priority: int = 0,
    ) -> tuple[str, int]:
        """A chat request (see `chat_prompt`) -> request id and prompt length. Its reply
        is built as its tokens come (`wait_events`, `wait_chat`). priority 1: batch work,
        which yields to interactive requests (priority 0)."""
        self._alive()
        prompt, params, stops = chat_prompt(
            request, self.config.max_context_length, frame=self.harmony_frame == "strict"
        )
        self.check_model(
            request.model if isinstance(request, ChatRequest) else request.get("model")
        )
        replies = [
            ReplyBuilder(stops, logprobs=params.logprobs is not None) for _ in range(params.n)
        ]
        rid = self.core.submit(prompt, params, request_id, reply=replies, priority=priority)
        return rid, len(prompt)

    def submit_text(self, body: dict[str, Any]) -> list[tuple[str, list[int]]]:
        """A completions request (cluster.completions) -> (request id, prompt ids) of each
        of its prompts, their replies built as text (`wait_events`). A bad request
        raises before anything is queued; a prompt that fails later does not cancel the
        ones queued before it (the caller cancels them)."""
        self._alive()
        request = CompletionRequest.parse(body)
        self.check_model(request.model)
        params = request.params()
        stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        prompts = request.prompts()
        for i, prompt in enumerate(prompts):
            self.core.check(prompt, params, f"prompt {i}")
        keep = 0 if request.max_tokens == 0 else -1
        out = []
        for prompt in prompts:
            replies = [
                TextReply(stops, logprobs=request.logprobs is not None, keep=keep)
                for _ in range(params.n)
            ]
            out.append((self.core.submit(prompt, params, reply=replies), prompt))
        return out

    def wait_events(
        self, request_id: str, after: int | list[int] = 0, timeout: float | None = None
    ) -> tuple[list[Any], dict[str, Any] | None]:
        """The reply's events past the first `after` (cluster.chat; with n > 1 choices, a
        count per choice and (choice, event) pairs: `EventCursor`), and, once the request
        finished, the reply."""
        events, reply = self.core.wait_reply(request_id, after=after, timeout=timeout)
        if reply is None:
            self._alive()
        return events, reply

    def wait_replies(
        self,
        cursors: dict[str, int | list[int]],
        timeout: float | None = None,
        watcher: str | None = None,
    ) -> dict[str, tuple[list[Any], dict[str, Any] | None] | None]:
        """`wait_events` for many requests (`EngineCore.wait_replies`): a front's one
        poll for every reply it streams. Raises EngineUnavailable once the loop stopped
        and none of them has a finished reply left to hand over."""
        news = self.core.wait_replies(cursors, timeout=timeout, watcher=watcher)
        if self.error is not None and not any(got and got[1] is not None for got in news.values()):
            self._alive()
        return news

    def nudge(self, watcher: str) -> None:
        self.core.nudge(watcher)

    def release(self, request_id: str) -> None:
        """The caller is done with a request: cancelled if it still runs, then forgotten
        (one call, so that the two cannot arrive out of order)."""
        self.core.cancel(request_id)
        self.core.forget(request_id)

    def wait_chat(self, request_id: str) -> dict[str, Any]:
        """The finished reply: message, finish_reason, usage, harmony messages (with
        n > 1, every choice's in `choices`)."""
        while True:
            _, reply = self.wait_events(request_id, sys.maxsize)  # no event is news
            if reply is not None:
                return reply

    # -- fronts and shutdown -------------------------------------------------------------
    def attach(self, start: Callable[..., Front], *args: Any) -> str:
        """Starts a front on this engine, in this process: `start(engine, *args)` (the HTTP
        API's `http_api.serve_api`). Returns its URL."""
        front = start(self, *args)
        self.fronts.append(front)
        return front.url

    def shutdown(self) -> None:
        for front in self.fronts:
            front.stop()
        self._stop.set()
        self.core.wake()
        self._loop.join(timeout=10)

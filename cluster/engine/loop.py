"""The engine's API without Ray: a thread steps an `EngineCore` while token requests come
and go. `Coordinator` runs it on Ray shards; tests drive it with any `run_step`. Fronts
reach it from above (`cluster.client.engine_client`): they add typed requests (`add`), read each
step's token deltas for their requests as one stream per front (`outputs`), and abort
what they no longer want (`abort`). Text never comes here: the engine knows nothing of
the layers that use it."""

from __future__ import annotations

import os
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gptoss_ray.cluster.engine.core import EngineCore
from gptoss_ray.cluster.engine.messages import EngineRequest, TokenDelta
from gptoss_ray.model.config import ModelConfig
from gptoss_ray.model.types import EngineUnavailable, KVLayout, RequestError

IDLE_AFTER_S = 1.0
# How often an idle front's stream says it is alive: a front that died is found at the
# stream's next item (its generator ends there), so its requests do not run for nobody.
HEARTBEAT_S = 5.0


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

    # -- API ---------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """What a front needs to render requests and check them: the model's id and path,
        its context, the harmony frame setting; and the engine's health."""
        return {
            "model": self.model_path,
            "model_id": self.model_id,
            "shards": self.shards,
            "kv_layout": vars(self.layout),
            "harmony_frame": self.harmony_frame,
            "max_context_length": self.config.max_context_length,
            "loras": list(self.core.loras),  # LoRA adapters served, by name
            "healthy": self.error is None,
            "error": self.error,
            "pid": os.getpid(),
        }

    def stats(self) -> dict[str, Any]:
        return self.core.snapshot()

    def expert_load(self) -> list[list[int]]:
        """[layer][expert] rows routed to each expert ([] where nobody counts them)."""
        return self._expert_load() if self._expert_load is not None else []

    def load_lora(self, name: str, path: str) -> None:
        """Serves one more LoRA adapter (`EngineCore.add_lora`)."""
        self.core.add_lora(name, path)

    def unload_lora(self, name: str) -> None:
        """Stops serving one (`EngineCore.remove_lora`): refused while it is in use."""
        self.core.remove_lora(name)

    def add(self, groups: list[list[EngineRequest]], front: str) -> list[RequestError | None]:
        """Queues groups of requests, each all or none (`EngineCore.add`) and apart from
        the others: a front sends what its handlers submitted at once in one call. ->
        each group's error (None: queued). Their tokens go to `front`'s stream
        (`outputs`)."""
        self._alive()
        errors: list[RequestError | None] = []
        for requests in groups:
            try:
                self.core.add(requests, front)
                errors.append(None)
            except RequestError as exc:
                errors.append(exc)
        return errors

    def abort(self, request_id: str, choice: int | None = None) -> None:
        """Stops a request (every choice, or one): a stop string found by its front, a
        client gone. Unknown or finished ids are ignored."""
        self.core.cancel(request_id, choice)

    def outputs(self, front: str) -> Iterator[list[TokenDelta]]:
        """The token deltas of `front`'s requests, a batch per step (those a slow reader
        missed come together), and [] every HEARTBEAT_S while there are none. A Ray
        streaming generator per front: when the front is gone, the next item ends it, and
        its requests are cancelled; so is ending the stream."""
        box = self.core.outbox(front)
        try:
            while not self._stop.is_set():
                deltas = box.take(HEARTBEAT_S)
                if deltas is None:  # closed: the engine shuts down
                    return
                yield deltas
        finally:
            self.core.close_outbox(front)

    def shutdown(self) -> None:
        self._stop.set()
        self.core.close_outboxes()  # the fronts' streams end now
        self.core.wake()
        self._loop.join(timeout=10)

"""The Python API: start an engine on a Ray cluster (or a local Ray instance), generate,
stream, chat, shut down.

    engine = Engine.start(model="gpt-oss-tiny", shards=2)
    outs = engine.generate([[5, 6, 7], [8, 9]], SamplingParams(max_tokens=16, temperature=0))
    for delta in engine.stream([5, 6, 7], SamplingParams(max_tokens=16)):
        ...
    replies = engine.chat([{"messages": [{"role": "user", "content": "Hi"}]}])
    engine.shutdown()
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import ray

from gptoss_ray.cluster.client.chat import TextDelta, chat_request
from gptoss_ray.cluster.client.engine_client import (
    Finished,
    LoopThread,
    RayEngineClient,
    RequestStream,
    TokenReply,
    actor_error,
    combined_reply,
    token_output,
)
from gptoss_ray.cluster.engine.config import EngineConfig
from gptoss_ray.cluster.engine.messages import EngineRequest, RequestOutput
from gptoss_ray.cluster.runtime.coordinator import check_engine, coordinator_actor, here
from gptoss_ray.cluster.runtime.ray_instance import NAMESPACE, init_for_engine
from gptoss_ray.model import harmony
from gptoss_ray.model.types import DeviceUnavailable, RequestError, SamplingParams


class Engine:
    def __init__(self, coordinator: ray.actor.ActorHandle, *, owns_ray: bool) -> None:
        self.coordinator = coordinator
        self._owns_ray = owns_ray
        self._loop = LoopThread()
        self.client = RayEngineClient(coordinator, "engine")
        self._info: dict[str, Any] | None = None

    @classmethod
    def start(
        cls,
        model: str = "gpt-oss-tiny",
        shards: int = 2,
        *,
        address: str | None = None,
        name: str | None = None,
        coordinator_node: str | None = None,
        config: EngineConfig | None = None,
        owner: Any = None,
        **options: Any,
    ) -> Engine:
        """Starts the coordinator and its shards. `config` (`EngineConfig`), or `model`,
        `shards` and its other fields as keywords (device, dtype, kv_budget_mb,
        gpu_memory_utilization, kernels, overlap, ...: each field's description says
        what it does and its default), validated here, a bad one named.
        `address="auto"` joins a running Ray cluster (`ray up`, `ray start`), as does
        RAY_ADDRESS; without either, a private local Ray instance is started for this
        engine and ended with it, whether or not another runs on this machine
        (cluster/runtime/ray_instance.py says why). The coordinator runs on this process's node
        unless `coordinator_node` (a Ray node id) says otherwise. `owner`: an actor (the
        caller's, started from one) whose end ends the engine, shards and placement
        group too, however it ends."""
        if config is None:
            config = EngineConfig(model=model, shards=shards, **options)
        elif options:
            raise ValueError(f"options {sorted(options)} beside a config: put them in it")
        config = config.forwarding_env()  # this process's NCCL_*: the user's shell
        if coordinator_node is None:  # the paths read here as the coordinator will
            check_engine(config)
        shards, device = config.shards, config.device
        owns_ray = init_for_engine(address, shards + 1)
        gpus = ray.cluster_resources().get("GPU", 0)
        if device == "cuda" and owns_ray and gpus < shards:  # a private Ray never grows
            ray.shutdown()
            raise DeviceUnavailable(
                f"device cuda: {shards} shard(s) need a GPU each; this machine has {gpus:g}"
            )
        remote = coordinator_actor(
            name=name or f"gptoss-ray-coordinator-{uuid.uuid4().hex[:8]}",
            scheduling_strategy=here(coordinator_node),
            **({"lifetime": "detached", "namespace": NAMESPACE} if owner is not None else {}),
        )
        coordinator = remote.remote(config, owner)
        try:
            ray.get(coordinator.info.remote())
        except ray.exceptions.RayActorError as exc:
            raise RuntimeError(f"the engine failed to start: {exc}") from None
        return cls(coordinator, owns_ray=owns_ray)

    def info(self) -> dict[str, Any]:
        return ray.get(self.coordinator.info.remote())

    def stats(self) -> dict[str, Any]:
        return ray.get(self.coordinator.stats.remote())

    def _model(self) -> dict[str, Any]:
        if self._info is None:
            self._info = self.info()
        return self._info

    def _submit(self, requests, replies, combine=combined_reply) -> list[RequestStream]:
        return self._loop.run(self.client.submit(requests, replies, combine))

    def _items(self, stream: RequestStream) -> Iterator[Any]:
        """A stream's items, read from this thread; the request is aborted if the
        reader stops early."""
        try:
            while True:
                item = self._loop.run(stream.queue.get())
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            self._loop.loop.call_soon_threadsafe(stream.close)

    # -- token ids ---------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], params: SamplingParams | None = None) -> RequestStream:
        """Starts a request of token ids; read it with `tokens` (as they are drawn) or
        `result`. A bad one raises its RequestError."""
        (stream,) = self._submit(*_tokens(prompt, params or SamplingParams()), token_output)
        return stream

    def tokens(self, stream: RequestStream) -> Iterator[list[int]]:
        """A request's new token ids as they are drawn, until it finishes."""
        for item in self._items(stream):
            if not isinstance(item, Finished):
                yield item[1]

    def result(self, stream: RequestStream, timeout: float | None = None) -> Any:
        """A request's output (`RequestOutput`; a chat reply for `chat` requests) once it
        finished."""
        return self._loop.run(stream.result(), timeout)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput | RequestError]:
        """Runs every prompt; results in input order. A bad request comes back as its
        RequestError in its place and the others still run."""
        params = params or SamplingParams()
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} parameter sets for {len(prompts)} prompts")

        async def submit_all() -> list[Any]:  # at once: one call to the engine
            submits = (
                self.client.submit(*_tokens(prompt, p), token_output)
                for prompt, p in zip(prompts, plist, strict=True)
            )
            return await asyncio.gather(*submits, return_exceptions=True)

        streams = []
        for got in self._loop.run(submit_all()):
            if isinstance(got, BaseException) and not isinstance(got, RequestError):
                raise got
            streams.append(got if isinstance(got, RequestError) else got[0])
        return [s if isinstance(s, RequestError) else self.result(s) for s in streams]

    def stream(
        self, prompt: Sequence[int], params: SamplingParams | None = None
    ) -> Iterator[list[int]]:
        """Yields the new token ids as they are sampled, until the request finishes."""
        yield from self.tokens(self.submit(prompt, params))

    # -- chat (harmony) ----------------------------------------------------------------
    def chat(self, requests: Sequence[dict[str, Any]]) -> list[dict[str, Any] | Exception]:
        """OpenAI chat requests (or {"conversation": harmony JSON, ...}) -> replies in
        input order: message (content, reasoning_content, tool_calls), finish_reason,
        usage. A bad request comes back as its error in its place. Rendered and parsed
        here, in this process: the engine sees tokens only."""
        submitted: list[RequestStream | Exception] = []
        for body in requests:
            try:
                request, replies = chat_request(body, self._model())
                submitted += self._submit([request], [replies])
            except (RequestError, harmony.HarmonyError, ValueError) as exc:
                submitted.append(exc)
        return [s if isinstance(s, Exception) else self.result(s) for s in submitted]

    def chat_stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Yields {"choice", "channel", "recipient", "delta"} as the reply is sampled
        (reasoning, the answer up to any stop string, tool-call arguments), then a last
        event with the whole reply ({"done": True, ...})."""
        request, replies = chat_request(body, self._model())
        (stream,) = self._submit([request], [replies])
        for item in self._items(stream):
            if isinstance(item, Finished):
                yield {"done": True, **item.reply}
            elif isinstance(item[1], TextDelta):
                choice, event = item
                yield {
                    "choice": choice,
                    "channel": event.channel,
                    "recipient": event.recipient,
                    "delta": event.text,
                }

    def shutdown(self) -> None:
        try:
            ray.get(self.coordinator.shutdown.remote(), timeout=60)
        finally:
            self._loop.stop()
            ray.kill(self.coordinator)
            if self._owns_ray:
                ray.shutdown()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _tokens(prompt: Sequence[int], params: SamplingParams) -> tuple[list, list]:
    request = EngineRequest(uuid.uuid4().hex, list(prompt), params)
    return [request], [[TokenReply() for _ in range(params.n)]]


def _unwrap(call):
    """Ray wraps an actor's exception; give back the original (RequestError, ...)."""
    try:
        return call()
    except ray.exceptions.RayTaskError as exc:
        raise actor_error(exc) from None

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

import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import ray

from gptoss_ray.cluster.chat import EventCursor, TextDelta
from gptoss_ray.cluster.coordinator import Coordinator
from gptoss_ray.cluster.engine_config import EngineConfig
from gptoss_ray.cluster.engine_core import RequestOutput
from gptoss_ray.cluster.ray_instance import init_for_engine
from gptoss_ray.model import harmony
from gptoss_ray.model.types import DeviceUnavailable, RequestError, SamplingParams


class Engine:
    def __init__(self, coordinator: ray.actor.ActorHandle, *, owns_ray: bool) -> None:
        self.coordinator = coordinator
        self._owns_ray = owns_ray

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
        **options: Any,
    ) -> Engine:
        """Starts the coordinator and its shards. `config` (`EngineConfig`), or `model`,
        `shards` and its other fields as keywords (device, dtype, kv_budget_mb,
        gpu_memory_utilization, kernels, overlap, ...: each field's description says
        what it does and its default), validated here, a bad one named.
        `address="auto"` joins a running Ray cluster (`ray up`, `ray start`), as does
        RAY_ADDRESS; without either, a private local Ray instance is started for this
        engine and ended with it, whether or not another runs on this machine
        (cluster/ray_instance.py says why). The coordinator runs on this process's node
        unless `coordinator_node` (a Ray node id) says otherwise."""
        if config is None:
            config = EngineConfig(model=model, shards=shards, **options)
        elif options:
            raise ValueError(f"options {sorted(options)} beside a config: put them in it")
        shards, device = config.shards, config.device
        owns_ray = init_for_engine(address, shards + 1)
        gpus = ray.cluster_resources().get("GPU", 0)
        if device == "cuda" and owns_ray and gpus < shards:  # a private Ray never grows
            ray.shutdown()
            raise DeviceUnavailable(
                f"device cuda: {shards} shard(s) need a GPU each; this machine has {gpus:g}"
            )
        remote = ray.remote(Coordinator).options(
            name=name or f"gptoss-ray-coordinator-{uuid.uuid4().hex[:8]}",
            max_concurrency=64,
            num_cpus=0,
            scheduling_strategy=here(coordinator_node),
        )
        coordinator = remote.remote(config)
        try:
            ray.get(coordinator.info.remote())
        except ray.exceptions.RayActorError as exc:
            raise RuntimeError(f"the engine failed to start: {exc}") from None
        return cls(coordinator, owns_ray=owns_ray)

    def info(self) -> dict[str, Any]:
        return ray.get(self.coordinator.info.remote())

    def stats(self) -> dict[str, Any]:
        return ray.get(self.coordinator.stats.remote())

    # -- token ids ---------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], params: SamplingParams | None = None) -> str:
        return _unwrap(
            lambda: ray.get(
                self.coordinator.submit.remote(list(prompt), params or SamplingParams())
            )
        )

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
        ids: list[str | RequestError] = []
        for prompt, p in zip(prompts, plist, strict=True):
            try:
                ids.append(self.submit(prompt, p))
            except RequestError as exc:
                ids.append(exc)
        waits = {
            i: self.coordinator.wait.remote(rid)
            for i, rid in enumerate(ids)
            if isinstance(rid, str)
        }
        results: list[RequestOutput | RequestError] = []
        for i, rid in enumerate(ids):
            results.append(
                rid if isinstance(rid, RequestError) else _unwrap(lambda w=waits[i]: ray.get(w))
            )
        for rid in ids:
            if isinstance(rid, str):
                self.coordinator.forget.remote(rid)
        return results

    def stream(
        self, prompt: Sequence[int], params: SamplingParams | None = None
    ) -> Iterator[list[int]]:
        """Yields the new token ids as they are sampled, until the request finishes."""
        rid = self.submit(prompt, params)
        seen = 0
        while True:
            out: RequestOutput = _unwrap(
                lambda seen=seen: ray.get(self.coordinator.wait.remote(rid, seen, 30.0))
            )
            if len(out.token_ids) > seen:
                yield out.token_ids[seen:]
                seen = len(out.token_ids)
            if out.finished:
                self.coordinator.forget.remote(rid)
                return

    # -- chat (harmony) ----------------------------------------------------------------
    def chat(self, requests: Sequence[dict[str, Any]]) -> list[dict[str, Any] | Exception]:
        """OpenAI chat requests (or {"conversation": harmony JSON, ...}) -> replies in
        input order: message (content, reasoning_content, tool_calls), finish_reason,
        usage. A bad request comes back as its error in its place."""
        submitted: list[str | Exception] = []
        for request in requests:
            try:
                rid, _ = _unwrap(lambda r=request: ray.get(self.coordinator.submit_chat.remote(r)))
                submitted.append(rid)
            except (RequestError, harmony.HarmonyError, ValueError) as exc:
                submitted.append(exc)
        pending = {
            i: self.coordinator.wait_chat.remote(rid)
            for i, rid in enumerate(submitted)
            if isinstance(rid, str)
        }
        out: list[dict[str, Any] | Exception] = []
        for i, rid in enumerate(submitted):
            out.append(
                rid if isinstance(rid, Exception) else _unwrap(lambda w=pending[i]: ray.get(w))
            )
            if isinstance(rid, str):
                self.coordinator.forget.remote(rid)
        return out

    def chat_stream(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Yields {"channel", "recipient", "delta"} as the reply is sampled (reasoning, the
        answer up to any stop string, tool-call arguments), then a last event with the
        whole reply ({"done": True, ...})."""
        rid, _ = _unwrap(lambda: ray.get(self.coordinator.submit_chat.remote(request)))
        cursor = EventCursor(request.get("n") or 1)
        try:
            while True:
                events, reply = _unwrap(
                    lambda a=cursor.after: ray.get(
                        self.coordinator.wait_events.remote(rid, a, 30.0)
                    )
                )
                for choice, event in cursor.advance(events):
                    if isinstance(event, TextDelta):
                        yield {
                            "choice": choice,
                            "channel": event.channel,
                            "recipient": event.recipient,
                            "delta": event.text,
                        }
                if reply is not None:
                    yield {"done": True, **reply}
                    return
        finally:
            self.coordinator.forget.remote(rid)

    def shutdown(self) -> None:
        try:
            ray.get(self.coordinator.shutdown.remote(), timeout=60)
        finally:
            ray.kill(self.coordinator)
            if self._owns_ray:
                ray.shutdown()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def here(node_id: str | None = None):
    """Keeps the coordinator on the caller's node (the head, usually): it must not die
    with a worker node, and its loopback HTTP server must be where the user is."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node_id = node_id or ray.get_runtime_context().get_node_id()
    return NodeAffinitySchedulingStrategy(node_id, soft=False)


def _unwrap(call):
    """Ray wraps an actor's exception; give back the original (RequestError, ...)."""
    try:
        return call()
    except ray.exceptions.RayTaskError as exc:
        raise actor_error(exc) from None


def actor_error(exc: ray.exceptions.RayTaskError) -> Exception:
    """The exception an actor's method raised, which Ray wrapped."""
    original = getattr(exc, "cause", None)
    return original if isinstance(original, Exception) else exc.as_instanceof_cause()

"""The coordinator, a named Ray actor: it places the shard actors (one placement-group
bundle each, packed onto as few nodes as fit), joins them into a process group, runs the
engine loop in a background thread while requests come and go, and replaces shards that
are lost."""

from __future__ import annotations

import contextlib
import datetime
import os
import threading
import time
import traceback
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from gptoss_ray.cluster.engine_core import EngineCore, RequestOutput, ShardsRestarted
from gptoss_ray.model import harmony
from gptoss_ray.model.checkpoint import Checkpoint, resolve_model
from gptoss_ray.model.harmony.openai_chat import (
    ChatRequest,
    HarmonyRequest,
    from_harmony,
    to_harmony,
)
from gptoss_ray.model.types import (
    EngineUnavailable,
    KVLayout,
    SamplingParams,
    StepPlan,
    StepResult,
)
from gptoss_ray.shards.worker import ShardWorker


class ChatEngine:
    """The engine's API without Ray: the loop thread stepping an `EngineCore`, token and
    chat requests, the HTTP server. `Coordinator` puts it on Ray shards; tests can drive
    it with any `run_step`."""

    def __init__(self, model_path: str, config, layout: KVLayout, core: EngineCore) -> None:
        self.model_path = model_path
        self.config = config
        self.layout = layout
        self.core = core
        self.shards = core.world_size
        self.error: str | None = None
        self.http = None
        self._stop_strings: dict[str, list[str]] = {}
        self._stop = threading.Event()
        self._loop = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._loop.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self.core.wait_for_work(timeout=0.05):
                    self.core.step()
        except Exception as exc:
            traceback.print_exc()  # the whole story goes to the actor's log
            self.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self.core.fail(self.error)

    def _alive(self) -> None:
        if self.error is not None:
            raise EngineUnavailable(f"the engine loop stopped: {self.error}")

    # -- API ---------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {
            "model": self.model_path,
            "shards": self.shards,
            "kv_layout": vars(self.layout),
            "healthy": self.error is None,
        }

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
        self._stop_strings.pop(request_id, None)

    def cancel(self, request_id: str) -> None:
        self.core.cancel(request_id)

    def stats(self) -> dict[str, Any]:
        with self.core._lock:
            s = self.core.stats
            return {
                "steps": s.steps,
                "generated_tokens": s.generated_tokens,
                "prefill_tokens": s.prefill_tokens,
                "preemptions": s.preemptions,
                "recoveries": s.recoveries,
                "requests": s.requests,
                "seconds": dict(s.seconds),
            }

    def submit_chat(
        self, request: dict[str, Any] | ChatRequest, request_id: str | None = None
    ) -> tuple[str, int]:
        """A chat request (see `chat_prompt`) -> request id and prompt length."""
        self._alive()
        prompt, params, stops = chat_prompt(request, self.config.max_context_length)
        rid = self.core.submit(prompt, params, request_id)
        if stops:
            self._stop_strings[rid] = stops
        return rid, len(prompt)

    def wait_chat(self, request_id: str, timeout: float | None = None) -> dict[str, Any]:
        out = self.wait(request_id, timeout=timeout)
        return chat_response(out, self._stop_strings.get(request_id, []))

    def expert_load(self) -> list[list[int]]:
        """[layer][expert] rows routed to each expert; shards that do not report: []."""
        return []

    def start_http(
        self, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None
    ) -> str:
        """Serves the OpenAI-compatible API from here; returns its base URL."""
        from gptoss_ray.cluster.http_api import ApiServer

        if self.http is None:
            self.http = ApiServer(self, host, port, api_key)
        node = ray.util.get_node_ip_address() if host in ("0.0.0.0", "::") else self.http.host
        return f"http://{node}:{self.http.port}/v1"

    def shutdown(self) -> None:
        if self.http is not None:
            self.http.stop()
        self._stop.set()
        self._loop.join(timeout=10)


STEP_TIMEOUT_S = 3600.0  # a step this long means a hung shard


class Coordinator(ChatEngine):
    def __init__(
        self,
        model: str,
        shards: int,
        *,
        device: str = "cpu",
        dtype: str = "bfloat16",
        kv_budget_bytes: int = 256 * 2**20,
        block_size: int = 16,
        token_budget: int = 256,
        max_seqs: int = 64,
        cpus_per_shard: float = 1,
        gpus_per_shard: float | None = None,
        placement_timeout: float = 120,
        recovery_timeout: float = 120,
        kernels: bool | None = None,
        decode_graphs: bool | None = None,
        threads_per_shard: int | None = None,
        compiled_steps: bool | None = None,
    ) -> None:
        path = resolve_model(model)  # writes a preset's built-in checkpoint once, here
        self.model_path = str(path)
        self.config = Checkpoint(path).config
        self.shards = shards
        self.layout = KVLayout.from_budget(
            self.config,
            kv_budget_bytes,
            bytes_per_value={"float32": 4, "bfloat16": 2}[dtype],
            block_size=block_size,
            max_seqs=max_seqs,
            max_chunk=token_budget,
        )
        gpus = gpus_per_shard if gpus_per_shard is not None else (1 if device == "cuda" else 0)
        bundle = {"CPU": cpus_per_shard} | ({"GPU": gpus} if gpus else {})
        self.pg = placement_group([bundle] * shards, strategy="PACK")
        try:
            ray.get(self.pg.ready(), timeout=placement_timeout)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            raise RuntimeError(
                f"could not place {shards} shards of {bundle} within {placement_timeout:.0f} s; "
                f"the cluster has {ray.available_resources()} available"
            ) from None
        self._device, self._dtype = device, dtype
        self._load_options = {"kernels": kernels, "decode_graphs": decode_graphs}
        self._threads = threads_per_shard
        self._shard_options = {
            "num_cpus": cpus_per_shard,
            "num_gpus": gpus_per_shard
            if gpus_per_shard is not None
            else (1 if device == "cuda" else 0),
            # NCCL/gloo interface settings (NCCL_SOCKET_IFNAME, ...) reach every shard
            "runtime_env": {
                "env_vars": {
                    k: v
                    for k, v in os.environ.items()
                    if k.startswith(("NCCL_", "GLOO_", "TP_SOCKET_IFNAME"))
                }
            },
        }
        self.recovery_timeout = recovery_timeout
        self.workers = [self._spawn(r) for r in range(shards)]
        self._form_group(self.workers)
        self.expert_ranges = ray.get(
            [
                w.load.remote(self.model_path, dtype, self.layout, **self._load_options)
                for w in self.workers
            ]
        )
        # Off by default on CPU shards: the channels' readers poll, and there every core
        # already runs the shards' torch threads (2 cores, batch 64: 86 -> 120 ms a step)
        self._compiled_steps = device == "cuda" if compiled_steps is None else compiled_steps
        self._dag = self._compile_steps()
        core = EngineCore(
            self.config,
            shards,
            self.layout,
            self._run_step,
            token_budget=token_budget,
            max_seqs=max_seqs,
        )
        self.recoveries: list[dict[str, Any]] = []
        super().__init__(self.model_path, self.config, self.layout, core)

    def _spawn(self, rank: int):
        """A shard actor in its placement-group bundle (rescheduled by Ray onto another
        node if its node is gone)."""
        return (
            ray.remote(ShardWorker)
            .options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, rank),
                **self._shard_options,
            )
            .remote(rank, self.shards, self._device, self._threads)
        )

    def _form_group(self, workers: list) -> None:
        if len(workers) > 1:
            host, port = ray.get(workers[0].address.remote())
            ray.get([w.init_process_group.remote(host, port) for w in workers])

    def _compile_steps(self) -> Any:
        """The step as a Ray compiled graph: the plans reach the shards and their results
        come back through shared-memory channels, a few hundred microseconds sooner per
        step than actor calls (`gptoss-ray bench sweep` shows the `rpc` share). None
        where compiled steps are off or cannot be built (plain actor calls then)."""
        if not self._compiled_steps:
            return None
        from ray.dag import InputNode, MultiOutputNode

        try:
            with InputNode() as plans:
                dag = MultiOutputNode([w.step.bind(plans[i]) for i, w in enumerate(self.workers)])
            return dag.experimental_compile()
        except Exception as exc:  # an older Ray, a platform without its channels
            print(
                f"coordinator: compiled steps unavailable ({exc!r}); using actor calls", flush=True
            )
            return None

    def _teardown_steps(self) -> None:
        if self._dag is not None:
            with contextlib.suppress(Exception):  # a lost shard cannot take part
                self._dag.teardown()
            self._dag = None

    def _run_step(self, plans: list[StepPlan]) -> list[StepResult]:
        refs: list = []
        try:
            if self._dag is not None:
                # the compiled graph's own read timeout (10 s) is shorter than a long
                # prefill or a first CUDA-graph capture; a lost shard fails it at once
                return ray.get(self._dag.execute(*plans), timeout=STEP_TIMEOUT_S)
            refs = [w.step.remote(p) for w, p in zip(self.workers, plans, strict=True)]
            return ray.get(refs)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            if refs:
                ray.wait(refs, num_returns=len(refs), timeout=30)  # let the survivors fail too
            self._teardown_steps()
            self._recover(exc)
            self._dag = self._compile_steps()
            raise ShardsRestarted from exc

    def _recover(self, cause: Exception) -> None:
        """Replaces lost shards (same or another node), re-forms the process group, and
        reloads the replacements' weights; the survivors keep theirs but drop their KV.
        Raises when no replacement can be placed within recovery_timeout."""
        deadline = time.monotonic() + self.recovery_timeout
        lost = []
        for rank, w in enumerate(self.workers):
            try:
                ray.get(w.ping.remote(), timeout=10)
            except Exception:
                lost.append(rank)
        print(f"coordinator: shard(s) {lost} lost ({type(cause).__name__}); recovering", flush=True)
        for rank in lost:
            with contextlib.suppress(Exception):
                ray.kill(self.workers[rank])
            self.workers[rank] = self._spawn(rank)
        for rank in lost:
            try:
                ray.get(
                    self.workers[rank].ping.remote(), timeout=max(1, deadline - time.monotonic())
                )
            except ray.exceptions.GetTimeoutError:
                raise RuntimeError(
                    f"shard {rank} was lost and no replacement could be placed within "
                    f"{self.recovery_timeout:.0f} s (cluster resources available: "
                    f"{ray.available_resources()}); the engine is unhealthy"
                ) from None
        self._form_group(self.workers)
        ray.get(
            [
                self.workers[r].load.remote(
                    self.model_path, self._dtype, self.layout, **self._load_options
                )
                for r in lost
            ]
        )
        ray.get([w.reset_kv.remote() for w in self.workers])
        self.recoveries.append({"time": time.time(), "lost": lost, "cause": type(cause).__name__})

    def expert_load(self) -> list[list[int]]:
        # each shard counts the rows its own experts received: the sum is the whole load
        per_shard = ray.get([w.expert_load.remote() for w in self.workers], timeout=30)
        return [
            [sum(col) for col in zip(*rows, strict=True)] for rows in zip(*per_shard, strict=True)
        ]

    def status(self) -> dict[str, Any]:
        """Per shard: node, device, experts, memory, KV use; plus queue, load, jobs."""
        shards = ray.get([w.describe.remote() for w in self.workers], timeout=30)
        with self.core._lock:
            waiting = len(self.core.scheduler.waiting)
            running = [len(s.running) for s in self.core.scheduler.shards]
        return {
            **self.info(),
            "shards_detail": shards,
            "waiting": waiting,
            "running": running,
            "expert_load": self.expert_load(),
            "stats": self.stats(),
            "recoveries": self.recoveries,
        }

    def info(self) -> dict[str, Any]:
        return {**super().info(), "expert_ranges": self.expert_ranges}

    def shutdown(self) -> None:
        super().shutdown()
        self._teardown_steps()
        with contextlib.suppress(Exception):  # a dead shard cannot say goodbye
            ray.get([w.shutdown.remote() for w in self.workers], timeout=30)
        for w in self.workers:
            ray.kill(w)
        remove_placement_group(self.pg)


def chat_prompt(request: Any, context: int) -> tuple[list[int], SamplingParams, list[str]]:
    """Render a chat request for completion and read its sampling fields. The request is
    an OpenAI chat request, or {"conversation": <openai-harmony JSON>, ...sampling}."""
    if isinstance(request, dict) and "conversation" in request:
        fields = HarmonyRequest.parse(request)
        messages = harmony.Conversation.from_dict(fields.conversation).messages
    else:
        fields = request if isinstance(request, ChatRequest) else ChatRequest.parse(request)
        messages = to_harmony(fields, conversation_start_date=datetime.date.today().isoformat())
    prompt = harmony.render_for_completion(messages)
    r = fields
    max_tokens = r.max_completion_tokens or r.max_tokens or max(1, min(4096, context - len(prompt)))
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if r.temperature is None else r.temperature,
        top_p=1.0 if r.top_p is None else r.top_p,
        top_k=r.top_k or 0,
        seed=r.seed,
    )
    stops = [r.stop] if isinstance(r.stop, str) else list(r.stop or [])
    return prompt, params, stops


def chat_response(out: RequestOutput, stop: list[str] | None = None) -> dict[str, Any]:
    """Finished tokens -> an OpenAI-style choice: message, finish_reason, usage, and the
    parsed harmony messages. `stop` strings cut the answer text (applied to the parsed
    content once the request finished; the engine does not stop early for them)."""
    parser = harmony.StreamParser("assistant", strict=False)
    for token in out.token_ids:
        parser.process(token)
    messages = parser.process_eos().messages
    message = from_harmony(messages)
    finish = "tool_calls" if message.tool_calls else out.finish_reason
    cuts = [message.content.find(s) for s in stop or [] if s and message.content]
    cuts = [c for c in cuts if c >= 0]
    if cuts:
        message.content = message.content[: min(cuts)]
        finish = "stop"
    return {
        "request_id": out.request_id,
        "message": message.model_dump(exclude_none=True),
        "finish_reason": finish,
        "harmony": [m.to_dict() for m in messages],
        "token_ids": list(out.token_ids),
        "problems": parser.problems,
        "usage": {
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": len(out.token_ids),
            "total_tokens": out.prompt_tokens + len(out.token_ids),
        },
    }

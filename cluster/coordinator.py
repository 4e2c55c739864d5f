"""The coordinator, a named Ray actor: it places the shard actors (one placement-group
bundle each, packed onto as few nodes as fit), joins them into a process group, runs the
engine loop (`EngineLoop`) over them while requests come and go, and replaces shards
that are lost. Ray only: the engine's API is `EngineLoop`'s, chat is `cluster.chat`."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from gptoss_ray.cluster.engine_core import EngineCore, ShardsRestarted
from gptoss_ray.cluster.engine_loop import EngineLoop
from gptoss_ray.model.checkpoint import Checkpoint, resolve_model
from gptoss_ray.model.types import KVLayout, StepPlan, StepResult
from gptoss_ray.shards.worker import ShardWorker

STEP_TIMEOUT_S = 3600.0  # a step this long means a hung shard


class Coordinator(EngineLoop):
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
        max_prompt_tokens: int | None = None,
        prefix_cache: bool = True,
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
            max_prompt_tokens=max_prompt_tokens,
            prefix_cache=prefix_cache,
            cache_salt=f"{self.model_path}:{dtype}",
        )
        self.recoveries: list[dict[str, Any]] = []
        super().__init__(
            self.model_path, self.config, self.layout, core, expert_load=self._expert_load_of_shards
        )

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
            lost = self._recover(exc)
            self._dag = self._compile_steps()
            raise ShardsRestarted(lost) from exc

    def _recover(self, cause: Exception) -> list[int]:
        """Replaces lost shards (same or another node), re-forms the process group, and
        reloads the replacements' weights; the survivors keep theirs and their cached
        prefixes but drop their sequences. Returns the ranks replaced; raises when no
        replacement can be placed within recovery_timeout."""
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
        return lost

    def _expert_load_of_shards(self) -> list[list[int]]:
        # each shard counts the rows its own experts received: the sum is the whole load
        per_shard = ray.get([w.expert_load.remote() for w in self.workers], timeout=30)
        return [
            [sum(col) for col in zip(*rows, strict=True)] for rows in zip(*per_shard, strict=True)
        ]

    def status(self) -> dict[str, Any]:
        """Per shard: node, device, experts, memory, KV use; plus queue, load, jobs."""
        shards = ray.get([w.describe.remote() for w in self.workers], timeout=30)
        stats = self.stats()
        return {
            **self.info(),
            "shards_detail": shards,
            "waiting": stats["waiting"],
            "running": stats["running"],
            "expert_load": self.expert_load(),
            "stats": stats,
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

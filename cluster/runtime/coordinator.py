"""The coordinator, a named Ray actor: it places the shard actors (one placement-group
bundle each, packed onto as few nodes as fit), joins them into a process group, runs the
engine loop (`EngineLoop`) over them while requests come and go, and replaces shards
that are lost. Ray only: the engine's API is `EngineLoop`'s, chat is `cluster.client.chat`."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from gptoss_ray.cluster.engine.config import EngineConfig
from gptoss_ray.cluster.engine.core import EngineCore, ShardsRestarted
from gptoss_ray.cluster.engine.loop import EngineLoop
from gptoss_ray.cluster.runtime.ray_instance import NAMESPACE
from gptoss_ray.model.config import ModelConfig
from gptoss_ray.model.eagle3_config import Eagle3Config
from gptoss_ray.model.lora_config import read_adapter_config
from gptoss_ray.model.model_folder import model_config, read_config, resolve_model
from gptoss_ray.model.types import (
    DEFAULT_GPU_MEMORY_UTILIZATION,
    DEFAULT_KV_BUDGET_MB,
    KVLayout,
    StepPlan,
    StepResult,
    size_kv,
)
from gptoss_ray.router.plan import expert_ranges
from gptoss_ray.shards.worker import STEP_THREADS, ShardWorker

STEP_TIMEOUT_S = 3600.0  # a step this long means a hung shard
OWNER_POLL_S = 1.0  # how often an engine started for an actor looks for it (`_outlive`)
# how long an aborted shard may take to leave its step (`ShardWorker.abort_group`)
ABORT_GRACE_S = 5.0
# forming the group again around running shards: all join at once, so this is ample
REFORM_RENDEZVOUS_S = 30.0
# what a step's call or its compiled graph raises when a shard is gone: the actor's death,
# its task's failure, or (compiled graph) a channel it closed, whichever comes first
SHARD_LOST = (
    ray.exceptions.RayActorError,
    ray.exceptions.RayTaskError,
    ray.exceptions.RayChannelError,
)


# the KV cache a GPU shard loads with, replaced once free memory is read (`size_kv`)
PROVISIONAL_KV_MB = 64
# A coordinator actor's threads: each front's token stream holds one for as long as the
# front lives (`EngineLoop.outputs`); every other call takes one briefly.
CONCURRENCY = 64


def coordinator_actor(**options: Any) -> Any:
    """The coordinator as a Ray actor class with its options (a name, a lifetime, where
    it runs): the one way `Engine.start` and `serve` make one."""
    return ray.remote(Coordinator).options(max_concurrency=CONCURRENCY, num_cpus=0, **options)


class Coordinator(EngineLoop):
    def __init__(self, config: EngineConfig, owner: Any = None) -> None:
        """Places the shards, loads them (sizing their KV cache, `config`'s fields say
        how) and starts the engine loop. `owner`: the actor this engine serves (a Ray
        Data stage's), whose end ends it (`_outlive`)."""
        self.engine_config = config
        shards, device, dtype = config.shards, config.device, config.dtype
        path = resolve_model(config.model)  # writes a preset's built-in checkpoint once, here
        self.model_path = str(path)
        self.config = read_config(path)  # no torch here: only the shards load tensors
        expert_ranges(self.config.num_experts, shards)  # too many shards: said before any starts
        self.shards = shards
        sizes = {
            "bytes_per_value": {"float32": 4, "bfloat16": 2}[dtype],
            "block_size": config.block_size,
            "max_seqs": config.max_seqs,
            "max_chunk": config.token_budget,
        }
        if config.speculative == "eagle3":  # the draft's keys sit beside the target's
            draft = check_draft(config, self.config)
            sizes["draft_bytes_per_token"] = draft.kv_bytes_per_token(sizes["bytes_per_value"])
        # GPU shards read their free memory after a warm-up (and check an explicit budget
        # against it); CPU shards take a fixed budget unless a utilization is asked for
        measured = device == "cuda" or config.gpu_memory_utilization is not None
        budget = config.kv_budget_bytes
        if budget is None:
            budget = (PROVISIONAL_KV_MB if measured else DEFAULT_KV_BUDGET_MB) * 2**20
        self.layout = KVLayout.from_budget(self.config, budget, **sizes)
        bundle = config.shard_bundle()
        gpus = bundle.get("GPU", 0)
        self.pg = placement_group([bundle] * shards, strategy="PACK")
        try:
            ray.get(self.pg.ready(), timeout=config.placement_timeout)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            raise RuntimeError(
                f"could not place {shards} shards of {bundle} within "
                f"{config.placement_timeout:.0f} s; "
                f"the cluster has {ray.available_resources()} available"
            ) from None
        self._device, self._dtype = device, dtype
        self._load_options = {
            "kernels": config.kernels,
            "decode_graphs": config.decode_graphs,
            "null_model": config.null_model,
        }
        loras = {n: str(Path(p).resolve()) for n, p in config.loras.items()}
        if config.lora_on:
            self._load_options |= {
                "max_loras": config.max_loras,
                "max_lora_rank": config.max_lora_rank,
            }
        if config.speculative == "eagle3":
            self._load_options |= {
                "draft_model": str(Path(config.draft_model).resolve()),  # type: ignore[arg-type]
                "num_draft_tokens": config.num_draft_tokens,
            }
        self._threads = config.threads_per_shard
        self._env = config.env
        self._shard_options = {
            "num_cpus": config.cpus_per_shard,
            "num_gpus": gpus,
            # the collectives' settings (NCCL_SOCKET_IFNAME, ...) and the user's --env,
            # from the process that started the engine (`EngineConfig.forwarding_env`)
            "runtime_env": {"env_vars": dict(config.env)},
        }
        self.recovery_timeout = config.recovery_timeout
        self.collective_timeout = config.collective_timeout
        self._generation = 0  # of the process group formed last
        self.workers = [self._spawn(r) for r in range(shards)]
        self._form_group(self.workers, loaded=False)
        # every shard loads at once: with decode graphs, their capture warm-ups run the
        # expert exchange together
        loaded = ray.get(
            [
                w.load.remote(
                    self.model_path, dtype, self.layout, capture=not measured, **self._load_options
                )
                for w in self.workers
            ]
        )
        self.expert_ranges = [experts for experts, _ in loaded]
        # the slowest shard's capture of every decode bucket (0 without graphs)
        self.graph_capture_s = max(seconds for _, seconds in loaded)
        self.kv_source = "budget" if config.kv_budget_mb is not None else "default"
        if measured:  # the graphs hold the KV cache: captured once it has its size
            readings = ray.get([w.measure_memory.remote() for w in self.workers])
            self.layout = size_kv(
                self.config,
                readings,
                utilization=config.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION,
                budget_bytes=config.kv_budget_bytes,
                **sizes,
            )
            ray.get([w.resize_kv.remote(self.layout) for w in self.workers])
            self.graph_capture_s = max(ray.get([w.capture_graphs.remote() for w in self.workers]))
            if config.kv_budget_mb is None:
                self.kv_source = "memory"
        if shards > 1:  # loaded: the steps' collectives wait no longer than this
            ray.get(
                [w.set_collective_timeout.remote(self.collective_timeout) for w in self.workers]
            )
        # Off by default on CPU shards: the channels' readers poll, and there every core
        # already runs the shards' torch threads (2 cores, batch 64: 86 -> 120 ms a step)
        compiled_steps = config.compiled_steps
        self._compiled_steps = device == "cuda" if compiled_steps is None else compiled_steps
        self._dag = self._compile_steps()
        self._outstanding: list[list[Any]] = []  # refs of the steps sent, not yet in
        self._step_index = 0  # of the next step sent as actor calls (`ShardWorker.step`)
        self._park_lock = threading.Lock()
        self._idle = False
        self._wake = threading.Event()
        self._wake.set()  # not parked
        drafter, num_draft_tokens = config.drafter()  # speculative decoding, if asked
        core = EngineCore(
            self.config,
            shards,
            self.layout,
            launch_step=self._launch_step,
            # Off by default on CPU shards: there the coordinator's planning competes for
            # the cores with the shards' own threads (2 cores, batch 1: 40 -> 30 tokens/s
            # with it on; RESULTS.md). A GPU shard's step leaves its host cores free.
            overlap=device == "cuda" if config.overlap is None else config.overlap,
            token_budget=config.token_budget,
            max_seqs=config.max_seqs,
            max_prompt_tokens=config.max_prompt_tokens,
            prefix_cache=config.prefix_cache,
            cache_salt=f"{self.model_path}:{dtype}",
            drafter=drafter,
            num_draft_tokens=num_draft_tokens,
            loras=loras,
            max_loras=config.max_loras if config.lora_on else 0,
            max_lora_rank=config.max_lora_rank,
            lora_updates=config.enable_lora,
        )
        self.recoveries: list[dict[str, Any]] = []
        super().__init__(
            self.model_path,
            self.config,
            self.layout,
            core,
            expert_load=self._expert_load_of_shards,
            harmony_frame=config.harmony_frame,
        )
        if owner is not None:  # started whole: a shutdown finds everything it ends
            threading.Thread(target=self._outlive, args=(owner,), daemon=True).start()

    def _spawn(self, rank: int):
        """A shard actor in its placement-group bundle (rescheduled by Ray onto another
        node if its node is gone)."""
        return (
            # "abort" reaches a shard whose other threads wait on its shard thread
            ray.remote(concurrency_groups={"steps": STEP_THREADS, "abort": 1})(ShardWorker)
            .options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, rank),
                **self._shard_options,
            )
            .remote(rank, self.shards, self._device, self._threads, tuple(self._env))
        )

    def _form_group(self, workers: list, loaded: bool = True) -> None:
        """A new process group of the shards, numbered (an abort names the group it
        ends). loaded: the shards are up and have their weights: the rendezvous takes
        REFORM_RENDEZVOUS_S at most (a peer lost meanwhile fails it, not hangs it) and
        the steps' collective timeout holds at once."""
        if len(workers) > 1:
            self._generation += 1
            host, port = ray.get(workers[0].address.remote(), timeout=30)
            options = {}
            if loaded:
                options = {
                    "timeout_s": REFORM_RENDEZVOUS_S,
                    "collective_timeout_s": self.collective_timeout,
                }
            ray.get(
                [
                    w.init_process_group.remote(host, port, self._generation, **options)
                    for w in workers
                ],
                timeout=REFORM_RENDEZVOUS_S + 30 if loaded else None,
            )
        self._grouped = True

    def _leave_group(self) -> None:
        """While idle, gloo shards leave their process group (its transport thread would
        keep each at ~0.4% of a core); the next step forms it again. NCCL's stays: the
        decode CUDA graphs hold its communicator."""
        if len(self.workers) > 1 and self._device == "cpu":
            with contextlib.suppress(Exception):  # a lost shard: the next step finds it
                ray.get([w.leave_group.remote() for w in self.workers], timeout=30)
            self._grouped = False

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

    # -- idle ---------------------------------------------------------------------------
    # An idle Ray actor still wakes a hundred times a second (its main thread's signal
    # check, about 1% of a core here), and a compiled graph's shards poll its channels
    # (a core each), and gloo's transport thread wakes too. With no work for IDLE_AFTER_S
    # the graph goes, gloo shards leave their process group, and each shard is parked in a
    # blocking `ray.get` on a call of ours that returns when work comes (or when `status`
    # needs the shards). The first step after pays for it: the shards' wake-up (a few ms),
    # forming the group again and, with compiled steps, building the graph again.
    def went_idle(self) -> None:
        if self._dag is not None:
            self._teardown_steps()
        self._leave_group()
        with self._park_lock:
            self._idle = True
            self._park()

    def woke(self) -> None:
        with self._park_lock:
            self._idle = False
            self._unpark()

    def until_woken(self) -> None:
        """Returns when the shards parked on it may go on (called on ourselves)."""
        self._wake.wait()

    def _park(self) -> None:
        if not self._wake.is_set():
            return  # parked already
        self._wake = threading.Event()
        woken = ray.get_runtime_context().current_actor.until_woken.remote()
        for w in self.workers:
            w.park.remote([woken])

    def _unpark(self) -> None:
        self._wake.set()

    def _ask_shards(self, method: str) -> list[Any]:
        """Every shard's answer to `method` (parked shards are woken, and parked again
        after if the engine is still idle)."""
        with self._park_lock:
            self._unpark()
        try:
            return ray.get([getattr(w, method).remote() for w in self.workers], timeout=30)
        finally:
            with self._park_lock:
                if self._idle:
                    self._park()

    def _teardown_steps(self) -> None:
        if self._dag is not None:
            with contextlib.suppress(Exception):  # a lost shard cannot take part
                self._dag.teardown()
            self._dag = None

    def _launch_step(self, plans: list[StepPlan]) -> Callable[[], list[StepResult]]:
        """Sends a step to every shard (an actor call each, or the compiled graph, which
        takes the next step while one runs) -> a function that waits for its results.
        A lost shard fails it: the shards are replaced and ShardsRestarted raised."""
        try:
            if not self._grouped:  # after an idle spell
                # a shard lost meanwhile fails here, not after the others' rendezvous times out
                ray.get([w.ping.remote() for w in self.workers])
                self._form_group(self.workers)
            if self._dag is None and self._compiled_steps:
                self._dag = self._compile_steps()
            if self._dag is not None:
                refs = [self._dag.execute(*plans)]
            else:
                # received by each shard while the step before still runs there
                index, self._step_index = self._step_index, self._step_index + 1
                refs = [
                    w.step.options(concurrency_group="steps").remote(p, index)
                    for w, p in zip(self.workers, plans, strict=True)
                ]
        except SHARD_LOST as exc:
            self._restart(exc)
        self._outstanding.append(refs)

        def results() -> list[StepResult]:
            try:
                if self._dag is not None:
                    # the compiled graph's own read timeout (10 s) is shorter than a long
                    # prefill or a first CUDA-graph capture; a lost shard fails it at once
                    return ray.get(refs[0], timeout=STEP_TIMEOUT_S)
                return ray.get(refs)
            except SHARD_LOST as exc:
                self._restart(exc)
            finally:
                if refs in self._outstanding:
                    self._outstanding.remove(refs)

        return results

    def _restart(self, cause: Exception) -> NoReturn:
        """A step failed: frees the surviving shards from it (their group is aborted),
        replaces the lost shards, and raises ShardsRestarted (every step sent is void)."""
        stuck = self._abort_group()
        self._outstanding.clear()
        self._teardown_steps()
        lost = self._recover(cause, stuck)
        self._dag = self._compile_steps()
        raise ShardsRestarted(lost) from cause

    def _abort_group(self) -> list[int]:
        """Aborts the process group on every shard at once, so that none waits in a
        collective for a lost peer (NCCL would until its timeout; so would gloo, where a
        peer's sockets stay open). -> the ranks not free of their step within
        ABORT_GRACE_S: lost, or stuck where an abort cannot reach."""
        refs = [
            w.abort_group.options(concurrency_group="abort").remote(self._generation, ABORT_GRACE_S)
            for w in self.workers
        ]
        ray.wait(refs, num_returns=len(refs), timeout=ABORT_GRACE_S + 10)
        stuck = []
        for rank, ref in enumerate(refs):
            try:
                if not ray.get(ref, timeout=0):
                    stuck.append(rank)
            except Exception:  # lost, or no answer in time
                stuck.append(rank)
        return stuck

    def _recover(self, cause: Exception, suspects: list[int] = ()) -> list[int]:
        """Replaces lost shards (same or another node), re-forms the process group, and
        reloads the replacements' weights; the survivors keep theirs and their cached
        prefixes but drop their sequences. A shard lost meanwhile (a replacement too)
        is replaced in turn. Returns the ranks replaced; raises when no replacement can
        be placed, or the group formed, within recovery_timeout."""
        began = time.monotonic()
        deadline = began + self.recovery_timeout
        replaced: list[int] = []
        unloaded: set[int] = set()
        lost = sorted(set(suspects) | set(self._unreachable(range(len(self.workers)))))
        print(f"coordinator: shard(s) {lost} lost ({type(cause).__name__}); recovering", flush=True)
        while True:
            for rank in lost:
                with contextlib.suppress(Exception):
                    ray.kill(self.workers[rank])
                self.workers[rank] = self._spawn(rank)
                replaced.append(rank)
                unloaded.add(rank)
            try:
                self._await_placed(lost, deadline)
                self._form_group(self.workers)
                ray.get(
                    [
                        self.workers[r].load.remote(
                            self.model_path,
                            self._dtype,
                            self.layout,
                            capture=False,
                            **self._load_options,
                        )
                        for r in sorted(unloaded)
                    ]
                )
                unloaded.clear()
                if self._device == "cuda":  # graphs hold the old group's communicator
                    ray.get([w.capture_graphs.remote() for w in self.workers])
                ray.get([w.reset_kv.remote(self._step_index) for w in self.workers])
                break
            except (*SHARD_LOST, ray.exceptions.GetTimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the shards' process group could not be formed again within "
                        f"{self.recovery_timeout:.0f} s ({exc!r}); the engine is unhealthy"
                    ) from exc
                # a shard lost while the group formed: free the others, replace it, again
                lost = sorted(
                    set(self._abort_group()) | set(self._unreachable(range(len(self.workers))))
                )
                print(
                    f"coordinator: forming the group again failed ({type(exc).__name__}); "
                    f"replacing shard(s) {lost}",
                    flush=True,
                )
        self.recoveries.append(
            {
                "time": time.time(),
                "lost": sorted(set(replaced)),
                "cause": type(cause).__name__,
                "seconds": round(time.monotonic() - began, 2),
            }
        )
        return sorted(set(replaced))

    def _unreachable(self, ranks: range) -> list[int]:
        """The ranks whose shard does not answer (dead, or its node gone)."""
        refs = {rank: self.workers[rank].ping.remote() for rank in ranks}
        out = []
        for rank, ref in refs.items():
            try:
                ray.get(ref, timeout=10)
            except Exception:
                out.append(rank)
        return out

    def _await_placed(self, ranks: list[int], deadline: float) -> None:
        """Waits for replacement shards to start; a replacement that dies is started
        again (its node was lost before Ray knew), until the deadline."""
        for rank in ranks:
            while True:
                try:
                    ray.get(
                        self.workers[rank].ping.remote(),
                        timeout=max(1, deadline - time.monotonic()),
                    )
                    break
                except ray.exceptions.GetTimeoutError:
                    raise RuntimeError(
                        f"shard {rank} was lost and no replacement could be placed within "
                        f"{self.recovery_timeout:.0f} s (cluster resources available: "
                        f"{ray.available_resources()}); the engine is unhealthy"
                    ) from None
                except ray.exceptions.RayActorError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1)
                    self.workers[rank] = self._spawn(rank)

    def _expert_load_of_shards(self) -> list[list[int]]:
        # each shard counts the rows its own experts received: the sum is the whole load
        per_shard = self._ask_shards("expert_load")
        return [
            [sum(col) for col in zip(*rows, strict=True)] for rows in zip(*per_shard, strict=True)
        ]

    def status(self) -> dict[str, Any]:
        """Per shard: node, device, experts, memory, KV use; plus queue, load, jobs."""
        shards = self._ask_shards("describe")
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
        return {
            **super().info(),
            "expert_ranges": self.expert_ranges,
            "graph_capture_s": round(self.graph_capture_s, 2),
            "kv_capacity": self.layout.capacity() | {"sized_by": self.kv_source},
        }

    def _outlive(self, owner: Any) -> None:
        """Ends this engine once `owner` is gone, however it went. Ray would end an owned
        coordinator with its owner but keep its placement group (and the shards' CPUs
        and GPUs) reserved until the job ends: so this coordinator is detached, notices,
        and shuts down itself."""
        ping = owner.__ray_ready__.options(max_task_retries=0)  # gone is gone: no retry
        ref = ping.remote()
        while True:
            if not ray.wait([ref], timeout=OWNER_POLL_S)[0]:
                continue  # busy, not gone: the same ping still waits
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                break
            time.sleep(OWNER_POLL_S)
            ref = ping.remote()
        try:
            self.shutdown()
        finally:
            ray.kill(ray.get_runtime_context().current_actor)

    def shutdown(self) -> None:
        super().shutdown()
        with self._park_lock:
            self._idle = False
            self._unpark()
        self._teardown_steps()
        with contextlib.suppress(Exception):  # a dead shard cannot say goodbye
            ray.get([w.shutdown.remote() for w in self.workers], timeout=30)
        for w in self.workers:
            ray.kill(w)
        remove_placement_group(self.pg)


def here(node_id: str | None = None):
    """Keeps the coordinator on the caller's node (the head, usually): it must not die
    with a worker node, and its loopback HTTP server must be where the user is."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node_id = node_id or ray.get_runtime_context().get_node_id()
    return NodeAffinitySchedulingStrategy(node_id, soft=False)


def engine_names(name: str, engines: int) -> list[str]:
    """The first engine keeps the name (batch jobs and clients find it by it); the others
    are `name-1`, `name-2`, ..."""
    return [name] + [f"{name}-{i}" for i in range(1, engines)]


def check_draft(config: EngineConfig, model: ModelConfig) -> Eagle3Config:
    """The EAGLE-3 draft's config, checked against the target's."""
    draft = Eagle3Config.from_folder(config.draft_model)  # type: ignore[arg-type]
    draft.check_target(model, config.draft_model)  # type: ignore[arg-type]
    return draft


def check_engine(config: EngineConfig) -> None:
    """What a coordinator would refuse as it starts (the model, its shard count, the
    draft), refused here first with the error's own words: a coordinator starts on this
    node (`here()`), so the paths read the same; no torch."""
    model = model_config(config.model)
    expert_ranges(model.num_experts, config.shards)
    if config.speculative == "eagle3":
        check_draft(config, model)
    for name, path in config.loras.items():
        read_adapter_config(path, config.max_lora_rank, name)


def start_engines(
    names: list[str], config: EngineConfig, *, exist_ok: bool = False
) -> list[dict[str, Any]]:
    """Starts a detached coordinator for each name, all at once, and returns their info
    once every one is ready. A name already running is refused, or with `exist_ok` used
    as it is."""
    actors = []
    for name in names:
        try:
            actors.append(ray.get_actor(name, namespace=NAMESPACE))
            if not exist_ok:
                raise RuntimeError(
                    f"an engine named {name!r} is already running (gptoss-ray stop --name {name})"
                )
            continue
        except ValueError:
            pass
        remote = coordinator_actor(
            name=name, namespace=NAMESPACE, lifetime="detached", scheduling_strategy=here()
        )
        actors.append(remote.remote(config))
    try:
        return ray.get([a.info.remote() for a in actors])
    except ray.exceptions.RayActorError as exc:
        for actor in actors:
            ray.kill(actor)
        raise RuntimeError(f"the engine failed to start: {exc}") from None

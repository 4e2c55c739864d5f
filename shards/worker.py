"""The shard as a Ray actor: a thin wrapper (the cluster layer applies `ray.remote`)
that joins the process group, loads its `Shard` and runs steps."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from gptoss_ray.model.types import (
    COLLECTIVE_ENV,
    DeviceMemory,
    KVLayout,
    StepPlan,
    StepResult,
)

if TYPE_CHECKING:  # the shard's process imports them (below); the coordinator never does
    from gptoss_ray.shards.shard import Shard

# threads that receive steps sent as actor calls (a Ray concurrency group of the actor)
STEP_THREADS = 2


def _on_shard_thread(method):
    """Runs the method on the worker's shard thread, after what was sent there before."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if threading.get_ident() == self._shard_thread_id:
            return method(self, *args, **kwargs)
        return self._shard_thread.submit(method, self, *args, **kwargs).result()

    return run


class ShardWorker:
    def __init__(
        self,
        rank: int,
        world_size: int,
        device: str = "cpu",
        threads: int | None = None,
        env_names: tuple[str, ...] = (),
    ) -> None:
        """env_names: the variables the engine's config set here (`EngineConfig.env`),
        which `describe` reports as this process sees them."""
        import torch

        self.rank, self.world_size = rank, world_size
        self.env_names = tuple(env_names)
        if device == "cuda":
            # Ray sets CUDA_VISIBLE_DEVICES to the GPU of this actor's bundle
            torch.cuda.set_device(0)
            self.device = "cuda:0"
        else:
            self.device = "cpu"
            cores = os.cpu_count() or 1
            torch.set_num_threads(threads or max(1, cores // world_size))
        self.shard: Shard | None = None
        # Steps sent as actor calls are received on threads of their own (`STEP_THREADS`):
        # the next step's plan is unpickled while this one runs, instead of after. All
        # that touches the shard or its process group runs on one thread, steps in the
        # order sent (`index`): one step at a time, and one OpenMP team for torch (a
        # second team's spinning workers would take the cores from the first: 2 cores,
        # batch 16, 37 -> 90 ms a step).
        self._shard_thread = ThreadPoolExecutor(1, "shard", self._mark_shard_thread)
        self._shard_thread_id: int | None = None
        self._turn = threading.Condition()
        self._next_step = 0
        self.capture_seconds = 0.0

    def _mark_shard_thread(self) -> None:
        self._shard_thread_id = threading.get_ident()

    def address(self) -> tuple[str, int]:
        """This node's address and a free port, for the process group's rendezvous."""
        try:
            import ray

            host = ray.util.get_node_ip_address()
        except Exception:
            host = "127.0.0.1"
        with socket.socket() as s:
            s.bind((host, 0))
            return host, s.getsockname()[1]

    @_on_shard_thread
    def init_process_group(self, host: str, port: int, timeout_s: float = 120) -> None:
        """Joins (or, after a lost shard, re-joins) the shards' process group."""
        import datetime

        import torch.distributed as dist

        with contextlib.suppress(Exception):  # the old group lost a member
            self.leave_group()
        backend = "nccl" if self.device.startswith("cuda") else "gloo"
        dist.init_process_group(
            backend,
            init_method=f"tcp://{host}:{port}",
            rank=self.rank,
            world_size=self.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )

    def park(self, woken: list) -> None:
        """Blocks until the call in `woken` (the coordinator's) returns: an idle shard
        sleeps here instead of waking a hundred times a second in Ray's task loop."""
        import ray

        with contextlib.suppress(Exception):  # a coordinator gone: nothing to wait for
            ray.get(woken[0])

    def ping(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    @_on_shard_thread
    def expert_load(self) -> list[list[int]]:
        """[layer][expert]: rows this shard's experts received since it started."""
        return self.shard.expert_load.tolist() if self.shard is not None else []

    def reset_kv(self, next_step: int = 0) -> None:
        """Drops every sequence's table (after a lost shard, all are recomputed); the
        blocks' keys stay, for the prefix cache that the scheduler keeps. The next step
        sent is `next_step`: one still waiting from before is void."""
        with self._turn:
            self._next_step = next_step
            self._turn.notify_all()
        self._release_all()

    @_on_shard_thread
    def _release_all(self) -> None:
        if self.shard is not None:
            self.shard.release_all()

    @_on_shard_thread
    def describe(self) -> dict:
        import ray

        shard = self.shard
        out = {
            "rank": self.rank,
            "node": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "device": self.device,
            "pid": os.getpid(),
            "in_process_group": self.world_size > 1 and _in_group(),
            "collectives": "nccl" if self.device.startswith("cuda") else "gloo",
            # what the engine's config set in this process, and the network settings the
            # collectives read (set here or inherited)
            "env": {
                k: v
                for k, v in os.environ.items()
                if k in self.env_names or k.startswith(COLLECTIVE_ENV)
            },
            "graph_capture_s": round(self.capture_seconds, 3),
        }
        if shard is not None:
            full, sliding = shard.kv.free_blocks()
            layout = shard.kv.layout
            out |= {
                "experts": list(shard.experts),
                "sequences": len(shard.kv.tables),
                "kv_free_blocks": {"full": full, "sliding": sliding},
                "kv_total_blocks": {"full": layout.full_blocks, "sliding": layout.sliding_blocks},
                "kv_capacity": layout.capacity(),
                "kv_bytes": shard.kv.nbytes(),
                "weight_bytes": sum(
                    t.numel() * t.element_size() for t in shard.model.state_dict().values()
                )
                if shard.model is not None
                else 0,
            }
            if self.device.startswith("cuda"):
                import torch

                out["cuda_memory_allocated"] = torch.cuda.memory_allocated()
                out["gpu"] = torch.cuda.get_device_name(0)
                out["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
                out["nccl_version"] = ".".join(map(str, torch.cuda.nccl.version()))
        return out

    @_on_shard_thread
    def load(
        self,
        model: str,
        dtype: str,
        layout: KVLayout,
        kernels: bool | None = None,
        decode_graphs: bool | None = None,
        null_model: bool = False,
        capture: bool = True,
    ) -> tuple[tuple[int, int], float]:
        """-> this shard's experts and the seconds its decode graphs took to capture.
        null_model: a shard that does no model work (`NullShard`), for the benchmarks.
        capture: capture the decode graphs now (every shard loads at once); a replacement
        shard leaves it to `capture_graphs`, which all shards then call together."""
        import torch

        from gptoss_ray.router.transport import DistributedTransport, LocalTransport
        from gptoss_ray.shards.shard import NullShard, Shard

        if null_model:
            self.shard = NullShard(
                model, rank=self.rank, world_size=self.world_size, kv_layout=layout
            )
            return self.shard.experts, 0.0
        transport = DistributedTransport() if self.world_size > 1 else LocalTransport()
        self.shard = Shard(
            model,
            rank=self.rank,
            world_size=self.world_size,
            transport=transport,
            dtype=getattr(torch, dtype),
            device=self.device,
            kv_layout=layout,
            kernels=kernels,
            decode_graphs=decode_graphs,
        )
        self.capture_seconds = self.shard.capture_graphs() if capture else 0.0
        return self.shard.experts, self.capture_seconds

    @_on_shard_thread
    def measure_memory(self) -> DeviceMemory:
        """The device's memory after the largest step (`Shard.measure_memory`); every
        shard calls it at once."""
        assert self.shard is not None, "load() first"
        return self.shard.measure_memory()

    @_on_shard_thread
    def resize_kv(self, layout: KVLayout) -> None:
        assert self.shard is not None, "load() first"
        self.shard.resize_kv(layout)

    @_on_shard_thread
    def capture_graphs(self) -> float:
        """Captures the decode graphs again (after the process group was formed anew)."""
        self.capture_seconds = self.shard.capture_graphs() if self.shard is not None else 0.0
        return self.capture_seconds

    def step(self, plan: StepPlan, index: int | None = None) -> StepResult:
        """Runs a step. index: its place in the order the coordinator sent them (actor
        calls, which may arrive at once); None: steps come one at a time (the compiled
        graph's loop)."""
        assert self.shard is not None, "load() first"
        if index is None:
            return self._shard_thread.submit(self.shard.step, plan).result()
        with self._turn:
            while self._next_step != index:
                if index < self._next_step:
                    raise RuntimeError(
                        f"shard {self.rank}: step {index} is void (the shards were reset; "
                        f"the next step is {self._next_step})"
                    )
                self._turn.wait()
            running = self._shard_thread.submit(self.shard.step, plan)
            self._next_step = index + 1
            self._turn.notify_all()
        return running.result()

    @_on_shard_thread
    def leave_group(self) -> None:
        """Ends this shard's part in the process group (`init_process_group` joins again):
        on shutdown, and while the engine idles, since gloo's transport thread wakes
        hundreds of times a second even with nothing to send."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    def shutdown(self) -> None:
        self.leave_group()
        self._shard_thread.shutdown(wait=False)


def _in_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()

"""The shard as a Ray actor: a thin wrapper (the cluster layer applies `ray.remote`)
that joins the process group, loads its `Shard` and runs steps."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import subprocess
import threading
import time
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
# the rendezvous of a process group and the collectives while shards load (a first
# collective waits for the slowest shard's weights): `set_collective_timeout` then
# shortens it for the steps
GROUP_INIT_TIMEOUT_S = 600


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
        self.generation = -1  # of the process group joined last (the coordinator counts)
        self.collective_timeout_s: float | None = None  # of the steps, once loaded
        self._group_sockets: set[int] = set()  # its connections, for `fail_in_collective`
        # groups aborted here: a gloo group's threads may still wait on a vanished peer
        # until its timeout, and destroying it would wait with them
        self._aborted_groups: list = []

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
    def init_process_group(
        self,
        host: str,
        port: int,
        generation: int = 0,
        timeout_s: float = GROUP_INIT_TIMEOUT_S,
        collective_timeout_s: float | None = None,
    ) -> None:
        """Joins (or, after a lost shard, re-joins) the shards' process group; the
        coordinator numbers each group it forms (`abort_group` names the one it means).
        collective_timeout_s: at once the steps' timeout (a group re-formed around
        loaded shards), else `GROUP_INIT_TIMEOUT_S` until `set_collective_timeout`."""
        import datetime

        import torch.distributed as dist

        with contextlib.suppress(Exception):  # the old group lost a member
            self.leave_group()
        backend = "nccl" if self.device.startswith("cuda") else "gloo"
        before = _sockets()
        dist.init_process_group(
            backend,
            init_method=f"tcp://{host}:{port}",
            rank=self.rank,
            world_size=self.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        self._group_sockets = _sockets() - before
        self.generation = generation
        if self.shard is not None:
            self.shard.transport.reopen()
        if collective_timeout_s is not None:
            self.set_collective_timeout(collective_timeout_s)

    @_on_shard_thread
    def set_collective_timeout(self, seconds: float) -> None:
        """A collective that waits longer fails (NCCL: its watchdog ends the process,
        which Ray reports as a lost shard): for hangs that no death announces."""
        import datetime

        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _set_pg_timeout

        if dist.is_initialized():
            _set_pg_timeout(datetime.timedelta(seconds=seconds))
            self.collective_timeout_s = seconds

    def abort_group(self, generation: int, grace_s: float) -> bool:
        """Aborts process group `generation` (a peer was lost), from outside the shard
        thread, which may be waiting in one of its collectives: NCCL's communicator is
        aborted (its kernels end), a gloo collective stops being waited for; every
        collective after fails until the group is formed again. -> whether the shard
        thread is free within grace_s (if not, the coordinator replaces this shard)."""
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _abort_process_group

        if generation == self.generation and dist.is_initialized():
            self._aborted_groups.append(dist.group.WORLD)
            if self.shard is not None:
                self.shard.transport.abort()
            _abort_process_group()
        try:  # after the step (and any step already sent) that the abort ends
            self._shard_thread.submit(lambda: None).result(timeout=grace_s)
            return True
        except TimeoutError:
            return False

    def fail_in_collective(
        self, collectives: int, linger_s: float = 120.0, hang: bool = False
    ) -> None:
        """Tests: this shard's process ends in place of its collective `collectives`
        from now (2 per transformer block in a step: dispatch, combine), while the others
        wait in it, and the group's connections stay open for linger_s (in a process
        that holds nothing else), as when a node vanishes without a reset: the peers are not
        told by their sockets, only by the coordinator's abort. hang: the process stays,
        its shard thread stuck there for linger_s (a hang no death announces: the
        others' collective timeout ends it)."""
        assert self.shard is not None, "load() first"
        keep = set(self._group_sockets)

        def die() -> None:
            if hang:
                time.sleep(linger_s)
                return
            # a fresh process (no fork of this one, whose other libraries' fork handlers
            # could hang) holds the group's sockets, in a session of its own
            subprocess.Popen(
                ["sleep", str(linger_s)],
                pass_fds=sorted(keep),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            os._exit(1)

        self.shard.transport.fail_before(collectives, die)

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
            "collective_timeout_s": self.collective_timeout_s,
            "group_generation": self.generation,
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
        draft_model: str | None = None,
        num_draft_tokens: int = 4,
        max_loras: int = 0,
        max_lora_rank: int = 16,
    ) -> tuple[tuple[int, int], float]:
        """-> this shard's experts and the seconds its decode graphs took to capture.
        null_model: a shard that does no model work (`NullShard`), for the benchmarks.
        capture: capture the decode graphs now (every shard loads at once); a replacement
        shard leaves it to `capture_graphs`, which all shards then call together.
        draft_model: an EAGLE-3 draft beside the target; max_loras: LoRA slots (`Shard`)."""
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
            draft_model=draft_model,
            num_draft_tokens=num_draft_tokens,
            max_loras=max_loras,
            max_lora_rank=max_lora_rank,
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
            return self._shard_thread.submit(self._step, plan).result()
        with self._turn:
            while self._next_step != index:
                if index < self._next_step:
                    raise RuntimeError(
                        f"shard {self.rank}: step {index} is void (the shards were reset; "
                        f"the next step is {self._next_step})"
                    )
                self._turn.wait()
            running = self._shard_thread.submit(self._step, plan)
            self._next_step = index + 1
            self._turn.notify_all()
        return running.result()

    def _step(self, plan: StepPlan) -> StepResult:
        from gptoss_ray.router.transport import GroupAborted

        result = self.shard.step(plan)
        if self.world_size > 1 and self.shard.transport.aborted:
            # NCCL: the aborted collectives left garbage in the step's buffers
            raise GroupAborted(f"shard {self.rank}: the process group was aborted in the step")
        return result

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


def _open_fds() -> set[int]:
    try:
        return {int(fd) for fd in os.listdir("/proc/self/fd")}
    except OSError:  # no /proc: nothing to keep for a fault
        return set()


def _sockets() -> set[int]:
    """This process's open sockets (Linux; empty elsewhere)."""
    out = set()
    for fd in _open_fds():
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                out.add(fd)
    return out


def _in_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()

"""The shard as a Ray actor: a thin wrapper (the cluster layer applies `ray.remote`)
that joins the process group, loads its `Shard` and runs steps."""

from __future__ import annotations

import os
import socket

import torch

from router.transport import DistributedTransport, LocalTransport
from shards.kv_cache import KVLayout
from shards.shard import Shard, StepPlan, StepResult


class ShardWorker:
    def __init__(self, rank: int, world_size: int, device: str = "cpu") -> None:
        self.rank, self.world_size = rank, world_size
        if device == "cuda":
            # Ray sets CUDA_VISIBLE_DEVICES to the GPU of this actor's bundle
            torch.cuda.set_device(0)
            self.device = "cuda:0"
        else:
            self.device = "cpu"
            cores = os.cpu_count() or 1
            torch.set_num_threads(max(1, cores // world_size))
        self.shard: Shard | None = None

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

    def init_process_group(self, host: str, port: int) -> None:
        import torch.distributed as dist

        backend = "nccl" if self.device.startswith("cuda") else "gloo"
        dist.init_process_group(
            backend, init_method=f"tcp://{host}:{port}", rank=self.rank,
            world_size=self.world_size,
        )  # fmt: skip

    def load(self, model: str, dtype: str, layout: KVLayout) -> tuple[int, int]:
        transport = DistributedTransport() if self.world_size > 1 else LocalTransport()
        self.shard = Shard(
            model, rank=self.rank, world_size=self.world_size, transport=transport,
            dtype=getattr(torch, dtype), device=self.device, kv_layout=layout,
        )  # fmt: skip
        return self.shard.experts

    def step(self, plan: StepPlan) -> StepResult:
        assert self.shard is not None, "load() first"
        return self.shard.step(plan)

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

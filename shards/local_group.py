"""An engine's shards as processes of this machine in one gloo group, driven over pipes:
the shards without Ray, for the expert exchange's tests and `gptoss-ray bench exchange`.

A step's plans go to every shard at once, as the coordinator sends them, and each shard
can count what a step asks of the host (`model.op_counter`): its host reads and its
collectives, per transformer block."""

from __future__ import annotations

import contextlib
import datetime
import os
import secrets
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from multiprocessing.connection import Client, Listener
from typing import Any

from gptoss_ray.model.model_folder import resolve_model
from gptoss_ray.model.op_counter import StepOps
from gptoss_ray.model.types import StepPlan, StepResult

# a shard that fails inside a collective leaves the others waiting there: this long
GROUP_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard_main(conn, rank: int, world: int, port: int, model: str, threads: int, options) -> None:
    """A shard process: joins the group, loads its shard, then runs what it is sent."""
    try:
        import torch
        import torch.distributed as dist

        from gptoss_ray.model.op_counter import OpCounter
        from gptoss_ray.router.transport import DistributedTransport, LocalTransport
        from gptoss_ray.shards.shard import Shard

        torch.set_num_threads(threads)
        if world > 1:
            dist.init_process_group(
                "gloo",
                init_method=f"tcp://127.0.0.1:{port}",
                rank=rank,
                world_size=world,
                timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S),
            )
        transport = DistributedTransport() if world > 1 else LocalTransport()
        shard = Shard(model, rank=rank, world_size=world, transport=transport, **options)
        counter = OpCounter(shard.model)
        conn.send(("ok", shard.experts))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        op, arg = conn.recv()
        if op == "stop":
            break
        try:
            if op == "step":
                plan, count = arg
                if count:
                    with counter.step():
                        result = shard.step(plan)
                else:
                    result = shard.step(plan)
                conn.send(("ok", result))
            elif op == "counted":
                conn.send(("ok", counter.steps))
            else:
                conn.send(("error", f"unknown request {op!r}"))
        except Exception:
            conn.send(("error", traceback.format_exc()))
    if world > 1:
        dist.destroy_process_group()


class LocalShardGroup:
    """`world_size` shards of `model`, each a process with `threads` torch threads;
    `shard_options` go to each `Shard` (dtype, kv_layout, exchange, kernels, ...). The
    processes start as `python -m` of this module, so a caller's own script is never
    imported again in them."""

    def __init__(self, model: str, world_size: int, *, threads: int = 1, **shard_options) -> None:
        path = str(resolve_model(model))  # a preset's checkpoint written once, here
        port = _free_port()
        self.world_size = world_size
        self._conns: list = []
        self._procs: list[subprocess.Popen] = []
        authkey = secrets.token_bytes(16)
        with Listener(("127.0.0.1", 0), authkey=authkey) as listener:
            host, listen_port = listener.address
            for _ in range(world_size):
                self._procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", __name__, f"{host}:{listen_port}"],
                        stdin=subprocess.PIPE,
                        env=os.environ.copy(),
                    )
                )
                self._procs[-1].stdin.write(authkey)  # type: ignore[union-attr]
                self._procs[-1].stdin.close()  # type: ignore[union-attr]
            try:
                for rank in range(world_size):
                    conn = listener.accept()
                    conn.send((rank, world_size, port, path, threads, shard_options))
                    self._conns.append(conn)
                self.experts: list[tuple[int, int]] = self._answers()
            except BaseException:
                self.close()
                raise

    def _answers(self) -> list[Any]:
        out, errors = [], []
        for rank, conn in enumerate(self._conns):
            try:
                status, value = conn.recv()
            except EOFError:
                status, value = "error", "its process ended without answering"
            if status == "error":
                errors.append(f"shard {rank}: {value}")
            out.append(value)
        if errors:
            raise RuntimeError("\n".join(errors))
        return out

    def launch(self, plans: list[StepPlan], count: bool = False) -> Callable[[], list[StepResult]]:
        """Sends one step's plans, one per shard -> a function that waits for their
        results (in the order sent, with earlier steps' first). count: each shard counts
        this step's host reads and collectives."""
        for conn, plan in zip(self._conns, plans, strict=True):
            conn.send(("step", (plan, count)))
        return self._answers

    def counted(self) -> list[list[StepOps]]:
        """[shard][counted step]: what each counted step asked of each shard's host."""
        for conn in self._conns:
            conn.send(("counted", None))
        return self._answers()

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(Exception):
                conn.send(("stop", None))
        for proc in self._procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> LocalShardGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":  # a shard process of a LocalShardGroup
    host, _, listen_port = sys.argv[1].rpartition(":")
    with Client((host, int(listen_port)), authkey=sys.stdin.buffer.read()) as parent:
        _shard_main(parent, *parent.recv())

"""The all-to-all exchange between shards, behind a small interface: in-process for one
shard, torch.distributed for several (gloo on CPU, NCCL on GPU).

`all_to_all` swaps equal, fixed-size parts of one buffer: one collective whose sizes the
host knows without asking the device, so it waits for nothing and a CUDA graph can hold
it. `exchange_counts` and `exchange` move routing-sized parts (the pair exchange, kept to
compare with): the host must first learn the counts. On gloo the list form of all_to_all
fails for uneven shapes, so those rows travel with `all_to_all_single` and split sizes."""

from __future__ import annotations

from typing import Protocol

import torch


class Transport(Protocol):
    rank: int
    world_size: int

    def all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        """send [W * n, ...]: part d (rows d*n .. d*n+n-1) for shard d -> the parts sent
        here, [W * n, ...], part s from shard s."""
        ...

    def exchange_counts(self, send_counts: list[int]) -> list[int]:
        """Each shard's send counts -> how many rows this shard receives from each."""
        ...

    def exchange(
        self, rows: torch.Tensor, send_counts: list[int], recv_counts: list[int]
    ) -> torch.Tensor:
        """rows [sum(send_counts), ...] grouped by destination -> the rows sent here,
        [sum(recv_counts), ...] grouped by source."""
        ...


class LocalTransport:
    """One shard: everything stays here."""

    rank = 0
    world_size = 1

    def all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        return send

    def exchange_counts(self, send_counts: list[int]) -> list[int]:
        return list(send_counts)

    def exchange(
        self, rows: torch.Tensor, send_counts: list[int], recv_counts: list[int]
    ) -> torch.Tensor:
        return rows


class DistributedTransport:
    """All-to-all over an initialised torch.distributed process group."""

    def __init__(self, group=None) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if (dist.get_backend(group) == "nccl")
            else torch.device("cpu")
        )

    def all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        send = send.contiguous()
        out = torch.empty_like(send)
        self._dist.all_to_all_single(out, send, group=self.group)
        return out

    def exchange_counts(self, send_counts: list[int]) -> list[int]:
        send = torch.tensor(send_counts, dtype=torch.long, device=self.device)
        recv = torch.empty_like(send)
        self._dist.all_to_all_single(recv, send, group=self.group)
        return recv.tolist()

    def exchange(
        self, rows: torch.Tensor, send_counts: list[int], recv_counts: list[int]
    ) -> torch.Tensor:
        rows = rows.contiguous()
        out = torch.empty((sum(recv_counts), *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
        self._dist.all_to_all_single(
            out,
            rows,
            output_split_sizes=recv_counts,
            input_split_sizes=send_counts,
            group=self.group,
        )
        return out

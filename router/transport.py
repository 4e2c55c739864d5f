"""The all-to-all exchange between shards, behind a small interface: in-process for one
shard, torch.distributed for several (gloo on CPU, NCCL on GPU).

`all_to_all` swaps equal, fixed-size parts of one buffer: one collective whose sizes the
host knows without asking the device, so it waits for nothing and a CUDA graph can hold
it. `exchange_counts` and `exchange` move routing-sized parts (the pair exchange, kept to
compare with): the host must first learn the counts. On gloo the list form of all_to_all
fails for uneven shapes, so those rows travel with `all_to_all_single` and split sizes.

A shard's collectives can be aborted from another thread (`DistributedTransport.abort`):
when a peer is lost, the coordinator frees the survivors that wait for it in a
collective instead of leaving them there until the group's timeout."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Protocol

import torch


class Transport(Protocol):
    rank: int
    world_size: int
    aborted: bool  # since `abort`: every collective raises GroupAborted until `reopen`

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
    aborted = False  # no group to abort

    def abort(self) -> None:
        pass

    def reopen(self) -> None:
        pass

    def all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        return send

    def exchange_counts(self, send_counts: list[int]) -> list[int]:
        return list(send_counts)

    def exchange(
        self, rows: torch.Tensor, send_counts: list[int], recv_counts: list[int]
    ) -> torch.Tensor:
        return rows


# how soon a gloo collective's wait sees an abort
ABORT_POLL = datetime.timedelta(milliseconds=100)


ABORTED = "the process group was aborted: a shard was lost"


class GroupAborted(RuntimeError):
    """The shard's process group was aborted (a peer was lost) during or before a
    collective: the step is void."""


class DistributedTransport:
    """All-to-all over an initialised torch.distributed process group (the default
    group, whichever is initialised when a collective runs: re-formed after a loss)."""

    def __init__(self, group=None) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.nccl = dist.get_backend(group) == "nccl"
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if self.nccl else torch.device("cpu")
        )
        self.aborted = False

    def abort(self) -> None:
        """Voids the collective waited for now (from another thread) and every one after,
        until `reopen`. An NCCL collective is freed by aborting its communicator
        (`torch.distributed`'s abort, which the shard calls): a gloo one, whose group
        cannot be aborted, stops being waited for within ABORT_POLL."""
        self.aborted = True

    def reopen(self) -> None:
        """Collectives run again (in the group formed anew)."""
        self.aborted = False

    def fail_before(self, collectives: int, fault: Callable[[], None]) -> None:
        """Tests: `fault()` runs in place of the collective `collectives` from now (0: the
        next), while the other shards wait in it. (A wrapper of this transport's
        collectives until then: the steps' path itself has no test hook.)"""
        run, left = self._collective, collectives

        def counted(out: torch.Tensor, send: torch.Tensor, **splits) -> None:
            nonlocal left
            if left == 0:
                del self._collective  # the class's again
                fault()
            left -= 1
            run(out, send, **splits)

        self._collective = counted  # type: ignore[method-assign]

    def _collective(self, out: torch.Tensor, send: torch.Tensor, **splits) -> None:
        if self.aborted:
            raise GroupAborted(ABORTED)
        if self.nccl:  # enqueued on the stream; an aborted communicator frees it
            self._dist.all_to_all_single(out, send, group=self.group, **splits)
            return
        # gloo: waited for in slices, between which an abort is seen (a gloo collective
        # whose peer vanished without closing its sockets waits for the group's timeout).
        # A slice's end raises and leaves the collective running; a Python callback on
        # the work's future instead costs 80 us a collective here (it needs the GIL).
        work = self._dist.all_to_all_single(out, send, group=self.group, async_op=True, **splits)
        while True:
            try:
                work.wait(ABORT_POLL)
                return
            except RuntimeError:
                if work.is_completed():  # done since, or failed: then its own error
                    work.wait()
                    return
                if self.aborted:
                    raise GroupAborted(ABORTED) from None

    def all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        send = send.contiguous()
        out = torch.empty_like(send)
        self._collective(out, send)
        return out

    def exchange_counts(self, send_counts: list[int]) -> list[int]:
        send = torch.tensor(send_counts, dtype=torch.long, device=self.device)
        recv = torch.empty_like(send)
        self._collective(recv, send)
        return recv.tolist()

    def exchange(
        self, rows: torch.Tensor, send_counts: list[int], recv_counts: list[int]
    ) -> torch.Tensor:
        rows = rows.contiguous()
        out = torch.empty((sum(recv_counts), *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
        self._collective(out, rows, output_split_sizes=recv_counts, input_split_sizes=send_counts)
        return out

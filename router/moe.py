"""Expert parallelism for the MoE layers: dispatch, the local experts, combine.

The home shard keeps the routing weights; the owners return unweighted expert outputs,
and the home multiplies and sums each token's k contributions in slot order in float32:
the same arithmetic as the single-device `MLPBlock`, whatever the number of shards."""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from gptoss_ray.model.model import ExpertSlice, combine
from gptoss_ray.router.plan import DispatchPlan
from gptoss_ray.router.transport import Transport


class StepTimer:
    """Seconds spent per phase (attention, dispatch, experts, combine, ...)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] += now - self._last
        self._last = now


def dispatch(
    h: torch.Tensor, plan: DispatchPlan, transport: Transport
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Sends each pair's row and expert id to the expert's owner. Returns the rows and
    expert ids this shard received, and the counts received from each shard."""
    recv_counts = transport.exchange_counts(plan.send_counts)
    rows = transport.exchange(h[plan.tokens], plan.send_counts, recv_counts)
    experts = transport.exchange(plan.experts, plan.send_counts, recv_counts)
    return rows, experts, recv_counts


def combine_back(
    y: torch.Tensor,
    plan: DispatchPlan,
    recv_counts: list[int],
    weights: torch.Tensor,
    transport: Transport,
) -> torch.Tensor:
    """Returns the owners' outputs to their home rows and sums each token's k weighted
    contributions in slot order, in float32 -> [T, H]."""
    back = transport.exchange(y, recv_counts, plan.send_counts)  # in send order
    t, k = weights.shape
    contributions = torch.zeros(t, k, back.shape[-1], dtype=torch.float32, device=back.device)
    contributions[plan.tokens, plan.slots] = back.float() * weights[plan.tokens, plan.slots, None]
    return combine(contributions)


class ExpertParallel:
    """The expert exchange of one shard, plugged into every MoE block of its model
    (`Transformer.distribute`): each (token, slot) pair goes to its expert's owner, the
    pairs that arrive here run on this shard's experts, and their outputs come home to be
    weighted and summed in slot order. Every shard calls it in every layer, even with no
    tokens of its own: the exchange is collective. `timer`, if set, times its phases."""

    def __init__(self, owners: torch.Tensor, transport: Transport) -> None:
        self.owners = owners  # [E] rank of each expert, on the rows' device
        self.transport = transport
        self.timer: StepTimer | None = None

    def __call__(
        self, experts: ExpertSlice, h: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        lap = self.timer.lap if self.timer is not None else _no_lap
        plan = DispatchPlan.build(expert_ids, self.owners, self.transport.world_size)
        lap("gate")
        rows, received, recv_counts = dispatch(h, plan, self.transport)
        experts.count(received)
        lap("dispatch")
        y = experts.run_grouped(rows, received)
        lap("experts")
        out = combine_back(y, plan, recv_counts, weights, self.transport)
        lap("combine")
        return out


def _no_lap(phase: str) -> None:
    pass

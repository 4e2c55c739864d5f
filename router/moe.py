"""One expert-parallel MoE layer: gate, dispatch, local experts, combine.

The home shard keeps the routing weights; the owners return unweighted expert outputs,
and the home multiplies and sums each token's k contributions in slot order in float32:
the same arithmetic as the single-device `MLPBlock`, whatever the number of shards."""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from gptoss_ray.model.model import MLPBlock, combine, count_rows
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


def expert_parallel_mlp(
    block: MLPBlock,
    x: torch.Tensor,
    owners: torch.Tensor,
    transport: Transport,
    timer: StepTimer | None = None,
    load: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [T, H] (T may be 0: every shard takes part in the exchange) -> x + MoE(x).
    `load` [E] (on the rows' device), if given, counts the rows each local expert received."""
    h = block.norm(x)
    expert_ids, weights = block.router(h)
    plan = DispatchPlan.build(expert_ids, owners, transport.world_size)
    if timer:
        timer.lap("gate")
    rows, experts, recv_counts = dispatch(h, plan, transport)
    if load is not None:
        count_rows(load, experts)
    if timer:
        timer.lap("dispatch")
    y = block.experts.run_grouped(rows, experts) if rows.shape[0] else rows
    if timer:
        timer.lap("experts")
    out = combine_back(y, plan, recv_counts, weights, transport)
    if timer:
        timer.lap("combine")
    return (x.float() + out).to(x.dtype)

"""Which shard owns which experts, and the dispatch plan of one MoE layer: every
(token, slot) pair goes to the shard that owns its expert, rows grouped by destination."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gptoss_ray.model.config import ConfigError

if TYPE_CHECKING:  # the coordinator checks shard counts here without loading torch
    import torch


def expert_ranges(num_experts: int, world_size: int) -> list[tuple[int, int]]:
    """Experts split as evenly as possible: the first `E % W` shards hold one more."""
    if world_size < 1:
        raise ConfigError(f"{world_size} shards: at least 1 is needed")
    if world_size > num_experts:
        raise ConfigError(
            f"{world_size} shards for {num_experts} experts: some would hold none (at most "
            f"{num_experts} shards for this model)"
        )
    base, extra = divmod(num_experts, world_size)
    out, lo = [], 0
    for rank in range(world_size):
        hi = lo + base + (1 if rank < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


def owner_table(ranges: list[tuple[int, int]]) -> torch.Tensor:
    """[E] long: the rank that owns each expert."""
    import torch

    owners = [rank for rank, (lo, hi) in enumerate(ranges) for _ in range(lo, hi)]
    return torch.tensor(owners, dtype=torch.long)


@dataclass
class DispatchPlan:
    """Pairs (token, slot) sorted by destination shard (stable, so within a destination
    they keep token-major order)."""

    tokens: torch.Tensor  # [N] token row of each pair, in send order
    slots: torch.Tensor  # [N] slot 0..k-1 of each pair
    experts: torch.Tensor  # [N] global expert id
    send_counts: list[int]  # [W] pairs for each destination

    @classmethod
    def build(cls, expert_ids: torch.Tensor, owners: torch.Tensor, world_size: int) -> DispatchPlan:
        """expert_ids [T, k] -> the plan."""
        import torch

        t, k = expert_ids.shape
        flat = expert_ids.reshape(-1)
        dest = owners[flat]  # owners lives on the rows' device
        order = torch.sort(dest, stable=True).indices
        counts = torch.bincount(dest, minlength=world_size).tolist()
        pairs = torch.arange(t * k, device=flat.device)[order]
        return cls(tokens=pairs // k, slots=pairs % k, experts=flat[order], send_counts=counts)

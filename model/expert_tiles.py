"""Rows grouped by expert into tiles of a fixed height, on the device: the one grouping
of the MoE layer, shared by the Triton kernels and the torch path.

The number of tiles depends on shapes only (rows, experts, tile height), never on how the
rows are routed, so a step that groups its rows this way waits for nothing and can be
graph-captured."""

from __future__ import annotations

import torch


class ExpertTiles:
    """Rows sorted by expert and cut into tiles; every tensor stays on the device."""

    def __init__(self, local_experts: torch.Tensor, num_experts: int, block_m: int) -> None:
        """local_experts [R]: each row's expert, 0..num_experts-1 (the slice's numbering),
        or num_experts for a row that no expert here takes: such rows sort last and are
        in no tile (the padding of a fixed-size exchange)."""
        rows = local_experts.shape[0]
        self.block_m = block_m
        self.order = torch.argsort(local_experts, stable=True).to(torch.int32)  # sorted -> row
        counts = torch.zeros(num_experts + 1, dtype=torch.long, device=local_experts.device)
        # index_add_, not bincount: bincount sizes its output from the data, so it waits
        counts.index_add_(0, local_experts, torch.ones_like(local_experts, dtype=counts.dtype))
        counts = counts[:num_experts]
        self.expert_end = torch.cumsum(counts, 0).to(torch.int32)  # [E], in sorted rows
        starts = self.expert_end - counts
        tiles = (counts + block_m - 1) // block_m
        tile_end = torch.cumsum(tiles, 0)
        # each expert wastes at most one partly filled tile, and a tile has a row at least
        # (single-row tiles: exactly one per row; no spare programs for 128 idle experts)
        self.num_tiles = min(rows, -(-rows // block_m) + num_experts)
        t = torch.arange(self.num_tiles, device=local_experts.device)
        expert = torch.searchsorted(tile_end, t, right=True)
        valid = expert < num_experts
        expert = expert.clamp(max=num_experts - 1)
        self.tile_row = (starts[expert] + (t - (tile_end - tiles)[expert]) * block_m).to(
            torch.int32
        )
        self.tile_expert = torch.where(valid, expert, -1).to(torch.int32)

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (source, taken), both [tiles, block_m]: the input row at each place of each
        tile, and whether that place holds one (a tile's last rows may run past its
        expert's end; an idle tile holds none). Where taken is false, source is a valid
        row index all the same, so that gathers need no mask."""
        m = self.block_m
        expert = self.tile_expert.long()
        place = self.tile_row.long()[:, None] + torch.arange(m, device=expert.device)  # sorted
        end = self.expert_end.long()[expert.clamp(min=0)]
        taken = (expert[:, None] >= 0) & (place < end[:, None])
        last = max(self.order.shape[0] - 1, 0)
        return self.order.long()[place.clamp(max=last)], taken

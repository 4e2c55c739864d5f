"""The LoRA adapters of one shard: the slot table the plan gives (`StepPlan.loras`: each
slot's adapter, by name and PEFT folder; the same on every shard, as the experts of one
shard run rows from all of them, each naming its slot), and each step's tokens' slots.
An adapter is read from its folder when the table first names it (the experts' slices
this shard holds only) and kept on the host from then on: a slot that the scheduler
gives back to it later takes it from there."""

from __future__ import annotations

from typing import Any

import torch

from gptoss_ray.model.lora import LoraAdapter, LoraSlots
from gptoss_ray.model.types import SeqWork


class ShardLoras:
    def __init__(self, shard: Any, max_loras: int, max_rank: int) -> None:
        """shard: the `Shard` whose model, experts and sequences' params these are."""
        self.shard = shard
        # by (name, folder, load count): read once, dropped when reloaded under its name
        self.host: dict[tuple[str, str, int], LoraAdapter] = {}
        self.slots: LoraSlots | None = None
        if max_loras > 0:
            self.slots = LoraSlots(
                shard.config,
                max_loras=max_loras,
                max_rank=max_rank,
                experts=shard.experts,
                dtype=shard.dtype,
                device=shard.device,
            )
            shard.model.attach_lora(self.slots)
        self._folders: list[tuple[str, str, int] | None] = [None] * max(max_loras, 0)

    def sync(self, table: list[tuple[str, str, int] | None]) -> None:
        """Makes the slots hold what the plan's table says (slot -> (name, folder, load
        count))."""
        if self.slots is None:
            if any(table):
                raise ValueError(f"shard {self.shard.rank}: no LoRA adapters are served here")
            return
        if len(table) != self.slots.max_loras:
            raise ValueError(
                f"shard {self.shard.rank}: a LoRA table of {len(table)} slots for "
                f"{self.slots.max_loras}"
            )
        for slot, entry in enumerate(table):
            if self._folders[slot] == entry:
                continue
            self._folders[slot] = entry
            if entry is None:
                self.slots.clear(slot)
                continue
            name = entry[0]
            if entry not in self.host:
                for old in [k for k in self.host if k[0] == name]:  # an earlier load's
                    del self.host[old]
                self.host[entry] = LoraAdapter.load(
                    name, entry[1], self.shard.config, experts=self.shard.experts
                )
            self.slots.put(slot, self.host[entry])

    def token_slots(self, work: list[SeqWork], lengths: list[int]) -> torch.Tensor | None:
        """Each of the step's tokens' slot (-1: the base model), by the synced table;
        None where no token has one."""
        if self.slots is None:
            return None
        names = [self.shard.params[w.seq_id].lora for w in work]
        if not any(names):
            return None
        slot_of = {name: slot for slot, name in enumerate(self.slots.names) if name}
        missing = {n for n in names if n} - slot_of.keys()
        if missing:
            raise ValueError(
                f"shard {self.shard.rank}: LoRA adapters {sorted(missing)} have no slot in "
                "the plan's table"
            )
        per_seq = torch.tensor([slot_of[n] if n else -1 for n in names], dtype=torch.long)
        return per_seq.repeat_interleave(torch.tensor(lengths)).to(self.shard.device)

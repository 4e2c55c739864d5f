"""The LoRA adapters of one shard: which are served (by name, a PEFT folder each), which
are resident in the model's slots (`model.lora.LoraSlots`), and each step's tokens'
slots. An adapter is read from its folder when a step first needs it (its experts'
slices only, as the shard holds them), kept on the host from then on, and placed in a
slot; with every slot taken, the least recently used adapter that the step does not
need leaves its slot (it stays on the host)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gptoss_ray.model.lora import LoraAdapter, LoraSlots
from gptoss_ray.model.types import SeqWork

if TYPE_CHECKING:
    from gptoss_ray.shards.shard import Shard


class ShardLoras:
    def __init__(self, shard: Shard, paths: dict[str, str], max_loras: int, max_rank: int) -> None:
        self.shard = shard
        self.paths = dict(paths)
        self.host: dict[str, LoraAdapter] = {}  # read once, kept
        self.slots: LoraSlots | None = None
        self._last_used: dict[int, int] = {}  # slot -> the step that last needed it
        self._steps = 0
        if self.paths and max_loras > 0:
            self.slots = LoraSlots(
                shard.config,
                max_loras=max_loras,
                max_rank=max_rank,
                experts=shard.experts,
                dtype=shard.dtype,
                device=shard.device,
            )
            shard.model.attach_lora(self.slots)

    def used_by(self, work: list[SeqWork]) -> bool:
        return self.slots is not None and any(self._name(w) for w in work)

    def _name(self, w: SeqWork) -> str | None:
        return self.shard.params[w.seq_id].lora

    def token_slots(self, work: list[SeqWork], lengths: list[int]) -> torch.Tensor | None:
        """Each of the step's tokens' slot (-1: the base model), its adapters made
        resident first; None where no token has one."""
        names = [self._name(w) for w in work]
        if self.slots is None or not any(names):
            if any(names):
                raise ValueError(f"shard {self.shard.rank}: no LoRA adapters are served here")
            return None
        self._steps += 1
        slot_of = self._resident({n for n in names if n})
        per_token = [
            slot_of[n] if n else -1 for n, k in zip(names, lengths, strict=True) for _ in range(k)
        ]
        return torch.tensor(per_token, dtype=torch.long).to(self.shard.device)

    def _resident(self, names: set[str]) -> dict[str, int]:
        """Places each adapter a step needs in a slot -> its slot, by name."""
        slots = self.slots
        assert slots is not None
        if len(names) > slots.max_loras:
            raise ValueError(
                f"shard {self.shard.rank}: a step with {len(names)} LoRA adapters; "
                f"{slots.max_loras} slots (the scheduler keeps to max_loras)"
            )
        where = {name: slots.names.index(name) for name in names if name in slots.names}
        for name in sorted(names - where.keys()):
            if name not in self.paths:
                raise ValueError(f"shard {self.shard.rank}: no LoRA adapter {name!r} here")
            if name not in self.host:
                self.host[name] = LoraAdapter.load(
                    name, self.paths[name], self.shard.config, experts=self.shard.experts
                )
            free = [s for s, n in enumerate(slots.names) if n is None]
            taken = set(where.values())
            slot = (
                free[0]
                if free
                else min(
                    (s for s in range(slots.max_loras) if s not in taken),
                    key=lambda s: self._last_used.get(s, -1),
                )
            )
            slots.put(slot, self.host[name])
            where[name] = slot
        for slot in where.values():
            self._last_used[slot] = self._steps
        return where

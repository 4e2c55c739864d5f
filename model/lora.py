"""LoRA adapters for gpt-oss in PEFT's layout, many resident at once.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors`, as PEFT
saves them for a gpt-oss model: LoRA on the attention projections (`target_modules`:
q_proj, k_proj, v_proj, o_proj) and on the experts' stacked parameters
(`target_parameters`: mlp.experts.gate_up_proj, mlp.experts.down_proj). A LoRA on a
weight W adds scaling * B @ A to it (scaling: alpha / r, or alpha / sqrt(r) with rsLoRA).

`LoraSlots` holds up to `max_loras` adapters on a device, each in a slot, every layer's
factors stacked across slots (ranks padded to `max_rank`, the scaling folded into B).
A step's tokens each name a slot (or none: the base model), and every LoRA product is
one masked pair of matmuls over all slots, `((x @ A.T) * mask) @ B.T`: no loop over
requests or adapters, shapes fixed by the slots alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from gptoss_ray.model.config import CheckpointError, ConfigError, ModelConfig
from gptoss_ray.model.lora_config import (
    ATTENTION_MODULES,
    CONFIG_FILE,
    EXPERT_PARAMETERS,
    WEIGHTS_FILE,
    LoraConfig,
)


@dataclass
class LayerLora:
    """One adapter's factors in one layer, in this model's orientation (y = x @ W.T), the
    scaling in B. Experts: those of the shard's slice, expert-major."""

    qkv: tuple[torch.Tensor, torch.Tensor] | None = None  # A [3r, H], B [qkv, 3r]
    out: tuple[torch.Tensor, torch.Tensor] | None = None  # A [r, q], B [H, r]
    mlp1: tuple[torch.Tensor, torch.Tensor] | None = None  # A [n, r, H], B [n, 2I, r]
    mlp2: tuple[torch.Tensor, torch.Tensor] | None = None  # A [n, r, I], B [n, H, r]


@dataclass
class LoraAdapter:
    name: str
    config: LoraConfig
    layers: list[LayerLora]

    @classmethod
    def load(
        cls,
        name: str,
        folder: str | Path,
        model: ModelConfig,
        *,
        experts: tuple[int, int] | None = None,
    ) -> LoraAdapter:
        """Reads a PEFT adapter for `model` (float32 factors), its experts' slices
        [lo, hi) only; every tensor's shape checked against the model's."""
        folder = Path(folder)
        config = LoraConfig.from_folder(folder)
        tensors = _read(folder)
        r, scale = config.r, config.scaling
        lo, hi = experts if experts is not None else (0, model.num_experts)
        c = model
        layers = []
        for n in range(c.num_hidden_layers):
            attn = f"model.layers.{n}.self_attn"
            layer = LayerLora()
            parts = {}
            for proj, out_dim in (("q_proj", c.q_dim), ("k_proj", c.kv_dim), ("v_proj", c.kv_dim)):
                parts[proj] = _pair(tensors, f"{attn}.{proj}", (r, c.hidden_size), (out_dim, r))
            if any(p is not None for p in parts.values()):
                a = torch.zeros(3 * r, c.hidden_size)
                b = torch.zeros(c.qkv_dim, 3 * r)
                row = 0
                for i, (proj, dim) in enumerate(
                    (("q_proj", c.q_dim), ("k_proj", c.kv_dim), ("v_proj", c.kv_dim))
                ):
                    if parts[proj] is not None:
                        pa, pb = parts[proj]
                        a[i * r : (i + 1) * r] = pa
                        b[row : row + dim, i * r : (i + 1) * r] = pb * scale
                    row += dim
                layer.qkv = (a, b)
            out = _pair(tensors, f"{attn}.o_proj", (r, c.q_dim), (c.hidden_size, r))
            if out is not None:
                layer.out = (out[0], out[1] * scale)
            h, i2, i1 = c.hidden_size, 2 * c.intermediate_size, c.intermediate_size
            sizes = {"gate_up_proj": ("mlp1", h, i2), "down_proj": ("mlp2", i1, h)}
            for module, param in config.expert_wrappers(f"model.layers.{n}.mlp.experts"):
                attr, fan_in, fan_out = sizes[param]
                pair = _expert_pair(tensors, module, c.num_experts, r, fan_in, fan_out)
                if pair is not None:
                    a, b = pair  # [E, r, in], [E, out, r]
                    setattr(layer, attr, (a[lo:hi].contiguous(), (b[lo:hi] * scale).contiguous()))
            layers.append(layer)
        if tensors:  # what `_take` left: names this model has no place for
            raise CheckpointError(
                f"{folder / WEIGHTS_FILE}: tensors this model has no place for: "
                f"{', '.join(sorted(tensors)[:4])}"
            )
        if not any(
            x is not None
            for layer in layers
            for x in (layer.qkv, layer.out, layer.mlp1, layer.mlp2)
        ):
            raise CheckpointError(f"{folder / WEIGHTS_FILE}: no LoRA tensor for this model")
        return cls(name, config, layers)


def _read(folder: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors by their module path ("model.layers.0.self_attn.q_proj"
    + ".lora_A.weight"), PEFT's "base_model.model." prefix taken off."""
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} (LoRA weights load from safetensors)")
    try:
        with safe_open(path, framework="pt") as f:
            return {k.removeprefix("base_model.model."): f.get_tensor(k).float() for k in f.keys()}  # noqa: SIM118
    except SafetensorError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from exc


def _take(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Takes a tensor out of `tensors` (those left at the end have no place)."""
    t = tensors.pop(name)
    if tuple(t.shape) != shape:
        raise CheckpointError(f"{name}: shape {list(t.shape)}, expected {list(shape)}")
    return t


def _pair(tensors, module: str, a_shape, b_shape) -> tuple[torch.Tensor, torch.Tensor] | None:
    a, b = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
    if a not in tensors and b not in tensors:
        return None
    for name in (a, b):
        if name not in tensors:
            raise CheckpointError(f"{name}: missing (its pair is there)")
    return _take(tensors, a, a_shape), _take(tensors, b, b_shape)


def _expert_pair(
    tensors, module: str, e: int, r: int, fan_in: int, fan_out: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """PEFT's factors of a stacked [E, in, out] parameter -> A [E, r, in], B [E, out, r]:
    it keeps them as lora_A [E * r, in] (expert-major) and lora_B [out, r * E] (rank-
    major)."""
    pair = _pair(tensors, module, (e * r, fan_in), (fan_out, r * e))
    if pair is None:
        return None
    return pair[0].reshape(e, r, fan_in), pair[1].reshape(fan_out, r, e).permute(2, 0, 1)


class LayerSlots:
    """One layer's factors of every slot, stacked: slot s owns a band of `width` rows of
    each A and the same columns of each B (zeros where its rank is smaller, or it holds
    nothing), so that one product serves every slot."""

    def __init__(
        self, c: ModelConfig, n: int, slots: int, rank: int, owner: torch.Tensor, dtype, device
    ) -> None:
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.owner = owner  # [S * R]: the slot of each rank-wide band row
        # whether any slot's adapter has expert factors (the same on every shard: their
        # slot tables are the plan's)
        self.experts_active = False

        h, i = c.hidden_size, c.intermediate_size
        self.qkv = (zeros(slots * 3 * rank, h), zeros(c.qkv_dim, slots * 3 * rank))
        self.out = (zeros(slots * rank, c.q_dim), zeros(h, slots * rank))
        self.mlp1 = (zeros(n, slots * rank, h), zeros(n, 2 * i, slots * rank))
        self.mlp2 = (zeros(n, slots * rank, i), zeros(n, h, slots * rank))


class LoraSlots:
    """Up to `max_loras` adapters resident on a device (`put`, `clear`), every layer's
    factors stacked across slots (`LayerSlots`), ranks up to `max_rank`."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        max_loras: int,
        max_rank: int,
        experts: tuple[int, int] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        lo, hi = experts if experts is not None else (0, config.num_experts)
        self.config, self.max_loras, self.max_rank = config, max_loras, max_rank
        # the slot that owns each band row: A's rows, B's columns (rank-wide bands, and
        # the attention's q, k, v bands three to a slot)
        self.owner = torch.arange(max_loras, device=device).repeat_interleave(max_rank)
        self.owner3 = torch.arange(max_loras, device=device).repeat_interleave(3 * max_rank)
        self.layers = [
            LayerSlots(config, hi - lo, max_loras, max_rank, self.owner, dtype, device)
            for _ in range(config.num_hidden_layers)
        ]
        self.names: list[str | None] = [None] * max_loras
        self.with_experts: set[int] = set()  # slots whose adapter has expert factors

    def put(self, slot: int, adapter: LoraAdapter) -> None:
        """Places an adapter in a slot (what was there goes)."""
        r, big = adapter.config.r, self.max_rank
        if r > big:
            raise ConfigError(f"adapter {adapter.name!r}: rank {r} exceeds max_lora_rank {big}")
        self.clear(slot)
        band = slice(slot * big, slot * big + r)
        for layer, lora in zip(self.layers, adapter.layers, strict=True):
            if lora.qkv is not None:
                a, b = lora.qkv  # [3r, H], [qkv, 3r]: q, k, v bands of r
                for j in range(3):
                    rows = slice(slot * 3 * big + j * big, slot * 3 * big + j * big + r)
                    layer.qkv[0][rows] = a[j * r : (j + 1) * r]
                    layer.qkv[1][:, rows] = b[:, j * r : (j + 1) * r]
            if lora.out is not None:
                layer.out[0][band], layer.out[1][:, band] = lora.out
            for kind in ("mlp1", "mlp2"):
                pair = getattr(lora, kind)
                if pair is not None:
                    stacked = getattr(layer, kind)
                    stacked[0][:, band], stacked[1][:, :, band] = pair
                    self.with_experts.add(slot)
        self.names[slot] = adapter.name
        self._mark()

    def clear(self, slot: int) -> None:
        big = self.max_rank
        band, band3 = (
            slice(slot * big, (slot + 1) * big),
            slice(slot * 3 * big, (slot + 1) * 3 * big),
        )
        for layer in self.layers:
            layer.qkv[0][band3], layer.qkv[1][:, band3] = 0, 0
            layer.out[0][band], layer.out[1][:, band] = 0, 0
            for stacked in (layer.mlp1, layer.mlp2):
                stacked[0][:, band], stacked[1][:, :, band] = 0, 0
        self.names[slot] = None
        self.with_experts.discard(slot)
        self._mark()

    def _mark(self) -> None:
        for layer in self.layers:
            layer.experts_active = bool(self.with_experts)

    def masks(self, adapters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's slot [T] (-1: the base model) -> its bands' masks, rank-wide
        [T, S * R] and for q, k, v [T, S * 3R], in the factors' dtype."""
        dtype = self.layers[0].out[0].dtype
        return band_mask(adapters, self.owner, dtype), band_mask(adapters, self.owner3, dtype)


def band_mask(slots: torch.Tensor, owner: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows' slots [...] (-1: none) -> 1 where a band row belongs to the row's slot, 0
    elsewhere [..., len(owner)]."""
    return (slots[..., None] == owner).to(dtype)


def lora_delta(
    x: torch.Tensor, pair: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    """x [T, in] -> each row's own slot's LoRA product [T, out]: ((x @ A.T) * mask) @ B.T,
    every slot in one pair of matmuls (a row's mask keeps its slot's band only)."""
    a, b = pair
    return ((x.to(a.dtype) @ a.T) * mask) @ b.T


def lora_delta_tiles(
    x: torch.Tensor,
    pair: tuple[torch.Tensor, torch.Tensor],
    experts: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """The same for tiles of rows of one expert each: x [c, h, in], experts [c] (local
    index), the rows' band masks [c, h, S * R] (`band_mask`) -> [c, h, out]."""
    a, b = pair[0][experts], pair[1][experts]  # [c, S*R, in], [c, out, S*R]
    return torch.bmm(torch.bmm(x.to(a.dtype), a.mT) * mask, b.mT)


def write_random_adapter(
    config: ModelConfig,
    folder: str | Path,
    *,
    r: int = 8,
    experts: bool = False,
    seed: int = 0,
    scale: float = 0.05,
) -> Path:
    """A random LoRA adapter in PEFT's layout for `config` (benchmarks; tests make theirs
    with PEFT itself): A and B on q, k, v and o, and with `experts` on the experts'
    gate_up_proj and down_proj."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    c, e = config, config.num_experts

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * scale).contiguous()

    tensors = {}
    for n in range(c.num_hidden_layers):
        attn = f"base_model.model.model.layers.{n}.self_attn"
        for proj, fan_in, fan_out in (
            ("q_proj", c.hidden_size, c.q_dim),
            ("k_proj", c.hidden_size, c.kv_dim),
            ("v_proj", c.hidden_size, c.kv_dim),
            ("o_proj", c.q_dim, c.hidden_size),
        ):
            tensors[f"{attn}.{proj}.lora_A.weight"] = normal(r, fan_in)
            tensors[f"{attn}.{proj}.lora_B.weight"] = normal(fan_out, r)
        if experts:
            base = f"base_model.model.model.layers.{n}.mlp.experts"
            for module, fan_in, fan_out in (
                (f"{base}.base_layer", c.hidden_size, 2 * c.intermediate_size),  # gate_up_proj
                (base, c.intermediate_size, c.hidden_size),  # down_proj
            ):
                tensors[f"{module}.lora_A.weight"] = normal(e * r, fan_in)
                tensors[f"{module}.lora_B.weight"] = normal(fan_out, r * e)
    save_file(tensors, str(folder / WEIGHTS_FILE))
    config_json = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": list(ATTENTION_MODULES),
        "target_parameters": [f"mlp.experts.{p}" for p in EXPERT_PARAMETERS] if experts else None,
        "bias": "none",
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config_json, indent=2))
    return folder

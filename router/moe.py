"""Expert parallelism for the MoE layers: dispatch, the local experts, combine.

The exchange (`TokenExchange`) moves fixed-size buffers, the shape of the step's bucket:
every shard pads its tokens to the plan's `bucket` rows B and, per MoE layer,

- dispatch: one all-to-all of [W, B, H + k]: each token once to every shard, with the
  ids of the experts of its k slots that the shard owns (-1 for the others) riding in the
  row's last k columns (their bits in the hidden dtype), so rows and routing are one
  collective;
- the owner runs the (row, slot) pairs that name its experts, grouped by expert on the
  device (`ExpertTiles`): pairs that are padding sort last and are in no tile;
- combine: one all-to-all of [W, B, k, H]: each received row's k slot outputs go back
  to its home, which takes slot j of token t from the owner of its expert and sums the
  k weighted contributions in slot order, in float32: the arithmetic of the
  single-device `MLPBlock` whatever the number of shards.

Nothing in it reads the device from the host, and its shapes depend on (W, B) only: no
counts are exchanged, a decode step can be one CUDA graph with the collectives inside,
and all shards agree on the shapes because the coordinator's plan says B.

Why this shape (DeepEP's low-latency mode and pplx-kernels have fixed buffers too, but
write only the rows routed with their own one-sided kernels; SGLang and vLLM keep
NCCL's all-to-all for the rest): with stock NCCL or gloo a fixed-size all-to-all sends
the whole buffer, so each token goes to every shard, needed or not, and the combine
carries k slots per token. That costs bandwidth at large batches and many shards (a
remote W-1 of W parts of B(H + k) + B k H values per shard and layer, against
2 B k H (W-1)/W values for the routed pairs) and buys: two collectives instead of four,
no host round trip (two per layer before), no waiting on the slowest shard's counts, and
graph capture. `gptoss-ray bench exchange` prints both paths' counts and the traffic
table for 120b (benchmarks/RESULTS.md). A bounded-capacity buffer (DeepEP's
`num_max_dispatch_tokens_per_rank` with a recompute on overflow) or device-side splits
(NVSHMEM's all_to_all_vdev) would cut the bytes; both are later work.

`PairExchange`, the path before: each (token, slot) pair to its owner in routing-sized
parts, counts first (four collectives and two host waits per layer). It stays selectable
(`Shard(exchange="pairs")`) for the benchmark's before/after until GPU figures are in."""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from gptoss_ray.model.model import ExpertSlice, combine
from gptoss_ray.router.plan import DispatchPlan
from gptoss_ray.router.transport import Transport


class StepTimer:
    """Seconds spent per phase (attention, dispatch, experts, combine, ...). On a GPU each
    lap first waits for the device, else a phase is booked the kernels queued before it:
    a wait in every layer, so a shard there times phases only when asked (`Shard`'s
    time_phases). Without phases nothing is timed inside the step (`inner` is None) and
    the step is one phase, "step"."""

    def __init__(self, device: torch.device | None = None, phases: bool = True) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.device = device
        self.phases = phases
        self._cuda = device is not None and device.type == "cuda"
        self._start = self._last = time.perf_counter()

    @property
    def inner(self) -> StepTimer | None:
        """The timer for the layers and the exchange: None when phases are not timed."""
        return self if self.phases else None

    def lap(self, phase: str) -> None:
        if not self.phases:
            return
        if self._cuda:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[phase] += now - self._last
        self._last = now

    def done(self) -> dict[str, float]:
        """The seconds by phase, once the step's results are on the host."""
        if self.phases:
            return dict(self.seconds)
        return {"step": time.perf_counter() - self._start}


def _slot_dtype(dtype: torch.dtype) -> torch.dtype:
    """The integer type whose bits an expert id takes in a row of `dtype`."""
    return {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]


def dispatch(
    h: torch.Tensor,
    expert_ids: torch.Tensor,
    owner: torch.Tensor,
    real: torch.Tensor | None,
    rows: int,
    transport: Transport,
    adapters: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """h [T, H], expert_ids and their owners [T, k] -> every shard's tokens padded to
    `rows`, as received here: their rows [W * rows, H], the expert ids of their slots
    that this shard owns [W * rows, k] (-1: another shard's, or a padding row) and, with
    `adapters` (each token's LoRA slot [T]; every shard gives them or none does), each
    received row's [W * rows], riding in one more column."""
    world = transport.world_size
    t, k = expert_ids.shape
    hidden = h.shape[1]
    extra = k + (adapters is not None)
    shards = torch.arange(world, device=h.device)[:, None, None]
    ids = torch.where(owner[None] == shards, expert_ids[None], -1)  # [W, T, k]
    if real is not None:  # a static batch's padding rows go to no expert
        ids = torch.where(real[None, :, None] > 0, ids, -1)
    send = h.new_zeros(world, rows, hidden + extra)
    send[:, :t, :hidden] = h
    slots = send[..., hidden:].view(_slot_dtype(h.dtype))
    slots.fill_(-1)
    slots[:, :t, :k] = ids
    if adapters is not None:
        slots[:, :t, k] = adapters[None]
    recv = transport.all_to_all(send.view(world * rows, hidden + extra))
    got = recv[:, hidden:].view(_slot_dtype(h.dtype)).long()
    return recv[:, :hidden], got[:, :k], got[:, k] if adapters is not None else None


def combine_home(
    y: torch.Tensor,
    owner: torch.Tensor,
    weights: torch.Tensor,
    rows: int,
    transport: Transport,
) -> torch.Tensor:
    """y [W * rows * k, H]: this shard's output for each slot of each row it received
    (unspecified where it owns none) -> home to their shards; each token takes slot j
    from its expert's owner and sums its k weighted contributions in slot order, in
    float32 -> [T, H]."""
    t, k = owner.shape
    back = transport.all_to_all(y).view(transport.world_size, rows, k, y.shape[-1])
    token = torch.arange(t, device=owner.device)[:, None]
    slot = torch.arange(k, device=owner.device)[None, :]
    got = back[owner, token, slot]  # [T, k, H]: [owner of slot j of token t, t, j]
    return combine(got.float() * weights[..., None])


class Exchange:
    """What an expert exchange of one shard knows: who owns each expert, the transport,
    the step's bucket and, if set, the timer of its phases. Plugged into every MoE block
    of its model (`Transformer.distribute`); every shard calls it in every layer, even
    with no tokens of its own: the exchange is collective."""

    def __init__(self, owners: torch.Tensor, transport: Transport) -> None:
        self.owners = owners  # [E] rank of each expert, on the rows' device
        self.transport = transport
        self.rows = 0  # tokens each shard pads to in this step (`StepPlan.bucket`)
        self.timer: StepTimer | None = None


class TokenExchange(Exchange):
    """The expert exchange in fixed-size buffers (the module's docstring), every shard
    with the same `rows`."""

    def __call__(
        self,
        experts: ExpertSlice,
        h: torch.Tensor,
        expert_ids: torch.Tensor,
        weights: torch.Tensor,
        real: torch.Tensor | None = None,
        adapters: torch.Tensor | None = None,
    ) -> torch.Tensor:
        lap = self.timer.lap if self.timer is not None else _no_lap
        t, k = expert_ids.shape
        if t > self.rows:
            raise ValueError(
                f"{t} tokens for an exchange of {self.rows} rows a shard (the step's bucket)"
            )
        owner = self.owners[expert_ids]  # [T, k]
        lap("gate")
        x, ids, slots = dispatch(h, expert_ids, owner, real, self.rows, self.transport, adapters)
        lap("dispatch")
        flat = ids.reshape(-1)
        experts.count(flat.clamp(min=0), flat >= 0)
        pairs = x[:, None, :].expand(-1, k, -1).reshape(-1, x.shape[1])
        # about a shard's share of the pairs is not padding
        lora = experts.lora_rows(slots, k)
        y = experts.run_grouped(pairs, flat, expected_rows=self.rows * k, lora=lora)
        lap("experts")
        out = combine_home(y, owner, weights, self.rows, self.transport)
        lap("combine")
        return out


# -- the pair exchange, before: routing-sized parts, counts first ----------------------
def pair_dispatch(
    h: torch.Tensor, plan: DispatchPlan, transport: Transport
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Sends each pair's row and expert id to the expert's owner. Returns the rows and
    expert ids this shard received, and the counts received from each shard."""
    recv_counts = transport.exchange_counts(plan.send_counts)
    rows = transport.exchange(h[plan.tokens], plan.send_counts, recv_counts)
    experts = transport.exchange(plan.experts, plan.send_counts, recv_counts)
    return rows, experts, recv_counts


def pair_combine(
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


class PairExchange(Exchange):
    """Each (token, slot) pair to its expert's owner, in parts sized by the routing
    (`rows` unused): counts, rows, expert ids and outputs are four collectives, and the
    host reads the counts twice a layer. Eager steps only (no static batches, no
    graphs)."""

    def __call__(
        self,
        experts: ExpertSlice,
        h: torch.Tensor,
        expert_ids: torch.Tensor,
        weights: torch.Tensor,
        real: torch.Tensor | None = None,
        adapters: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if real is not None:
            raise ValueError("the pair exchange runs eager steps only (no padding rows)")
        if experts.lora_rows(adapters, 1) is not None:
            raise ValueError("the pair exchange does not carry LoRA adapters (use 'tokens')")
        lap = self.timer.lap if self.timer is not None else _no_lap
        plan = DispatchPlan.build(expert_ids, self.owners, self.transport.world_size)
        lap("gate")
        rows, received, recv_counts = pair_dispatch(h, plan, self.transport)
        experts.count(received)
        lap("dispatch")
        y = experts.run_grouped(rows, received)
        lap("experts")
        out = pair_combine(y, plan, recv_counts, weights, self.transport)
        lap("combine")
        return out


EXCHANGES = {"tokens": TokenExchange, "pairs": PairExchange}


def _no_lap(phase: str) -> None:
    pass

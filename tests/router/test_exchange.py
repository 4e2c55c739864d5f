"""The expert exchange between shards, counted from below (`model.op_counter`: a torch
function mode and a dispatch mode in each shard process, joined by gloo): inside the
layers of a decode step nothing reads the device from the host, each MoE layer makes two
collectives, their shapes depend on the step's bucket only, and the tokens are the
single-process baseline's."""

from __future__ import annotations

import functools

import pytest
import torch

from gptoss_ray.cluster.engine.core import EngineCore
from gptoss_ray.model.model_folder import read_config, resolve_model
from gptoss_ray.model.types import KVLayout, StepPlan
from gptoss_ray.router.moe import TokenExchange, combine_home, dispatch
from gptoss_ray.router.transport import LocalTransport
from gptoss_ray.shards.local_group import LocalShardGroup
from tests.engine_cases import GREEDY, baseline, prompts
from tests.model.test_kernels import random_experts, random_routing
from tests.tiny import tiny_config

LAYOUT = KVLayout(16, 128, 128)
# (prompt, tokens to generate): 5, 40, 3, 17, 33 and 1 prompt tokens; some end early,
# so later steps run in a smaller bucket
CHOSEN = ((0, 10), (1, 10), (3, 4), (5, 3), (6, 10), (8, 2))


@functools.cache
def tiny():
    return read_config(resolve_model("gpt-oss-tiny"))


def is_decode(plans: list[StepPlan]) -> bool:
    works = [w for p in plans for w in p.work]
    return bool(works) and all(w.sample and w.size == 1 for w in works)


def expected(chosen) -> list[tuple[int, ...]]:
    return [baseline()[i][:n] for i, n in chosen]


def run_counted(world: int, chosen=CHOSEN, **options):
    """Greedy generation of the chosen (prompt, tokens) on `world` shard processes, every
    decode step counted -> (tokens per prompt, [shard][decode step] ops, the steps'
    buckets)."""
    buckets = []
    with LocalShardGroup(
        "gpt-oss-tiny", world, dtype=torch.float32, kv_layout=LAYOUT, **options
    ) as group:

        def launch(plans):
            decode = is_decode(plans)
            if decode:
                buckets.append(plans[0].bucket)
            return group.launch(plans, count=decode)

        core = EngineCore(tiny(), world, LAYOUT, launch_step=launch, overlap=False, token_budget=64)
        ids = [
            core.submit(prompts()[i], GREEDY.model_copy(update={"max_tokens": n}))
            for i, n in chosen
        ]
        core.run_until_done()
        tokens = [tuple(core.output(i).token_ids) for i in ids]
        return tokens, group.counted(), buckets


@pytest.mark.parametrize("world", [2, 3])
def test_decode_steps_exchange_fixed_buffers_without_host_reads(world):
    tokens, counted, buckets = run_counted(world)
    assert tokens == expected(CHOSEN)
    layers = tiny().num_hidden_layers
    assert len(buckets) >= 9 and len(set(buckets)) >= 2  # the batch shrank as prompts ended
    for rank, steps in enumerate(counted):
        assert len(steps) == len(buckets)
        for ops, bucket in zip(steps, buckets, strict=True):
            assert ops.host_reads_in_blocks() == 0, (rank, [b.host_reads for b in ops.blocks])
            assert ops.collectives_per_block() == [2] * layers
            for block in ops.shapes():
                # dispatch [W * B, H + k], combine [W * B * k, H]: the bucket's only
                assert block == [
                    ("c10d::alltoall_base_", [(world * bucket, 132)] * 2),
                    ("c10d::alltoall_base_", [(world * bucket * 4, 128)] * 2),
                ]
    # every shard ran the same shapes, whatever its own sequences
    assert all(s.shapes() == counted[0][i].shapes() for s_ in counted for i, s in enumerate(s_))


def test_the_pair_exchange_is_caught_reading_routing_sized_counts():
    """The path before (kept to compare with) under the same count: the counter sees its
    `bincount(...).tolist()` and the counts' `.tolist()` in every MoE layer, four
    collectives, and shapes that change with the routing between steps of one bucket,
    where the fixed-size exchange's above do not."""
    tokens, counted, buckets = run_counted(2, exchange="pairs")
    assert tokens == expected(CHOSEN)
    layers = tiny().num_hidden_layers
    for steps in counted:
        for ops in steps:
            assert [sorted(b.host_reads) for b in ops.blocks] == [
                ["aten::bincount", "tolist", "tolist"]
            ] * layers
            assert ops.collectives_per_block() == [4] * layers
    same_bucket = [i for i in range(1, len(buckets)) if buckets[i] == buckets[i - 1]]
    assert any(counted[0][i].shapes() != counted[0][i - 1].shapes() for i in same_bucket)


def test_a_shard_with_no_tokens_runs_the_same_shapes():
    """One request, two shards: every decode step's sequence lives on one shard; the other
    has nothing of its own, and takes part with the bucket's shapes all the same."""
    tokens, counted, buckets = run_counted(2, chosen=((1, 10),))
    assert tokens == expected(((1, 10),))
    assert set(buckets) == {1}
    for mine, other in zip(*counted, strict=True):
        assert mine.shapes() == other.shapes()
        assert mine.collectives_per_block() == other.collectives_per_block() == [2] * 4
        assert mine.host_reads_in_blocks() == other.host_reads_in_blocks() == 0


@pytest.mark.slow
def test_the_static_decode_step_of_two_shards_gives_the_baseline_tokens():
    """The step a CUDA graph records with the exchange inside (buffers refilled, padding
    rows routed nowhere), run eagerly on two CPU shards with the kernels interpreted."""
    chosen = ((0, 4), (1, 4), (6, 3))
    tokens, counted, _ = run_counted(2, chosen, kernels=True, decode_graphs=True)
    assert tokens == expected(chosen)
    assert all(ops.host_reads_in_blocks() == 0 for steps in counted for ops in steps)


def test_dispatch_sends_each_token_once_per_shard_with_that_shards_slots():
    """One shard standing for two (the transport's parts are what each would receive):
    slot ids ride in the rows' last columns, bit for bit, in bf16 and float32."""
    owners = torch.tensor([0, 0, 1, 1, 1, 0])
    ids = torch.tensor([[0, 2, 5, 3], [4, 3, 2, 1]])
    real = torch.tensor([1, 0])  # the second token is padding
    for dtype in (torch.bfloat16, torch.float32):
        h = torch.randn(2, 8).to(dtype)

        class TwoParts(LocalTransport):
            world_size = 2

        x, slots, _ = dispatch(h, ids, owners[ids], real, 3, TwoParts())
        assert x.shape == (6, 8) and slots.shape == (6, 4)
        assert torch.equal(x[0], h[0]) and torch.equal(x[3], h[0])  # once to each shard
        assert slots.tolist() == [
            [0, -1, 5, -1],  # part 0: shard 0's slots of token 0
            [-1, -1, -1, -1],  # token 1 is padding
            [-1, -1, -1, -1],  # the bucket's third row
            [-1, 2, -1, 3],  # part 1: shard 1's slots of token 0
            [-1, -1, -1, -1],
            [-1, -1, -1, -1],
        ]


def test_combine_takes_each_slot_from_its_owner_and_sums_in_slot_order():
    config = tiny_config()
    experts = random_experts(config, 0, config.num_experts, seed=3)
    h, ids, weights = random_routing(config, 5, seed=4)
    want = experts(h, ids, weights)
    # what two owners would send back: each fills only the slots of its own experts
    owners = (ids >= 4).long()
    y = experts.run_grouped(
        h[:, None].expand(5, 4, -1).reshape(-1, h.shape[1]), ids.reshape(-1)
    ).view(5, 4, -1)
    parts = torch.full((2, 8, 4, h.shape[1]), float("nan"))  # unowned places: garbage
    for o in (0, 1):
        parts[o, :5][owners == o] = y[owners == o]
    back = combine_home(parts.reshape(-1, h.shape[1]), owners, weights, 8, _Returns(parts))
    torch.testing.assert_close(back, want, rtol=0, atol=0)


class _Returns(LocalTransport):
    """A transport whose all-to-all hands back prepared parts (what the owners sent)."""

    world_size = 2

    def __init__(self, parts: torch.Tensor) -> None:
        self.parts = parts

    def all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        return self.parts.reshape(send.shape)


def test_more_tokens_than_the_bucket_is_refused():
    exchange = TokenExchange(torch.zeros(8, dtype=torch.long), LocalTransport())
    exchange.rows = 2
    experts = random_experts(tiny_config(), 0, 8, seed=1)
    h = torch.randn(3, 64)
    with pytest.raises(ValueError, match="3 tokens for an exchange of 2 rows"):
        exchange(experts, h, torch.zeros(3, 4, dtype=torch.long), torch.ones(3, 4) / 4)

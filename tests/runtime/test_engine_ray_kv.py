"""Ray engine with a KV budget too small for the batch: requests queue, the newest
running sequence is preempted and recomputed, and every result is still exact."""

from __future__ import annotations

import time

import pytest

from gptoss_ray.cluster.client.engine import Engine
from gptoss_ray.model.model_folder import read_config, resolve_model
from gptoss_ray.model.types import KVLayout
from tests.engine_cases import GREEDY, baseline, prompts


def test_out_of_kv_blocks_queues_and_preempts(ray_session):
    # 8 full-attention blocks (128 tokens) per shard for ten prompts of up to 110 tokens
    eng = Engine.start(
        "gpt-oss-tiny", shards=2, dtype="float32", kv_budget_mb=0.25, token_budget=32
    )
    try:
        want = KVLayout.from_budget(
            read_config(resolve_model("gpt-oss-tiny")), 2**18, bytes_per_value=4, max_chunk=32
        )
        assert eng.info()["kv_capacity"] == want.capacity() | {"sized_by": "budget"}
        start = time.monotonic()
        outs = eng.generate(prompts(), GREEDY)
        assert tuple(tuple(o.token_ids) for o in outs) == baseline()
        assert eng.stats()["preemptions"] > 0
        assert time.monotonic() - start < 120
    finally:
        eng.shutdown()


def test_prefix_cache_on_expert_parallel_shards(ray_session):
    """Three shards exchanging experts, a KV budget small enough to preempt: multi-turn
    conversations that share system prompts give the tokens they give without the cache
    (the in-process reference), and later turns reuse the earlier ones' KV."""
    from tests.engine.test_prefix_cache import GREEDY as SIX
    from tests.engine.test_prefix_cache import conversations, reference, replay

    eng = Engine.start(
        "gpt-oss-tiny", shards=3, dtype="float32", kv_budget_mb=0.25, token_budget=32
    )
    try:
        replies = replay(lambda ps: [o.token_ids for o in eng.generate(ps, SIX)], conversations())
        assert tuple(map(tuple, replies)) == reference()
        caches = eng.stats()["prefix_cache"]
        assert len(caches) == 3 and sum(c["hit_tokens"] for c in caches) > 0
    finally:
        eng.shutdown()


def test_a_memory_share_that_leaves_no_room_for_the_kv_fails_the_start_with_the_numbers(
    ray_session,
):
    """On CPU shards a utilization reads the host's memory (as a GPU shard reads its
    device's): a share smaller than what is in use leaves nothing for the KV cache."""
    with pytest.raises(RuntimeError, match=r"gpu_memory_utilization 1e-06 of shard 0's .* in use"):
        Engine.start("gpt-oss-tiny", shards=1, dtype="float32", gpu_memory_utilization=1e-6)

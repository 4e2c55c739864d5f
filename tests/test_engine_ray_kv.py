"""Ray engine with a KV budget too small for the batch: requests queue, the newest
running sequence is preempted and recomputed, and every result is still exact."""

from __future__ import annotations

import time

from gptoss_ray.cluster.engine import Engine
from tests.engine_cases import GREEDY, baseline, prompts


def test_out_of_kv_blocks_queues_and_preempts(ray_session):
    # 8 full-attention blocks (128 tokens) per shard for ten prompts of up to 110 tokens
    eng = Engine.start(
        "gpt-oss-tiny", shards=2, dtype="float32", kv_budget_mb=0.25, token_budget=32
    )
    try:
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
    from tests.test_prefix_cache import GREEDY as SIX
    from tests.test_prefix_cache import conversations, reference, replay

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

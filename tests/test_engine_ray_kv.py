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

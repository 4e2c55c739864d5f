"""A shard lost *inside* a collective, as a node that vanishes without a reset: the
other shards wait in that collective, told nothing by their sockets (the dead shard's
connections stay open), so only the coordinator's abort frees them, within seconds,
long before the group's own timeout; the group is formed again and the batch is exact."""

from __future__ import annotations

import time

import pytest

from tests.engine_cases import GREEDY, baseline, prompts

LAYERS = 4  # gpt-oss-tiny's transformer blocks: two collectives each per step


@pytest.mark.parametrize("compiled_steps", [False, True], ids=["actor-calls", "compiled-graph"])
def test_a_shard_lost_in_a_collective_is_aborted_out_of_it(ray_session, compiled_steps):
    from gptoss_ray.cluster.client.engine import Engine

    ray = ray_session
    # gloo's own timeout far beyond the test's: only the abort can free the survivors
    engine = Engine.start(
        "gpt-oss-tiny",
        shards=3,
        dtype="float32",
        token_budget=16,
        collective_timeout=900,
        compiled_steps=compiled_steps,
    )
    try:
        expected = baseline()
        workers = ray.get(engine.coordinator.__ray_call__.remote(lambda c: c.workers))
        # rank 1 ends in the combine of block 2 of the fourth step (a prefill chunk)
        ray.get(workers[1].fail_in_collective.remote(3 * 2 * LAYERS + 2 * 2 + 1, linger_s=60))
        start = time.monotonic()
        outs = engine.generate(prompts(), GREEDY)
        took = time.monotonic() - start
        assert tuple(tuple(o.token_ids) for o in outs) == expected
        recoveries = ray.get(engine.coordinator.__ray_call__.remote(lambda c: c.recoveries))
        assert [r["lost"] for r in recoveries] == [[1]], recoveries
        assert took < 45, (
            f"{took:.0f} s: the survivors waited for the dead shard's sockets to close"
        )
    finally:
        engine.shutdown()


def test_a_shard_hung_in_a_collective_is_replaced_after_the_collective_timeout(ray_session):
    """No death announces a hang: the others' collectives end at the collective timeout,
    the hung shard (its process alive, its shard thread stuck) is not freed by the abort
    and is replaced; the batch is exact."""
    from gptoss_ray.cluster.client.engine import Engine

    ray = ray_session
    engine = Engine.start(
        "gpt-oss-tiny", shards=3, dtype="float32", token_budget=16, collective_timeout=4
    )
    try:
        expected = baseline()
        workers = ray.get(engine.coordinator.__ray_call__.remote(lambda c: c.workers))
        ray.get(workers[2].fail_in_collective.remote(2 * 2 * LAYERS + 1, linger_s=600, hang=True))
        start = time.monotonic()
        outs = engine.generate(prompts(), GREEDY)
        took = time.monotonic() - start
        assert tuple(tuple(o.token_ids) for o in outs) == expected
        recoveries = ray.get(engine.coordinator.__ray_call__.remote(lambda c: c.recoveries))
        assert [r["lost"] for r in recoveries] == [[2]], recoveries
        assert took < 90, f"{took:.0f} s"
    finally:
        engine.shutdown()

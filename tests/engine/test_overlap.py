"""Overlapped steps: step N+1 is planned and sent before step N's results are in, each
shard decoding the token it drew itself. Same tokens as one step at a time (greedy and
seeded, late arrivals, stop tokens, cancels, preemption; stop strings in
tests/front/test_http_api.py, a killed shard in tests/runtime/test_faults.py, both with overlapped steps,
the default); a sequence that ends wastes one decode slot at most and nothing past its end
is emitted. And the null model: shards that do no model work, for the host loop alone."""

from __future__ import annotations

import threading
import time

import pytest

from gptoss_ray.cluster.engine.core import EngineCore
from gptoss_ray.model.sampling import step_seed
from gptoss_ray.model.types import KVLayout, SamplingParams, StepPlan
from gptoss_ray.shards.shard import NullShard, Shard
from tests.engine_cases import GREEDY, baseline, prompts, tiny_shard

SEEDED = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)


class Counted:
    """A shard's step that counts, per sequence, the tokens it drew."""

    def __init__(self, shard: Shard) -> None:
        self.shard, self.drawn = shard, {}

    def __call__(self, plans: list[StepPlan]):
        (result,) = [self.shard.step(plans[0])]
        for seq_id in result.tokens:
            self.drawn[seq_id] = self.drawn.get(seq_id, 0) + 1
        return [result]


def core_on(
    layout: KVLayout, *, overlap: bool, token_budget: int = 48
) -> tuple[EngineCore, Counted]:
    shard = tiny_shard(layout)
    counted = Counted(shard)
    core = EngineCore(shard.config, 1, layout, counted, overlap=overlap, token_budget=token_budget)
    return core, counted


def run(core: EngineCore, params: SamplingParams, late: int = 3) -> tuple[tuple[int, ...], ...]:
    """Every prompt, the last ones arriving while the first decode."""
    ps = prompts()
    ids = [core.submit(p, params) for p in ps[:late]]
    for _ in range(4):
        core.step()
    ids += [core.submit(p, params) for p in ps[late:]]
    core.run_until_done()
    return tuple(tuple(core.output(i).token_ids) for i in ids)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("full_blocks", [256, 10], ids=["roomy", "preempting"])
def test_overlapped_steps_give_the_tokens_of_one_step_at_a_time(params, full_blocks):
    layout = KVLayout(16, full_blocks, 64)
    outs = {}
    for overlap in (False, True):
        core, _ = core_on(layout, overlap=overlap, token_budget=32)
        outs[overlap] = run(core, params)
        assert core.scheduler.free_blocks(0) == (full_blocks, 64)
        if full_blocks == 10:
            assert core.stats.preemptions > 0
        assert all(s.inflight == s.pending == 0 for s in core.requests.values())
    assert outs[True] == outs[False] == baseline(params)


def test_a_stop_token_wastes_one_decode_slot_at_most_and_nothing_past_it_is_kept():
    layout = KVLayout(16, 256, 64)
    full = baseline()
    # stop at each prompt's 4th greedy token (ignore_eos off: only these ids stop)
    for overlap in (False, True):
        core, counted = core_on(layout, overlap=overlap)
        ids = []
        for p, expected in zip(prompts(), full, strict=True):
            stop = SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[expected[3]])
            ids.append(core.submit(p, stop))
        core.run_until_done()
        for rid, expected in zip(ids, full, strict=True):
            out = core.output(rid)
            end = expected.index(expected[3]) + 1  # the first time that token comes
            assert tuple(out.token_ids) == expected[:end] and out.finish_reason == "stop"
            assert counted.drawn[rid] <= end + overlap  # one slot past the stop at most
        assert core.stats.generated_tokens == sum(
            len(core.output(r).token_ids) for r in ids
        )  # the wasted draws are not counted as generated


def test_max_tokens_costs_no_wasted_slot_and_cancel_stops_at_once():
    core, counted = core_on(KVLayout(16, 256, 64), overlap=True)
    ids = [core.submit(p, GREEDY) for p in prompts()[:4]]
    core.run_until_done()
    assert all(counted.drawn[r] == GREEDY.max_tokens for r in ids)
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    rid = core.submit(prompts()[0], long)
    for _ in range(6):
        core.step()
    core.cancel(rid)
    seen = len(core.output(rid).token_ids)
    core.run_until_done()
    out = core.output(rid)
    assert out.finish_reason == "cancelled" and len(out.token_ids) == seen
    assert counted.drawn[rid] <= seen + 1


def test_the_null_model_keeps_the_plans_and_results_without_model_work():
    layout = KVLayout(16, 10, 64)
    shard = NullShard("gpt-oss-tiny", rank=0, world_size=1, kv_layout=layout)
    core = EngineCore(
        shard.config, 1, layout, lambda plans: [shard.step(plans[0])], token_budget=32
    )
    params = SamplingParams(max_tokens=6, temperature=0, seed=3, ignore_eos=True)
    ids = [core.submit(p, params) for p in prompts()]
    core.run_until_done()
    for rid in ids:
        assert core.output(rid).token_ids == [step_seed(3, n) % 100_000 for n in range(6)]
    assert core.stats.preemptions > 0  # the same block tables, short of blocks: preempted
    assert shard.free_blocks() == (10, 64) and not shard.kv.tables
    assert core.stats.seconds["null"] >= 0 and "attention" not in core.stats.seconds


def _null_plans(layout: KVLayout) -> tuple[list[StepPlan], list[dict[str, int]]]:
    """The plans of overlapped steps (decodes of tokens the shard drew a step before) and
    the tokens a null shard draws for each, in order."""
    shard = NullShard("gpt-oss-tiny", rank=0, world_size=1, kv_layout=layout)
    plans, tokens = [], []

    def step(ps: list[StepPlan]):
        plans.append(ps[0])
        result = shard.step(ps[0])
        tokens.append(result.tokens)
        return [result]

    core = EngineCore(shard.config, 1, layout, step, overlap=True, token_budget=32)
    params = SamplingParams(max_tokens=6, temperature=0, seed=3, ignore_eos=True)
    for p in prompts()[:3]:
        core.submit(p, params)
    core.run_until_done()
    assert any(w.last_drawn for p in plans for w in p.work)
    return plans, tokens


def test_a_shard_worker_runs_steps_in_the_order_sent_on_one_thread_whatever_their_arrival():
    # Steps sent as actor calls are received on threads of their own, the next while one
    # runs; they must run in the order sent (a decode of the token drawn the step before),
    # all on the worker's one shard thread (one OpenMP team).
    from concurrent.futures import ThreadPoolExecutor

    from gptoss_ray.shards.worker import ShardWorker

    layout = KVLayout(16, 64, 64)
    plans, expected = _null_plans(layout)
    worker = ShardWorker(0, 1)
    worker.load("gpt-oss-tiny", "bfloat16", layout, null_model=True)
    ran_on = []
    step = worker.shard.step
    worker.shard.step = lambda plan: ran_on.append(threading.get_ident()) or step(plan)
    order = list(range(len(plans)))[::-1]  # the last sent arrives first
    with ThreadPoolExecutor(len(plans)) as receivers:
        results = {i: receivers.submit(worker.step, plans[i], i) for i in order}
        got = [results[i].result(timeout=30).tokens for i in range(len(plans))]
    assert got == expected
    assert len(set(ran_on)) == 1 and ran_on[0] != threading.get_ident()
    worker.shutdown()


def test_a_reset_voids_the_steps_that_still_wait_for_their_turn():
    from concurrent.futures import ThreadPoolExecutor

    from gptoss_ray.shards.worker import ShardWorker

    layout = KVLayout(16, 64, 64)
    plans, expected = _null_plans(layout)
    worker = ShardWorker(0, 1)
    worker.load("gpt-oss-tiny", "bfloat16", layout, null_model=True)
    with ThreadPoolExecutor(1) as receiver:
        waiting = receiver.submit(worker.step, plans[1], 1)  # step 0 never comes
        time.sleep(0.2)
        assert not waiting.done()
        worker.reset_kv(next_step=5)  # as after a lost shard: the steps sent before are void
        with pytest.raises(RuntimeError, match="step 1 is void"):
            waiting.result(timeout=30)
    assert worker.step(plans[0], 5).tokens == expected[0]  # the sequences start again
    worker.shutdown()

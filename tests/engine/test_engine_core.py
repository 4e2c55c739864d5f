"""The engine loop on one in-process shard (no Ray): continuous batching, chunked
prefill, paged KV with preemption, bad requests failing alone."""

from __future__ import annotations

from collections import Counter

import pytest

from gptoss_ray.cluster.engine.core import EngineCore
from gptoss_ray.cluster.engine.kv_blocks import KVBlocks
from gptoss_ray.cluster.engine.messages import EngineRequest
from gptoss_ray.model.types import (
    KVLayout,
    RequestError,
    SamplingParams,
    StepResult,
    blocks_held,
)
from gptoss_ray.shards.shard import Shard
from tests.engine_cases import GREEDY, baseline, baseline_model, prompts, tiny_shard


def make_core(
    layout: KVLayout, token_budget: int = 48, kernels: bool = False
) -> tuple[EngineCore, Shard]:
    shard = tiny_shard(layout, kernels)
    core = EngineCore(
        shard.config, 1, layout, lambda plans: [shard.step(plans[0])], token_budget=token_budget
    )
    return core, shard


def test_matches_the_single_process_baseline_with_chunked_prefill():
    core, shard = make_core(KVLayout(16, 256, 256), token_budget=48)
    ids = [core.submit(p, GREEDY) for p in prompts()]
    core.run_until_done()
    assert tuple(tuple(core.output(i).token_ids) for i in ids) == baseline()
    assert shard.free_blocks() == (256, 256)  # every block came back
    assert core.scheduler.free_blocks(0) == (256, 256)  # and the scheduler has them all
    assert core.stats.steps > max(len(p) for p in prompts()) // 48  # prefill was chunked


def test_the_triton_kernels_give_the_same_tokens(monkeypatch):
    """The whole step through the MoE and paged attention kernels (the interpreter on CPU,
    float32): continuous batching with chunked prefill still matches the baseline."""
    import gptoss_ray.model.kernels.attention as attention
    import gptoss_ray.model.kernels.mxfp4_matmul as mxfp4_matmul

    launches = {"moe": 0, "attention": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            launches[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(mxfp4_matmul, "moe_mxfp4", counted("moe", mxfp4_matmul.moe_mxfp4))
    monkeypatch.setattr(
        attention, "paged_attention", counted("attention", attention.paged_attention)
    )
    core, shard = make_core(KVLayout(16, 256, 256), token_budget=24, kernels=True)
    short = GREEDY.model_copy(update={"max_tokens": 4})  # the interpreter is slow
    ids = [core.submit(p, short) for p in prompts()[:2]]  # 5 and 40 tokens (a window of 32)
    core.run_until_done()
    assert [tuple(core.output(i).token_ids) for i in ids] == [b[:4] for b in baseline()[:2]]
    layers = shard.config.num_hidden_layers
    assert launches["moe"] == launches["attention"] >= layers * short.max_tokens


def test_requests_arriving_while_others_decode():
    core, _ = make_core(KVLayout(16, 256, 256))
    ps = prompts()
    first = [core.submit(p, GREEDY) for p in ps[:4]]
    for _ in range(5):
        core.step()
    assert all(core.output(i).token_ids for i in first[:1])  # decoding is under way
    later = [core.submit(p, GREEDY) for p in ps[4:]]
    core.run_until_done()
    assert tuple(tuple(core.output(i).token_ids) for i in first + later) == baseline()


def test_running_out_of_kv_blocks_preempts_and_still_completes_correctly():
    """... and a sequence's sampling parameters reach its shard once per placement (its
    first work there; the shard keeps them until the sequence is released there), not with
    every decode: pickled into each plan they were most of a large batch's host cost."""
    layout = KVLayout(16, 10, 16)  # 160 tokens of full-attention KV for 10 prompts
    shard = tiny_shard(layout)
    plans = []

    def step(step_plans):
        plans.append(step_plans[0])
        return [shard.step(step_plans[0])]

    core = EngineCore(shard.config, 1, layout, step, token_budget=32)
    ids = [core.submit(p, GREEDY) for p in prompts()]
    core.run_until_done()
    assert tuple(tuple(core.output(i).token_ids) for i in ids) == baseline()
    assert core.stats.preemptions > 0
    assert shard.free_blocks() == (10, 16)
    sent = Counter(w.seq_id for p in plans for w in p.work if w.params is not None)
    released = Counter(seq_id for p in plans for seq_id in p.release)
    assert sent == released  # a placement each: preempted ones came back with them
    assert sum(sent.values()) < sum(len(p.work) for p in plans) / 3


def test_seeded_sampling_is_reproducible_and_matches_the_baseline():
    params = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)
    runs = []
    for budget in (16, 64):  # different batching, same tokens
        core, _ = make_core(KVLayout(16, 256, 256), token_budget=budget)
        ids = [core.submit(p, params) for p in prompts()]
        core.run_until_done()
        runs.append(tuple(tuple(core.output(i).token_ids) for i in ids))
    assert runs[0] == runs[1] == baseline(params)


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([], GREEDY, "the prompt is empty"),
        ([5, 300000], GREEDY, "token id 300000 at position 1 is outside 0..201087"),
        ([5] * 10, SamplingParams(max_tokens=131072, temperature=0), "exceed the context length"),
        ([5] * 150, GREEDY, "needs 10 KV blocks of 16 tokens; a shard has 8"),
    ],
)
def test_a_bad_request_fails_alone(prompt, params, message):
    core, _ = make_core(KVLayout(16, 8, 16), token_budget=32)
    good = core.submit(prompts()[0], GREEDY)
    with pytest.raises(RequestError, match=message):
        core.submit(prompt, params)
    core.run_until_done()
    assert tuple(core.output(good).token_ids) == baseline()[0]


def test_invalid_sampling_parameters_are_named():
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_sliding_layers_keep_only_the_window():
    window, bs = baseline_model().config.sliding_window, 16
    assert blocks_held(0, 100, bs, window) == (7, 7)  # a prefill chunk needs all its rows
    assert blocks_held(100, 1, bs, window) == (7, 3)  # decoding: the window only
    assert blocks_held(1000, 1, bs, window) == (63, 3)


def test_the_scheduler_grants_what_blocks_held_counts():
    """The scheduler's block tables: every grant holds what `blocks_held` says, the sliding
    blocks that leave the window go back to the pool, a short pool grants nothing and
    changes nothing, and a released sequence gives everything back."""
    window, bs = 32, 16
    blocks = KVBlocks(KVLayout(bs, 40, 12), window)
    length = 0
    for new in (100, 1, 1, 30, 1, 60, 1, 1):
        grant = blocks.grow("a", length, new)
        table = blocks.tables["a"]
        assert (len(table.full), len(table.sliding)) == blocks_held(length, new, bs, window)
        assert grant.sliding == table.sliding and table.sliding_first * bs <= max(
            0, length - window + 1
        )
        length += new
    assert sorted(blocks.tables["a"].full) == sorted(set(blocks.tables["a"].full))
    free = blocks.free_blocks()
    assert free == (40 - len(blocks.tables["a"].full), 12 - len(blocks.tables["a"].sliding))
    assert blocks.grow("b", 0, 40 * bs) is None  # more than the free full blocks
    assert blocks.free_blocks() == free and "b" not in blocks.tables
    b = blocks.grow("b", 0, 20)
    assert not set(b.full) & set(blocks.tables["a"].full)
    assert not set(b.sliding) & set(blocks.tables["a"].sliding)
    blocks.release("a")
    blocks.release("b")
    assert blocks.free_blocks() == (40, 12)


def test_a_long_prompt_is_chunked_around_the_other_sequences():
    """Decodes go first, a long prompt takes at most half the budget while requests wait,
    and beside decodes its chunk shrinks as its context grows: requests arriving during its
    prefill start at once and decode every step, in steps that stay short (it once took the
    whole budget, step after step, and they waited for all of it)."""
    from gptoss_ray.cluster.engine.scheduler import REFERENCE_CONTEXT, Scheduler, Sequence

    sched = Scheduler(1, KVLayout(16, 4096, 4096), None, token_budget=256)

    def seq(name: str, n: int) -> Sequence:
        params = SamplingParams(max_tokens=1000)
        return Sequence(name, list(range(1, n + 1)), params, 0, frozenset(), arrival=0)

    long = seq("long", 5000)
    sched.add(long)
    plans = sched.schedule()
    ((work,),) = [p.work for p in plans]
    assert work.size == 256  # alone, it has the whole budget
    sched.update(plans, [StepResult({}, {})])
    short = [seq(f"s{i}", 8) for i in range(3)]
    for s in short:
        sched.add(s)
    steps = 0
    while long.computed < len(long.prompt):
        plans = sched.schedule()
        chunk = {w.seq_id: w.size for w in plans[0].work}
        start = {w.seq_id: w.start for w in plans[0].work}["long"]
        # the arrivals' prompts at once, then a token each every step
        assert all(chunk[s.seq_id] == (8 if steps == 0 else 1) for s in short), chunk
        # beside decodes its chunk shrinks as its context grows (a step's cost is bounded)
        bound = 256 * REFERENCE_CONTEXT // max(REFERENCE_CONTEXT, start)
        beside = min(253, 5000 - start, bound)
        assert chunk["long"] == (128 if steps == 0 else beside)
        sched.update(plans, [StepResult({w.seq_id: 7 for w in plans[0].work if w.sample}, {})])
        steps += 1
    assert steps > 1 + -(-(5000 - 256 - 128) // 253)  # more, smaller steps


def test_batch_work_yields_to_interactive_requests():
    """Priority 1 (batch) waits behind priority 0 and is preempted first when KV blocks run
    out; every reply still equals the baseline. The interactive prompts fit the KV blocks
    together: any preemption they see would be the scheduler's choice, not a need."""
    ps, want = prompts(), baseline()
    core, _ = make_core(KVLayout(16, 10, 16), token_budget=32)
    first, last = [0, 1, 2, 3, 4, 7, 9], [5, 6, 8]
    batch = [core.submit(ps[i], GREEDY, priority=1) for i in first]
    interactive = [core.submit(ps[i], GREEDY) for i in last]
    admitted: dict[str, int] = {}  # the step that first gave each request a shard
    steps = 0
    while core.has_work():
        core.step()
        steps += 1
        for r in batch + interactive:
            if core.requests[r].home is not None or core.output(r).finished:
                admitted.setdefault(r, steps)
    got = [tuple(core.output(r).token_ids) for r in batch + interactive]
    assert got == [want[i] for i in first + last]
    assert {core.output(r).preemptions for r in interactive} == {0}
    assert sum(core.output(r).preemptions for r in batch) > 0
    # queued last, the interactive requests are admitted first
    assert max(admitted[r] for r in interactive) <= min(admitted[r] for r in batch)


def test_each_step_puts_one_batch_per_front_holding_only_its_requests():
    """Token deltas are pushed: after a step, each front's outbox gets one batch with its
    own requests' new tokens (and their ends); the tokens add up to the baseline, and a
    request is forgotten once its last delta went. A front gone cancels its requests."""
    core, _ = make_core(KVLayout(16, 256, 64), token_budget=256)
    ps = prompts()
    core.add([EngineRequest(f"a{i}", p, GREEDY) for i, p in enumerate(ps[:2])], front="A")
    core.add([EngineRequest("b0", ps[2], GREEDY)], front="B")
    puts: Counter = Counter()
    for name in "AB":
        box = core.outbox(name)
        box.put = lambda deltas, name=name, put=box.put: (puts.update([name]), put(deltas))[1]
    got: dict[str, list[int]] = {}
    ends = {}
    while core.has_work():
        core.step()
        for name in "AB":
            for d in core.outbox(name).take(0) or []:
                assert d.request_id.startswith(name.lower())  # only its own
                got[d.request_id] = got.get(d.request_id, []) + d.token_ids
                if d.finished:
                    ends[d.request_id] = d.finish_reason
    assert [got[r] for r in ("a0", "a1", "b0")] == [list(t) for t in baseline()[:3]]
    assert ends == {"a0": "length", "a1": "length", "b0": "length"}
    assert 0 < puts["A"] <= core.stats.steps and 0 < puts["B"] <= core.stats.steps
    assert not core.requests  # forgotten once their last delta went

    core.add([EngineRequest("gone", ps[0], GREEDY.model_copy(update={"max_tokens": 40}))], "C")
    core.step()
    core.close_outbox("C")  # the front's stream ended: its request stops
    assert (not core.requests and not core.has_work()) or core.scheduler.live == {}
    core.run_until_done()
    assert core.outbox("C").take(0) == []  # a new, empty outbox: nothing was sent after

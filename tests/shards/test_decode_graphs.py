"""The static decode step that CUDA graphs record: on CPU it runs eagerly (kernels under
the interpreter) and must give the baseline's tokens; on CUDA it is captured and must
give the eager step's tokens. Also the sync-free pieces it is built from."""

from __future__ import annotations

import pytest
import torch

from gptoss_ray.cluster.engine.core import EngineCore
from gptoss_ray.cluster.engine.kv_blocks import KVBlocks
from gptoss_ray.model.model import ExpertSlice
from gptoss_ray.model.sampling import Draw, draw_one, sample_rows
from gptoss_ray.model.types import KVLayout, SamplingParams, SeqWork, StepPlan, step_bucket
from gptoss_ray.router.moe import StepTimer, TokenExchange
from gptoss_ray.router.transport import LocalTransport
from gptoss_ray.shards.decode_graphs import DecodeGraphs
from gptoss_ray.shards.kv_cache import PagedKVCache
from gptoss_ray.shards.shard import Shard
from tests.engine_cases import GREEDY, baseline, baseline_model, prompts
from tests.model.test_kernels import random_experts, random_routing
from tests.tiny import place, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def make_core(device: str, dtype: torch.dtype, graphs: bool, token_budget: int = 128):
    layout = KVLayout(16, 64, 64)
    shard = Shard(
        "gpt-oss-tiny",
        rank=0,
        world_size=1,
        transport=LocalTransport(),
        dtype=dtype,
        device=device,
        kv_layout=layout,
        kernels=True,
        decode_graphs=graphs,
    )
    core = EngineCore(
        shard.config, 1, layout, lambda plans: [shard.step(plans[0])], token_budget=token_budget
    )
    return core, shard


def test_static_decode_gives_the_baseline_tokens(monkeypatch):
    """Three sequences (a padded bucket of 4) decoding across block boundaries and past
    the 32-token window; one finishes early, so later steps run in a smaller bucket."""
    core, shard = make_core("cpu", torch.float32, graphs=True)
    buckets = []
    run = shard.graphs.run
    monkeypatch.setattr(
        shard.graphs,
        "run",
        lambda seqs, tokens, rows: buckets.append(len(seqs)) or run(seqs, tokens, rows),
    )
    chosen = [0, 1, 6]  # 5, 40 and 33 prompt tokens
    short = GREEDY.model_copy(update={"max_tokens": 4})
    ids = [core.submit(prompts()[i], short if i == 6 else GREEDY) for i in chosen]
    core.run_until_done()
    want = baseline()
    assert tuple(core.output(ids[0]).token_ids) == want[0]
    assert tuple(core.output(ids[1]).token_ids) == want[1]
    assert tuple(core.output(ids[2]).token_ids) == want[6][:4]
    assert 3 in buckets and 2 in buckets  # the early finish shrank the batch
    assert shard.free_blocks() == (64, 64)
    # each token's routing counted once (prefill + decodes)
    routed = (5 + 40 + 33 + 9 + 9 + 3) * shard.config.num_hidden_layers
    assert int(shard.expert_load.sum()) == routed * shard.config.experts_per_token


def test_a_failed_capture_falls_back_to_eager_steps(monkeypatch, capsys):
    """Where a capture fails (as it might on a GPU stack we have not met), the shard
    says so once and decodes eagerly: the same tokens, nothing written twice."""
    core, shard = make_core("cpu", torch.float32, graphs=True)
    graphs = shard.graphs
    graphs.capture = True  # take the capture branch on CPU

    def broken(batch):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "_capture", broken)
    ids = [core.submit(prompts()[i], GREEDY.model_copy(update={"max_tokens": 3})) for i in (0, 3)]
    core.run_until_done()
    assert [tuple(core.output(i).token_ids) for i in ids] == [baseline()[0][:3], baseline()[3][:3]]
    assert shard.graphs is None
    out = capsys.readouterr().out
    assert out.count("capturing the decode step of bucket 2 failed") == 1
    assert "not permitted when stream is capturing" in out


def test_buckets_and_what_fits():
    model = baseline_model()
    model.use_kernels(True)
    try:
        layout = KVLayout(16, 8, 8)
        cache = PagedKVCache(model.config, layout, dtype=torch.float32, device=torch.device("cpu"))
        graphs = DecodeGraphs(model, cache, buckets=(1, 2, 4, 8))
        assert [step_bucket(n) for n in (0, 1, 2, 3, 5, 8, 250, 257, 300)] == [
            *(0, 1, 2, 4, 8, 8, 256, 320, 320)
        ]
        blocks = KVBlocks(layout, model.config.attention_window)
        seqs = [place(cache, blocks, str(i), 1) for i in range(8)]
        assert graphs.fits(seqs, 8) and not graphs.fits(seqs, 16) and not graphs.fits(seqs, 4)
        # one shard alone runs no empty step; one among several replays its bucket padded
        assert not graphs.fits([], 1) and not graphs.fits([], 0)
        graphs.exchange = TokenExchange(torch.zeros(8, dtype=torch.long), LocalTransport())
        assert graphs.fits([], 2) and not graphs.fits([], 3)
        assert graphs.buffers.max_length == 8 * 16  # the full pool's 8 blocks
        # one block past each pool's end is the padding rows' scratch
        assert cache.k[0].shape[0] == 9 and cache.scratch_block == {False: 8, True: 8}
    finally:
        model.use_kernels(False)


def test_capture_at_load_covers_every_bucket_in_order_and_the_prefill_attention(monkeypatch):
    """What a GPU shard does at load, with the capture itself recorded instead: every
    bucket, smallest first (all shards in the same order: their warm-ups run the
    exchange), each with the exchange sized to it, then the prompt chunks' attention."""
    _, shard = make_core("cpu", torch.float32, graphs=True)
    graphs = shard.graphs
    graphs.exchange = TokenExchange(torch.zeros(16, dtype=torch.long), LocalTransport())
    graphs.capture = True
    captured = []

    def record(batch):
        captured.append((batch.num_tokens, graphs.exchange.rows, int(batch.real.sum())))
        return None, None

    monkeypatch.setattr(graphs, "_capture", record)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    warmed = []
    monkeypatch.setattr(graphs, "warm_prefill_attention", lambda: warmed.append(True))
    assert shard.capture_graphs() >= 0
    assert captured == [(b, b, 0) for b in graphs.buckets]  # padding rows only
    assert warmed == [True]


def test_the_prefill_attention_warm_up_touches_no_sequence():
    _, shard = make_core("cpu", torch.float32, graphs=True)
    before = [k.clone() for k in shard.kv.k]
    shard.graphs.warm_prefill_attention()  # the interpreter runs it on CPU
    assert all(torch.equal(a, b) for a, b in zip(before, shard.kv.k, strict=True))


def test_decode_graphs_are_refused_where_they_cannot_work():
    with pytest.raises(ValueError, match="need the Triton kernels"):
        Shard(
            "gpt-oss-tiny",
            rank=0,
            world_size=1,
            transport=LocalTransport(),
            dtype=torch.float32,
            kernels=False,
            decode_graphs=True,
        )
    with pytest.raises(ValueError, match="need the fixed-size exchange between 2 shards"):
        Shard(
            "gpt-oss-tiny",
            rank=0,
            world_size=2,
            transport=LocalTransport(),
            dtype=torch.float32,
            kernels=True,
            decode_graphs=True,
            exchange="pairs",
        )


def test_the_all_local_expert_path_is_the_general_path_bit_for_bit():
    config = tiny_config()
    experts = random_experts(config, 0, config.num_experts, seed=5)
    h, ids, weights = random_routing(config, 7, seed=6)
    fast = experts(h, ids, weights)
    # the general path: the expert exchange, here with one shard that owns every expert,
    # its 7 tokens padded to a bucket of 8
    owners = torch.zeros(config.num_experts, dtype=torch.long)
    experts.exchange = exchange = TokenExchange(owners, LocalTransport())
    exchange.rows = 8
    torch.testing.assert_close(experts(h, ids, weights), fast, rtol=0, atol=0)


def test_count_rows_is_bincount():
    counter = ExpertSlice(tiny_config(), 0, 0)
    counter.load = load = torch.zeros(8, dtype=torch.long)
    experts = torch.tensor([3, 1, 3, 0, 3, 7])
    counter.count(experts)
    counter.count(experts[:2])
    assert (
        load.tolist()
        == (
            torch.bincount(experts, minlength=8) + torch.bincount(experts[:2], minlength=8)
        ).tolist()
    )


def test_batched_sampling_draws_what_each_row_draws_alone():
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(1))
    greedy = SamplingParams(temperature=0)
    hot = SamplingParams(temperature=0.8, top_p=0.9, top_k=50)
    draws = [Draw(greedy, 1, 0), Draw(hot, 11, 3), Draw(hot, 12, 0), Draw(greedy, 2, 5)]
    draws.append(Draw(hot, 11, 4))
    want = [draw_one(logits[i], d) for i, d in enumerate(draws)]
    assert sample_rows(logits, draws)[0] == want
    assert sample_rows(logits[:2], [draws[0], draws[3]])[0] == [want[0], int(logits[1].argmax())]
    with pytest.raises(ValueError, match="3 rows of logits for 2 draws"):
        sample_rows(logits[:3], draws[:2])


@pytest.mark.parametrize(
    ("device", "dtype", "tol"),
    [
        ("cpu", torch.float32, 1e-4),
        pytest.param("cuda", torch.bfloat16, 5e-2, marks=pytest.mark.gpu),
    ],
)
def test_a_static_step_computes_the_eager_steps_logits(device, dtype, tol):
    """After an eager prefill, one decode step of 3 sequences (a padded bucket of 4) from
    the graph (captured on CUDA, eager on CPU), then the same step through the eager
    path: same logits, and the eager step found the keys the static one wrote."""
    _, shard = make_core(device, dtype, graphs=True)
    ps = [prompts()[i] for i in (0, 1, 6)]
    blocks = KVBlocks(shard.kv.layout, shard.config.attention_window)  # as the scheduler's
    grants = [blocks.grow(str(i), 0, len(p)) for i, p in enumerate(ps)]
    plan = StepPlan(
        [
            SeqWork(str(i), p, 0, False, blocks=g)
            for i, (p, g) in enumerate(zip(ps, grants, strict=True))
        ]
    )
    shard.step(plan)  # prefill: several tokens each, the eager path
    caches = [place(shard.kv, blocks, str(i), 1) for i in range(3)]
    tokens = [11, 22, 33]
    with torch.inference_mode():  # as in Shard.step
        static = shard.graphs.run(caches, tokens, 4).clone()
        eager = shard._forward([[t] for t in tokens], caches, [0, 1, 2], StepTimer(), 4)
    if device == "cuda":
        assert 4 in shard.graphs.graphs  # captured and replayed
    torch.testing.assert_close(static, eager, rtol=tol, atol=tol)
    assert [c.next_position for c in caches] == [len(p) + 1 for p in ps]


@pytest.mark.gpu
def test_captured_graphs_give_the_eager_tokens():
    """bf16 on CUDA, graphs refilled and replayed over many steps and buckets: the same
    greedy tokens as the eager kernel steps (cuBLAS may pick other algorithms for a
    padded batch, so a near-tie may flip: at most 1 token in 20)."""
    runs = []
    for graphs in (False, True):
        core, shard = make_core("cuda", torch.bfloat16, graphs=graphs, token_budget=512)
        ids = [core.submit(p, GREEDY) for p in prompts()]
        core.run_until_done()
        runs.append([core.output(i).token_ids for i in ids])
        if graphs:
            assert len(shard.graphs.graphs) >= 1
    pairs = [(a, b) for x, y in zip(*runs, strict=True) for a, b in zip(x, y, strict=True)]
    assert sum(a == b for a, b in pairs) >= 0.95 * len(pairs)


def test_phase_timers_wait_for_a_gpu_and_a_shard_may_time_the_step_alone(monkeypatch):
    """On a GPU a lap first waits for the device (else a phase is booked the kernels
    queued before it); a shard that does not time phases (a GPU's default) reports one
    phase, "step", and passes no timer to the layers."""
    from gptoss_ray.cluster.engine.core import EngineCore
    from tests.engine_cases import GREEDY, prompts, tiny_shard

    waits = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waits.append(device))
    gpu = torch.device("cuda", 0)
    timer = StepTimer(gpu)
    timer.lap("attention"), timer.lap("experts")
    assert waits == [gpu, gpu] and set(timer.done()) == {"attention", "experts"}
    assert StepTimer(gpu, phases=False).inner is None

    for phases, want in [(True, {"attention", "experts", "sampling"}), (False, {"step"})]:
        shard = tiny_shard(KVLayout(16, 64, 64))
        shard.time_phases = phases
        seconds = []

        def run(plans, shard=shard, seconds=seconds):
            result = shard.step(plans[0])
            seconds.append(set(result.seconds))
            return [result]

        core = EngineCore(shard.config, 1, shard.kv.layout, run)
        core.submit(prompts()[0], GREEDY.model_copy(update={"max_tokens": 2}))
        core.run_until_done()
        assert want <= set().union(*seconds)
        assert phases or all(s == {"step"} for s in seconds)

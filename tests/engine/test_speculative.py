"""Speculative decoding: draft tokens verified in the step. The reply is the one without
drafts, token for token (greedy, and seeded sampling too: the target draws each token
from its own seeded numbers and a draft is kept only where it equals that draw), on 1, 2
and 3 shards, with preemption, prefix hits, n > 1, stop ids, penalties, logprobs and a
grammar (whose requests are not drafted); a draft of the target's own continuation is
taken whole and cuts the steps as k + 1 predicts; a sampled reply's tokens follow the
target's distribution (a vocabulary of 16, a chi-square test)."""

from __future__ import annotations

import math

import pytest
import torch

from gptoss_ray.cluster.engine.core import EngineCore
from gptoss_ray.cluster.engine.drafts import NgramDrafter
from gptoss_ray.model.grammar import reply_grammar
from gptoss_ray.model.types import KVLayout, SamplingParams
from tests.engine_cases import prompts, tiny_shard


class Scripted:
    """A drafter that knows each choice's reply (from a run without drafts): "self"
    proposes it, "half" its first half of k then wrong tokens, "wrong" only wrong ones."""

    def __init__(self, replies: dict[tuple[str, int], list[int]], mode: str) -> None:
        self.replies, self.mode = replies, mode

    def propose(self, seq, k: int) -> list[int]:
        reply = self.replies[(seq.request_id, seq.choice)]
        right = reply[len(seq.output) : len(seq.output) + k]
        keep = {"self": len(right), "half": (k + 1) // 2, "wrong": 0}[self.mode]
        return right[:keep] + [(t + 1) % 200_000 for t in right[keep:]]

    def forget(self, seq_id: str) -> None:
        pass

    def receive(self, seq_id: str, length: int, tokens: list[int]) -> None:
        pass  # (the shards' EAGLE-3 drafts, where they make them: not these)


def requests() -> list[tuple[list[int], SamplingParams]]:
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    sampled = SamplingParams(
        max_tokens=16,
        temperature=1.0,
        top_p=0.9,
        seed=7,
        ignore_eos=True,
        repetition_penalty=1.2,
        presence_penalty=0.3,
        logprobs=2,
    )
    ps = prompts()
    out = [(p, greedy) for p in ps[:6]]
    out += [(ps[2], greedy)]  # a prefix hit
    out += [(ps[6], sampled), (ps[7], sampled.model_copy(update={"n": 2, "seed": 9}))]
    out += [(ps[8], greedy.model_copy(update={"grammar": reply_grammar()}))]
    return out


def run(core: EngineCore) -> dict[tuple[str, int], tuple[list[int], list]]:
    ids = [core.submit(p, params, request_id=f"r{i}") for i, (p, params) in enumerate(requests())]
    core.run_until_done()
    out = {}
    for rid in ids:
        o = core.output(rid)
        for choice, c in enumerate(o.choices or [o]):
            lps = [(lp.token, lp.logprob) for lp in c.logprobs or []]
            out[(rid, choice)] = (list(c.token_ids), lps)
    return out


def same(a: dict, b: dict) -> bool:
    """The same tokens, and logprobs within float32 noise (a draft's position is computed
    in a chunk of k + 1 tokens, not alone: its sums may round apart in the last bits)."""
    return a.keys() == b.keys() and all(
        a[k][0] == b[k][0]
        and [t for t, _ in a[k][1]] == [t for t, _ in b[k][1]]
        and all(abs(x - y) < 1e-4 for (_, x), (_, y) in zip(a[k][1], b[k][1], strict=True))
        for k in a
    )


@pytest.mark.parametrize("world", [1, 2, 3])
def test_replies_with_drafts_equal_those_without(world, tmp_path):
    """The drafts of the target's own reply, of n-grams, of half-right scripts (in a
    cache tight enough to preempt) and of a random EAGLE-3 draft on the shards, each
    checkpoint-loaded beside the target (float32): every reply is the one without."""
    from gptoss_ray.cluster.engine.drafts import ShardDrafts
    from gptoss_ray.model.eagle3 import Eagle3Config, write_random_draft
    from gptoss_ray.model.model_folder import read_config, resolve_model
    from gptoss_ray.shards.local_group import LocalShardGroup

    config = read_config(resolve_model("gpt-oss-tiny"))
    eagle = Eagle3Config(
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=config.vocab_size,
        draft_vocab_size=4096,
        aux_layers=(0, 1, 3),
    )
    # its 4096 ids: ordinary tokens, spread over the vocabulary
    d2t = torch.arange(4096) * 48 - torch.arange(4096)
    draft = write_random_draft(eagle, tmp_path / "eagle3", d2t=d2t)
    roomy, tight = KVLayout(16, 160, 160), KVLayout(16, 22 if world == 1 else 11, 40)

    def core(layout, group, drafter=None, k=0) -> EngineCore:
        return EngineCore(
            config,
            world,
            layout,
            launch_step=group.launch,
            token_budget=48,
            drafter=drafter,
            num_draft_tokens=k,
        )

    with LocalShardGroup("gpt-oss-tiny", world, dtype=torch.float32, kv_layout=roomy) as group:
        plain = run(core(roomy, group))
        replies = {key: tokens for key, (tokens, _) in plain.items()}
        drafted = core(roomy, group, Scripted(replies, "self"), 4)
        assert same(run(drafted), plain)
        assert drafted.scheduler.drafts_accepted == drafted.scheduler.drafts_proposed > 100
        ngram = core(roomy, group, NgramDrafter(1, 3), 3)
        assert same(run(ngram), plain)
    with LocalShardGroup(
        "gpt-oss-tiny", world, dtype=torch.float32, kv_layout=tight, draft_model=str(draft)
    ) as group:
        half = core(tight, group, Scripted(replies, "half"), 4)
        assert same(run(half), plain)
        assert half.stats.preemptions > 0  # drafts' blocks too: recomputed, still exact
        s = half.scheduler
        assert 0 < s.drafts_accepted < s.drafts_proposed
        eagle3 = core(tight, group, ShardDrafts(), 4)
        assert same(run(eagle3), plain)
        assert eagle3.stats.preemptions > 0 and eagle3.scheduler.drafts_proposed > 100


def test_a_stop_id_inside_accepted_drafts_ends_the_reply_there():
    layout = KVLayout(16, 64, 64)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    shard = tiny_shard(layout)
    plain = EngineCore(shard.config, 1, layout, lambda plans: [shard.step(plans[0])])
    rid = plain.submit(prompts()[3], params, request_id="r0")
    plain.run_until_done()
    reply = plain.output(rid).token_ids
    stop = reply[9]
    stopped = params.model_copy(update={"stop_token_ids": [stop], "ignore_eos": False})
    shard = tiny_shard(layout)
    core = EngineCore(
        shard.config,
        1,
        layout,
        lambda plans: [shard.step(plans[0])],
        drafter=Scripted({("r0", 0): reply}, "self"),
        num_draft_tokens=8,
    )
    core.submit(prompts()[3], stopped, request_id="r0")
    core.run_until_done()
    out = core.output("r0")
    assert out.token_ids == reply[: reply.index(stop) + 1] and out.finish_reason == "stop"
    assert shard.free_blocks() == (64, 64) and core.scheduler.free_blocks(0) == (64, 64)


def test_a_self_draft_is_taken_whole_and_cuts_the_steps_by_k_plus_1():
    """One prompt, greedy, 41 tokens: without drafts, one prefill step (it draws the first
    token) and 40 decodes; with the target's own continuation as the draft, k = 4, each
    decode yields 5 tokens: 1 + 40 / 5 = 9 steps (and in both, one that only releases). A verifier that took fewer drafts, or
    wrote their keys wrong, could not give the same tokens in 9 steps."""
    layout = KVLayout(16, 64, 64)
    params = SamplingParams(max_tokens=41, temperature=0, ignore_eos=True)
    shard = tiny_shard(layout)
    plain = EngineCore(shard.config, 1, layout, lambda plans: [shard.step(plans[0])])
    plain.submit(prompts()[0], params, request_id="r0")
    plain.run_until_done()
    reply = plain.output("r0").token_ids
    assert plain.stats.steps == 1 + 40 + 1  # and one that releases its blocks on the shard
    for mode, steps in (("self", 1 + 40 // 5 + 1), ("wrong", 1 + 40 + 1)):
        shard = tiny_shard(layout)
        core = EngineCore(
            shard.config,
            1,
            layout,
            lambda plans, shard=shard: [shard.step(plans[0])],
            drafter=Scripted({("r0", 0): reply}, mode),
            num_draft_tokens=4,
        )
        core.submit(prompts()[0], params, request_id="r0")
        core.run_until_done()
        assert core.output("r0").token_ids == reply, mode
        assert core.stats.steps == steps, mode
        snap = core.snapshot()
        # self: 8 decodes of 4 drafts each, all kept; wrong: 40 decodes, each with what
        # max_tokens leaves room for (up to 4), none kept
        proposed = 8 * 4 if mode == "self" else sum(min(4, 40 - n) for n in range(1, 41))
        assert snap["drafts_proposed"] == proposed, mode
        assert snap["drafts_accepted"] == (proposed if mode == "self" else 0), mode


def test_ngram_drafter_proposes_what_followed_the_latest_earlier_match():
    class Seq:
        def __init__(self, tokens):
            self.seq_id, self.toks = "s", tokens

        @property
        def length(self):
            return len(self.toks)

        def tokens(self, start, n):
            return self.toks[start : start + n]

    d = NgramDrafter(min_n=2, max_n=3)
    seq = Seq([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3])
    # the 3-gram 1 2 3 ended last at position 6: 7 8 5 followed it
    assert d.propose(seq, 3) == [7, 8, 5]
    seq.toks += [7, 8]  # grows: indexed as it goes
    assert d.propose(seq, 2) == [5, 1]  # "3 7 8" followed by 5 1
    seq.toks += [4]  # "8 4" and "7 8 4" never seen
    assert d.propose(seq, 2) == []
    assert NgramDrafter(1, 1).propose(Seq([5, 6, 5]), 4) == [6, 5]
    with pytest.raises(ValueError, match="need 1 <= min <= max"):
        NgramDrafter(3, 2)


# -- the distribution of a sampled reply's tokens --------------------------------------
def _chi2_critical(df: int, z: float = 3.09) -> float:
    """The chi-square quantile at p = 0.001 (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_sampled_tokens_follow_the_targets_distribution(tmp_path):
    """A vocabulary of 16, temperature 1, 2000 seeds: the draft for the second token is
    the target's most likely one there, so it is often kept. The second tokens' counts by
    first token match the target's probabilities (its logprobs over the whole vocabulary,
    from the single-process model) within a chi-square test at p = 0.001; a verifier that
    kept every draft would pile the mass on the drafts and fail it."""
    from gptoss_ray.model.checkpoint import Checkpoint, write_random_checkpoint
    from gptoss_ray.model.generate import generate
    from gptoss_ray.router.transport import LocalTransport
    from gptoss_ray.shards.shard import Shard
    from tests.tiny import tiny_config

    config = tiny_config(vocab_size=16)
    folder = write_random_checkpoint(config, tmp_path / "v16", seed=3)
    model = Checkpoint(folder).load(dtype=torch.float32)
    prompt = [1, 5, 2, 9]
    # the target's distribution of the second token after each first token
    probs = {}
    for first in range(16):
        (c,) = generate(
            model, [[*prompt, first]], SamplingParams(max_tokens=1, temperature=0, logprobs=16)
        )
        top = dict(c.logprobs[0].top)
        probs[first] = torch.tensor([math.exp(top[t]) for t in range(16)])
    draft = {first: int(p.argmax()) for first, p in probs.items()}

    class MostLikely:
        def propose(self, seq, k):
            return [draft[seq.output[0]]] if len(seq.output) == 1 else []

        def forget(self, seq_id):
            pass

    layout = KVLayout(16, 1024, 1024)
    shard = Shard(
        folder,
        rank=0,
        world_size=1,
        transport=LocalTransport(),
        dtype=torch.float32,
        kv_layout=layout,
    )
    core = EngineCore(
        shard.config,
        1,
        layout,
        lambda plans: [shard.step(plans[0])],
        token_budget=256,
        drafter=MostLikely(),
        num_draft_tokens=1,
    )
    n = 2000
    ids = [
        core.submit(prompt, SamplingParams(max_tokens=3, temperature=1.0, seed=s, ignore_eos=True))
        for s in range(n)
    ]
    core.run_until_done()
    counts = torch.zeros(16, 16)
    for rid in ids:
        first, second, _ = core.output(rid).token_ids
        counts[first, second] += 1
    assert core.scheduler.drafts_accepted > n // 4  # the drafts were often kept
    stat, cells = 0.0, 0
    for first in range(16):
        total = counts[first].sum()
        if total == 0:
            continue
        expected = total * probs[first]
        big = expected >= 5  # the small cells pooled into one
        observed = torch.cat([counts[first][big], counts[first][~big].sum().view(1)])
        expect = torch.cat([expected[big], expected[~big].sum().view(1)])
        keep = expect > 0
        stat += float(((observed[keep] - expect[keep]) ** 2 / expect[keep]).sum())
        cells += int(keep.sum()) - 1
    assert stat < _chi2_critical(cells), (stat, cells)


def test_a_request_that_opts_out_gets_no_drafts():
    from gptoss_ray.model.harmony.openai_chat import ChatRequest

    body = {"messages": [{"role": "user", "content": "hi"}], "speculative": False}
    assert ChatRequest.parse(body).sampling_params(16).speculative is False
    assert ChatRequest.parse({**body, "speculative": True}).sampling_params(16).speculative
    layout = KVLayout(16, 64, 64)
    shard = tiny_shard(layout)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    core = EngineCore(
        shard.config,
        1,
        layout,
        lambda plans: [shard.step(plans[0])],
        drafter=Scripted({("a", 0): [1] * 12, ("b", 0): [1] * 12}, "self"),
        num_draft_tokens=4,
    )
    core.submit(prompts()[0], params.model_copy(update={"speculative": False}), request_id="a")
    core.run_until_done()
    assert core.scheduler.drafts_proposed == 0
    core.submit(prompts()[0], params, request_id="b")
    core.run_until_done()
    assert core.scheduler.drafts_proposed > 0


def test_ngram_speculation_through_ray_gives_the_baseline(ray_session):
    """`Engine.start(speculative="ngram")` on 2 shards: the greedy replies of the
    single-process baseline, and the drafts counted in the engine's stats."""
    from gptoss_ray.cluster.client.engine import Engine
    from tests.engine_cases import GREEDY, baseline

    engine = Engine.start(
        "gpt-oss-tiny",
        shards=2,
        dtype="float32",
        speculative="ngram",
        ngram_min=1,
        ngram_max=3,
        num_draft_tokens=3,
    )
    try:
        outs = engine.generate(prompts(), GREEDY)
        assert tuple(tuple(o.token_ids) for o in outs) == baseline()
        stats = engine.stats()
        assert {"drafts_proposed", "drafts_accepted", "drafted_steps"} <= stats.keys()
    finally:
        engine.shutdown()


def test_a_chat_reply_counts_its_drafts_in_its_usage():
    """Over HTTP, read with OpenAI's client: the same greedy chat request with drafts
    and with `"speculative": false` gives the same message; the drafted one's usage has
    OpenAI's completion_tokens_details (accepted and rejected prediction tokens), which add
    up to the drafts the engine proposed."""
    import openai

    from gptoss_ray.cluster.engine.loop import EngineLoop
    from tests.support import served

    class Repeats:  # proposes the last token again: now and then right, mostly not
        def propose(self, seq, k):
            return [seq.tokens(seq.length - 1, 1)[0]] * k

        def forget(self, seq_id):
            pass

    layout = KVLayout(16, 256, 128)
    shard = tiny_shard(layout)
    core = EngineCore(
        shard.config,
        1,
        layout,
        lambda plans: [shard.step(plans[0])],
        drafter=Repeats(),
        num_draft_tokens=3,
    )
    engine = EngineLoop("/models/gpt-oss-tiny", core.config, layout, core)
    body = {
        "model": "gpt-oss-tiny",
        "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": 24,
        "temperature": 0,
    }
    try:
        with served(engine, "k") as url:
            client = openai.OpenAI(base_url=url, api_key="k")
            plain = client.chat.completions.create(
                **body, extra_body={"speculative": False}
            ).model_dump()
            assert core.scheduler.drafts_proposed == 0
            drafted = client.chat.completions.create(**body).model_dump()
    finally:
        engine.shutdown()
    assert drafted["choices"][0]["message"] == plain["choices"][0]["message"]
    assert plain["usage"]["completion_tokens_details"] is None
    details = drafted["usage"]["completion_tokens_details"]
    s = core.scheduler
    assert {k: v for k, v in details.items() if v is not None} == {
        "accepted_prediction_tokens": s.drafts_accepted,
        "rejected_prediction_tokens": s.drafts_proposed - s.drafts_accepted,
    }
    assert s.drafts_proposed > 0

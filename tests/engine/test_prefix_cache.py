"""Prefix caching: the block bookkeeping (hashes, sharing, the hybrid rule, eviction), and
exactness: greedy tokens with the cache on equal those with it off, for multi-turn
conversations that share system prompts, on one and on several shards, with preemption
forced by a small KV budget."""

from __future__ import annotations

import functools

import pytest
import torch

from gptoss_ray.cluster.engine.core import EngineCore
from gptoss_ray.cluster.engine.kv_blocks import KVBlocks, chain_hashes
from gptoss_ray.model.types import KVLayout, SamplingParams, StepResult
from gptoss_ray.shards.shard import Shard
from tests.engine_cases import tiny_shard

BS, WINDOW = 4, 6  # blocks of 4 tokens; a query sees the 6 keys up to itself


def run(blocks: KVBlocks, seq_id: str, tokens: list[int], start: int = 0) -> list[bytes]:
    """A sequence computed in one chunk from `start` (its cached prefix): grown and
    committed as the scheduler does -> its block hashes."""
    hashes = chain_hashes([], tokens, BS, blocks.salt)
    hit = start // BS
    grant = blocks.grow(seq_id, start, len(tokens) - start, hashes[:hit] if hit else None)
    assert grant is not None
    blocks.commit(seq_id, hashes, len(tokens))
    return hashes


def test_hashes_chain_every_token_before_the_block_and_the_salt():
    a = chain_hashes([], list(range(12)), BS, b"m")
    assert len(a) == 3 and len(set(a)) == 3
    assert chain_hashes([], list(range(11)), BS, b"m") == a[:2]  # whole blocks only
    changed = chain_hashes([], [99, *range(1, 12)], BS, b"m")  # first token differs
    assert not set(changed) & set(a)  # so does every later block's hash
    assert chain_hashes([], list(range(12)), BS, b"other model")[0] != a[0]
    # extending a known prefix gives the same chain as hashing all at once
    assert chain_hashes(a[:1], list(range(4, 12)), BS, b"m") == a


def test_a_released_sequence_leaves_its_whole_blocks_cached_for_the_next():
    blocks = KVBlocks(KVLayout(BS, 16, 16), WINDOW, prefix_cache=True)
    tokens = list(range(100, 114))  # 3 whole blocks and 2 tokens
    hashes = run(blocks, "a", tokens)
    blocks.release("a")
    assert blocks.free_blocks() == (16, 16)  # cached blocks count as available
    assert blocks.cache_stats()["cached_full_blocks"] == 3
    # the same prompt: all 3 blocks, since a token is left to compute after them
    assert blocks.cached_prefix(hashes, len(tokens)) == 3
    # a prompt that is exactly the 3 blocks: 2, the last token's logits are needed
    assert blocks.cached_prefix(hashes[:3], 12) == 2
    grant = blocks.grow("b", 12, 2, hashes[:3])
    assert grant.cached == 12 and len(grant.full) == 4  # the whole table: 3 reused + 1 new
    # the reused blocks are b's now: counted in use, no longer evictable
    assert blocks.free_blocks() == (16 - 4, 16 - len(grant.sliding))
    assert all(blocks.full_pool.refs[b] == 1 for b in grant.full)
    assert all(blocks.sliding_pool.refs[b] == 1 for b in grant.sliding)
    assert grant.full[:3] == [blocks.full_pool.block_of[h] for h in hashes[:3]]
    # the sliding layers reuse the blocks that the window before token 12 covers
    assert grant.sliding_first == (12 - WINDOW + 1) // BS == 1
    assert grant.sliding[:2] == [blocks.sliding_pool.block_of[h] for h in hashes[1:3]]
    without = KVBlocks(KVLayout(BS, 16, 16), WINDOW)  # prefix_cache off: nothing kept
    run(without, "a", tokens)
    without.release("a")
    assert without.cached_prefix(hashes, len(tokens)) == 0


def test_a_hit_needs_the_sliding_blocks_of_the_window_before_it():
    """The hybrid rule: the full layers hold blocks 0..2 of a sequence, but if the
    sliding layers' blocks before the end of block 2 were evicted, only the longest
    prefix whose window is still cached can be used."""
    blocks = KVBlocks(KVLayout(BS, 16, 16), WINDOW, prefix_cache=True)
    tokens = list(range(200, 214))
    hashes = run(blocks, "a", tokens)
    blocks.release("a")
    assert blocks.cached_prefix(hashes, 14) == 3
    sliding = blocks.sliding_pool
    # evict the sliding copy of block 2: a hit of 3 blocks needs blocks 1 and 2 there
    block2 = sliding.block_of.pop(hashes[2])
    del sliding.hash_of[block2]
    assert blocks.cached_prefix(hashes, 14) == 2  # ends after block 1: needs blocks 0, 1
    block0 = sliding.block_of.pop(hashes[0])
    del sliding.hash_of[block0]
    assert blocks.cached_prefix(hashes, 14) == 0  # every shorter hit needs block 0


def test_only_blocks_whose_keys_are_all_written_are_registered():
    blocks = KVBlocks(KVLayout(BS, 16, 16), WINDOW, prefix_cache=True)
    hashes = chain_hashes([], list(range(16)), BS, b"")  # 4 blocks known
    blocks.grow("a", 0, 10)
    blocks.commit("a", hashes, 10)  # keys of tokens 0..9: blocks 0 and 1
    assert blocks.cache_stats()["cached_full_blocks"] == 2
    assert blocks.cached_prefix(hashes, 16) == 2


def test_shared_blocks_are_never_evicted_and_the_tail_goes_first():
    blocks = KVBlocks(KVLayout(BS, 6, 12), None, prefix_cache=True)
    prompt = list(range(300, 313))  # 3 whole blocks + 1
    hashes = run(blocks, "a", prompt)
    run(blocks, "b", prompt, start=12)  # shares blocks 0..2 with a
    assert blocks.full_pool.refs[blocks.full_pool.block_of[hashes[0]]] == 2
    blocks.release("a")
    assert blocks.free_blocks()[0] == 6 - 4  # b holds 3 shared + 1 own; a's last one freed
    # a grow that needs every available block evicts nothing that b uses
    assert blocks.grow("c", 0, 3 * BS) is None
    c = blocks.grow("c", 0, 2 * BS)
    assert not set(c.full) & set(blocks.tables["b"].full)
    blocks.release("c")
    blocks.release("b")
    # b let go of its tail first: a new 1-block sequence evicts the cached tail, not block 0
    before = blocks.cache_stats()["evictions"]
    blocks.grow("d", 0, 6 * BS)  # every block: the 3 cached ones are evicted, tail first
    assert blocks.cache_stats()["evictions"] - before == 3
    blocks.release("d")
    other = KVBlocks(KVLayout(BS, 4, 12), None, prefix_cache=True)
    run(other, "a", prompt)  # blocks 0..2 cached, block 3 (partial) freed at release
    other.release("a")
    other.grow("e", 0, 2 * BS)  # 1 free block + the least recently released cached one
    assert other.cached_prefix(hashes, 13) == 2  # block 2 (the tail) went, 0 and 1 stayed


def test_a_sequence_starting_from_a_hit_writes_only_its_own_blocks():
    """The shard's side: a plan that reuses cached blocks starts a table at the cached
    length, reads the shared keys and writes after them, in both kinds of layer."""
    from gptoss_ray.shards.kv_cache import PagedKVCache
    from tests.tiny import tiny_config

    config = tiny_config(sliding_window=WINDOW)
    layout = KVLayout(BS, 16, 16)
    cache = PagedKVCache(config, layout, dtype=torch.float32, device=torch.device("cpu"))
    blocks = KVBlocks(layout, WINDOW, prefix_cache=True)
    tokens = list(range(14))
    hashes = chain_hashes([], tokens, BS, b"")
    heads, dim = config.num_key_value_heads, config.head_dim
    layers = range(config.num_hidden_layers)
    assert {config.is_sliding(i) for i in layers} == {True, False}
    a = cache.place("a", 0, blocks.grow("a", 0, 14))
    for layer in layers:
        a.store(layer, torch.ones(14, heads, dim), torch.ones(14, heads, dim))
    a.commit(14)
    blocks.commit("a", hashes, 14)
    blocks.release("a")
    cache.release("a")
    grant = blocks.grow("b", 12, 2, hashes[:3])
    b = cache.place("b", 12, grant)
    assert b.next_position == 12
    for layer in layers:
        k, _, _ = b.store(layer, torch.full((2, heads, dim), 2.0), torch.zeros(2, heads, dim))
        # the shared keys (ones) are read as they were written, the new ones after them
        assert k[:-2].eq(1).all() and k[-2:].eq(2).all()
        kept = grant.sliding[:2] if config.is_sliding(layer) else grant.full[:3]
        assert cache.k[layer][kept].eq(1).all()  # b wrote none of the shared blocks


# -- exactness on the tiny model ----------------------------------------------------------
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def conversations(users: int = 4, turns: int = 3) -> list[list[list[int]]]:
    """Per user, each turn's new tokens: a shared 45-token system prompt (longer than the
    tiny model's 32-token window) for users 0, 2, ..., another one for the rest."""
    g = torch.Generator().manual_seed(5)
    systems = [torch.randint(0, 200000, (45,), generator=g).tolist() for _ in range(2)]
    return [
        [systems[u % 2] + torch.randint(0, 200000, (7,), generator=g).tolist()]
        + [torch.randint(0, 200000, (5 + t,), generator=g).tolist() for t in range(1, turns)]
        for u in range(users)
    ]


def replay(generate, convs: list[list[list[int]]]) -> list[list[int]]:
    """Every user's turns, each turn's prompt being the whole conversation so far (its
    earlier prompts and replies), all users' turn t at once through `generate` (prompts
    -> their replies' token ids) -> every reply's tokens."""
    history = [[] for _ in convs]
    replies = []
    for t in range(len(convs[0])):
        for u, conv in enumerate(convs):
            history[u] += conv[t]
        for u, out in enumerate(generate(history)):
            history[u] += out
            replies.append(out)
    return replies


def generate_on(core: EngineCore):
    """`replay`'s generate on an in-process engine core."""

    def generate(prompts: list[list[int]]) -> list[list[int]]:
        ids = [core.submit(p, GREEDY) for p in prompts]
        core.run_until_done()
        return [core.output(rid).token_ids for rid in ids]

    return generate


def shard_set(world: int, layout: KVLayout) -> tuple[list[Shard], object]:
    """`world` in-process shards, each with every expert (data parallel: the scheduler's
    placement and each shard's cache are what is under test, not the exchange)."""
    shards = [tiny_shard(layout) for _ in range(world)]
    return shards, lambda plans: [s.step(p) for s, p in zip(shards, plans, strict=True)]


@functools.cache
def reference() -> tuple[tuple[int, ...], ...]:
    shards, run_step = shard_set(1, KVLayout(16, 256, 256))
    core = EngineCore(shards[0].config, 1, shards[0].kv.layout, run_step, prefix_cache=False)
    return tuple(map(tuple, replay(generate_on(core), conversations())))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_greedy_tokens_with_the_cache_equal_those_without(world):
    # 12 full blocks of 16 tokens a shard: with 4 users of up to ~100 tokens, running
    # sequences are preempted, and their blocks become cache for their recomputation
    layout = KVLayout(16, 12, 64)
    shards, run_step = shard_set(world, layout)
    core = EngineCore(shards[0].config, world, layout, run_step, token_budget=48)
    replies = replay(generate_on(core), conversations())
    assert tuple(map(tuple, replies)) == reference()
    snap = core.snapshot()
    caches = snap["prefix_cache"]
    assert sum(c["hit_tokens"] for c in caches) > 0
    if world == 1:
        assert snap["preemptions"] > 0 and sum(c["evictions"] for c in caches) > 0
    for s in shards:  # every table given back; the cached blocks stay available
        assert s.free_blocks() == (12, 64)
    assert all(core.scheduler.free_blocks(r) == (12, 64) for r in range(world))


def test_the_cache_saves_prefill_and_new_turns_go_where_their_prefix_is():
    layout = KVLayout(16, 256, 256)
    counts = {}
    for on in (False, True):
        shards, run_step = shard_set(2, layout)
        core = EngineCore(shards[0].config, 2, layout, run_step, prefix_cache=on)
        assert tuple(map(tuple, replay(generate_on(core), conversations()))) == reference()
        counts[on] = core.snapshot()
    saved = counts[False]["prefill_tokens"] - counts[True]["prefill_tokens"]
    hits = sum(c["hit_tokens"] for c in counts[True]["prefix_cache"])
    assert saved == hits > 0
    assert sum(c["hit_tokens"] for c in counts[False]["prefix_cache"]) == 0
    # turns 2 and 3 find their conversation so far on the shard that ran it: every whole
    # block of what it computed (its prompt and all but its last drawn token)
    expected = 0
    for conv in conversations():
        length = 0
        for t, new in enumerate(conv):
            expected += (length - 1) // 16 * 16 if t else 0
            length += len(new) + GREEDY.max_tokens
    assert hits == expected


def test_a_request_arriving_during_an_identical_prefill_reuses_only_computed_blocks():
    """Chunks of 24 tokens end inside a 16-token block: a request with the same prompt
    arriving mid-prefill may reuse the blocks already whole, never the one half written."""
    from tests import engine_cases

    layout = KVLayout(16, 64, 64)
    shards, run_step = shard_set(1, layout)
    # one step at a time: the first step's blocks are known before the second is planned
    core = EngineCore(shards[0].config, 1, layout, run_step, token_budget=24, overlap=False)
    prompt, ten = engine_cases.prompts()[4], engine_cases.GREEDY  # 100 tokens
    first = core.submit(prompt, ten)
    core.step()  # 24 tokens computed: block 0 whole, block 1 half written
    second = core.submit(prompt, ten)
    core.step()
    assert core.snapshot()["prefix_cache"][0]["hit_tokens"] == 16
    core.run_until_done()
    assert (
        core.output(first).token_ids
        == core.output(second).token_ids
        == list(engine_cases.baseline()[4])
    )


def test_a_lost_shard_loses_its_cache_and_the_others_keep_theirs():
    layout = KVLayout(16, 64, 64)
    from gptoss_ray.cluster.engine.scheduler import Scheduler
    from gptoss_ray.cluster.engine.scheduler import Sequence as Seq

    sched = Scheduler(2, layout, 32, token_budget=256)

    def seq(name: str, tokens: list[int]) -> Seq:
        return Seq(name, tokens, GREEDY, 0, frozenset(), 0)

    a, b = seq("a", list(range(40))), seq("b", list(range(1000, 1040)))
    sched.add(a)
    sched.add(b)
    plans = sched.schedule()
    assert {a.home, b.home} == {0, 1}
    sched.update(plans, [StepResult({w.seq_id: 7 for w in p.work}, {}) for p in plans])
    lost_home, kept_home = a.home, b.home
    sched.requeue_all(lost=[lost_home])
    assert sched.shards[lost_home].blocks.cache_stats()["cached_full_blocks"] == 0
    assert sched.shards[kept_home].blocks.cache_stats()["cached_full_blocks"] == 2
    # recomputed: b goes back to its shard and reuses its blocks; a starts over
    plans = sched.schedule()
    work = {w.seq_id: w for p in plans for w in p.work}
    assert b.home == kept_home and work["b"].start == 32 and work["b"].blocks.cached == 32
    assert work["a"].start == 0

"""Continuous batching: which sequences run on which shard at each engine step.

Requests join and leave at every step. Each shard's batch holds its running sequences'
decodes and prefill chunks under a per-step token budget; a new sequence is homed on the
shard that holds the longest cached prefix of it, among the shards whose free KV is
within `PLACEMENT_MARGIN` of the freest. The scheduler owns every shard's KV blocks
(which are free, which sequence holds which, which hold a reusable prefix:
`cluster.engine.kv_blocks`) and puts in each plan the blocks it grants, so it only plans steps
that fit: when blocks run out, new requests wait, and if a running sequence cannot grow,
the newest running sequence of that shard is preempted (its blocks let go: cached, so
that its recomputation from its tokens is mostly a cache hit)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from typing import Any

from gptoss_ray.cluster.engine.drafts import Drafter
from gptoss_ray.cluster.engine.kv_blocks import KVBlocks, chain_hashes
from gptoss_ray.model.types import (
    BlockGrant,
    KVLayout,
    SamplingParams,
    SeqWork,
    StepPlan,
    StepResult,
    blocks_held,
    with_buckets,
)


class Status(StrEnum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: str
    prompt: list[int]
    params: SamplingParams
    seed: int
    stop_ids: frozenset[int]
    arrival: int
    output: list[int] = field(default_factory=list)
    # 0: interactive; higher: batch work, which waits behind lower values and is the
    # first to be preempted when KV blocks run out
    priority: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    home: int | None = None
    computed: int = 0  # tokens in the home shard's cache once the steps planned have run
    # steps sent to the shards with work of this sequence, whose results are not in yet,
    # and the tokens they draw for it (overlapped steps: the next step is planned before
    # the last one's results come back)
    inflight: int = 0
    pending: int = 0
    preemptions: int = 0
    # time.monotonic() in the coordinator: queued, first token sampled, finished
    submitted_at: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    # who reads its tokens (`EngineCore.add`): a front's id, its request and choice, the
    # tokens sent so far, and whether its last delta went
    front: str | None = None
    request_id: str = ""
    choice: int = 0
    sent: int = 0
    ended: bool = False
    block_hashes: list[bytes] = field(default_factory=list)  # of its whole blocks, so far
    # one per output token when its params ask for logprobs (`TokenLogprob`), else None
    logprobs: list[Any] | None = None
    # the prompt's (position 0 has none), when its params ask for prompt_logprobs
    prompt_logprobs: list[Any] | None = None
    # n > 1: the other choices of the prompt, waiting for this one's first draw to fork
    # from it; a choice forked from a parent keeps its table for its first work
    forks: list[Sequence] = field(default_factory=list)
    parent: Sequence | None = None
    fork_grant: BlockGrant | None = None
    # speculative decoding: draft tokens proposed for it, and accepted
    drafts_proposed: int = 0
    drafts_accepted: int = 0

    @property
    def length(self) -> int:
        """Known tokens: the prompt and what was generated so far."""
        return len(self.prompt) + len(self.output)

    @property
    def todo(self) -> int:
        """Tokens to compute: the known ones not in the cache, and those still being drawn."""
        return self.length + self.pending - self.computed

    def tokens(self, start: int, n: int) -> list[int]:
        """Known tokens start..start+n, without joining the two lists (a decode step
        needs one token, not a copy of the whole sequence)."""
        p = len(self.prompt)
        if start >= p:
            return self.output[start - p : start - p + n]
        return self.prompt[start : start + n] + self.output[: max(0, start + n - p)]


@dataclass
class ShardState:
    blocks: KVBlocks
    running: list[Sequence] = field(default_factory=list)  # in admission order
    release: list[str] = field(default_factory=list)


REFERENCE_CONTEXT = 2048  # tokens: see Scheduler._chunk_beside_decodes
# A new sequence goes where its longest cached prefix is, unless that shard has fewer free
# full-attention blocks than the freest shard by more than this share of a pool: then it
# goes to the best of the shards that are not that short (prefix first, then free blocks).
PLACEMENT_MARGIN = 0.25


class Scheduler:
    def __init__(
        self,
        world_size: int,
        layout: KVLayout,
        window: int | None,
        *,
        token_budget: int = 256,
        max_seqs: int = 64,
        prefix_cache: bool = True,
        cache_salt: bytes = b"",
        drafter: Drafter | None = None,
        num_draft_tokens: int = 0,
        max_loras: int = 0,
        loras: dict[str, str] | None = None,
    ) -> None:
        """cache_salt: what besides the tokens decides a block's keys (the model), mixed
        into every prefix-cache hash, with a sequence's LoRA adapter. drafter: proposes
        up to num_draft_tokens draft tokens for each decode (speculative decoding;
        `cluster.engine.drafts`), which count against the token budget. max_loras: the
        LoRA slots every shard keeps; loras: the adapters served, name -> PEFT folder
        (the engine core's, changed in place as adapters load and unload)."""
        self.layout = layout
        # the LoRA slots every shard keeps (slot -> adapter), and the plan that last used
        # each: a new adapter takes a slot no running sequence uses, the least recent
        self.loras = loras if loras is not None else {}
        self.lora_slots: list[str | None] = [None] * max_loras
        self._slot_used = [0] * max_loras
        self._plans = 0
        self.drafter = drafter
        self.num_draft_tokens = num_draft_tokens if drafter is not None else 0
        # tokens emitted, and draft tokens proposed and accepted, since the start
        self.generated = 0
        self.drafts_proposed = self.drafts_accepted = self.drafted_steps = 0
        self.window = window
        self.token_budget = token_budget
        self.max_seqs = max_seqs
        self.cache_salt = cache_salt
        self.shards = [
            ShardState(KVBlocks(layout, window, prefix_cache=prefix_cache, salt=cache_salt))
            for _ in range(world_size)
        ]
        self.waiting: deque[Sequence] = deque()
        self.live: dict[str, Sequence] = {}  # every sequence not finished, by id
        self.preempted = 0
        # per shard: the block copies forked choices need before their first step
        self.copies: list[dict[str, list[tuple[bool, int, int]]]] = [{} for _ in self.shards]
        self._forked: set[str] = set()  # choices forked in this plan: their token is in it

    def _held(self, length: int, new: int) -> tuple[int, int]:
        return blocks_held(length, new, self.layout.block_size, self.window)

    def capacity_error(self, prompt_len: int, max_tokens: int) -> str | None:
        """Why a request can never fit on one shard, or None."""
        full = self._held(0, prompt_len + max_tokens)[0]
        sliding_chunk = self._held(0, min(prompt_len + max_tokens, self.token_budget))[1]
        if full > self.layout.full_blocks or sliding_chunk > self.layout.sliding_blocks:
            return (
                f"prompt of {prompt_len} tokens + max_tokens {max_tokens} needs {full} KV "
                f"blocks of {self.layout.block_size} tokens; a shard has "
                f"{self.layout.full_blocks}"
            )
        return None

    def add(self, seq: Sequence, forks: Iterable[Sequence] = ()) -> None:
        """Queues a sequence, and the other choices of its prompt (n > 1), which fork from
        it when it draws its first token: its prompt's KV computed once for all."""
        later = next((i for i, w in enumerate(self.waiting) if w.priority > seq.priority), None)
        if later is None:
            self.waiting.append(seq)
        else:  # ahead of lower-priority work that waits (never ahead of its own kind)
            self.waiting.insert(later, seq)
        self.live[seq.seq_id] = seq
        for fork in forks:
            fork.parent = seq
            seq.forks.append(fork)
            self.live[fork.seq_id] = fork

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s.running or s.release for s in self.shards)

    # -- planning ----------------------------------------------------------------------
    def schedule(self) -> list[StepPlan]:
        plans = [
            StepPlan(release=s.release, copies=[c for cs in copies.values() for c in cs])
            for s, copies in zip(self.shards, self.copies, strict=True)
        ]
        self.copies = [{} for _ in self.shards]
        self._forked = set()
        budgets = [self.token_budget] * len(self.shards)
        for rank, shard in enumerate(self.shards):
            shard.release = []
            # Decodes first, then prompt chunks with what the budget leaves, each at most
            # half of it while requests wait: a long prompt is chunked around the running
            # and the arriving sequences instead of stalling them for its whole prefill.
            cap = self.token_budget // 2 if self.waiting else self.token_budget
            for decoding in (True, False):
                i = 0
                while i < len(shard.running):
                    seq = shard.running[i]
                    n = min(seq.todo, budgets[rank], max(1, cap))
                    if not decoding and budgets[rank] < self.token_budget:
                        n = min(n, self._chunk_beside_decodes(seq.computed))
                    if (
                        n <= 0
                        or (seq.todo == 1) != decoding
                        or self._drawn_enough(seq)
                        or seq.seq_id in self._forked
                    ):
                        i += 1
                        continue
                    drafts = self._drafts(seq, budgets[rank] - n) if decoding else []
                    grant = shard.blocks.grow(seq.seq_id, seq.computed, n + len(drafts))
                    if grant is None and drafts:  # no room for the drafts: the decode alone
                        drafts = []
                        grant = shard.blocks.grow(seq.seq_id, seq.computed, n)
                    if grant is None:
                        # the latest of the lowest priority (batch work before interactive)
                        j = max(
                            range(len(shard.running)), key=lambda k: (shard.running[k].priority, k)
                        )
                        self._preempt(rank, shard.running[j], plans[rank])
                        i -= j < i  # retry seq (or move on if it was the victim)
                        continue
                    plans[rank].work.append(self._work(seq, n, grant, drafts=drafts))
                    self._fork(rank, seq, plans[rank].work[-1])
                    budgets[rank] -= n + len(drafts)
                    i += 1
        # admit waiting sequences, oldest first, where their prefix is cached
        while self.waiting:
            seq = self.waiting[0]
            if seq.inflight:
                break  # preempted while a step ran: it waits for that step's token
            if not self._lora_slot(seq):
                break  # every slot's adapter runs: it waits for one to finish
            candidates = [
                r
                for r, s in enumerate(self.shards)
                if budgets[r] > 0 and len(s.running) < self.max_seqs
            ]
            if not candidates:
                break
            rank, hit = self._place(seq, candidates)
            shard = self.shards[rank]
            cached = hit * self.layout.block_size
            n = min(seq.length - cached, budgets[rank])
            grant = shard.blocks.grow(seq.seq_id, cached, n, seq.block_hashes[:hit])
            if grant is None:
                break  # blocks ran out: it waits for running sequences to finish
            self.waiting.popleft()
            shard.blocks.admitted(seq.length, cached)
            seq.status, seq.home, seq.computed = Status.RUNNING, rank, cached
            shard.running.append(seq)
            plans[rank].work.append(self._work(seq, n, grant, placed=True))
            self._fork(rank, seq, plans[rank].work[-1])
            budgets[rank] -= n
        if self.lora_slots:  # every shard's table, the same
            self._plans += 1
            running = self._running_loras()
            for i, name in enumerate(self.lora_slots):
                if name in running:
                    self._slot_used[i] = self._plans
            table = [(n, *self.loras[n]) if n is not None else None for n in self.lora_slots]
            for plan in plans:
                plan.loras = table
        return with_buckets(plans)

    def _fork(self, rank: int, seq: Sequence, work: SeqWork) -> None:
        """The chunk that draws a sequence's first token draws its other choices' too:
        each shares the prompt's whole blocks, gets a copy of the partly written one
        (in the shard's next plan, before anything else runs), and decodes on its own from
        the next step. A choice that does not fit waits as a sequence of its own (its
        whole prompt blocks are a prefix-cache hit)."""
        if not (work.sample and seq.forks):
            return
        shard = self.shards[rank]
        end = work.start + work.size
        for child in seq.forks:
            forked = shard.blocks.fork(seq.seq_id, child.seq_id, end)
            child.parent = None
            if forked is None:
                self.waiting.append(child)
                continue
            child.fork_grant, self.copies[rank][child.seq_id] = forked
            child.status, child.home, child.computed = Status.RUNNING, rank, end
            child.inflight, child.pending = 1, 1
            shard.running.append(child)
            self._forked.add(child.seq_id)
            work.forks.append((child.seq_id, child.seed))
        seq.forks = []

    def _place(self, seq: Sequence, candidates: list[int]) -> tuple[int, int]:
        """The shard for a new sequence and how many of its blocks are cached there."""
        self._hashes(seq, seq.length // self.layout.block_size)
        free = {r: self.shards[r].blocks.free_blocks()[0] for r in candidates}
        enough = max(free.values()) - PLACEMENT_MARGIN * self.layout.full_blocks
        # a prompt to score is computed whole: cached blocks have no logits
        scoring = seq.prompt_logprobs is not None and len(seq.prompt_logprobs) < len(seq.prompt)
        hits = {
            r: 0 if scoring else self.shards[r].blocks.cached_prefix(seq.block_hashes, seq.length)
            for r in candidates
            if free[r] >= enough
        }
        rank = max(hits, key=lambda r: (hits[r], free[r], -r))
        return rank, hits[rank]

    def _lora_salt(self, seq: Sequence) -> bytes:
        """What a sequence's adapter adds to its blocks' hashes: its name and which load
        of it (a reload under the name may be other weights)."""
        lora = seq.params.lora
        if lora is None:
            return b""
        _, load = self.loras.get(lora, ("", -1))
        return f"\0lora:{lora}:{load}".encode()

    def _running_loras(self) -> set[str | None]:
        return {s.params.lora for shard in self.shards for s in shard.running}

    def drop_lora(self, name: str) -> None:
        """An unloaded adapter leaves its slot (no sequence uses it: the core checks)."""
        self.lora_slots = [None if n == name else n for n in self.lora_slots]

    def _lora_slot(self, seq: Sequence) -> bool:
        """The sequence's adapter has a slot, or gets one that no running sequence's
        adapter holds (an empty one first, else the least recently used) -> whether it
        has one. Every step then needs only the adapters of the slots."""
        lora = seq.params.lora
        if lora is None or lora in self.lora_slots:
            return True
        running = self._running_loras()
        free = [i for i, name in enumerate(self.lora_slots) if name not in running]
        if not free:
            return False
        slot = min(free, key=lambda i: (self.lora_slots[i] is not None, self._slot_used[i]))
        self.lora_slots[slot] = lora
        return True

    def _drafts(self, seq: Sequence, room: int) -> list[int]:
        """Draft tokens to verify with a decode whose last token is known (a token still
        being drawn cannot be drafted after), within `room` tokens of the step's budget
        and the sequence's max_tokens; none for a request that opted out."""
        params = seq.params
        k = min(self.num_draft_tokens, room, params.max_tokens - len(seq.output) - 1)
        if k <= 0 or seq.pending or not params.speculative:
            return []
        return self.drafter.propose(seq, k)[:k]  # type: ignore[union-attr]

    @staticmethod
    def _drawn_enough(seq: Sequence) -> bool:
        """The tokens being drawn end the sequence at max_tokens: nothing more to plan."""
        return len(seq.output) + seq.pending >= seq.params.max_tokens

    def _chunk_beside_decodes(self, start: int) -> int:
        """A prompt chunk's attention reads everything before it: at a long context a
        budget-sized chunk makes the step, and so every decoding sequence's next token,
        many times slower. Beside decodes a chunk costs at most what a full budget costs at
        `REFERENCE_CONTEXT` tokens."""
        return max(16, self.token_budget * REFERENCE_CONTEXT // max(REFERENCE_CONTEXT, start))

    def _hashes(self, seq: Sequence, blocks: int) -> list[bytes]:
        """The prefix-cache hashes of the sequence's first `blocks` blocks (at least)."""
        have, bs = len(seq.block_hashes), self.layout.block_size
        if blocks > have:
            tokens = seq.tokens(have * bs, (blocks - have) * bs)
            salt = self.cache_salt + self._lora_salt(seq)
            chain_hashes(seq.block_hashes, tokens, bs, salt)
        return seq.block_hashes

    def free_blocks(self, rank: int) -> tuple[int, int]:
        return self.shards[rank].blocks.free_blocks()

    def _work(
        self,
        seq: Sequence,
        n: int,
        blocks: BlockGrant,
        placed: bool = False,
        drafts: list[int] | None = None,
    ) -> SeqWork:
        """The sequence's next n tokens as a step's work, counted as planned: they are in
        the cache once the step ran, and the token it draws is pending until then. The
        first work after a sequence is `placed` on a shard tells it the tokens before the
        chunk, when its draws need them. drafts: proposed tokens after them, to verify
        (counted as planned too, until the step says which were kept)."""
        drafts = drafts or []
        sample = n == seq.todo
        # a token still being drawn is decoded by the shard that draws it
        last_drawn = seq.pending > 0 and sample
        assert not last_drawn or n == 1, "only the last token can be pending"
        # The parameters go with a sequence's first work on its shard, which keeps them
        # until the sequence is released there: pickled into every decode's plan they were
        # most of its cost (batch 256: 3.2 of 3.8 ms a step here, and as much to unpickle).
        first_here = placed or seq.fork_grant is not None
        if seq.fork_grant is not None:  # a forked choice's first work: its whole table
            forked, seq.fork_grant = seq.fork_grant, None
            blocks = BlockGrant(
                forked.full + blocks.full, blocks.sliding_first, blocks.sliding, forked.cached
            )
        work = SeqWork(
            seq_id=seq.seq_id,
            tokens=[] if last_drawn else seq.tokens(seq.computed, n) + drafts,
            start=seq.computed,
            sample=sample,
            draw_index=len(seq.output) + seq.pending,
            params=seq.params if first_here else None,
            seed=seq.seed,
            blocks=blocks,
            last_drawn=last_drawn,
            context=seq.tokens(0, seq.computed) if placed and seq.params.needs_history else None,
            drafts=len(drafts),
        )
        if not sample and not last_drawn:  # (scoring its last row; an EAGLE-3 draft's input)
            work.next_token = seq.tokens(seq.computed + n, 1)[0]
        if seq.prompt_logprobs is not None and seq.computed < len(seq.prompt) and not last_drawn:
            work.score = seq.params.prompt_logprobs
        seq.computed += n + len(drafts)
        seq.inflight += 1
        seq.pending += sample
        if drafts:
            seq.drafts_proposed += len(drafts)
            self.drafts_proposed += len(drafts)
            self.drafted_steps += 1
        return work

    def _free(self, shard: ShardState, seq: Sequence) -> None:
        shard.blocks.release(seq.seq_id)
        shard.running.remove(seq)
        seq.fork_grant = None
        for copies in self.copies:
            copies.pop(seq.seq_id, None)

    def _preempt(self, rank: int, seq: Sequence, plan: StepPlan) -> None:
        shard = self.shards[rank]
        for w in plan.work:
            if w.seq_id == seq.seq_id:  # planned in this step: not any more
                seq.inflight -= 1
                seq.pending -= w.sample
                if w.drafts:  # nor are its drafts proposed
                    seq.drafts_proposed -= w.drafts
                    self.drafts_proposed -= w.drafts
                    self.drafted_steps -= 1
                for fork_id, _ in w.forks:  # its choices fork again with its next draw
                    child = self.live[fork_id]
                    child.inflight = child.pending = 0
                    self._free(shard, child)
                    child.status, child.home, child.computed = Status.WAITING, None, 0
                    child.parent = seq
                    seq.forks.append(child)
            elif any(f == seq.seq_id for f, _ in w.forks):  # forked in this step: not now
                w.forks = [f for f in w.forks if f[0] != seq.seq_id]
                seq.inflight -= 1
                seq.pending -= 1
        plan.work = [w for w in plan.work if w.seq_id != seq.seq_id]
        self._free(shard, seq)
        plan.release.append(seq.seq_id)
        seq.status, seq.home, seq.computed = Status.WAITING, None, 0
        seq.preemptions += 1
        self.preempted += 1
        self.waiting.appendleft(seq)

    def requeue_all(self, lost: Iterable[int] = ()) -> None:
        """A step failed and shards were replaced: running sequences wait again (oldest
        first) and will be recomputed from their known tokens. Every shard dropped its
        sequences; the replaced ones (`lost`) lost their cached prefixes too, the others
        keep theirs (keys the failed step wrote are in blocks never registered)."""
        running = sorted(
            (seq for shard in self.shards for seq in shard.running), key=lambda s: s.arrival
        )
        lost = set(lost)
        for rank, shard in enumerate(self.shards):
            for seq in shard.running:
                shard.blocks.release(seq.seq_id)
            shard.running.clear()
            shard.release.clear()
            if rank in lost:
                shard.blocks.reset()
        for seq in running:
            seq.status, seq.home, seq.computed = Status.WAITING, None, 0
            seq.fork_grant = None
        self.copies = [{} for _ in self.shards]
        for seq in self.live.values():  # the steps in flight are void
            seq.inflight = seq.pending = 0
        self.waiting.extendleft(reversed(running))

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends a sequence now (a stop token or string, max_tokens, a cancel): its blocks
        are freed and its home shard drops its cache at the next step."""
        if seq.parent is not None:  # a choice still waiting to fork
            seq.parent.forks.remove(seq)
            seq.parent = None
        elif seq.status == Status.WAITING:
            self.waiting.remove(seq)
        elif seq.status == Status.RUNNING and seq.home is not None:
            shard = self.shards[seq.home]
            self._free(shard, seq)
            shard.release.append(seq.seq_id)
        seq.status, seq.finish_reason, seq.finished_at = Status.FINISHED, reason, time.monotonic()
        self.live.pop(seq.seq_id, None)
        if self.drafter is not None:
            self.drafter.forget(seq.seq_id)

    # -- results -----------------------------------------------------------------------
    def update(self, plans: list[StepPlan], results: list[StepResult]) -> list[Sequence]:
        """Applies a step's results (steps in the order they were planned); returns the
        sequences that got a token. A sequence that finished while the step ran gets
        nothing from it: what it drew past its end is dropped."""
        advanced = []
        now = time.monotonic()
        for rank, (plan, result) in enumerate(zip(plans, results, strict=True)):
            tokens = result.tokens
            shard = self.shards[rank]
            for w in plan.work:
                for fork_id, _ in w.forks:  # choices whose first token this chunk drew
                    child = self.live.get(fork_id)
                    if child is not None:
                        child.inflight -= 1
                        child.pending -= 1
                        self._advance(child, fork_id, result, now, advanced)
                seq = self.live.get(w.seq_id)
                if seq is None:  # finished while the step ran; its blocks are released
                    continue
                seq.inflight -= 1
                seq.pending -= w.sample
                done = w.start + w.size
                if w.drafts:  # the rejected drafts' keys are not in the cache
                    kept = len(result.accepted.get(w.seq_id, ()))
                    done -= w.drafts - kept
                    if seq.status == Status.RUNNING:  # (a preempted one starts anew)
                        seq.computed -= w.drafts - kept
                    seq.drafts_accepted += kept
                    self.drafts_accepted += kept
                self._commit(shard, seq, done)
                scored = result.prompt_logprobs.get(w.seq_id, ())
                if seq.prompt_logprobs is not None:  # each prompt position once (recomputed)
                    for position, lp in enumerate(scored, w.start + 1):
                        if position == len(seq.prompt_logprobs) < len(seq.prompt):
                            seq.prompt_logprobs.append(lp)
                if w.seq_id in tokens:
                    # accepted drafts' blocks are known once they are in its output
                    after = partial(self._commit, shard, seq, done) if w.drafts else None
                    self._advance(seq, w.seq_id, result, now, advanced, after)
                    drafts = result.drafts.get(w.seq_id)
                    if drafts and self.drafter is not None and seq.status == Status.RUNNING:
                        self.drafter.receive(seq.seq_id, seq.length, drafts)  # type: ignore[union-attr]
        return advanced

    def _commit(self, shard: ShardState, seq: Sequence, done: int) -> None:
        """The sequence's blocks that became whole, as far as its tokens are known, are
        reusable (not a preempted sequence's: it let go of them, and cannot be homed
        again before this step is in)."""
        if shard.blocks.prefix_cache and seq.status == Status.RUNNING:
            done = min(done, seq.length)
            whole = self._hashes(seq, done // self.layout.block_size)
            shard.blocks.commit(seq.seq_id, whole, done)

    def _advance(
        self,
        seq: Sequence,
        key: str,
        result: StepResult,
        now: float,
        advanced: list[Sequence],
        known: Callable[[], None] | None = None,
    ) -> None:
        """Appends what the step drew for the sequence (its accepted drafts first) up to
        a stop or max_tokens; `known` is called once they are in its output, before it
        ends."""
        accepted = result.accepted.get(key, ())
        tokens = [*accepted, result.tokens[key]]
        logprobs = [None] * len(tokens)
        if seq.logprobs is not None:  # asked: the shard sent one per token
            logprobs = [*result.accepted_logprobs.get(key, ()), result.logprobs[key]]
        advanced.append(seq)
        if seq.first_token_at is None:
            seq.first_token_at = now
        for token, logprob in zip(tokens, logprobs, strict=True):
            seq.output.append(token)
            self.generated += 1
            if seq.logprobs is not None:
                seq.logprobs.append(logprob)
            reason = "stop" if token in seq.stop_ids else None
            if reason is None and len(seq.output) >= seq.params.max_tokens:
                reason = "length"
            if reason is not None:
                if known is not None:
                    known()
                self.finish(seq, reason)
                return
        if known is not None:
            known()

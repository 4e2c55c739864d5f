"""The engine loop without Ray: requests in, steps on the shards, tokens out.

`EngineCore` validates and queues requests, asks the scheduler for each step's plans,
sends them to every shard at once (`launch_step`: Ray actors in `cluster.coordinator`;
in-process, any `run_step`), and records tokens, finish reasons and timings. It is
thread-safe: one thread steps, others submit and wait.

Steps overlap: step N+1 is planned and sent before step N's results come back, so that
the shards never wait for the host's bookkeeping, streaming and stop checks. A sequence
decoding in both steps decodes in N+1 the token its shard drew in N (`SeqWork.last_drawn`);
the scheduler learns it a step late. A sequence that ends in N (a stop token or string, a
cancel) has one decode slot of N+1 wasted, and what N+1 drew for it is dropped; max_tokens
costs nothing (the scheduler counts the tokens being drawn)."""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from gptoss_ray.cluster.scheduler import Reply, Scheduler, Status
from gptoss_ray.cluster.scheduler import Sequence as Seq
from gptoss_ray.model.config import ModelConfig
from gptoss_ray.model.types import (
    ContextLengthExceeded,
    EngineUnavailable,
    KVLayout,
    RequestError,
    SamplingParams,
    SeqWork,
    StepPlan,
    StepResult,
    TokenLogprob,
    UnknownRequest,
    check_prompt,
)

RunStep = Callable[[list[StepPlan]], list[StepResult]]
# sends a step's plans to the shards -> a function that waits for their results
LaunchStep = Callable[[list[StepPlan]], Callable[[], list[StepResult]]]


class ShardsRestarted(Exception):
    """Raised by a step's launch or results when a shard was lost and replaced: every
    step in flight is void, every shard dropped its sequences (recomputed from their
    tokens), and the replaced shards (`lost`) their prefix caches too."""

    def __init__(self, lost: Sequence[int] = ()) -> None:
        super().__init__(f"shards {list(lost)} were replaced")
        self.lost = list(lost)


@dataclass
class RequestOutput:
    request_id: str
    prompt_tokens: int
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    preemptions: int = 0
    error: str | None = None
    time_to_first_token: float | None = None  # seconds from submission
    inter_token_latency: float | None = None  # mean seconds between later tokens
    logprobs: list[TokenLogprob] | None = None  # one per token, when asked
    choices: list[RequestOutput] | None = None  # with n > 1: every choice, in order
    # each prompt token's (None for the first), when asked
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class InFlight:
    """A step sent to the shards whose results are not in yet."""

    plans: list[StepPlan]
    results: Callable[[], list[StepResult]]
    host_s: float  # its planning, while no other step was running (else 0: hidden)


@dataclass
class EngineStats:
    steps: int = 0
    generated_tokens: int = 0
    prefill_tokens: int = 0
    preemptions: int = 0
    recoveries: int = 0
    requests: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    # the same split over steady decoding alone (steps whose every chunk is one token's
    # decode): no prefill, and none of a batch's first step and last release
    decode: dict[str, float] = field(default_factory=lambda: defaultdict(float))


class EngineCore:
    def __init__(
        self,
        config: ModelConfig,
        world_size: int,
        layout: KVLayout,
        run_step: RunStep | None = None,
        *,
        launch_step: LaunchStep | None = None,
        overlap: bool = True,
        token_budget: int = 256,
        max_seqs: int = 64,
        max_prompt_tokens: int | None = None,
        prefix_cache: bool = True,
        cache_salt: str = "",
    ) -> None:
        """max_prompt_tokens: the longest prompt taken (default: what the context allows),
        so that one request cannot hold the engine for minutes of prefill. prefix_cache:
        reuse the KV of prompts' cached prefixes (`shards.kv_blocks`); cache_salt: what
        besides the tokens decides the keys (the model's path and dtype). run_step runs a
        step and returns its results; launch_step sends it and returns how to wait for them
        (one of the two). overlap: plan each step while the one before runs (False: one
        step at a time, for comparison)."""
        if (run_step is None) == (launch_step is None):
            raise ValueError("give run_step or launch_step")
        self.launch_step = launch_step or _launch_from(run_step)
        self.overlap = overlap
        self.config = config
        self.max_prompt_tokens = max_prompt_tokens
        self.world_size = world_size
        self._inflight: deque[InFlight] = deque()
        self._mark: float | None = None  # when the last step's bookkeeping ended
        self._early = 0.0  # seconds a step's results came before its share (see _take)
        self.scheduler = Scheduler(
            world_size,
            layout,
            config.attention_window,
            token_budget=token_budget,
            max_seqs=max_seqs,
            prefix_cache=prefix_cache,
            cache_salt=cache_salt.encode(),
        )
        self.requests: dict[str, Seq] = {}  # every choice's sequence, by its id
        self._forks: dict[str, list[str]] = {}  # request id -> its other choices' ids (n > 1)
        self.stats = EngineStats()
        self._arrivals = 0
        self.failure: str | None = None  # set when a step failed: nothing can finish now
        # One lock for everything; the loop waits on `_lock`, and each waiter for a
        # request's tokens on a condition of its own (`_watch`), so that a step wakes only
        # the waiters of sequences that advanced, not every waiter (256 `generate` waits
        # woken every step took a fifth of the loop's time at batch 256).
        self._mutex = threading.RLock()
        self._lock = threading.Condition(self._mutex)
        self._watchers: dict[str, set[threading.Condition]] = {}  # sequence id -> waiters
        self._nudged: set[str | None] = set()  # watchers whose next wait ends at once

    # -- requests ----------------------------------------------------------------------
    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        reply: Reply | Sequence[Reply] | None = None,
        priority: int = 0,
    ) -> str:
        """Queues a request; a bad one raises RequestError and nothing else changes. With
        `reply` (a chat request's ReplyBuilder, one per choice when params.n > 1), its
        tokens are fed to it as they come, and a stop string it finds ends the sequence at
        once. Choice i of n (`choice_ids`) draws with seed + i: what a request for one
        choice with that seed draws. priority: 0 interactive, 1 batch work (waits behind
        interactive requests, preempted first)."""
        prompt = list(prompt)
        if self.failure is not None:
            raise EngineUnavailable(f"the engine stopped after a failure: {self.failure}")
        self.check(prompt, params, f"request {request_id}" if request_id else "request")
        request_id = request_id or uuid.uuid4().hex
        replies = list(reply) if isinstance(reply, Sequence) else [reply] * params.n
        if len(replies) != params.n:
            raise ValueError(f"{len(replies)} replies for n={params.n} choices")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        now = time.monotonic()
        seqs = [
            Seq(
                seq_id=choice,
                prompt=prompt,
                params=params,
                seed=(seed + i) % (1 << 63),
                stop_ids=params.stop_ids(self.config.eos_token_ids),
                arrival=self._arrivals,
                priority=priority,
                submitted_at=now,
                reply=replies[i],
                logprobs=[] if params.logprobs is not None else None,
                # the prompt is scored once, by the choice that computes it
                prompt_logprobs=[None] if params.prompt_logprobs is not None and i == 0 else None,
            )
            for i, choice in enumerate(choice_ids(request_id, params.n))
        ]
        with self._lock:
            if any(seq.seq_id in self.requests for seq in seqs):
                raise RequestError(f"request id {request_id!r} is already in use")
            self._arrivals += 1
            self.stats.requests += 1
            for seq in seqs:
                self.requests[seq.seq_id] = seq
            if len(seqs) > 1:
                self._forks[request_id] = [seq.seq_id for seq in seqs[1:]]
            self.scheduler.add(seqs[0], seqs[1:])
            self._lock.notify_all()
        return request_id

    def check(self, prompt: list[int], params: SamplingParams, where: str = "request") -> None:
        """Raises the RequestError `submit` would for this prompt; `where` names it."""
        check_prompt(prompt, params.max_tokens, self.config, f"{where}: the prompt")
        if self.max_prompt_tokens is not None and len(prompt) > self.max_prompt_tokens:
            raise ContextLengthExceeded(
                f"{where}: the prompt has {len(prompt)} tokens; this server takes at most "
                f"{self.max_prompt_tokens} (its --max-prompt-tokens)",
                param="messages",
            )
        problem = self.scheduler.capacity_error(len(prompt), params.max_tokens)
        if problem:
            raise RequestError(f"{where}: {problem}")

    def output(self, request_id: str) -> RequestOutput:
        with self._lock:
            return self._outputs(request_id)

    def _choices(self, request_id: str) -> list[Seq]:
        """A request's sequences, one per choice (a choice's own id: that one alone)."""
        seq = self._get(request_id)
        return [seq] + [self.requests[c] for c in self._forks.get(request_id, ())]

    def _outputs(self, request_id: str) -> RequestOutput:
        """Choice 0's output; with n > 1, every choice's in `choices`."""
        seqs = self._choices(request_id)
        out = self._output(seqs[0])
        if len(seqs) > 1:
            out.choices = [self._output(seq) for seq in seqs]
            out.finished = all(o.finished for o in out.choices)
        return out

    def _get(self, request_id: str) -> Seq:
        try:
            return self.requests[request_id]
        except KeyError:
            raise UnknownRequest(f"unknown request id {request_id!r}") from None

    def _output(self, seq: Seq) -> RequestOutput:
        ttft = itl = None
        if seq.first_token_at is not None:
            ttft = seq.first_token_at - seq.submitted_at
            if seq.finished_at is not None and len(seq.output) > 1:
                itl = (seq.finished_at - seq.first_token_at) / (len(seq.output) - 1)
        return RequestOutput(
            request_id=seq.seq_id,
            prompt_tokens=len(seq.prompt),
            token_ids=list(seq.output),
            finished=seq.status == Status.FINISHED,
            finish_reason=seq.finish_reason,
            preemptions=seq.preemptions,
            time_to_first_token=ttft,
            inter_token_latency=itl,
            logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
            prompt_logprobs=list(seq.prompt_logprobs) if seq.prompt_logprobs is not None else None,
        )

    def wait(
        self, request_id: str, *, after: int = -1, timeout: float | None = None
    ) -> RequestOutput:
        """Blocks until the request has more than `after` tokens (in choice 0) or every
        choice finished."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            seqs = self._choices(request_id)
            self._wait_for(
                seqs,
                lambda: (
                    all(seq.status == Status.FINISHED for seq in seqs)
                    or (after is not None and len(seqs[0].output) > after)
                ),
                deadline,
            )
            return self._outputs(request_id)

    def wait_reply(
        self, request_id: str, *, after: int | Sequence[int] = 0, timeout: float | None = None
    ) -> tuple[list[Any], dict[str, Any] | None]:
        """A chat request's reply events past the first `after`, once there are some or
        it finished (or the timeout passed), and its reply once it finished (else None).
        With n > 1 choices, `after` counts each choice's events, the events come as
        (choice, event) pairs, and the reply has every choice's in `choices` (usage
        summed)."""
        news = self.wait_replies({request_id: after}, timeout=timeout)
        if request_id in news and news[request_id] is None:
            raise UnknownRequest(f"unknown request id {request_id!r}")
        return news.get(request_id) or ([], None)

    def wait_replies(
        self,
        cursors: dict[str, int | Sequence[int]],
        *,
        timeout: float | None = None,
        watcher: str | None = None,
    ) -> dict[str, tuple[list[Any], dict[str, Any] | None] | None]:
        """`wait_reply` for many requests at once (one call serves every stream of a
        front): returns when any of them has events past its cursor or finished (or the
        timeout passed, or `nudge(watcher)` was called), with (events, reply or None) for
        each that has, and None for each id the engine does not know (forgotten, or never
        submitted here)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            watched: dict[str, tuple[list[Seq], list[int]]] = {}
            out: dict[str, tuple[list[Any], dict[str, Any] | None] | None] = {}
            for rid, after in cursors.items():
                if rid not in self.requests:
                    out[rid] = None
                    continue
                seqs = self._choices(rid)
                if seqs[0].reply is None:
                    raise RequestError(f"request {rid!r} is not a chat request")
                watched[rid] = (
                    seqs,
                    [after] * len(seqs) if isinstance(after, int) else list(after),
                )

            def news(rid: str) -> bool:
                seqs, afters = watched[rid]
                done = all(s.status == Status.FINISHED for s in seqs)
                return done or any(
                    len(s.reply.events) > a for s, a in zip(seqs, afters, strict=True)
                )

            self._wait_for(
                [s for seqs, _ in watched.values() for s in seqs],
                lambda: bool(out) or any(news(r) for r in watched) or watcher in self._nudged,
                deadline,
            )
            self._nudged.discard(watcher)
            for rid in watched:
                if news(rid) or self.failure is not None:
                    out[rid] = self._events_past(*watched[rid])
            return out

    def _events_past(
        self, seqs: list[Seq], afters: list[int]
    ) -> tuple[list[Any], dict[str, Any] | None]:
        # finishing a reply can add events (the text of a character its end cut)
        done = all(s.status == Status.FINISHED for s in seqs)
        reply = self._reply(seqs) if done else None
        if len(seqs) == 1:
            return list(seqs[0].reply.events[afters[0] :]), reply
        events = [
            (i, ev)
            for i, (s, a) in enumerate(zip(seqs, afters, strict=True))
            for ev in s.reply.events[a:]
        ]
        return events, reply

    def _wait_for(
        self, seqs: Sequence[Seq], ready: Callable[[], bool], deadline: float | None
    ) -> None:
        """Waits (with the lock held) until `ready()`, a failure, or the deadline; woken by
        news of `seqs` (or of everyone)."""
        with self._watch(seqs) as news:
            while not ready() and self.failure is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return
                news.wait(left)

    @contextlib.contextmanager
    def _watch(self, seqs: Sequence[Seq]) -> Iterator[threading.Condition]:
        """A condition (with the lock held) that is notified when one of `seqs` gets a
        token or finishes, or when every waiter is (`_notify()`)."""
        news = threading.Condition(self._mutex)
        for seq in seqs:
            self._watchers.setdefault(seq.seq_id, set()).add(news)
        try:
            yield news
        finally:
            for seq in seqs:
                waiters = self._watchers.get(seq.seq_id)
                if waiters is not None:
                    waiters.discard(news)
                    if not waiters:
                        del self._watchers[seq.seq_id]

    def _notify(self, seqs: Sequence[Seq] | None = None) -> None:
        """Wakes the waiters of `seqs`; None: every waiter, and the loop (with the lock)."""
        if seqs is None:
            self._lock.notify_all()
            conditions = {c for waiters in self._watchers.values() for c in waiters}
        else:
            conditions = {c for seq in seqs for c in self._watchers.get(seq.seq_id, ())}
        for condition in conditions:
            condition.notify_all()

    def nudge(self, watcher: str) -> None:
        """Ends the `wait_replies` of `watcher` now, or its next one at once: its front
        has a new reader, which the next call will cover."""
        with self._lock:
            self._nudged.add(watcher)
            self._notify()

    @staticmethod
    def _reply(seqs: list[Seq]) -> dict[str, Any]:
        replies = [
            s.reply.finish(s.finish_reason, request_id=s.seq_id, prompt_tokens=len(s.prompt))
            for s in seqs
        ]
        if seqs[0].prompt_logprobs is not None:
            replies[0]["prompt_logprobs"] = list(seqs[0].prompt_logprobs)
        if len(replies) == 1:
            return replies[0]
        completion = sum(r["usage"]["completion_tokens"] for r in replies)
        prompt = replies[0]["usage"]["prompt_tokens"]
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        return {**replies[0], "usage": usage, "choices": replies}

    def fail(self, reason: str) -> None:
        """A step failed (a shard died): wake every waiter; new requests are refused."""
        with self._lock:
            self.failure = reason
            self._notify()

    def cancel(self, request_id: str) -> None:
        """Stops a request (every choice): it finishes now with finish_reason "cancelled"."""
        with self._lock:
            if request_id not in self.requests:
                return
            for seq in self._choices(request_id):
                if seq.status != Status.FINISHED:
                    self.scheduler.finish(seq, "cancelled")
            self._notify()

    def forget(self, request_id: str) -> None:
        with self._lock:
            if request_id not in self.requests:
                return
            seqs = self._choices(request_id)
            if all(seq.status == Status.FINISHED for seq in seqs):
                for seq in seqs:
                    del self.requests[seq.seq_id]
                self._forks.pop(request_id, None)

    def snapshot(self) -> dict[str, Any]:
        """One consistent reading of the engine, for status, stats and metrics: counters,
        seconds per phase, the queue, running sequences and free KV blocks per shard."""
        with self._lock:
            s, sched = self.stats, self.scheduler
            return {
                "steps": s.steps,
                "generated_tokens": s.generated_tokens,
                "prefill_tokens": s.prefill_tokens,
                "preemptions": s.preemptions,
                "recoveries": s.recoveries,
                "requests": s.requests,
                "seconds": dict(s.seconds),
                "decode": dict(s.decode),
                "waiting": len(sched.waiting),
                "running": [len(shard.running) for shard in sched.shards],
                "free_blocks": [sched.free_blocks(r) for r in range(self.world_size)],
                "prefix_cache": [shard.blocks.cache_stats() for shard in sched.shards],
                "failure": self.failure,
            }

    # -- stepping ----------------------------------------------------------------------
    def _busy(self) -> bool:
        """Sequences to run or steps still running (with the lock held)."""
        return self.scheduler.has_work() or bool(self._inflight)

    def has_work(self) -> bool:
        with self._lock:
            return self._busy()

    def wait_for_work(self, timeout: float | None) -> bool:
        """Sleeps until there is work (a request, a step in flight), `wake`, or timeout."""
        with self._lock:
            if not self._busy():
                self._lock.wait(timeout)
            return self._busy()

    def wake(self) -> None:
        """Ends a `wait_for_work` now (the loop is told to stop)."""
        with self._lock:
            self._notify()

    def step(self) -> None:
        """Plans and sends the next step, then takes in the results of the one before it
        (overlap) or of this one; with nothing to plan, of every step still running."""
        t0 = time.perf_counter()
        with self._lock:
            plans = self.scheduler.schedule()
        host = time.perf_counter() - t0
        if any(p.work or p.release for p in plans):
            try:
                results = self.launch_step(plans)
            except ShardsRestarted as restart:
                self._restarted(restart)
                return
            if not self._inflight:
                self._mark = t0  # the shards were idle: this step's time starts here
                self._early = 0.0
            self._inflight.append(InFlight(plans, results, 0.0 if self._inflight else host))
        keep = 1 if self.overlap and self._inflight and self._inflight[-1].plans is plans else 0
        while len(self._inflight) > keep:
            self._take(self._inflight.popleft())

    def _take(self, step: InFlight) -> None:
        try:
            results = step.results()
        except ShardsRestarted as restart:
            self._restarted(restart)
            return
        t0 = time.perf_counter()
        with self._lock:
            advanced = self.scheduler.update(step.plans, results)
            for seq in advanced:
                if seq.reply is not None:
                    fed = len(seq.reply.tokens)
                    lps = seq.logprobs[fed:] if seq.logprobs is not None else None
                    seq.reply.feed(seq.output[fed:], lps)
                    if seq.reply.stopped and seq.status != Status.FINISHED:
                        self.scheduler.finish(seq, "stop")
            now = time.perf_counter()
            stats = self.stats
            stats.steps += 1
            stats.generated_tokens += len(advanced)
            stats.prefill_tokens += sum(self._prompt_tokens(w) for p in step.plans for w in p.work)
            stats.preemptions = self.scheduler.preempted
            # the slowest shard sets the pace; its split tells where the time went
            slowest = max(results, key=lambda r: sum(r.seconds.values()))
            for phase, sec in slowest.seconds.items():
                stats.seconds[phase] += sec
            # A step's time runs from the end of the last one's bookkeeping (or from its
            # planning, if the shards were idle) to the end of its own. Beyond the slowest
            # shard's work, the host's planning and bookkeeping that no running step hid
            # are the coordinator's; the rest is the round trip (`rpc`). Results that come
            # late make one interval longer and the next shorter than the shard's step:
            # what one step's interval falls short is taken from the next steps' round
            # trips, so that their sum is not biased by the jitter.
            interval = now - (self._mark if self._mark is not None else t0)
            exposed = step.host_s + (0.0 if self._inflight else now - t0)
            rest = interval - sum(slowest.seconds.values()) - exposed - self._early
            rpc = max(0.0, rest)
            self._early = rpc - rest
            split = {"coordinator": exposed, "rpc": rpc, "step": interval}
            for phase, sec in split.items():
                stats.seconds[phase] += sec
            works = [w for p in step.plans for w in p.work]
            if works and all(w.sample and w.size == 1 for w in works):
                stats.decode["steps"] += 1
                for phase, sec in split.items():
                    stats.decode[phase] += sec
            self._mark = now
            self._notify(advanced)

    def _restarted(self, restart: ShardsRestarted) -> None:
        with self._lock:
            # Recompute from prompt + emitted tokens: same greedy output, nothing emitted
            # twice (the void steps' tokens were never recorded).
            self._inflight.clear()
            self.scheduler.requeue_all(restart.lost)
            self.stats.recoveries += 1
            self._mark = None
            self._notify()

    def _prompt_tokens(self, work: SeqWork) -> int:
        """The prompt's tokens in a step's chunk (a decode step feeds none: its one token
        was generated; a prompt computed again after a preemption counts again)."""
        seq = self.requests.get(work.seq_id)
        prompt = len(seq.prompt) if seq is not None else 0
        return max(0, min(work.start + work.size, prompt) - work.start)

    def run_until_done(self) -> None:
        while self.has_work():
            self.step()


def choice_ids(request_id: str, n: int) -> list[str]:
    """The sequence ids of a request's n choices: its own id, then `id#1`, `id#2`, ..."""
    return [request_id] + [f"{request_id}#{i}" for i in range(1, n)]


def _launch_from(run_step: RunStep) -> LaunchStep:
    """A step run at once, as a launch whose results are ready."""

    def launch(plans: list[StepPlan]) -> Callable[[], list[StepResult]]:
        results = run_step(plans)
        return lambda: results

    return launch

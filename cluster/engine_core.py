"""The engine loop without Ray: requests in, steps on the shards, tokens out.

`EngineCore` validates and queues requests, asks the scheduler for each step's plans,
runs them on every shard at once through `run_step` (in-process for one shard; Ray
actors in `cluster.coordinator`), and records tokens, finish reasons and timings. It is
thread-safe: one thread steps, others submit and wait."""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
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
    UnknownRequest,
    check_prompt,
)

RunStep = Callable[[list[StepPlan]], list[StepResult]]


class ShardsRestarted(Exception):
    """Raised by `run_step` when a shard was lost and replaced: the step's results are
    void, every shard dropped its sequences (recomputed from their tokens), and the
    replaced shards (`lost`) their prefix caches too."""

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


@dataclass
class EngineStats:
    steps: int = 0
    generated_tokens: int = 0
    prefill_tokens: int = 0
    preemptions: int = 0
    recoveries: int = 0
    requests: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))


class EngineCore:
    def __init__(
        self,
        config: ModelConfig,
        world_size: int,
        layout: KVLayout,
        run_step: RunStep,
        *,
        token_budget: int = 256,
        max_seqs: int = 64,
        max_prompt_tokens: int | None = None,
        prefix_cache: bool = True,
        cache_salt: str = "",
    ) -> None:
        """max_prompt_tokens: the longest prompt taken (default: what the context allows),
        so that one request cannot hold the engine for minutes of prefill. prefix_cache:
        reuse the KV of prompts' cached prefixes (`shards.kv_blocks`); cache_salt: what
        besides the tokens decides the keys (the model's path and dtype)."""
        self.config = config
        self.max_prompt_tokens = max_prompt_tokens
        self.world_size = world_size
        self.run_step = run_step
        self.scheduler = Scheduler(
            world_size,
            layout,
            config.attention_window,
            token_budget=token_budget,
            max_seqs=max_seqs,
            prefix_cache=prefix_cache,
            cache_salt=cache_salt.encode(),
        )
        self.requests: dict[str, Seq] = {}
        self.stats = EngineStats()
        self._arrivals = 0
        self.failure: str | None = None  # set when a step failed: nothing can finish now
        self._lock = threading.Condition()

    # -- requests ----------------------------------------------------------------------
    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        reply: Reply | None = None,
    ) -> str:
        """Queues a request; a bad one raises RequestError and nothing else changes. With
        `reply` (a chat request's ReplyBuilder), its tokens are fed to it as they come,
        and a stop string it finds ends the sequence at once."""
        prompt = list(prompt)
        if self.failure is not None:
            raise EngineUnavailable(f"the engine stopped after a failure: {self.failure}")
        self._check(prompt, params, request_id)
        request_id = request_id or uuid.uuid4().hex
        seq = Seq(
            seq_id=request_id,
            prompt=prompt,
            params=params,
            seed=params.seed if params.seed is not None else secrets.randbits(63),
            stop_ids=params.stop_ids(self.config.eos_token_ids),
            arrival=self._arrivals,
            submitted_at=time.monotonic(),
            reply=reply,
        )
        with self._lock:
            if request_id in self.requests:
                raise RequestError(f"request id {request_id!r} is already in use")
            self._arrivals += 1
            self.stats.requests += 1
            self.requests[request_id] = seq
            self.scheduler.add(seq)
            self._lock.notify_all()
        return request_id

    def _check(self, prompt: list[int], params: SamplingParams, request_id: str | None) -> None:
        where = f"request {request_id}" if request_id else "request"
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
            seq = self._get(request_id)
            return self._output(seq)

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
        )

    def wait(
        self, request_id: str, *, after: int = -1, timeout: float | None = None
    ) -> RequestOutput:
        """Blocks until the request has more than `after` tokens or is finished."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            seq = self._get(request_id)
            while (
                seq.status != Status.FINISHED
                and (after is None or len(seq.output) <= after)
                and self.failure is None
            ):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._lock.wait(left)
            return self._output(seq)

    def wait_reply(
        self, request_id: str, *, after: int = 0, timeout: float | None = None
    ) -> tuple[list[Any], dict[str, Any] | None]:
        """A chat request's reply events past the first `after`, once there are some or
        it finished (or the timeout passed), and its reply once it finished (else None)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            seq = self._get(request_id)
            if seq.reply is None:
                raise RequestError(f"request {request_id!r} is not a chat request")
            events = seq.reply.events
            while seq.status != Status.FINISHED and len(events) <= after and self.failure is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._lock.wait(left)
            reply = None
            if seq.status == Status.FINISHED:
                reply = seq.reply.finish(
                    seq.finish_reason, request_id=seq.seq_id, prompt_tokens=len(seq.prompt)
                )
            return list(events[after:]), reply

    def fail(self, reason: str) -> None:
        """A step failed (a shard died): wake every waiter; new requests are refused."""
        with self._lock:
            self.failure = reason
            self._lock.notify_all()

    def cancel(self, request_id: str) -> None:
        """Stops a request: it finishes now with finish_reason "cancelled"."""
        with self._lock:
            seq = self.requests.get(request_id)
            if seq is not None and seq.status != Status.FINISHED:
                self.scheduler.finish(seq, "cancelled")
                self._lock.notify_all()

    def forget(self, request_id: str) -> None:
        with self._lock:
            seq = self.requests.get(request_id)
            if seq is not None and seq.status == Status.FINISHED:
                del self.requests[request_id]

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
                "waiting": len(sched.waiting),
                "running": [len(shard.running) for shard in sched.shards],
                "free_blocks": [sched.free_blocks(r) for r in range(self.world_size)],
                "prefix_cache": [shard.blocks.cache_stats() for shard in sched.shards],
                "failure": self.failure,
            }

    # -- stepping ----------------------------------------------------------------------
    def has_work(self) -> bool:
        with self._lock:
            return self.scheduler.has_work()

    def wait_for_work(self, timeout: float) -> bool:
        with self._lock:
            if not self.scheduler.has_work():
                self._lock.wait(timeout)
            return self.scheduler.has_work()

    def step(self) -> None:
        t0 = time.perf_counter()
        with self._lock:
            plans = self.scheduler.schedule()
        t1 = time.perf_counter()
        try:
            results = self.run_step(plans)
        except ShardsRestarted as restart:
            with self._lock:
                # Recompute from prompt + emitted tokens: same greedy output, nothing
                # emitted twice (the failed step's tokens were never recorded).
                self.scheduler.requeue_all(restart.lost)
                self.stats.recoveries += 1
                self._lock.notify_all()
            return
        t2 = time.perf_counter()
        with self._lock:
            for seq in self.scheduler.update(plans, [r.tokens for r in results]):
                if seq.reply is not None:
                    seq.reply.feed(seq.output[len(seq.reply.tokens) :])
                    if seq.reply.stopped and seq.status != Status.FINISHED:
                        self.scheduler.finish(seq, "stop")
            stats = self.stats
            stats.steps += 1
            stats.generated_tokens += sum(len(r.tokens) for r in results)
            stats.prefill_tokens += sum(self._prompt_tokens(w) for p in plans for w in p.work)
            stats.preemptions = self.scheduler.preempted
            # the slowest shard sets the pace; its split tells where the time went
            slowest = max(results, key=lambda r: sum(r.seconds.values()))
            for phase, sec in slowest.seconds.items():
                stats.seconds[phase] += sec
            # the coordinator's own share: scheduling and bookkeeping here, and the
            # round trip to the shards beyond the slowest shard's step
            stats.seconds["coordinator"] += (t1 - t0) + (time.perf_counter() - t2)
            stats.seconds["rpc"] += max(0.0, (t2 - t1) - sum(slowest.seconds.values()))
            stats.seconds["step"] += time.perf_counter() - t0
            self._lock.notify_all()

    def _prompt_tokens(self, work: SeqWork) -> int:
        """The prompt's tokens in a step's chunk (a decode step feeds none: its one token
        was generated; a prompt computed again after a preemption counts again)."""
        seq = self.requests.get(work.seq_id)
        prompt = len(seq.prompt) if seq is not None else 0
        return max(0, min(work.start + len(work.tokens), prompt) - work.start)

    def run_until_done(self) -> None:
        while self.has_work():
            self.step()

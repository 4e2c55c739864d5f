"""The engine loop without Ray: token requests in, steps on the shards, token deltas out.

`EngineCore` validates and queues requests (`EngineRequest`), asks the scheduler for each
step's plans, sends them to every shard at once (`launch_step`: Ray actors in
`cluster.runtime.coordinator`; in-process, any `run_step`), and records tokens, finish reasons and
timings. After each step it puts every front's new tokens in that front's outbox, in one
batch (`cluster.engine.messages`); text never comes here. It is thread-safe: one thread steps,
others add, cancel and read.

Steps overlap: step N+1 is planned and sent before step N's results come back, so that
the shards never wait for the host's bookkeeping and streaming. A sequence decoding in
both steps decodes in N+1 the token its shard drew in N (`SeqWork.last_drawn`); the
scheduler learns it a step late. A sequence that ends in N (a stop token, a cancel) has
one decode slot of N+1 wasted, and what N+1 drew for it is dropped; max_tokens costs
nothing (the scheduler counts the tokens being drawn). A stop string is found by the
front, which aborts the sequence: the steps planned before its abort arrives still draw
for it, and the front drops what they drew."""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gptoss_ray.cluster.engine.drafts import Drafter
from gptoss_ray.cluster.engine.messages import EngineRequest, Outbox, RequestOutput, TokenDelta
from gptoss_ray.cluster.engine.scheduler import Scheduler, Status
from gptoss_ray.cluster.engine.scheduler import Sequence as Seq
from gptoss_ray.model.config import ConfigError, ModelConfig
from gptoss_ray.model.lora_config import read_adapter_config
from gptoss_ray.model.types import (
    ContextLengthExceeded,
    EngineUnavailable,
    KVLayout,
    LoraInUse,
    ModelNotFound,
    RequestError,
    SamplingParams,
    SeqWork,
    StepPlan,
    StepResult,
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
        drafter: Drafter | None = None,
        num_draft_tokens: int = 0,
        loras: dict[str, str] | None = None,
        max_loras: int = 0,
        max_lora_rank: int = 16,
        lora_updates: bool = False,
    ) -> None:
        """loras: the LoRA adapters served (`SamplingParams.lora`), name -> PEFT folder,
        in max_loras slots (0: LoRA off), ranks up to max_lora_rank; with lora_updates,
        `add_lora` and `remove_lora` change them while serving (their folders are read
        on the engine's machines: an operator's choice, `--enable-lora`). max_prompt_tokens: the longest prompt taken (default: what the context allows),
        so that one request cannot hold the engine for minutes of prefill. prefix_cache:
        reuse the KV of prompts' cached prefixes (`cluster.engine.kv_blocks`); cache_salt: what
        besides the tokens decides the keys (the model's path and dtype). run_step runs a
        step and returns its results; launch_step sends it and returns how to wait for them
        (one of the two). overlap: plan each step while the one before runs (False: one
        step at a time, for comparison). drafter: speculative decoding, up to
        num_draft_tokens draft tokens verified with each decode (`cluster.engine.drafts`)."""
        if (run_step is None) == (launch_step is None):
            raise ValueError("give run_step or launch_step")
        self.launch_step = launch_step or _launch_from(run_step)
        # name -> (PEFT folder, load count): a reload under a name is read afresh
        self.loras: dict[str, tuple[str, int]] = {n: (p, 0) for n, p in (loras or {}).items()}
        self.max_loras, self.max_lora_rank = max_loras, max_lora_rank
        self.lora_updates = lora_updates
        self._loads = 0
        # Drafts follow a sequence's last token: with a step in flight it is not known
        # yet, so with speculation each step is planned after the last one's results.
        self.overlap = overlap and drafter is None
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
            drafter=drafter,
            num_draft_tokens=num_draft_tokens,
            max_loras=max_loras,
            loras=self.loras,
        )
        self.requests: dict[str, Seq] = {}  # every choice's sequence, by its id
        self._forks: dict[str, list[str]] = {}  # request id -> its other choices' ids (n > 1)
        self.stats = EngineStats()
        self._arrivals = 0
        self.failure: str | None = None  # set when a step failed: nothing can finish now
        # One lock for everything; the loop waits on `_lock` for work. Readers wait on
        # their front's outbox (`Outbox`), never on this lock.
        self._mutex = threading.RLock()
        self._lock = threading.Condition(self._mutex)
        self._outboxes: dict[str, Outbox] = {}  # front -> its deltas not taken yet

    # -- requests ----------------------------------------------------------------------
    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
    ) -> str:
        """`add` for one prompt whose tokens are read with `output` (no front)."""
        request = EngineRequest(request_id or uuid.uuid4().hex, list(prompt), params, priority)
        self.add([request])
        return request.request_id

    def add(self, requests: Sequence[EngineRequest], front: str | None = None) -> None:
        """Queues requests, all or none: a bad one raises RequestError (naming it "prompt
        i" when there are several) and nothing else changes. With `front`, each step's new
        tokens of every choice go to that front's outbox (`outbox`), and a request is
        forgotten once its last delta went there. Choice i of n (`choice_ids`) draws with
        seed + i: what a request for one choice with that seed draws."""
        if self.failure is not None:
            raise EngineUnavailable(f"the engine stopped after a failure: {self.failure}")
        for i, request in enumerate(requests):
            self.check(
                request.prompt, request.params, f"prompt {i}" if len(requests) > 1 else "request"
            )
        now = time.monotonic()
        queued = [self._sequences(request, front, now) for request in requests]
        with self._lock:
            ids = [seq.seq_id for seqs in queued for seq in seqs]
            taken = [i for i in ids if i in self.requests]
            if taken or len(set(ids)) < len(ids):
                raise RequestError(f"request id {(taken or ids)[0]!r} is already in use")
            if front is not None:
                self.outbox(front)
            for seqs in queued:
                self._arrivals += 1
                self.stats.requests += 1
                for seq in seqs:
                    seq.arrival = self._arrivals
                    self.requests[seq.seq_id] = seq
                if len(seqs) > 1:
                    self._forks[seqs[0].seq_id] = [seq.seq_id for seq in seqs[1:]]
                self.scheduler.add(seqs[0], seqs[1:])
            self._lock.notify_all()

    def _sequences(self, request: EngineRequest, front: str | None, now: float) -> list[Seq]:
        params = request.params
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        return [
            Seq(
                seq_id=choice,
                prompt=request.prompt,
                params=params,
                seed=(seed + i) % (1 << 63),
                stop_ids=params.stop_ids(self.config.eos_token_ids),
                arrival=0,
                priority=request.priority,
                submitted_at=now,
                front=front,
                request_id=request.request_id,
                choice=i,
                logprobs=[] if params.logprobs is not None else None,
                # the prompt is scored once, by the choice that computes it
                prompt_logprobs=[None] if params.prompt_logprobs is not None and i == 0 else None,
            )
            for i, choice in enumerate(choice_ids(request.request_id, params.n))
        ]

    def check(self, prompt: list[int], params: SamplingParams, where: str = "request") -> None:
        """Raises the RequestError `add` would for this prompt; `where` names it."""
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
        if params.lora is not None and params.lora not in self.loras:  # (read unlocked)
            served = ", ".join(self.loras) or "none"
            raise ModelNotFound(
                f"{where}: no LoRA adapter {params.lora!r} is served (served: {served})",
                param="model",
            )

    def add_lora(self, name: str, path: str) -> None:
        """Serves one more LoRA adapter under `name` (vLLM's /v1/load_lora_adapter): its
        config is checked here; each shard reads its weights when a request first needs
        them."""
        self._lora_updates_on()
        try:
            read_adapter_config(path, self.max_lora_rank, name)
        except ConfigError as exc:
            raise RequestError(str(exc), param="lora_path") from None
        with self._lock:
            if name in self.loras:
                raise RequestError(f"a LoRA adapter {name!r} is loaded already", param="lora_name")
            self._loads += 1
            self.loras[name] = (path, self._loads)

    def _lora_updates_on(self) -> None:
        if not (self.lora_updates and self.max_loras):
            raise RequestError(
                "this engine does not load or unload LoRA adapters while serving: start it "
                "with --enable-lora"
            )

    def remove_lora(self, name: str) -> None:
        """Stops serving an adapter; refused while a request that uses it runs or waits."""
        self._lora_updates_on()
        with self._lock:
            if name not in self.loras:
                raise ModelNotFound(f"no LoRA adapter {name!r} is loaded", param="lora_name")
            users = [s for s in self.scheduler.live.values() if s.params.lora == name]
            if users:
                raise LoraInUse(
                    f"LoRA adapter {name!r} is in use by {len(users)} sequence(s); unload it "
                    "once they finish",
                    param="lora_name",
                )
            del self.loras[name]
            self.scheduler.drop_lora(name)

    def output(self, request_id: str) -> RequestOutput:
        """What a request (added without a front) has so far: choice 0's output; with
        n > 1, every choice's in `choices`."""
        with self._lock:
            seqs = self._choices(request_id)
            out = self._output(seqs[0])
            if len(seqs) > 1:
                out.choices = [self._output(seq) for seq in seqs]
                out.finished = all(o.finished for o in out.choices)
            return out

    def _choices(self, request_id: str) -> list[Seq]:
        """A request's sequences, one per choice (a choice's own id: that one alone)."""
        try:
            seq = self.requests[request_id]
        except KeyError:
            raise UnknownRequest(f"unknown request id {request_id!r}") from None
        return [seq] + [self.requests[c] for c in self._forks.get(request_id, ())]

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

    # -- fronts ------------------------------------------------------------------------
    def outbox(self, front: str) -> Outbox:
        """The outbox of a front's deltas (made on first use: by its first request, or by
        its reader, whichever comes first)."""
        with self._lock:
            box = self._outboxes.get(front)
            if box is None:
                box = self._outboxes[front] = Outbox()
            return box

    def close_outbox(self, front: str) -> None:
        """The front is gone: its requests are cancelled and forgotten."""
        with self._lock:
            box = self._outboxes.pop(front, None)
            if box is not None:
                box.close()
            for seq in [s for s in self.requests.values() if s.front == front]:
                if seq.status != Status.FINISHED:
                    self.scheduler.finish(seq, "cancelled")
                del self.requests[seq.seq_id]
                self._forks.pop(seq.seq_id, None)

    def close_outboxes(self) -> None:
        """Every front's stream ends (the engine shuts down)."""
        for front in list(self._outboxes):
            self.close_outbox(front)

    def _publish(self, seqs: Iterable[Seq]) -> None:
        """Sends what `seqs` drew since their last delta (and their end) to their fronts,
        one put per front; a request whose every choice ended is forgotten here."""
        batches: dict[str, list[TokenDelta]] = defaultdict(list)
        ended = []
        for seq in seqs:
            if seq.front is None or seq.ended:
                continue
            done = seq.status == Status.FINISHED
            if seq.sent == len(seq.output) and not done:
                continue
            lps = seq.logprobs[seq.sent :] if seq.logprobs is not None else None
            scored = seq.prompt_logprobs if seq.sent == 0 else None
            delta = TokenDelta(
                seq.request_id,
                seq.choice,
                seq.output[seq.sent :],
                lps,
                seq.finish_reason if done else None,
                scored,
                seq.preemptions,
                drafts_proposed=seq.drafts_proposed,
                drafts_accepted=seq.drafts_accepted,
            )
            batches[seq.front].append(delta)
            seq.sent, seq.ended = len(seq.output), done
            if done:
                ended.append(seq.request_id)
        for request_id in ended:
            seqs = self._choices(request_id) if request_id in self.requests else []
            if seqs and all(s.ended for s in seqs):
                for s in seqs:
                    del self.requests[s.seq_id]
                self._forks.pop(request_id, None)
        for front, deltas in batches.items():
            box = self._outboxes.get(front)
            if box is not None:
                box.put(deltas)

    def fail(self, reason: str) -> None:
        """A step failed (a shard died): every front hears it for each request it holds;
        new requests are refused."""
        with self._lock:
            self.failure = reason
            for front, box in self._outboxes.items():
                box.put(
                    [
                        TokenDelta(s.request_id, s.choice, [], error=reason)
                        for s in self.requests.values()
                        if s.front == front
                    ]
                )
            self._lock.notify_all()

    def cancel(self, request_id: str, choice: int | None = None) -> None:
        """Stops a request (every choice, or the one given): it finishes now with
        finish_reason "cancelled"; its front gets that as its last delta."""
        with self._lock:
            if request_id not in self.requests:
                return
            seqs = self._choices(request_id)
            if choice is not None:
                seqs = [s for s in seqs if s.choice == choice]
            for seq in seqs:
                if seq.status != Status.FINISHED:
                    self.scheduler.finish(seq, "cancelled")
            self._publish(seqs)

    def forget(self, request_id: str) -> None:
        """Drops a finished request added without a front (one with a front is dropped
        when its last delta is sent)."""
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
                # speculative decoding: draft tokens proposed and accepted, and the
                # decodes that verified drafts (each gave accepted + 1 tokens)
                "drafts_proposed": sched.drafts_proposed,
                "drafts_accepted": sched.drafts_accepted,
                "drafted_steps": sched.drafted_steps,
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
            self._lock.notify_all()

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
            self._publish(advanced)
            now = time.perf_counter()
            stats = self.stats
            stats.steps += 1
            stats.generated_tokens = self.scheduler.generated  # drafts kept count too
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

    def _restarted(self, restart: ShardsRestarted) -> None:
        with self._lock:
            # Recompute from prompt + emitted tokens: same greedy output, nothing emitted
            # twice (the void steps' tokens were never recorded).
            self._inflight.clear()
            self.scheduler.requeue_all(restart.lost)
            self.stats.recoveries += 1
            self._mark = None

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

"""What crosses between a front and an engine: tokens only.

A front sends `EngineRequest`s (prompt ids, sampling parameters, an id); the engine pushes
back, after each step, one batch of `TokenDelta`s per front for the requests that front
holds (`Outbox`). No text, chat or harmony crosses: the front renders prompts and builds
replies (`cluster.client.chat`, `cluster.client.completions`) in its own process."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from gptoss_ray.model.types import SamplingParams, TokenLogprob


@dataclass(frozen=True)
class EngineRequest:
    """A prompt to complete. Its n choices (`params.n`) are sequences `request_id`,
    `request_id#1`, ...; priority 0 is interactive, 1 batch work (waits behind
    interactive requests, preempted first)."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    priority: int = 0


@dataclass(frozen=True)
class TokenDelta:
    """A choice's tokens drawn since its last delta, with their logprobs when asked;
    `finish_reason` on its last one (`error` instead when the engine failed). The first
    delta of choice 0 carries the prompt's logprobs, when asked."""

    request_id: str
    choice: int
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    preemptions: int = 0
    error: str | None = None
    # speculative decoding, so far: draft tokens proposed for the choice, and kept
    drafts_proposed: int = 0
    drafts_accepted: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


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
    drafts_proposed: int = 0  # speculative decoding: draft tokens proposed, and kept
    drafts_accepted: int = 0


@dataclass
class Outbox:
    """The deltas waiting for one front: the step loop puts a step's at once, the front's
    reader takes all there are (a slow reader gets bigger batches, never more of them,
    and the step loop never waits for it)."""

    deltas: list[TokenDelta] = field(default_factory=list)
    closed: bool = False
    _ready: threading.Condition = field(default_factory=threading.Condition)

    def put(self, deltas: list[TokenDelta]) -> None:
        with self._ready:
            self.deltas += deltas
            self._ready.notify_all()

    def take(self, timeout: float | None = None) -> list[TokenDelta] | None:
        """Every delta waiting ([] after `timeout` without any); None once closed."""
        with self._ready:
            if not self.deltas and not self.closed:
                self._ready.wait(timeout)
            if self.closed and not self.deltas:
                return None
            out, self.deltas = self.deltas, []
            return out

    def close(self) -> None:
        with self._ready:
            self.closed = True
            self._ready.notify_all()

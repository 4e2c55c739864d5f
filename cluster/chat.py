"""Chat on top of token ids: an OpenAI (or harmony) chat request becomes a prompt, its
sampling parameters and stop strings; the completion's ids become a reply.

`ReplyBuilder` is the one reply builder: fed ids as they are sampled, it parses harmony
as a stream into typed events (reasoning and answer text, tool calls and their
arguments, message ends), and when the sequence ends it gives the reply (an OpenAI
assistant message, finish reason, usage, the parsed harmony messages). Chat completions
(streamed and not), Responses, `Engine.chat`/`chat_stream` and batch jobs all read it.
Stop strings end the answer where they begin: no event holds text at or past one (text
that may be the start of one waits until the next tokens tell), and the engine stops
the sequence on the step that completed it."""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from gptoss_ray.model import harmony
from gptoss_ray.model.harmony.openai_chat import (
    ChatRequest,
    HarmonyRequest,
    from_harmony,
    new_call_id,
    to_harmony,
)
from gptoss_ray.model.types import SamplingParams


def chat_prompt(request: Any, context: int) -> tuple[list[int], SamplingParams, list[str]]:
    """Render a chat request for completion and read its sampling fields. The request is
    an OpenAI chat request, or {"conversation": <openai-harmony JSON>, ...sampling}."""
    if isinstance(request, dict) and "conversation" in request:
        fields = HarmonyRequest.parse(request)
        messages = harmony.Conversation.from_dict(fields.conversation).messages
    else:
        fields = request if isinstance(request, ChatRequest) else ChatRequest.parse(request)
        messages = to_harmony(fields, conversation_start_date=datetime.date.today().isoformat())
    prompt = harmony.render_for_completion(messages)
    r = fields
    max_tokens = r.max_completion_tokens or r.max_tokens or max(1, min(4096, context - len(prompt)))
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if r.temperature is None else r.temperature,
        top_p=1.0 if r.top_p is None else r.top_p,
        top_k=r.top_k or 0,
        seed=r.seed,
    )
    stops = [r.stop] if isinstance(r.stop, str) else list(r.stop or [])
    return prompt, params, stops


# -- the reply, as events ------------------------------------------------------------------
Kind = Literal["reasoning", "content", "call"]


@dataclass(frozen=True)
class TextDelta:
    """New text of the message being written: reasoning (analysis), the answer, or a tool
    call's arguments (`call`: the call's index)."""

    kind: Kind
    text: str
    channel: str | None
    recipient: str | None
    call: int | None = None


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    call_id: str
    name: str


@dataclass(frozen=True)
class MessageEnd:
    kind: Kind


Event = TextDelta | ToolCallStart | MessageEnd


class ReplyBuilder:
    def __init__(self, stop: Sequence[str] = ()) -> None:
        self.stop = [s for s in stop if s]
        self.parser = harmony.StreamParser("assistant", strict=False)
        self.events: list[Event] = []
        self.stopped = False  # a stop string ended the answer
        self.reply: dict[str, Any] | None = None
        self._kind: Kind | None = None  # of the message being written
        self._calls: list[ToolCallStart] = []
        self._content = ""  # answer text shown so far
        self._held = ""  # answer text that may be the start of a stop string

    @property
    def tokens(self) -> list[int]:
        """The ids fed so far (none after a stop string's)."""
        return self.parser.tokens

    def feed(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            if self.stopped:
                return
            self._feed(token)

    def _feed(self, token: int) -> None:
        p = self.parser
        before = len(p.messages)
        p.process(token)
        if len(p.messages) > before and self._kind is not None:
            self._end()
        if p.state != harmony.StreamState.CONTENT:
            return
        if self._kind is None:
            self._kind = self._classify()
            if self._kind == "call":
                name = (p.current_recipient or "").removeprefix("functions.")
                self._calls.append(ToolCallStart(len(self._calls), new_call_id(), name))
                self.events.append(self._calls[-1])
        delta = p.last_content_delta
        if not delta:
            return
        if self._kind == "content":
            self._show(delta)
        else:
            call = len(self._calls) - 1 if self._kind == "call" else None
            self.events.append(
                TextDelta(self._kind, delta, p.current_channel, p.current_recipient, call)
            )

    def _classify(self) -> Kind:
        p = self.parser
        if p.current_recipient not in (None, "all", "assistant", "user"):
            return "call"
        return "reasoning" if p.current_channel == "analysis" else "content"

    def _show(self, delta: str) -> None:
        """Answer text, up to a stop string: what may begin one is held back."""
        pending = self._held + delta
        cuts = [i for i in (pending.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self._held = ""
            self._emit(pending[: min(cuts)])
            self.stopped = True
            return
        keep = max((_overlap(pending, s) for s in self.stop), default=0)
        self._held = pending[len(pending) - keep :]
        self._emit(pending[: len(pending) - keep])

    def _emit(self, text: str) -> None:
        if text:
            self._content += text
            p = self.parser
            self.events.append(TextDelta("content", text, p.current_channel, p.current_recipient))

    def _end(self) -> None:
        if self._kind == "content" and self._held:
            held, self._held = self._held, ""
            self._emit(held)
        self.events.append(MessageEnd(self._kind))  # type: ignore[arg-type]
        self._kind = None

    def finish(
        self, finish_reason: str | None, *, request_id: str, prompt_tokens: int
    ) -> dict[str, Any]:
        """The sequence ended: closes the message being written and returns the reply
        (once; later calls give the same): the OpenAI message (content, reasoning_content,
        tool_calls), finish_reason, the harmony messages, ids, parse problems, usage."""
        if self.reply is not None:
            return self.reply
        self.parser.process_eos()
        if self._kind is not None:
            self._end()
        messages = self.parser.messages
        ids = iter(c.call_id for c in self._calls)
        message = from_harmony(messages, call_id=lambda: next(ids, None) or new_call_id())
        if self.stopped:
            message.content = self._content or None
        finish = "tool_calls" if message.tool_calls else "stop" if self.stopped else finish_reason
        tokens = list(self.parser.tokens)
        self.reply = {
            "request_id": request_id,
            # every key always there (null or [] when empty), as clients index them
            "message": {
                "role": "assistant",
                "content": message.content,
                "reasoning_content": message.reasoning_content,
                "tool_calls": [c.model_dump() for c in message.tool_calls or ()],
            },
            "finish_reason": finish,
            "harmony": [m.to_dict() for m in messages],
            "token_ids": tokens,
            "problems": self.parser.problems,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(tokens),
                "total_tokens": prompt_tokens + len(tokens),
            },
        }
        return self.reply


def _overlap(text: str, stop: str) -> int:
    """The length of the longest end of `text` that is a proper start of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0


def chat_reply(
    token_ids: Sequence[int],
    finish_reason: str | None,
    *,
    stop: Sequence[str] = (),
    request_id: str = "",
    prompt_tokens: int = 0,
) -> dict[str, Any]:
    """The reply of a finished completion (ids past a stop string are not part of it)."""
    builder = ReplyBuilder(stop)
    builder.feed(token_ids)
    return builder.finish(finish_reason, request_id=request_id, prompt_tokens=prompt_tokens)

"""Chat on top of token ids: an OpenAI (or harmony) chat request becomes a prompt, its
sampling parameters and stop strings; the completion's ids become a reply.

`ReplyBuilder` is the one reply builder: fed ids as they are sampled, it parses harmony
as a stream into typed events (reasoning and answer text, tool calls and their
arguments, message ends), and when the sequence ends it gives the reply (an OpenAI
assistant message, finish reason, usage, the parsed harmony messages). Chat completions
(streamed and not), Responses, `Engine.chat`/`chat_stream` and batch jobs all read it,
each in its own process (the engine sees tokens only). Stop strings end the answer where
they begin: no event holds text at or past one (text that may be the start of one waits
until the next tokens tell), and the front aborts the sequence in the engine as soon as
it sees one (`engine_client.RequestStream`)."""

from __future__ import annotations

import datetime
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from gptoss_ray.cluster.engine.messages import EngineRequest
from gptoss_ray.model import harmony
from gptoss_ray.model import tokenizer as tok
from gptoss_ray.model.harmony.openai_chat import (
    ChatRequest,
    HarmonyRequest,
    from_harmony,
    new_call_id,
    to_harmony,
)
from gptoss_ray.model.types import ModelNotFound, SamplingParams, TokenLogprob


def chat_request(
    body: Any, info: dict[str, Any], *, priority: int = 0
) -> tuple[EngineRequest, list[ReplyBuilder]]:
    """A chat request (see `chat_prompt`) for the engine `info` describes (`EngineLoop.info`)
    -> the engine's token request, and the reply builder of each of its choices."""
    prompt, params, stops = chat_prompt(
        body, info["max_context_length"], frame=info["harmony_frame"] == "strict"
    )
    lora = check_model(body.model if isinstance(body, ChatRequest) else body.get("model"), info)
    if lora is not None:
        params = params.model_copy(update={"lora": lora})
    replies = [ReplyBuilder(stops, logprobs=params.logprobs is not None) for _ in range(params.n)]
    return EngineRequest(uuid.uuid4().hex, prompt, params, priority), replies


def check_model(model: str | None, info: dict[str, Any]) -> str | None:
    """A request that names a model must name the engine's (its id or its path) or one
    of the LoRA adapters it serves (vLLM's --lora-modules) -> that adapter's name, or
    None for the base model."""
    loras = info.get("loras", [])
    if model is None or model in (info["model_id"], info["model"]):
        return None
    if model in loras:
        return model
    served = ", ".join(repr(m) for m in [info["model_id"], *loras])
    raise ModelNotFound(
        f"the model {model!r} does not exist; this engine serves {served}", param="model"
    )


def chat_prompt(
    request: Any, context: int, *, frame: bool = True
) -> tuple[list[int], SamplingParams, list[str]]:
    """Render a chat request for completion and read its sampling fields. The request is
    an OpenAI chat request, or {"conversation": <openai-harmony JSON>, ...sampling}.
    frame: constrain every reply to a well-formed harmony frame (`--harmony-frame`);
    without it only requests that ask for a format or a tool call are constrained."""
    if isinstance(request, dict) and "conversation" in request:
        fields = HarmonyRequest.parse(request)
        messages = harmony.Conversation.from_dict(fields.conversation).messages
        prompt = harmony.render_for_completion(messages)
        params = fields.framed_params(
            max(1, min(4096, context - len(prompt))), messages, frame=frame
        )
    else:
        fields = request if isinstance(request, ChatRequest) else ChatRequest.parse(request)
        messages = to_harmony(fields, conversation_start_date=datetime.date.today().isoformat())
        prompt = harmony.render_for_completion(messages)
        params = fields.sampling_params(max(1, min(4096, context - len(prompt))), frame=frame)
    stops = fields.stops()
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
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens that wrote the text, when asked


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    call_id: str
    name: str


@dataclass(frozen=True)
class MessageEnd:
    kind: Kind


Event = TextDelta | ToolCallStart | MessageEnd


def paired(
    tokens: Iterable[int], logprobs: Iterable[TokenLogprob | None] | None
) -> list[tuple[int, TokenLogprob | None]]:
    """Tokens fed to a reply, each with its logprob (None where none was asked)."""
    tokens = list(tokens)
    lps = list(logprobs) if logprobs is not None else [None] * len(tokens)
    return list(zip(tokens, lps, strict=True))


class StopScan:
    """Text up to the first stop string, as it comes: what may be the start of one is
    held back until the next text tells."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = [s for s in stop if s]
        self._held = ""

    def push(self, delta: str) -> tuple[str, bool]:
        """-> the text that can be shown now, and whether a stop string ended it."""
        pending = self._held + delta
        cuts = [i for i in (pending.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self._held = ""
            return pending[: min(cuts)], True
        keep = max((_overlap(pending, s) for s in self.stop), default=0)
        self._held = pending[len(pending) - keep :]
        return pending[: len(pending) - keep], False

    def flush(self) -> str:
        """The text held back (the text ended without a stop string)."""
        held, self._held = self._held, ""
        return held


class ReplyBuilder:
    def __init__(self, stop: Sequence[str] = (), *, logprobs: bool = False) -> None:
        """logprobs: the request asked for them; each token's (fed beside it) goes with
        the text event it wrote, and the reply lists those of the answer's tokens."""
        self.stop = [s for s in stop if s]
        self.logprobs = logprobs
        self._token_logprobs: list[TokenLogprob] = []  # fed, their text not shown yet
        self.parser = harmony.StreamParser("assistant", strict=False)
        self.events: list[Event] = []
        self.stopped = False  # a stop string ended the answer
        self.reply: dict[str, Any] | None = None
        self._kind: Kind | None = None  # of the message being written
        self._calls: list[ToolCallStart] = []
        self._content = ""  # answer text shown so far
        self._scan = StopScan(self.stop)

    @property
    def tokens(self) -> list[int]:
        """The ids fed so far (none after a stop string's)."""
        return self.parser.tokens

    def feed(
        self, tokens: Iterable[int], logprobs: Iterable[TokenLogprob | None] | None = None
    ) -> None:
        for token, lp in paired(tokens, logprobs):
            if self.stopped:
                return
            self._feed(token, lp)

    def _feed(self, token: int, logprob: TokenLogprob | None = None) -> None:
        p = self.parser
        before = len(p.messages)
        text = p.state == harmony.StreamState.CONTENT  # a token of a message's text, or its end
        p.process(token)
        if len(p.messages) > before and self._kind is not None:
            self._flushed()
            self._end()
        if p.state != harmony.StreamState.CONTENT:
            return
        if text and logprob is not None and self.logprobs:
            self._token_logprobs.append(logprob)
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
            lps = self._take_logprobs()
            self.events.append(
                TextDelta(self._kind, delta, p.current_channel, p.current_recipient, call, lps)
            )

    def _flushed(self) -> None:
        """The text of a character its message's end cut (U+FFFD), which the finished
        message holds: streamed too, so that streamed text equals the whole."""
        tail = self.parser.last_flushed
        if not tail or self.stopped:
            return
        if self._kind == "content":
            self._show(tail)
            return
        m = self.parser.messages[-1]
        call = len(self._calls) - 1 if self._kind == "call" else None
        self.events.append(TextDelta(self._kind, tail, m.channel, m.recipient, call))  # type: ignore[arg-type]

    def _take_logprobs(self) -> tuple[TokenLogprob, ...]:
        lps, self._token_logprobs = tuple(self._token_logprobs), []
        return lps

    def _classify(self) -> Kind:
        p = self.parser
        if p.current_recipient not in (None, "all", "assistant", "user"):
            return "call"
        return "reasoning" if p.current_channel == "analysis" else "content"

    def _show(self, delta: str) -> None:
        """Answer text, up to a stop string: what may begin one is held back."""
        text, self.stopped = self._scan.push(delta)
        self._emit(text)

    def _emit(self, text: str) -> None:
        if text:
            self._content += text
            p = self.parser
            lps = self._take_logprobs()
            self.events.append(
                TextDelta("content", text, p.current_channel, p.current_recipient, None, lps)
            )

    def _end(self) -> None:
        if self._kind == "content":
            self._emit(self._scan.flush())
        self.events.append(MessageEnd(self._kind))  # type: ignore[arg-type]
        self._kind = None
        self._token_logprobs = []  # tokens whose text never showed (a cut character)

    def finish(
        self, finish_reason: str | None, *, request_id: str, prompt_tokens: int
    ) -> dict[str, Any]:
        """The sequence ended: closes the message being written and returns the reply
        (once; later calls give the same): the OpenAI message (content, reasoning_content,
        tool_calls), finish_reason, the harmony messages, ids, parse problems, usage."""
        if self.reply is not None:
            return self.reply
        before = len(self.parser.messages)
        self.parser.process_eos()
        if self._kind is not None:
            if len(self.parser.messages) > before:
                self._flushed()
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
            # the answer's tokens (OpenAI's `logprobs.content`), when asked
            "logprobs": self.content_logprobs() if self.logprobs else None,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(tokens),
                "total_tokens": prompt_tokens + len(tokens),
            },
        }
        return self.reply

    def content_logprobs(self) -> list[dict[str, Any]]:
        return logprob_entries(
            lp
            for ev in self.events
            if isinstance(ev, TextDelta) and ev.kind == "content"
            for lp in ev.logprobs
        )


def chat_completion(reply: dict[str, Any], model: str, completion_id: str) -> dict[str, Any]:
    """A finished reply (with n > 1, its `choices`) as OpenAI's `chat.completion`."""

    def choice(i: int, r: dict[str, Any]) -> dict[str, Any]:
        logprobs = r.get("logprobs")
        return {
            "index": i,
            "message": r["message"],
            "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
            "finish_reason": r["finish_reason"],
        }

    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice(i, r) for i, r in enumerate(reply.get("choices") or [reply])],
        "usage": reply["usage"],
    }


def logprob_entries(logprobs: Iterable[TokenLogprob]) -> list[dict[str, Any]]:
    """Tokens' logprobs in OpenAI's shape: token text, logprob, bytes, top_logprobs."""

    def entry(token: int, logprob: float) -> dict[str, Any]:
        raw = tok.token_bytes(token)
        text = raw.decode("utf-8", errors="replace")
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    return [
        {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
        for lp in logprobs
    ]


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
    logprobs: Sequence[TokenLogprob] | None = None,
) -> dict[str, Any]:
    """The reply of a finished completion (ids past a stop string are not part of it)."""
    builder = ReplyBuilder(stop, logprobs=logprobs is not None)
    builder.feed(token_ids, logprobs)
    return builder.finish(finish_reason, request_id=request_id, prompt_tokens=prompt_tokens)

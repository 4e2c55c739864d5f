"""Raw-text completions (`/v1/completions`, as vLLM serves it): a prompt is text or token
ids, the reply is the text of the tokens drawn, no harmony parsing. Evaluation harnesses
use it to score prompts (`echo` with `logprobs`: each prompt token's logprob) and to
generate up to stop strings.

A string prompt is encoded with special tokens allowed: who writes raw prompts for
gpt-oss writes the harmony format itself (`<|start|>user<|message|>...`). Special tokens
drawn (`<|return|>`) end up in `token_ids` and logprobs but not in the text, as vLLM's
default `skip_special_tokens`."""

from __future__ import annotations

import codecs
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import Field, model_validator

from gptoss_ray.cluster.client.chat import StopScan, TextDelta, check_model, paired
from gptoss_ray.cluster.engine.messages import EngineRequest
from gptoss_ray.model import tokenizer as tok
from gptoss_ray.model.harmony.openai_chat import SamplingFields
from gptoss_ray.model.types import RequestError, SamplingParams, TokenLogprob

MAX_PROMPTS = 64  # prompts in one request: more is a batch job


class CompletionRequest(SamplingFields):
    """An OpenAI (legacy) completions request. `logprobs` is a count here (0-20: vLLM's
    bound; OpenAI's is 5) and `max_tokens` may be 0 with `echo` (the prompt scored)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0, strict=True)
    logprobs: int | None = Field(default=None, ge=0, le=20, strict=True)  # type: ignore[assignment]
    echo: bool = Field(default=False, strict=True)
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, strict=True)

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix (insertion) is not supported by gpt-oss")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ValueError("best_of other than n is not supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt is an empty list")
        return self

    def prompts(self) -> list[list[int]]:
        """Every prompt as token ids (a list of ints is one prompt; of lists, several)."""
        p = self.prompt
        if isinstance(p, str):
            texts: list[Any] = [p]
        elif all(isinstance(x, int) for x in p):
            texts = [p]
        else:
            texts = list(p)
        if len(texts) > MAX_PROMPTS:
            raise RequestError(
                f"prompt: {len(texts)} prompts in one request; at most {MAX_PROMPTS} (use a "
                "batch job for more)",
                param="prompt",
            )
        return [tok.encode(t, allow_special=True) if isinstance(t, str) else t for t in texts]

    def params(self) -> SamplingParams:
        """The engine's sampling parameters; max_tokens 0 draws one token, dropped."""
        params = self.sampling_params(16)
        scored = self.logprobs if self.echo else None
        return params.model_copy(
            update={
                "max_tokens": max(1, self.max_tokens or 0),
                "logprobs": self.logprobs,
                "prompt_logprobs": scored,
            }
        )


def completion_requests(
    body: dict[str, Any], info: dict[str, Any]
) -> tuple[CompletionRequest, list[EngineRequest], list[list[TextReply]]]:
    """A completions request for the engine `info` describes -> the parsed request, a
    token request per prompt, and the reply of each choice of each."""
    request = CompletionRequest.parse(body)
    lora = check_model(request.model, info)
    params = request.params()
    if lora is not None:
        params = params.model_copy(update={"lora": lora})
    stops = request.stops()
    keep = 0 if request.max_tokens == 0 else -1
    prompts = request.prompts()
    requests = [EngineRequest(uuid.uuid4().hex, prompt, params) for prompt in prompts]
    replies = [
        [
            TextReply(stops, logprobs=request.logprobs is not None, keep=keep)
            for _ in range(params.n)
        ]
        for _ in prompts
    ]
    return request, requests, replies


class TextReply:
    """A raw completion's reply, fed token by token in the front (`engine_client.Reply`):
    text deltas up to a stop string (the front then aborts the sequence in the engine)."""

    def __init__(self, stop: Sequence[str] = (), *, logprobs: bool = False, keep: int = -1) -> None:
        """keep: tokens to keep at most (-1: all; 0 for max_tokens 0: the one drawn is
        dropped)."""
        self.logprobs = logprobs
        self.keep = keep
        self.tokens: list[int] = []
        self.token_logprobs: list[TokenLogprob] = []
        self.events: list[Any] = []
        self.stopped = False
        self.text = ""
        self.reply: dict[str, Any] | None = None
        self._scan = StopScan(stop)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._sent = 0  # logprobs that went out with an event

    def feed(
        self, tokens: Iterable[int], logprobs: Iterable[TokenLogprob | None] | None = None
    ) -> None:
        for token, lp in paired(tokens, logprobs):
            if self.stopped or len(self.tokens) == self.keep:
                return
            self.tokens.append(token)
            if lp is not None and self.logprobs:
                self.token_logprobs.append(lp)
            raw = tok.token_bytes(token) if token < tok.NUM_BASE_TOKENS else b""
            text, self.stopped = self._scan.push(self._utf8.decode(raw))
            self._emit(text)

    def _emit(self, text: str) -> None:
        """An event for the text, with the logprobs of the tokens fed since the last one
        (with logprobs, an event per token, text or not)."""
        if text or self.logprobs:
            lps = tuple(self.token_logprobs[self._sent :])
            self._sent = len(self.token_logprobs)
            self.events.append(TextDelta("content", text, None, None, None, lps))
        self.text += text

    def finish(
        self, finish_reason: str | None, *, request_id: str, prompt_tokens: int
    ) -> dict[str, Any]:
        if self.reply is None:
            if not self.stopped:
                self._emit(self._scan.flush() + self._utf8.decode(b"", final=True))
            self.reply = {
                "request_id": request_id,
                "text": self.text,
                "finish_reason": "stop" if self.stopped else finish_reason,
                "token_ids": list(self.tokens),
                "logprobs": list(self.token_logprobs) if self.logprobs else None,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": len(self.tokens),
                    "total_tokens": prompt_tokens + len(self.tokens),
                },
            }
        return self.reply


def legacy_logprobs(
    logprobs: Sequence[TokenLogprob | None], tokens: Sequence[int], offset: int = 0
) -> dict[str, Any]:
    """Tokens' logprobs in the completions API's shape: parallel lists of token text,
    logprob (None for a prompt's first token), top alternatives ({text: logprob}) and
    the text offset where each token starts (from `offset`)."""
    texts, offsets, position = [], [], offset
    for token in tokens:
        text = _text(token)
        texts.append(text)
        offsets.append(position)
        position += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [None if lp is None else lp.logprob for lp in logprobs],
        "top_logprobs": [
            None if lp is None else {_text(t): v for t, v in lp.top} for lp in logprobs
        ],
        "text_offset": offsets,
    }


def _text(token: int) -> str:
    return tok.token_bytes(token).decode("utf-8", errors="replace")


def completion_choices(
    index: int, prompt: list[int], reply: dict[str, Any], request: CompletionRequest
) -> list[dict[str, Any]]:
    """One prompt's finished reply (every choice of it, `choices` when n > 1) ->
    `text_completion` choices, numbered from index."""
    replies = reply.get("choices") or [reply]
    echo = tok.decode(prompt) if request.echo else ""
    out = []
    for j, r in enumerate(replies):
        logprobs = None
        if request.logprobs is not None:
            lps: list[TokenLogprob | None] = list(r["logprobs"])
            tokens = list(r["token_ids"])
            if request.echo:
                lps = list(reply["prompt_logprobs"]) + lps
                tokens = prompt + tokens
            logprobs = legacy_logprobs(lps, tokens)
        out.append(
            {
                "index": index + j,
                "text": echo + r["text"],
                "logprobs": logprobs,
                "finish_reason": r["finish_reason"],
            }
        )
    return out


def completion_object(
    completion_id: str, model: str, choices: list[dict[str, Any]], usage: dict[str, int]
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage,
    }

"""Grammar-constrained decoding: what a reply may be, as a grammar over tokens, and the
per-sequence matchers that turn it into a mask of the tokens allowed next.

The grammar engine is llguidance (Microsoft's, used by vLLM, SGLang and llama.cpp): Lark
grammars whose terminals may be special tokens (`<|channel|>`, `<|return|>`), JSON
Schemas inline (`%json{...}`), and a token budget on a rule (`[max_tokens=N]`), so the
harmony frame, the answer's JSON Schema and a reasoning budget are one grammar. Masks are
computed in its own threads, outside the GIL, while the shard's step runs
(`Shard._masks_while_the_step_runs`), and applied to the logits before sampling.

A reply under `json_frame` is: an optional analysis message (at most `reasoning` tokens
of text, then `<|end|><|start|>assistant`), then the final message, whose text is JSON
valid against the schema, ended by `<|return|>`. JSON is compact (no free whitespace
between tokens), so a model cannot pad it forever."""

from __future__ import annotations

import functools
import json
from typing import Any

import llguidance
import llguidance.tiktoken
import llguidance.torch
import torch

from gptoss_ray.model import tokenizer as tok
from gptoss_ray.model.types import RequestError

DEFAULT_REASONING = {"low": 256, "medium": 1024, "high": 4096}  # tokens of analysis at most
_COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


class GrammarError(RequestError):
    """A schema or grammar the engine cannot enforce; the message names what and where."""


@functools.cache
def harmony_tokenizer() -> llguidance.LLTokenizer:
    """The o200k_harmony vocabulary for the matchers (built once per process, ~1.5 s)."""
    return llguidance.tiktoken.lltokenizer_from_encoding(
        tok.get_encoding(), n_vocab=tok.VOCAB_SIZE, eos_token=tok.RETURN
    )


def json_frame(schema: dict[str, Any] | None, reasoning: int) -> str:
    """The grammar of a reply whose answer is JSON (valid against `schema`, or any JSON
    object without one) after at most `reasoning` tokens of analysis."""
    schema = {"type": "object"} if schema is None else schema
    body = json.dumps({**schema, "x-guidance": _COMPACT})
    return "\n".join(
        [
            "start: analysis? final",
            'analysis: <|channel|> "analysis" <|message|> thought <|end|> <|start|> "assistant"',
            f"thought[max_tokens={reasoning}]: TEXT",
            'final: <|channel|> "final" <|message|> answer <|return|>',
            f"answer: %json {body}",
            r"TEXT: /(.|\n)*/",
        ]
    )


def check_grammar(grammar: str, where: str) -> None:
    """Raises GrammarError (naming `where`, the request field) if the grammar, or a
    schema in it, cannot be enforced: unsupported keywords are errors, never ignored."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        llguidance.LLMatcher.grammar_from_lark(grammar), harmony_tokenizer()
    )
    if is_error or messages:
        raise GrammarError(
            f"{where}: " + "; ".join(messages or ["not a valid grammar"]), param=where
        )


class Matchers:
    """The matchers of the sequences with a grammar on one shard, by sequence id; each
    follows its sequence's tokens (those it drew, and on placement those before)."""

    def __init__(self) -> None:
        self.by_seq: dict[str, llguidance.LLMatcher] = {}
        self.executor: llguidance.LLExecutor | None = None

    def start(self, seq_id: str, grammar: str, output: list[int]) -> None:
        """A matcher for a sequence placed here, advanced past the tokens it drew."""
        matcher = llguidance.LLMatcher(harmony_tokenizer(), grammar, log_level=0)
        if output and not matcher.consume_tokens(output):
            raise RuntimeError(f"sequence {seq_id}: its own tokens break its grammar")
        self.by_seq[seq_id] = matcher

    def fork(self, parent: str, child: str) -> None:
        self.by_seq[child] = self.by_seq[parent].deep_copy()

    def drop(self, seq_id: str) -> None:
        self.by_seq.pop(seq_id, None)

    def masks(self, seq_ids: list[str | None]) -> torch.Tensor:
        """The allowed-token bitmasks [R, words] (int32) of rows; a row without a
        matcher (None) allows every token."""
        bitmask = llguidance.torch.allocate_token_bitmask(len(seq_ids), tok.VOCAB_SIZE)
        rows = [(self.by_seq[s], i) for i, s in enumerate(seq_ids) if s is not None]
        if rows:
            if self.executor is None:
                self.executor = llguidance.LLExecutor()
            llguidance.torch.fill_next_token_bitmask_par(self.executor, rows, bitmask)
        return bitmask

    def consume(self, seq_id: str, token: int) -> None:
        """The token a sequence drew (one drawn past the end of a finished reply, in an
        overlapped step, is dropped by the scheduler: ignored here)."""
        matcher = self.by_seq.get(seq_id)
        if matcher is None or matcher.is_stopped():
            return
        if not matcher.consume_token(token):
            raise RuntimeError(f"sequence {seq_id}: token {token} broke its grammar")


def apply_masks(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [R, V] float32 -> a copy with every token a row's mask forbids at -inf."""
    out = logits.float().clone()
    llguidance.torch.apply_token_bitmask_inplace(out, bitmask.to(out.device))
    return out

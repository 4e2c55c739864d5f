"""Grammar-constrained decoding: what a reply may be, as a grammar over tokens, and the
per-sequence matchers that turn it into a mask of the tokens allowed next.

The grammar engine is llguidance (Microsoft's, used by vLLM, SGLang and llama.cpp): Lark
grammars whose terminals may be special tokens (`<|channel|>`, `<|return|>`), JSON
Schemas inline (`%json{...}`), and a token budget on a rule (`[max_tokens=N]`), so the
harmony frame, the answer's or a tool's JSON Schema and a reasoning budget are one
grammar. Masks are computed in its own threads, outside the GIL, while the shard's step
runs (`Shard._masks_while_the_step_runs`), and applied to the logits before sampling.

`reply_grammar` is the harmony frame of a reply (the completion after the prompt's
`<|start|>assistant`): at most one analysis message (at most `reasoning` tokens of text),
then, where a tool may be called, any commentary preambles, then the ending: the final
message (free text, or JSON valid against a schema) ended by `<|return|>`, or one tool
call (`to=functions.NAME` after the role or after the channel, as the model pleases, on
`commentary`, `<|constrain|>json`, a JSON object as arguments: valid against the tool's
parameters where the tool is strict) ended by `<|call|>`. Every reply under it parses in
openai-harmony's strict mode. JSON is compact (no free whitespace between tokens), and a
number the schema leaves unbounded has at most 15 digits before the point and 8 after
(`_bounded_numbers`), so a model cannot pad it forever."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.numpy
import llguidance.tiktoken
import numpy

from gptoss_ray.model import tokenizer as tok

if TYPE_CHECKING:
    import torch
from gptoss_ray.model.types import RequestError

# tokens of analysis at most, where a request does not say (max_reasoning_tokens); never
# more than half its max_tokens, so that a reply cut by max_tokens has room to answer
DEFAULT_REASONING = {"low": 1024, "medium": 4096, "high": 16384}
_COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


class GrammarError(RequestError):
    """A schema or grammar the engine cannot enforce; the message names what and where."""


@functools.cache
def harmony_tokenizer() -> llguidance.LLTokenizer:
    """The o200k_harmony vocabulary for the matchers (built once per process, ~1.5 s)."""
    return llguidance.tiktoken.lltokenizer_from_encoding(
        tok.get_encoding(), n_vocab=tok.VOCAB_SIZE, eos_token=tok.RETURN
    )


@dataclass(frozen=True)
class FunctionTool:
    """A function the reply may call: its arguments are any JSON object, or, when
    `strict`, JSON valid against `parameters`."""

    name: str
    parameters: dict[str, Any] | None = None
    strict: bool = False


def reply_grammar(
    *,
    reasoning: int | None = None,
    answer: dict[str, Any] | None = None,
    tools: Sequence[FunctionTool] = (),
    final: bool = True,
) -> str:
    """The harmony frame of a reply as a Lark grammar. reasoning: the analysis message's
    tokens at most (None: no bound, 0: no analysis); answer: the final message is JSON valid against this
    schema (None: free text); tools: the functions it may call; final: whether it may
    answer instead of calling one (False: a call is required; needs tools)."""
    if not final and not tools:
        raise ValueError("a reply that must call a tool needs a tool to call")
    endings = (["final"] if final else []) + [f"call_{i}" for i in range(len(tools))]
    rules = [
        "start: "
        + ("analysis? " if reasoning != 0 else "")
        + ("preamble* " if tools else "")
        + "ending",
        "ending: " + " | ".join(endings),
        'analysis: <|channel|> "analysis" <|message|> thought <|end|> <|start|> "assistant"',
        f"thought[max_tokens={reasoning}]: TEXT" if reasoning is not None else "thought: TEXT",
        'final: <|channel|> "final" <|message|> answer <|return|>',
        "answer: " + ("TEXT" if answer is None else "%json " + _compact(answer)),
        r"TEXT: /(.|\n)*/",
    ]
    if tools:
        rules.append(
            'preamble: <|channel|> "commentary" <|message|> TEXT <|end|> <|start|> "assistant"'
        )
    for i, tool in enumerate(tools):
        to = json.dumps(f" to=functions.{tool.name}")
        args = tool.parameters if tool.strict and tool.parameters else {"type": "object"}
        rules += [
            f'call_{i}: ({to} <|channel|> "commentary" | <|channel|> "commentary" {to}) '
            f'" "? <|constrain|> "json" <|message|> args_{i} <|call|>',
            f"args_{i}: %json " + _compact(args),
        ]
    return "\n".join(rules)


def _compact(schema: dict[str, Any]) -> str:
    return json.dumps({**_bounded_numbers(schema), "x-guidance": _COMPACT})


# JSON numbers a schema leaves unbounded get at most this many digits before the point
# and after it: a model that writes digits forever still ends its reply. 15: every such
# integer is exact in a double, as JSON parsers (and llguidance's bounds) read numbers. A
# schema's own minimum / maximum / multipleOf on a number take the place of these.
INTEGER_DIGITS = 15
FRACTION_DIGITS = 8
_NUMBER_CAP = {
    "minimum": -(10**INTEGER_DIGITS - 1),
    "maximum": 10**INTEGER_DIGITS - 1,
    "multipleOf": 10.0**-FRACTION_DIGITS,
}


def _bounded_numbers(node: Any) -> Any:
    """The schema with every number and integer it leaves unbounded capped (`_NUMBER_CAP`:
    a bound on a side it lacks, multipleOf on a number that has none); enums and consts
    as they are."""
    if isinstance(node, list):
        return [_bounded_numbers(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _bounded_numbers(v) for k, v in node.items()}
    types = node.get("type")
    types = set(types) if isinstance(types, list) else {types}
    if types & {"number", "integer"} and not {"enum", "const"} & node.keys():
        if not {"minimum", "exclusiveMinimum"} & node.keys():
            out["minimum"] = _NUMBER_CAP["minimum"]
        if not {"maximum", "exclusiveMaximum"} & node.keys():
            out["maximum"] = _NUMBER_CAP["maximum"]
        if "number" in types and "multipleOf" not in node:
            out["multipleOf"] = _NUMBER_CAP["multipleOf"]
    return out


def check_schema(schema: dict[str, Any], where: str) -> str:
    """The schema's llguidance grammar (compact JSON); raises GrammarError (param `where`,
    the request field) if the JSON Schema cannot be enforced: a keyword llguidance does
    not implement is named with the JSON pointer of each place it is used, never ignored;
    any other problem in llguidance's words."""
    grammar = llguidance.LLMatcher.grammar_from_json_schema(_compact(schema))
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        grammar, harmony_tokenizer()
    )
    if not (is_error or messages):
        return grammar
    text = "; ".join(messages) or "not a schema that can be enforced"
    unimplemented = re.search(r"Unimplemented keys: (\[.*?\])", text)
    if unimplemented:
        keys = json.loads(unimplemented.group(1))
        places = sorted({p for key in keys for p in _pointers(schema, key)})
        names = ", ".join(keys)
        text = (
            f"the JSON Schema keyword(s) {names} cannot be enforced (at "
            f"{', '.join(p or '/' for p in places)}); remove them or express the constraint "
            "with supported keywords"
        )
    else:
        text = re.sub(r"^at \d+\(\d+\): ", "", text.splitlines()[0])
    raise GrammarError(f"{where}: {text}", param=where)


def _pointers(node: Any, key: str, path: str = "") -> list[str]:
    """JSON pointers of the objects in `node` that have `key` (a schema keyword)."""
    found = []
    if isinstance(node, dict):
        if key in node:
            found.append(path)
        for k, v in node.items():
            found += _pointers(v, key, f"{path}/{str(k).replace('~', '~0').replace('/', '~1')}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _pointers(v, key, f"{path}/{i}")
    return found


class Matchers:
    """The matchers of the sequences with a grammar on one shard, by sequence id; each
    follows its sequence's tokens (those it drew, and on placement those before).

    A matcher that fails (llguidance's parser limits on a pathological schema, or a
    token it refuses) must not take the engine down with every other sequence: the
    failure is printed to the shard's log with the sequence's id, and from then on the
    sequence may only end (<|return|>); its reply stops there, unfinished."""

    def __init__(self) -> None:
        self.by_seq: dict[str, llguidance.LLMatcher] = {}
        self.failed: set[str] = set()
        self.executor: llguidance.LLExecutor | None = None

    def start(self, seq_id: str, grammar: str, output: list[int]) -> None:
        """A matcher for a sequence placed here, advanced past the tokens it drew."""
        matcher = llguidance.LLMatcher(harmony_tokenizer(), grammar, log_level=0)
        self.by_seq[seq_id] = matcher
        if matcher.is_error() or (output and not matcher.consume_tokens(output)):
            self._fail(seq_id, matcher)

    def fork(self, parent: str, child: str) -> None:
        self.by_seq[child] = self.by_seq[parent].deep_copy()
        if parent in self.failed:
            self.failed.add(child)

    def drop(self, seq_id: str) -> None:
        self.by_seq.pop(seq_id, None)
        self.failed.discard(seq_id)

    def masks(
        self, seq_ids: list[str | None], ahead: list[list[int]] | None = None
    ) -> torch.Tensor:
        """The allowed-token bitmasks [R, words] (int32) of rows; a row without a
        matcher (None) allows every token. ahead[i]: row i's mask is the one after these
        tokens too (draft tokens before a draft's position, followed on a copy); where
        the grammar refuses them the row allows every token (a draft it refuses is never
        kept, so the row is never used). Allocated by numpy: this runs on the shard's
        mask thread, where a torch op would start a second OpenMP team beside the
        forward's (on two cores it doubled the step)."""
        import torch  # here, not at the top: the coordinator and the front import this module

        words = numpy.full((len(seq_ids), (tok.VOCAB_SIZE + 31) // 32), -1, numpy.int32)
        bitmask = torch.from_numpy(words)
        rows = []
        for i, s in enumerate(seq_ids):
            if s is None:
                continue
            matcher = self.by_seq[s]
            tokens = ahead[i] if ahead is not None else ()
            if tokens and s not in self.failed:
                matcher = matcher.deep_copy()
                if matcher.is_stopped() or not matcher.consume_tokens(list(tokens)):
                    continue
            rows.append((matcher, i))
        live = [(m, i) for m, i in rows if seq_ids[i] not in self.failed]
        if live:
            if self.executor is None:
                self.executor = llguidance.LLExecutor()
            # the numpy twin of llguidance.torch's: that module imports torch's compiler
            # (2 s in every process that loads this one, the coordinator's included)
            llguidance.numpy.fill_next_token_bitmask_par(self.executor, live, words)
        for m, i in rows:
            if seq_ids[i] in self.failed or m.is_error():
                if seq_ids[i] not in self.failed:
                    self._fail(seq_ids[i], m)  # type: ignore[arg-type]
                words[i] = 0
                words[i, tok.RETURN // 32] = 1 << (tok.RETURN % 32)
        return bitmask

    def consume(self, seq_id: str, token: int) -> None:
        """The token a sequence drew (one drawn past the end of a finished reply, in an
        overlapped step, is dropped by the scheduler: ignored here)."""
        matcher = self.by_seq.get(seq_id)
        if matcher is None or matcher.is_stopped() or seq_id in self.failed:
            return
        if not matcher.consume_token(token):
            self._fail(seq_id, matcher)

    def _fail(self, seq_id: str, matcher: llguidance.LLMatcher) -> None:
        self.failed.add(seq_id)
        print(
            f"sequence {seq_id}: its grammar failed ({matcher.get_error() or 'token refused'}); "
            "the reply ends here",
            flush=True,
        )

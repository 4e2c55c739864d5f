"""Draft tokens for speculative decoding, proposed where the scheduler plans a decode: a
sequence's next tokens guessed cheaply, which the shard verifies in the same forward as
the token it draws anyway (`SeqWork.drafts`), keeping the longest prefix its own draws
agree with.

`NgramDrafter` is prompt lookup: the last n tokens of the sequence (n from `max_n` down
to `min_n`) are looked up among its earlier tokens, prompt and reply, and the tokens that
followed their latest earlier occurrence are proposed. It costs the coordinator a few
dictionary lookups per sequence and step: every n-gram's latest end is indexed as the
sequence grows. It pays where replies copy their prompt (code edits, quoting, RAG).

`ShardDrafts` holds the drafts an EAGLE-3 draft model made on the shards in the step
before (shards/drafting.py), until the decode that verifies them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class KnownTokens(Protocol):
    """A sequence as a drafter reads it (the scheduler's `Sequence`)."""

    seq_id: str

    @property
    def length(self) -> int: ...

    def tokens(self, start: int, n: int) -> list[int]: ...


class Drafter(Protocol):
    def propose(self, seq: KnownTokens, k: int) -> list[int]:
        """Up to k tokens to follow the sequence's known ones (fewer, or none)."""
        ...

    def forget(self, seq_id: str) -> None:
        """The sequence is over: drop what was kept for it."""
        ...

    def receive(self, seq_id: str, length: int, tokens: list[int]) -> None:
        """A shard's drafts for the sequence once it has `length` tokens (EAGLE-3)."""
        ...


class ShardDrafts:
    """Drafts the shards make themselves (an EAGLE-3 draft beside the target: it reads
    the target's hidden states, which never leave the shard), kept from the step that
    made them to the decode that verifies them. A sequence whose tokens moved on since
    (preempted, or more of them known) gets none until its shard drafts again."""

    def __init__(self) -> None:
        self._made: dict[str, tuple[int, list[int]]] = {}

    def propose(self, seq: KnownTokens, k: int) -> list[int]:
        length, tokens = self._made.pop(seq.seq_id, (-1, []))
        return tokens[:k] if length == seq.length else []

    def forget(self, seq_id: str) -> None:
        self._made.pop(seq_id, None)

    def receive(self, seq_id: str, length: int, tokens: list[int]) -> None:
        self._made[seq_id] = (length, tokens)


@dataclass
class _Index:
    tokens: list[int] = field(default_factory=list)  # the sequence's, as far as indexed
    # n -> the n tokens ending at position e -> the latest such e before the last token
    ends: dict[int, dict[tuple[int, ...], int]] = field(default_factory=dict)


class NgramDrafter:
    def __init__(self, min_n: int = 2, max_n: int = 4) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram lengths {min_n}..{max_n}: need 1 <= min <= max")
        self.min_n, self.max_n = min_n, max_n
        self._index: dict[str, _Index] = {}

    def propose(self, seq: KnownTokens, k: int) -> list[int]:
        index = self._index.setdefault(seq.seq_id, _Index())
        toks = index.tokens
        indexed = max(0, len(toks) - 1)  # ends indexed so far: all but the last token's
        toks += seq.tokens(len(toks), seq.length - len(toks))
        last = len(toks) - 1
        for n in range(self.min_n, self.max_n + 1):
            ends = index.ends.setdefault(n, {})
            for e in range(max(indexed, n - 1), last):
                ends[tuple(toks[e - n + 1 : e + 1])] = e
        if k <= 0:
            return []
        for n in range(self.max_n, self.min_n - 1, -1):
            if n > last:
                continue
            e = index.ends[n].get(tuple(toks[last - n + 1 :]))
            if e is not None:
                return toks[e + 1 : e + 1 + k]
        return []

    def forget(self, seq_id: str) -> None:
        self._index.pop(seq_id, None)

    def receive(self, seq_id: str, length: int, tokens: list[int]) -> None:
        pass  # proposes from the tokens alone

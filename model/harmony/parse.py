"""Completion token ids -> harmony messages, one token at a time.

Strict mode raises exactly where openai-harmony's parser raises and otherwise gives the
same messages. Lenient mode is for serving: real models sometimes break the grammar, and
a reply must never fail because of it. It recovers what it can and marks each message it
had to repair (`Message.malformed` says why); whatever it could not place goes to
`StreamParser.problems`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from gptoss_ray.model import tokenizer as tok
from gptoss_ray.model.harmony.messages import Author, HarmonyError, Message, Role, TextContent

CHANNEL_TEXT = "<|channel|>"
CONSTRAIN_TEXT = "<|constrain|>"
KNOWN_CHANNELS = ("analysis", "commentary", "final")
# A message's content ends at any of these; only <|return|> and <|call|> stop sampling.
END_OF_MESSAGE = frozenset({tok.END, tok.RETURN, tok.CALL})
REPLACEMENT = "\ufffd"

# Unicode White_Space, as Rust's char::is_whitespace and str::trim see it (Python's
# str.isspace also counts \x1c..\x1f).
_WHITE_SPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_ASCII_WHITE_SPACE = " \t\n\x0c\r"  # Rust's split_ascii_whitespace (no \v)


class StreamState(StrEnum):
    EXPECT_START = "ExpectStart"
    HEADER = "Header"
    CONTENT = "Content"


@dataclass
class Header:
    author: Author
    recipient: str | None = None
    channel: str | None = None
    content_type: str | None = None
    problem: str | None = None  # lenient mode: what was repaired

    def message(self, text: str) -> Message:
        return Message(
            author=self.author,
            content=[TextContent(text=text)],
            channel=self.channel,
            recipient=self.recipient,
            content_type=self.content_type,
            malformed=self.problem,
        )


class StreamParser:
    """Feed completion ids with `process`; `process_eos` when generation ended.

    `role` is the role of the message the completion starts in (the prompt ends with
    `<|start|>assistant`), or None when the ids start with `<|start|>` themselves."""

    def __init__(self, role: Role | str | None = Role.ASSISTANT, *, strict: bool = True) -> None:
        self.strict = strict
        self.default_role = Role(role) if role is not None else Role.ASSISTANT
        self.next_role: Role | None = Role(role) if role is not None else None
        self.state = StreamState.HEADER if role is not None else StreamState.EXPECT_START
        self.messages: list[Message] = []
        self.tokens: list[int] = []
        self.problems: list[str] = []
        self.last_content_delta: str | None = None
        self._header_ids: list[int] = []
        self._header_note: str | None = None
        self._header: Header | None = None
        self._text = ""
        self._pending = b""  # bytes of a UTF-8 character split across tokens
        self.last_flushed: str | None = None  # what they became when their message ended

    # -- what a streaming API shows -------------------------------------------------
    @property
    def current_role(self) -> Role | None:
        if self._header is not None:
            return self._header.author.role
        return self.next_role

    @property
    def current_channel(self) -> str | None:
        return self._header.channel if self._header is not None else None

    @property
    def current_recipient(self) -> str | None:
        return self._header.recipient if self._header is not None else None

    @property
    def current_content_type(self) -> str | None:
        return self._header.content_type if self._header is not None else None

    @property
    def current_content(self) -> str:
        return self._text if self._header is not None else ""

    # -- feeding ---------------------------------------------------------------------
    def process(self, token: int) -> StreamParser:
        if not isinstance(token, int) or not 0 <= token < tok.VOCAB_SIZE:
            raise HarmonyError(
                f"token id {token!r} at index {len(self.tokens)} is outside 0..{tok.VOCAB_SIZE - 1}"
            )
        self.tokens.append(token)
        if self.state == StreamState.EXPECT_START:
            self._expect_start(token)
        elif self.state == StreamState.HEADER:
            self._in_header(token)
        else:
            self._in_content(token)
        return self

    def process_eos(self) -> StreamParser:
        """The completion ended (a stop id, max_tokens, or the end of the ids)."""
        if self.state == StreamState.HEADER:
            if self.strict:
                raise HarmonyError("Unexpected EOS while waiting for message header to complete")
            if self._header_ids:
                self.problems.append(f"completion ended inside a header: {self._header_string()!r}")
            self._reset_header(StreamState.EXPECT_START, None)
        elif self.state == StreamState.CONTENT:
            self._finish_message()
        return self

    # -- states ----------------------------------------------------------------------
    def _expect_start(self, token: int) -> None:
        if token == tok.START:
            self._reset_header(StreamState.HEADER, None)
            return
        if self.strict:
            raise HarmonyError(f"Unexpected token {token} while expecting start token {tok.START}")
        if token in END_OF_MESSAGE:
            self.problems.append(f"stray {tok.decode([token])} between messages")
            return
        # The model skipped <|start|>: read what follows as a header of the usual role.
        self._reset_header(StreamState.HEADER, self.default_role, "missing <|start|>")
        self._header_ids.append(token)

    def _in_header(self, token: int) -> None:
        if token == tok.MESSAGE:
            self._header = self._parse_header()
            self.next_role = None
            self.state = StreamState.CONTENT
            self._text, self._pending = "", b""
            return
        if not self.strict:
            if token == tok.START:
                if self._header_ids:
                    self.problems.append(f"header without <|message|>: {self._header_string()!r}")
                self._reset_header(StreamState.HEADER, None, "doubled <|start|>")
                return
            if token in END_OF_MESSAGE:
                self._message_without_body()
                return
        self._header_ids.append(token)

    def _in_content(self, token: int) -> None:
        if token in END_OF_MESSAGE:
            self._finish_message()
            return
        if not self.strict and token in (tok.START, tok.CHANNEL):
            # A new message began without <|end|>: close this one and read the new header.
            assert self._header is not None
            role = self._header.author.role
            self._note("missing <|end|>")
            self._finish_message()
            if token == tok.START:
                self._reset_header(StreamState.HEADER, None)
            else:
                self._reset_header(StreamState.HEADER, role, "missing <|end|><|start|>")
                self._header_ids.append(token)
            return
        self._pending += tok.get_encoding().decode_single_token_bytes(token)
        try:
            delta = self._pending.decode("utf-8")
            self._pending = b""
        except UnicodeDecodeError as exc:
            delta = self._pending[: exc.start].decode("utf-8")
            self._pending = self._pending[exc.start :]
            if exc.reason != "unexpected end of data":  # invalid bytes, not a split char
                delta += REPLACEMENT
                self._pending = self._pending[exc.end - exc.start :]
        self._text += delta
        self.last_content_delta = delta or None

    # -- helpers ---------------------------------------------------------------------
    def _reset_header(self, state: StreamState, role: Role | None, note: str | None = None) -> None:
        self.state = state
        self.next_role = role
        self._header_ids = []
        self._header_note = note
        self._header = None

    def _note(self, problem: str) -> None:
        assert self._header is not None
        self._header.problem = _join(self._header.problem, problem)

    def _finish_message(self) -> None:
        header = self._header
        assert header is not None
        # a character cut by the message's end: what it adds is no delta of its own
        self.last_flushed = self._pending.decode("utf-8", errors="replace") or None
        self.messages.append(header.message(self._text + (self.last_flushed or "")))
        self._text, self._pending = "", b""
        self.last_content_delta = None
        self._reset_header(StreamState.EXPECT_START, None)

    def _message_without_body(self) -> None:
        # Lenient: a header ended by <|end|>/<|return|>/<|call|> without <|message|>.
        # Keep its metadata and read whatever is not metadata as the text.
        if self._header_ids:
            header, rest = parse_header(
                self._header_string(), self.next_role, strict=False, metadata_only=True
            )
            header.problem = _join(_join(self._header_note, header.problem), "no <|message|>")
            self.messages.append(header.message(rest))
        self._reset_header(StreamState.EXPECT_START, None)

    def _header_string(self) -> str:
        data = b"".join(tok.get_encoding().decode_single_token_bytes(t) for t in self._header_ids)
        if self.strict:
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise HarmonyError(f"could not decode header: {exc}") from None
        return data.decode("utf-8", errors="replace")

    def _parse_header(self) -> Header:
        header, _ = parse_header(self._header_string(), self.next_role, strict=self.strict)
        header.problem = _join(self._header_note, header.problem)
        return header


def parse_completion(
    ids: list[int], role: Role | str | None = Role.ASSISTANT, *, strict: bool = True
) -> list[Message]:
    """All messages of a completion (which may be cut off by max_tokens)."""
    parser = StreamParser(role, strict=strict)
    for token in ids:
        parser.process(token)
    return parser.process_eos().messages


def parse_header(
    text: str, role: Role | None, *, strict: bool = True, metadata_only: bool = False
) -> tuple[Header, str]:
    """Header text (between `<|start|>` and `<|message|>`) -> role, channel, recipient,
    content type. Returns the header and, with metadata_only, the text that is not
    metadata. Lenient mode never raises."""
    problems: list[str] = []
    channel: str | None = None
    at = text.find(CHANNEL_TEXT)
    if at >= 0:
        after = text[at + len(CHANNEL_TEXT) :]
        end = next((i for i, c in enumerate(after) if c in _WHITE_SPACE or c == "<"), len(after))
        if end == 0:
            if strict:
                raise HarmonyError("channel marker present but no channel value found in header")
            problems.append("empty channel")
        else:
            channel = after[:end]
        text = text[:at] + after[end:]
    text = _trim(text)
    if CONSTRAIN_TEXT in text:
        text = _trim(text.replace(CONSTRAIN_TEXT, " " + CONSTRAIN_TEXT))
    parts = _split_ascii_whitespace(text)

    if not strict and channel is None:
        spelled = next((p for p in parts if p in KNOWN_CHANNELS), None)
        if spelled is not None:  # "analysis" written as text instead of <|channel|>analysis
            channel = spelled
            parts.remove(spelled)
            problems.append("channel name without <|channel|>")

    role_text: str | None = None
    if role is None:
        if not parts:
            if strict:
                raise HarmonyError("message header did not contain a role")
            problems.append("no role")
            role = Role.ASSISTANT
        else:
            role_text = parts[0]
            if role_text in _ROLES:
                role = Role(role_text)
            elif len(parts) > 1 or role_text.startswith("to="):
                parts.pop(0)  # a tool's name stands where the role would be
                role = Role.TOOL
            elif strict:
                raise HarmonyError(f"Unknown role: {role_text}")
            else:
                problems.append(f"unknown role {role_text!r}")
                parts.pop(0)
                role, role_text = Role.ASSISTANT, None
    if parts and parts[0] == role.value:
        parts.pop(0)

    recipient: str | None = None
    content_type: str | None = None
    rest = ""
    if metadata_only:
        # Only what is unmistakably metadata: to=NAME and <|constrain|>TYPE.
        keep = []
        for part in parts:
            if part.startswith("to=") and recipient is None:
                recipient = part[3:]
            elif part.startswith(CONSTRAIN_TEXT) and content_type is None:
                content_type = part
            else:
                keep.append(part)
        rest = " ".join(keep)
    elif parts:
        count = len(parts)
        last = parts.pop()
        if last.startswith("to="):
            recipient = last[3:]
        elif count == 1:
            recipient = last
        else:
            content_type = last
            raw = parts.pop()
            recipient = raw[3:] if raw.startswith("to=") else raw
        if parts:
            if strict:
                raise HarmonyError(
                    f"unexpected tokens remaining in message header: Some({' '.join(parts)!r})"
                )
            problems.append(f"ignored header text {' '.join(parts)!r}")

    if not strict and channel is None and role == Role.ASSISTANT:
        problems.append("no channel")
    author = Author(role=role, name=role_text if role == Role.TOOL else None)
    header = Header(author, recipient, channel, content_type, "; ".join(problems) or None)
    return header, rest


_ROLES = frozenset(r.value for r in Role)


def _trim(text: str) -> str:
    start, end = 0, len(text)
    while start < end and text[start] in _WHITE_SPACE:
        start += 1
    while end > start and text[end - 1] in _WHITE_SPACE:
        end -= 1
    return text[start:end]


def _split_ascii_whitespace(text: str) -> list[str]:
    for c in _ASCII_WHITE_SPACE[1:]:
        text = text.replace(c, " ")
    return [p for p in text.split(" ") if p]


def _join(a: str | None, b: str | None) -> str | None:
    if a and b:
        return f"{a}; {b}"
    return a or b

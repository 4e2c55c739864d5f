"""The OpenAI chat dialect <-> harmony. Batch jobs and the HTTP API speak this.

In: `messages` with system/developer/user/assistant/tool roles, `tool_calls`,
`reasoning_content`, `tools`, `reasoning_effort`. As OpenAI advises for gpt-oss, the
chat's system and developer messages become the harmony developer instructions; the
harmony system message carries identity, date, reasoning effort and channels.
Out: the parsed completion as one assistant message: `reasoning_content` (the analysis
channel), `content` (final, and commentary preambles), `tool_calls` with ids."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gptoss_ray.model import tokenizer as tok
from gptoss_ray.model.grammar import DEFAULT_REASONING, FunctionTool, check_schema, reply_grammar
from gptoss_ray.model.harmony.messages import (
    Author,
    DeveloperContent,
    HarmonyError,
    Message,
    ReasoningEffort,
    ResponseFormat,
    Role,
    SystemContent,
    TextContent,
    ToolDescription,
)
from gptoss_ray.model.tokenizer import VOCAB_SIZE
from gptoss_ray.model.types import SamplingParams


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class TextPart(_Model):
    type: Literal["text"]
    text: str


class FunctionDef(_Model):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Model):
    type: Literal["function"] = "function"
    function: FunctionDef


class FunctionCall(_Model):
    name: str = Field(min_length=1)
    arguments: str = ""


class ToolCall(_Model):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # another spelling seen in clients

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = Field(default=False, strict=True)


class SamplingFields(BaseModel):
    """The sampling fields of a chat request (validated here, used by the engine). Types
    are strict (`"max_tokens": true` is an error, not 1); fields this server does not
    implement yet are refused unless they ask for the default, never silently ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(default=None, strict=True)
    max_tokens: int | None = Field(default=None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(default=None, ge=1, strict=True)
    temperature: float | None = Field(default=None, ge=0, le=2, strict=True)
    top_p: float | None = Field(default=None, gt=0, le=1, strict=True)
    top_k: int | None = Field(default=None, ge=0, strict=True)
    seed: int | None = Field(default=None, ge=0, strict=True)
    stop: str | list[str] | None = Field(default=None, max_length=4)
    stream: bool = Field(default=False, strict=True)
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=16, strict=True)
    logprobs: bool | None = Field(default=None, strict=True)
    top_logprobs: int | None = Field(default=None, ge=0, le=20, strict=True)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, strict=True)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, strict=True)
    # vLLM's extensions, which its users send
    repetition_penalty: float | None = Field(default=None, gt=0, le=10, strict=True)
    min_tokens: int | None = Field(default=None, ge=0, strict=True)
    min_p: float | None = Field(default=None, ge=0, le=1, strict=True)
    ignore_eos: bool | None = Field(default=None, strict=True)
    stop_token_ids: list[int] | None = Field(default=None, max_length=64)
    logit_bias: dict[str, float] | None = None
    # ours: false keeps this request out of speculative decoding (no draft tokens)
    speculative: bool | None = Field(default=None, strict=True)

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.isdigit() or int(key) >= VOCAB_SIZE:
                raise ValueError(f"key {key!r} is not a token id in 0..{VOCAB_SIZE - 1}")
            if not -100 <= bias <= 100:
                raise ValueError(f"the bias of token {key} is {bias}, outside -100..100")
        return value

    @model_validator(mode="after")
    def _agree(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        most = self.max_completion_tokens or self.max_tokens
        if self.min_tokens and most is not None and self.min_tokens > most:
            raise ValueError(f"min_tokens {self.min_tokens} exceeds the max_tokens {most}")
        return self

    def stops(self) -> list[str]:
        """The stop strings, as a list (`stop` may be one string)."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """The engine's sampling parameters for these fields (OpenAI's defaults where
        left out)."""
        return SamplingParams(
            max_tokens=self.max_completion_tokens or self.max_tokens or default_max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            min_tokens=self.min_tokens or 0,
            min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            n=self.n or 1,
            ignore_eos=bool(self.ignore_eos),
            stop_token_ids=self.stop_token_ids,
            speculative=self.speculative is not False,
        )

    @classmethod
    def parse(cls, data: Any):
        """Validate, with errors that name the field (`messages[2].role: ...`)."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise validation_error(exc) from None


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormatField(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _complete(self) -> ResponseFormatField:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs its json_schema object")
        return self


class NamedFunction(_Model):
    name: str = Field(min_length=1)


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(SamplingFields):
    """An OpenAI chat-completions request (the fields that matter to gpt-oss)."""

    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ChatTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    response_format: ResponseFormatField | None = None
    # the analysis message's tokens at most; default by reasoning_effort (and at most
    # half of max_tokens): model.grammar.DEFAULT_REASONING
    max_reasoning_tokens: int | None = Field(default=None, ge=0, strict=True)

    @field_validator("tool_choice")
    @classmethod
    def _names_a_tool(cls, choice: Any, info: ValidationInfo) -> Any:
        names = [t.function.name for t in info.data.get("tools") or []]
        if choice == "required" and not names:
            raise ValueError("required needs tools to call")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(
                f"the function {choice.function.name!r} is not among the tools "
                f"({', '.join(names) or 'none given'})"
            )
        return choice

    def sampling_params(self, default_max_tokens: int, *, frame: bool = True) -> SamplingParams:
        """The sampling fields' parameters with the grammar of the reply (`reply_grammar`):
        always where the request asks for something only a grammar enforces (a JSON
        response_format, a strict tool, a required or named tool call), and for every
        request where `frame` (the server's `--harmony-frame strict`)."""
        params = super().sampling_params(default_max_tokens)
        fmt = self.response_format
        answer = None
        if fmt is not None and fmt.type != "text":
            schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None
            answer = schema or {"type": "object"}
        choice = self.tool_choice
        tools = [] if choice == "none" else self.tools or []
        if isinstance(choice, NamedToolChoice):
            tools = [t for t in tools if t.function.name == choice.function.name]
        callable_tools = [
            FunctionTool(t.function.name, t.function.parameters, bool(t.function.strict))
            for t in tools
        ]
        required = choice == "required" or isinstance(choice, NamedToolChoice)
        asked = answer is not None or required or any(t.strict for t in callable_tools)
        if not (asked or frame):
            return params
        if fmt is not None and fmt.json_schema is not None and fmt.json_schema.schema_:
            check_schema(fmt.json_schema.schema_, "response_format.json_schema.schema")
        for i, t in enumerate(self.tools or []):
            if t.function.strict and t.function.parameters and t in tools:
                check_schema(t.function.parameters, f"tools[{i}].function.parameters")
        return framed(
            params,
            reasoning=self.max_reasoning_tokens,
            effort=self.reasoning_effort,
            answer=answer,
            tools=callable_tools,
            required=required,
            asked=asked,
        )

    def response_formats(self) -> list[ResponseFormat] | None:
        """The developer message's `# Response Formats` entries (a JSON schema's)."""
        fmt = self.response_format
        if fmt is None or fmt.json_schema is None or fmt.type != "json_schema":
            return None
        s = fmt.json_schema
        return [ResponseFormat(name=s.name, description=s.description, schema=s.schema_)]


def framed(
    params: SamplingParams,
    *,
    reasoning: int | None,
    effort: str | None,
    answer: dict[str, Any] | None = None,
    tools: list[FunctionTool] | None = None,
    required: bool = False,
    asked: bool = False,
) -> SamplingParams:
    """params with the reply's grammar (`reply_grammar`), the analysis bounded by
    `reasoning` tokens (default by effort, at most half of max_tokens). The grammar ends
    the reply at <|return|> or <|call|>, which must stop the sequence: a request that asks
    for its guarantees (`asked`) but stops elsewhere (ignore_eos, stop_token_ids without
    them) is refused; a plain one goes unframed."""
    ends = {tok.RETURN, tok.CALL}
    if params.ignore_eos or not ends <= params.stop_ids(sorted(ends)):
        if not asked:
            return params
        field = "ignore_eos" if params.ignore_eos else "stop_token_ids"
        raise HarmonyError(
            f"{field}: a response_format, a strict tool or a required tool call ends the "
            f"reply at <|return|> ({tok.RETURN}) or <|call|> ({tok.CALL}), which must stop it",
            param=field,
        )
    if reasoning is None:
        reasoning = min(DEFAULT_REASONING[effort or "medium"], params.max_tokens // 2)
    grammar = reply_grammar(
        reasoning=reasoning, answer=answer, tools=tools or [], final=not required
    )
    return params.model_copy(update={"grammar": grammar})


class HarmonyRequest(SamplingFields):
    """A harmony conversation (openai-harmony's JSON) to complete, with sampling fields."""

    conversation: dict[str, Any]
    max_reasoning_tokens: int | None = Field(default=None, ge=0, strict=True)

    def framed_params(
        self, default_max_tokens: int, messages: list[Message], *, frame: bool = True
    ) -> SamplingParams:
        """The sampling parameters, with the harmony frame where `frame`: the functions it
        may call are those of the conversation's developer message, effort its system's."""
        params = self.sampling_params(default_max_tokens)
        if not frame:
            return params
        effort, tools = None, []
        for m in messages:
            for c in m.content:
                if isinstance(c, SystemContent) and c.reasoning_effort is not None:
                    effort = c.reasoning_effort.value.lower()
                if isinstance(c, DeveloperContent) and c.tools and "functions" in c.tools:
                    tools = [FunctionTool(t.name) for t in c.tools["functions"].tools]
        return framed(params, reasoning=self.max_reasoning_tokens, effort=effort, tools=tools)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None


def to_harmony(
    request: ChatRequest | dict[str, Any],
    *,
    conversation_start_date: str | None = None,
    model_identity: str | None = SystemContent().model_identity,
    knowledge_cutoff: str | None = "2024-06",
) -> list[Message]:
    """A chat request -> the harmony messages to render for completion."""
    if not isinstance(request, ChatRequest):
        request = ChatRequest.parse(request)
    effort = ReasoningEffort.parse(request.reasoning_effort or "medium")
    out = [
        Message(
            author=Author(role=Role.SYSTEM),
            content=[
                SystemContent(
                    model_identity=model_identity,
                    reasoning_effort=effort,
                    conversation_start_date=conversation_start_date,
                    knowledge_cutoff=knowledge_cutoff,
                )
            ],
        )
    ]
    instructions = [m.text for m in request.messages if m.role in ("system", "developer")]
    tools = [] if request.tool_choice == "none" else (request.tools or [])
    formats = request.response_formats()
    if instructions or tools or formats:
        dev = DeveloperContent(
            instructions="\n\n".join(instructions) if instructions else None,
            response_formats=formats,
        )
        if tools:
            described = []
            for i, t in enumerate(tools):
                try:
                    described.append(
                        ToolDescription(
                            name=t.function.name,
                            description=t.function.description or "",
                            parameters=t.function.parameters,
                        )
                    )
                except ValidationError as exc:
                    raise validation_error(exc, f"tools[{i}]") from None
            dev = dev.with_function_tools(described)
        out.append(Message(author=Author(role=Role.DEVELOPER), content=[dev]))

    call_names: dict[str, str] = {}  # tool_call_id -> function name
    for i, m in enumerate(request.messages):
        if m.role == "user":
            out.append(Message.from_role_and_content(Role.USER, m.text))
        elif m.role == "assistant":
            out += _assistant_turn(m, call_names)
        elif m.role == "tool":
            name = call_names.get(m.tool_call_id or "") or m.name
            if not name:
                raise HarmonyError(
                    f"messages[{i}]: a tool message needs a tool_call_id of an earlier "
                    f"assistant tool call or a name (tool_call_id={m.tool_call_id!r})"
                )
            out.append(
                Message(
                    author=Author(role=Role.TOOL, name=f"functions.{name}"),
                    content=[TextContent(text=m.text)],
                    channel="commentary",
                    recipient="assistant",
                )
            )
    return out


def _assistant_turn(m: ChatMessage, call_names: dict[str, str]) -> list[Message]:
    out = []
    reasoning = m.reasoning_content if m.reasoning_content is not None else m.reasoning
    if reasoning:
        out.append(_assistant(reasoning, "analysis"))
    if m.text:
        # Text beside tool calls is a preamble, which lives on the commentary channel.
        out.append(_assistant(m.text, "commentary" if m.tool_calls else "final"))
    for call in m.tool_calls or []:
        call_names[call.id] = call.function.name
        out.append(
            Message(
                author=Author(role=Role.ASSISTANT),
                content=[TextContent(text=call.function.arguments)],
                channel="commentary",
                recipient=f"functions.{call.function.name}",
                content_type="<|constrain|>json",
            )
        )
    return out


def _assistant(text: str, channel: str) -> Message:
    return Message(
        author=Author(role=Role.ASSISTANT), content=[TextContent(text=text)], channel=channel
    )


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def from_harmony(
    messages: list[Message], *, call_id: Callable[[], str] = new_call_id
) -> AssistantMessage:
    """Parsed completion messages -> one OpenAI assistant message. Any assistant message
    with a recipient is a tool call: `functions.NAME` -> NAME; a recipient without the
    prefix (models sometimes forget it) or a built-in tool keeps its name as is."""
    reasoning, content, calls = [], [], []
    for m in messages:
        if m.author.role != Role.ASSISTANT:
            continue
        name = _function_name(m.recipient)
        if name is not None:
            calls.append(ToolCall(id=call_id(), function=FunctionCall(name=name, arguments=m.text)))
        elif m.channel == "analysis":
            reasoning.append(m.text)
        else:  # final, a commentary preamble, or (malformed) no channel
            content.append(m.text)
    return AssistantMessage(
        content="".join(content) if content else None,
        reasoning_content="".join(reasoning) if reasoning else None,
        tool_calls=calls or None,
    )


def _function_name(recipient: str | None) -> str | None:
    if recipient is None or recipient in ("all", "assistant", "user"):
        return None
    if recipient.startswith("functions."):
        return recipient[len("functions.") :]
    return recipient


def describe_validation_error(exc: ValidationError, prefix: str = "") -> str:
    problems = []
    for err in exc.errors():
        value = err.get("input")
        shown = f" (got {value!r})" if not isinstance(value, dict | list) else ""
        path = _error_path(err, prefix)
        problems.append(f"{path or 'request'}: {err['msg'].removeprefix('Value error, ')}{shown}")
    return "; ".join(problems)


def validation_error(exc: ValidationError, prefix: str = "") -> HarmonyError:
    """The request error for a failed validation; `param` is the first field at fault."""
    first = _error_path(exc.errors()[0], prefix) if exc.errors() else ""
    return HarmonyError(describe_validation_error(exc, prefix), param=first or None)


def _error_path(err: Any, prefix: str) -> str:
    loc = [p for p in err["loc"] if not (isinstance(p, str) and p in _UNION_TAGS)]
    path = prefix
    for p in loc:
        path += f"[{p}]" if isinstance(p, int) else (f".{p}" if path else str(p))
    return path


_UNION_TAGS = {"str", "list[TextPart]"}

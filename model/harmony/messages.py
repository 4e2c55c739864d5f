"""Harmony conversations as data: the same classes and the same JSON as openai-harmony's
`Message.to_json()` / `Conversation.to_json()`, so that a conversation moves between the
two unchanged.

Reading JSON follows openai-harmony's renderer: a field that is absent is None (a bare
`{"type": "system_content"}` renders an empty system message). Building `SystemContent()`
in Python gives openai-harmony's defaults instead (identity, medium effort, cutoff 2024-06,
the three channels)."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gptoss_ray.model.harmony.schema import SchemaError, check_schema
from gptoss_ray.model.types import RequestError


class HarmonyError(RequestError):
    """Bad harmony input: names the message index and the field."""


class Role(StrEnum):
    USER = "user"
    ASSISTANT = "assistant"
    SYSTEM = "system"
    DEVELOPER = "developer"
    TOOL = "tool"


class ReasoningEffort(StrEnum):
    # openai-harmony's JSON spells these capitalised; the rendered text is lower case.
    LOW = "Low"
    MEDIUM = "Medium"
    HIGH = "High"

    @classmethod
    def parse(cls, value: str | ReasoningEffort) -> ReasoningEffort:
        if isinstance(value, ReasoningEffort):
            return value
        for effort in cls:
            if value.lower() == effort.value.lower():
                return effort
        raise ValueError(f"reasoning effort {value!r} is not one of low, medium, high")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Author(_Model):
    role: Role
    name: str | None = None


class TextContent(_Model):
    type: Literal["text"] = "text"
    text: str


class ToolDescription(_Model):
    name: str = Field(min_length=1)
    description: str = ""
    parameters: dict[str, Any] | None = None

    @field_validator("parameters")
    @classmethod
    def _schema_is_well_formed(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            try:
                check_schema(value)
            except SchemaError as exc:
                raise ValueError(f"malformed JSON schema: {exc}") from None
        return value


class ToolNamespaceConfig(_Model):
    name: str = Field(min_length=1)
    description: str | None = None
    tools: list[ToolDescription] = Field(default_factory=list)


class ChannelConfig(_Model):
    valid_channels: list[str]
    channel_required: bool

    @classmethod
    def require_channels(cls, channels: list[str]) -> ChannelConfig:
        return cls(valid_channels=channels, channel_required=True)


DEFAULT_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
DEFAULT_CHANNELS = ["analysis", "commentary", "final"]


class SystemContent(_Model):
    type: Literal["system_content"] = "system_content"
    model_identity: str | None = DEFAULT_IDENTITY
    reasoning_effort: ReasoningEffort | None = ReasoningEffort.MEDIUM
    conversation_start_date: str | None = None
    knowledge_cutoff: str | None = "2024-06"
    channel_config: ChannelConfig | None = Field(
        default_factory=lambda: ChannelConfig.require_channels(list(DEFAULT_CHANNELS))
    )
    tools: dict[str, ToolNamespaceConfig] | None = None

    @field_validator("reasoning_effort", mode="before")
    @classmethod
    def _effort(cls, value: Any) -> Any:
        return None if value is None else ReasoningEffort.parse(value)


class ResponseFormat(_Model):
    """A structured answer's format, as the developer message's `# Response Formats`
    section shows it to the model."""

    name: str
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")


class DeveloperContent(_Model):
    type: Literal["developer_content"] = "developer_content"
    instructions: str | None = None
    tools: dict[str, ToolNamespaceConfig] | None = None
    # not in openai-harmony 0.0.8's JSON (it has no response formats): kept out of to_dict
    response_formats: list[ResponseFormat] | None = Field(default=None, exclude=True)

    def with_function_tools(self, tools: list[ToolDescription]) -> DeveloperContent:
        namespaces = dict(self.tools or {})
        namespaces["functions"] = ToolNamespaceConfig(name="functions", tools=list(tools))
        return self.model_copy(update={"tools": namespaces})


Content = Annotated[TextContent | SystemContent | DeveloperContent, Field(discriminator="type")]


class Message(_Model):
    author: Author
    content: list[Content] = Field(default_factory=list)
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None
    # Set only by the lenient parser: why the model's output did not follow the grammar.
    malformed: str | None = None

    @classmethod
    def from_role_and_content(
        cls, role: Role | str, content: str | TextContent | SystemContent | DeveloperContent
    ) -> Message:
        if isinstance(content, str):
            content = TextContent(text=content)
        return cls(author=Author(role=Role(role)), content=[content])

    @property
    def text(self) -> str:
        """The concatenated text contents."""
        return "".join(c.text for c in self.content if isinstance(c, TextContent))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "role": self.author.role.value,
            "name": self.author.name,
            "content": [_content_to_dict(c) for c in self.content],
        }
        for key in ("channel", "recipient", "content_type", "malformed"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "message") -> Message:
        if not isinstance(data, dict):
            raise HarmonyError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if "role" not in data:
            raise HarmonyError(f"{where}.role: missing")
        role = data["role"]
        if role not in {r.value for r in Role}:
            raise HarmonyError(
                f"{where}.role: unknown role {role!r} "
                f"(expected one of {', '.join(r.value for r in Role)})"
            )
        raw_content = data.get("content", [])
        if isinstance(raw_content, str):
            raw_content = [{"type": "text", "text": raw_content}]
        if not isinstance(raw_content, list):
            raise HarmonyError(f"{where}.content: expected a string or a list of contents")
        contents = [
            _content_from_dict(c, f"{where}.content[{i}]") for i, c in enumerate(raw_content)
        ]
        fields = {k: data.get(k) for k in ("channel", "recipient", "content_type", "malformed")}
        for key, value in fields.items():
            if value is not None and not isinstance(value, str):
                raise HarmonyError(f"{where}.{key}: expected a string, got {value!r}")
        name = data.get("name")
        if name is not None and not isinstance(name, str):
            raise HarmonyError(f"{where}.name: expected a string, got {name!r}")
        unknown = set(data) - {"role", "name", "content", *fields}
        if unknown:
            raise HarmonyError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        if role == "tool" and not name:
            raise HarmonyError(f"{where}.name: a tool message needs the tool's name as author")
        return cls(author=Author(role=Role(role), name=name), content=contents, **fields)


class Conversation(_Model):
    messages: list[Message] = Field(default_factory=list)

    @classmethod
    def from_messages(cls, messages: list[Message]) -> Conversation:
        return cls(messages=list(messages))

    def __iter__(self):  # type: ignore[override]
        return iter(self.messages)

    def to_dict(self) -> dict[str, Any]:
        return {"messages": [m.to_dict() for m in self.messages]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any) -> Conversation:
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise HarmonyError('a conversation is a JSON object {"messages": [...]}')
        return cls(
            messages=[
                Message.from_dict(m, where=f"messages[{i}]") for i, m in enumerate(data["messages"])
            ]
        )

    @classmethod
    def from_json(cls, payload: str) -> Conversation:
        try:
            data = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise HarmonyError(f"not valid JSON: {exc}") from exc
        return cls.from_dict(data)


def _content_to_dict(content: TextContent | SystemContent | DeveloperContent) -> dict[str, Any]:
    if isinstance(content, TextContent):
        return {"type": "text", "text": content.text}
    out = content.model_dump(mode="json", exclude_none=True, exclude={"type"})
    out["type"] = content.type
    return out


_CONTENT_TYPES: dict[str, type[TextContent | SystemContent | DeveloperContent]] = {
    "text": TextContent,
    "system_content": SystemContent,
    "developer_content": DeveloperContent,
}


def _content_from_dict(raw: Any, where: str) -> TextContent | SystemContent | DeveloperContent:
    if not isinstance(raw, dict):
        raise HarmonyError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    kind = raw.get("type")
    model = _CONTENT_TYPES.get(kind)  # type: ignore[arg-type]
    if model is None:
        raise HarmonyError(
            f"{where}.type: unknown content type {kind!r} "
            "(expected text, system_content or developer_content)"
        )
    fields = {k: v for k, v in raw.items() if k != "type"}
    if model is not TextContent:
        # As in openai-harmony's renderer, an absent field means None, not the default.
        fields = {name: fields.get(name) for name in model.model_fields if name != "type"} | fields
    try:
        return model(**fields)
    except ValidationError as exc:
        raise HarmonyError(_describe(exc, where)) from None


def _describe(exc: ValidationError, where: str) -> str:
    problems = []
    for err in exc.errors():
        path = where + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        problems.append(f"{path}: {message}")
    return "; ".join(problems)

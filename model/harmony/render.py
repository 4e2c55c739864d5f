"""Conversation -> token ids, exactly as openai-harmony renders them.

Every piece of text is tokenized on its own (role, recipient, channel, each content) and
the special tokens go between, so the ids match a reference that renders piece by piece,
not the tokenization of the whole string."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from gptoss_ray.model import tokenizer as tok
from gptoss_ray.model.harmony.messages import (
    DeveloperContent,
    HarmonyError,
    Message,
    Role,
    SystemContent,
    TextContent,
    ToolNamespaceConfig,
)
from gptoss_ray.model.harmony.schema import to_typescript

CONSTRAIN_TEXT = "<|constrain|>"
STOP_TOKEN_IDS = (tok.RETURN, tok.CALL)  # sampling stops here; <|end|> is not a stop


def stop_token_ids() -> list[int]:
    """What generation stops at: `<|return|>` (final answer) and `<|call|>` (tool call)."""
    return list(STOP_TOKEN_IDS)


def render_conversation(
    messages: Iterable[Message], *, auto_drop_analysis: bool = True
) -> list[int]:
    """The conversation's ids, nothing appended."""
    messages = list(messages)
    has_function_tools = any(
        isinstance(c, DeveloperContent)
        and c.tools
        and c.tools.get("functions")
        and c.tools["functions"].tools
        for m in messages
        for c in m.content
    )
    last_assistant = next((m for m in reversed(messages) if m.author.role == Role.ASSISTANT), None)
    drop = auto_drop_analysis and last_assistant is not None and last_assistant.channel == "final"
    first_final = next((i for i, m in enumerate(messages) if m.channel == "final"), None)
    out: list[int] = []
    for i, message in enumerate(messages):
        if drop and first_final is not None and i < first_final and message.channel == "analysis":
            continue  # earlier reasoning is not shown to the model again
        try:
            out += render_message(message, has_function_tools=bool(has_function_tools))
        except HarmonyError as exc:
            raise HarmonyError(f"messages[{i}]: {exc}") from None
    return out


def render_for_completion(
    messages: Iterable[Message],
    next_role: Role | str = Role.ASSISTANT,
    *,
    auto_drop_analysis: bool = True,
) -> list[int]:
    """The prompt for the next turn: the conversation, then `<|start|>{role}`."""
    out = render_conversation(messages, auto_drop_analysis=auto_drop_analysis)
    return [*out, tok.START, *tok.encode(Role(next_role).value)]


def render_for_training(
    messages: Sequence[Message], *, auto_drop_analysis: bool = True
) -> list[int]:
    """As a training example: a last assistant message on `final` ends with `<|return|>`."""
    messages = list(messages)
    out = render_conversation(messages, auto_drop_analysis=auto_drop_analysis)
    last = messages[-1] if messages else None
    if out and last is not None and last.author.role == Role.ASSISTANT and last.channel == "final":
        out[-1] = tok.RETURN
    return out


def render_message(message: Message, *, has_function_tools: bool = False) -> list[int]:
    out = [tok.START]
    if message.author.role == Role.TOOL:
        if not message.author.name:
            raise HarmonyError("name: a tool message needs the tool's name as author")
        out += tok.encode(message.author.name)
    else:
        out += tok.encode(message.author.role.value)
        if message.author.name is not None:
            out += tok.encode(f":{message.author.name}")
    if message.recipient is not None and message.recipient != "all":
        out += tok.encode(f" to={message.recipient}")
    if message.channel is not None:
        out += [tok.CHANNEL, *tok.encode(message.channel)]
    if message.content_type is not None:
        if message.content_type.startswith(CONSTRAIN_TEXT):
            rest = message.content_type[len(CONSTRAIN_TEXT) :]
            out += [*tok.encode(" "), tok.CONSTRAIN, *tok.encode(rest)]
        else:
            out += tok.encode(f" {message.content_type}")
    out.append(tok.MESSAGE)
    for i, content in enumerate(message.content):
        if isinstance(content, SystemContent) and message.author.role != Role.SYSTEM:
            raise HarmonyError(f"content[{i}]: system content is only allowed in system messages")
        if isinstance(content, DeveloperContent) and message.author.role != Role.DEVELOPER:
            raise HarmonyError(
                f"content[{i}]: developer content is only allowed in developer messages"
            )
        out += tok.encode(content_text(content, has_function_tools=has_function_tools))
    calls_tool = message.author.role == Role.ASSISTANT and message.recipient is not None
    out.append(tok.CALL if calls_tool else tok.END)
    return out


def content_text(
    content: TextContent | SystemContent | DeveloperContent, *, has_function_tools: bool = False
) -> str:
    if isinstance(content, TextContent):
        return content.text
    if isinstance(content, SystemContent):
        return _system_text(content, has_function_tools)
    return _developer_text(content)


def _system_text(sys: SystemContent, has_function_tools: bool) -> str:
    sections = []
    top = []
    if sys.model_identity is not None:
        top.append(sys.model_identity)
    if sys.knowledge_cutoff is not None:
        top.append(f"Knowledge cutoff: {sys.knowledge_cutoff}")
    if sys.conversation_start_date is not None:
        top.append(f"Current date: {sys.conversation_start_date}")
    if top:
        sections.append("\n".join(top))
    if sys.reasoning_effort is not None:
        sections.append(f"Reasoning: {sys.reasoning_effort.value.lower()}")
    if sys.tools:
        sections.append(_tools_text(sys.tools))
    channels = sys.channel_config
    if channels is not None and channels.valid_channels:
        header = f"# Valid channels: {', '.join(channels.valid_channels)}."
        if channels.channel_required:
            header += " Channel must be included for every message."
        if has_function_tools:
            header += "\nCalls to these tools must go to the commentary channel: 'functions'."
        sections.append(header)
    return "\n\n".join(sections)


def _developer_text(dev: DeveloperContent) -> str:
    sections = []
    if dev.instructions is not None:
        sections += ["# Instructions", dev.instructions]
    if dev.tools:
        sections.append(_tools_text(dev.tools))
    if dev.response_formats:
        sections.append("# Response Formats")
        for fmt in dev.response_formats:
            about = f"// {fmt.description}\n" if fmt.description else ""
            schema = json.dumps(fmt.schema_, separators=(",", ":"), ensure_ascii=False)
            sections += [f"## {fmt.name}", about + schema]
    return "\n\n".join(sections)


def _tools_text(namespaces: dict[str, ToolNamespaceConfig]) -> str:
    sections = ["# Tools"]
    for key in sorted(namespaces):  # namespaces render in key order
        ns = namespaces[key]
        lines = [f"## {ns.name}\n"]
        if ns.description is not None:
            prefix = "// " if ns.tools else ""
            lines += [prefix + line for line in _lines(ns.description)]
        if ns.tools:
            lines.append(f"namespace {ns.name} {{\n")
            for tool in ns.tools:
                lines += [f"// {line}" for line in _lines(tool.description)]
                if tool.parameters is not None:
                    params = to_typescript(tool.parameters)
                    lines.append(f"type {tool.name} = (_: {params}) => any;\n")
                else:
                    lines.append(f"type {tool.name} = () => any;\n")
            lines.append(f"}} // namespace {ns.name}")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def _lines(text: str) -> list[str]:
    # Rust's str::lines: split at "\n", drop the "\r" of a "\r\n", no empty last line; a
    # bare "\r" stays (unlike str.splitlines, which also splits at \r, \v, \f, U+2028..).
    parts = text.split("\n")
    last = parts.pop()
    lines = [p.removesuffix("\r") for p in parts]
    if last:
        lines.append(last)
    return lines

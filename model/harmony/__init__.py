"""The harmony chat format of gpt-oss: conversations, rendering to token ids, parsing
completions (strict or lenient, whole or streamed), and the OpenAI chat dialect.
Token-identical to openai-harmony, which the tests use as the oracle."""

from gptoss_ray.model.harmony.messages import (
    Author,
    ChannelConfig,
    Conversation,
    DeveloperContent,
    HarmonyError,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
    TextContent,
    ToolDescription,
    ToolNamespaceConfig,
)
from gptoss_ray.model.harmony.parse import StreamParser, StreamState, parse_completion
from gptoss_ray.model.harmony.render import (
    render_conversation,
    render_for_completion,
    render_for_training,
    render_message,
    stop_token_ids,
)

__all__ = [
    "Author",
    "ChannelConfig",
    "Conversation",
    "DeveloperContent",
    "HarmonyError",
    "Message",
    "ReasoningEffort",
    "Role",
    "StreamParser",
    "StreamState",
    "SystemContent",
    "TextContent",
    "ToolDescription",
    "ToolNamespaceConfig",
    "parse_completion",
    "render_conversation",
    "render_for_completion",
    "render_for_training",
    "render_message",
    "stop_token_ids",
]

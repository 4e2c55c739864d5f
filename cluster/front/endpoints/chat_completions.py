"""/v1/chat/completions, streamed (server-sent events) and not."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gptoss_ray.cluster.client.chat import (
    TextDelta,
    ToolCallStart,
    chat_completion,
    logprob_entries,
)
from gptoss_ray.cluster.client.engine_client import Finished
from gptoss_ray.cluster.front.state import (
    FrontState,
    event_stream,
    read_json,
    sse,
)


async def chat_completions(front: FrontState, request: Request) -> Response:
    body = await read_json(front, request)
    if isinstance(body, dict) and body.get("stream"):
        return await event_stream(_stream_chat(front, body, request))
    async with front.submitted(body, "chat", request) as (_, (stream,)):
        reply = await front.reply(stream, request)
        model = await front.model_name(stream)
        return JSONResponse(chat_completion(reply, model, f"chatcmpl-{stream.request_id[:24]}"))


async def _stream_chat(
    front: FrontState, body: dict[str, Any], request: Request
) -> AsyncIterator[str]:
    async with front.submitted(body, "chat", request) as (_, (stream,)):
        # (read once the engine took the request: it checked them)
        n, rid = stream.request.params.n, stream.request_id
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        base = {
            "id": f"chatcmpl-{rid[:24]}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": await front.model_name(stream),
        }

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs=None):
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return sse({**base, "choices": [choice]})

        yield "".join(chunk(i, {"role": "assistant", "content": ""}) for i in range(n))
        async for item in front.events(stream, request):
            if isinstance(item, Finished):
                reply = item.reply
                break
            choice, event = item
            out = _chat_delta(event)
            if out is not None:
                yield chunk(choice, *out)
        text = "".join(
            chunk(i, {}, c["finish_reason"]) for i, c in enumerate(reply.get("choices") or [reply])
        )
        if include_usage:
            text += sse({**base, "choices": [], "usage": reply["usage"]})
        yield text + sse("[DONE]")


def _chat_delta(ev: Any) -> tuple[dict[str, Any], None, Any] | None:
    """An event as a chunk's (delta, finish, logprobs), None for events chat does not show."""
    if isinstance(ev, ToolCallStart):
        call = {"name": ev.name, "arguments": ""}
        return (
            {
                "tool_calls": [
                    {"index": ev.index, "id": ev.call_id, "type": "function", "function": call}
                ]
            },
            None,
            None,
        )
    if isinstance(ev, TextDelta) and ev.kind == "call":
        return {"tool_calls": [{"index": ev.call, "function": {"arguments": ev.text}}]}, None, None
    if isinstance(ev, TextDelta) and ev.kind == "reasoning":
        return {"reasoning_content": ev.text}, None, None
    if isinstance(ev, TextDelta):
        # the answer's tokens' logprobs go with the text they wrote, when asked
        lps = {"content": logprob_entries(ev.logprobs), "refusal": None} if ev.logprobs else None
        return {"content": ev.text}, None, lps
    return None

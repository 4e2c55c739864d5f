"""/v1/completions (raw text, as vLLM serves it), streamed and not."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gptoss_ray.cluster.client.completions import (
    completion_choices,
    completion_object,
    legacy_logprobs,
)
from gptoss_ray.cluster.client.engine_client import Finished
from gptoss_ray.cluster.front.state import (
    ApiError,
    FrontState,
    event_stream,
    read_json,
    sse,
)
from gptoss_ray.model import tokenizer as tok


async def completions(front: FrontState, request: Request) -> Response:
    body = await read_json(front, request)
    if not isinstance(body, dict):
        raise ApiError(400, "the request body is a JSON object", "invalid_request")
    if body.get("stream") and body.get("echo") and body.get("logprobs") is not None:
        raise ApiError(
            400, "echo with logprobs is not streamed: leave out stream", "invalid_request", "echo"
        )
    if body.get("stream"):
        return await event_stream(_stream_completions(front, body, request))
    async with front.submitted(body, "text", request) as (parsed, streams):
        n, cid = parsed.n or 1, f"cmpl-{streams[0].request_id[:24]}"
        choices, usage = [], Counter()
        for i, stream in enumerate(streams):
            reply = await front.reply(stream, request)
            choices += completion_choices(i * n, stream.request.prompt, reply, parsed)
            usage.update(reply["usage"])
        model = await front.model_name(streams[0])
        return JSONResponse(completion_object(cid, model, choices, dict(usage)))


async def _stream_completions(
    front: FrontState, body: dict[str, Any], request: Request
) -> AsyncIterator[str]:
    """Prompt after prompt (all run at once), each choice's text as it comes."""
    async with front.submitted(body, "text", request) as (parsed, streams):
        n, usage = parsed.n or 1, Counter()
        cid, model = f"cmpl-{streams[0].request_id[:24]}", await front.model_name(streams[0])

        def chunk(index: int, text: str, finish: str | None = None, logprobs: Any = None) -> str:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
            return sse(completion_object(cid, model, [choice], {}) | {"usage": None})

        yield ""  # submitted: the answer's head goes now
        for i, stream in enumerate(streams):
            offsets = [0] * n
            if parsed.echo:
                text = tok.decode(stream.request.prompt)
                yield "".join(chunk(i * n + j, text) for j in range(n))
            async for item in front.events(stream, request):
                if isinstance(item, Finished):
                    reply = item.reply
                    break
                j, event = item
                lps = None
                if parsed.logprobs is not None:
                    tokens = [lp.token for lp in event.logprobs]
                    lps = legacy_logprobs(event.logprobs, tokens, offsets[j])
                offsets[j] += len(event.text)
                yield chunk(i * n + j, event.text, logprobs=lps)
            yield "".join(
                chunk(i * n + j, "", r["finish_reason"])
                for j, r in enumerate(reply.get("choices") or [reply])
            )
            usage.update(reply["usage"])
        if parsed.stream_options and parsed.stream_options.include_usage:
            yield sse(completion_object(cid, model, [], dict(usage)))
        yield sse("[DONE]")

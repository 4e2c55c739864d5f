"""/v1/responses (streamed and not) and the stored responses: get, delete, input items."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gptoss_ray.cluster.client.engine_client import Finished
from gptoss_ray.cluster.front.responses import (
    ResponseStream,
    conversation,
    remember,
    response_object,
)
from gptoss_ray.cluster.front.state import (
    ApiError,
    FrontState,
    event_stream,
    read_json,
    sse,
)
from gptoss_ray.model.types import RequestError


async def responses(front: FrontState, request: Request) -> Response:
    body = await read_json(front, request)
    try:
        items, chat = await run_in_threadpool(conversation, body, front.responses)
    except RequestError as exc:  # harmony's among them
        raise ApiError.of(exc) from None
    if body.get("stream"):
        return await event_stream(_stream_responses(front, body, items, chat, request))
    async with front.submitted(chat, "chat", request) as (_, (stream,)):
        reply = await front.reply(stream, request)
        model = await front.model_name(stream)
        rid = stream.request_id
        response = response_object(reply, model, response_id=f"resp_{rid}", request=body)
    await run_in_threadpool(remember, front.responses, body, items, response)
    return JSONResponse(response)


async def _stream_responses(
    front: FrontState, body: dict[str, Any], items: list, chat: dict[str, Any], request: Request
) -> AsyncIterator[str]:
    async with front.submitted(chat, "chat", request) as (_, (stream,)):
        rid, out = stream.request_id, []
        seq = iter(range(1 << 62))

        def send(kind: str, **fields: Any) -> None:
            out.append(sse({"type": kind, "sequence_number": next(seq), **fields}, event=kind))

        model = await front.model_name(stream)
        events = ResponseStream(send, f"resp_{rid}", model, bool(chat.get("logprobs")))
        yield "".join(out)  # response.created
        out.clear()
        async for item in front.events(stream, request):
            if isinstance(item, Finished):
                response = events.complete(item.reply, body)
            else:
                events.handle(item[1])
            yield "".join(out)
            out.clear()
    await run_in_threadpool(remember, front.responses, body, items, response)


async def _stored(front: FrontState, request: Request) -> dict[str, Any]:
    rid = request.path_params["id"]
    entry = await run_in_threadpool(front.responses.get, rid)
    if entry is None:
        raise ApiError(404, f"no stored response {rid!r}", "not_found")
    return entry


async def get_response(front: FrontState, request: Request) -> Response:
    return JSONResponse((await _stored(front, request))["response"])


async def delete_response(front: FrontState, request: Request) -> Response:
    rid = request.path_params["id"]
    if not await run_in_threadpool(front.responses.delete, rid):
        raise ApiError(404, f"no stored response {rid!r}", "not_found")
    return JSONResponse({"id": rid, "object": "response.deleted", "deleted": True})


async def response_input_items(front: FrontState, request: Request) -> Response:
    entry = await _stored(front, request)
    data = entry["items"][: entry["inputs"]]
    if request.query_params.get("order", "desc") == "desc":
        data = data[::-1]  # OpenAI lists the newest first unless asked
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    body = {"object": "list", "data": data, "first_id": first, "last_id": last}
    return JSONResponse(body | {"has_more": False})

"""The Files and Batch APIs (`cluster.batch.service`): /v1/files and /v1/batches."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gptoss_ray.cluster.front.state import (
    ApiError,
    FrontState,
    read_json,
)
from gptoss_ray.model.types import RequestError


# -- the Batch API (cluster.batches_api) -----------------------------------------------------
async def _batches(front: FrontState, method: str, *args: Any) -> Any:
    service = await run_in_threadpool(lambda: front.batches)
    try:
        return await run_in_threadpool(getattr(service, method), *args)
    except (RequestError, ValueError) as exc:  # the job's own input errors among them
        raise ApiError.of(exc) from None


async def upload_file(front: FrontState, request: Request) -> Response:
    limit = front.settings.max_file_bytes
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit + 65536:
        raise ApiError(413, f"the file is over {limit} bytes", "request_too_large", "file")
    try:
        form = await request.form(max_files=1, max_fields=8)
    except Exception as exc:  # not multipart, or torn
        raise ApiError(
            400, f"a multipart form with file and purpose: {exc}", "invalid_request"
        ) from None
    upload, purpose = form.get("file"), form.get("purpose")
    if upload is None or isinstance(upload, str):
        raise ApiError(400, "file: the form has no file", "invalid_request", "file")
    if not isinstance(purpose, str):
        raise ApiError(400, "purpose: the form has no purpose", "invalid_request", "purpose")
    data = await upload.read()
    if len(data) > limit:
        raise ApiError(413, f"the file is over {limit} bytes", "request_too_large", "file")
    return JSONResponse(
        await _batches(front, "upload", upload.filename or "upload.jsonl", purpose, data)
    )


async def list_files(front: FrontState, request: Request) -> Response:
    service = await run_in_threadpool(lambda: front.batches)
    purpose = request.query_params.get("purpose")
    data = await service.files.list.remote(purpose)
    return JSONResponse({"object": "list", "data": data, "has_more": False})


async def _file(front: FrontState, request: Request, method: str) -> Any:
    service = await run_in_threadpool(lambda: front.batches)
    file_id = request.path_params["id"]
    got = await getattr(service.files, method).remote(file_id)
    if got is None or got is False:
        raise ApiError(404, f"no file {file_id!r}", "not_found", "file_id")
    return got


async def get_file(front: FrontState, request: Request) -> Response:
    return JSONResponse(await _file(front, request, "get"))


async def file_content(front: FrontState, request: Request) -> Response:
    return Response(await _file(front, request, "content"), media_type="application/jsonl")


async def delete_file(front: FrontState, request: Request) -> Response:
    await _file(front, request, "delete")
    return JSONResponse({"id": request.path_params["id"], "object": "file", "deleted": True})


async def create_batch(front: FrontState, request: Request) -> Response:
    return JSONResponse(await _batches(front, "create", await read_json(front, request)))


async def list_batches(front: FrontState, request: Request) -> Response:
    limit = request.query_params.get("limit", "20")
    if not limit.isdigit() or not 1 <= int(limit) <= 100:
        raise ApiError(400, f"limit {limit!r}: 1 to 100", "invalid_request", "limit")
    after = request.query_params.get("after")
    return JSONResponse(await _batches(front, "list", after, int(limit)))


async def get_batch(front: FrontState, request: Request) -> Response:
    return JSONResponse(await _batches(front, "get", request.path_params["id"]))


async def cancel_batch(front: FrontState, request: Request) -> Response:
    return JSONResponse(await _batches(front, "cancel", request.path_params["id"]))

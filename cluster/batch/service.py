"""The OpenAI Batch API over HTTP (/v1/files, /v1/batches), on the durable batch jobs of
`cluster.batch.jobs`: an uploaded file is kept by `FileStore`, a named actor that owns a folder
on its node; a batch is a `BatchJob` on that node reading the file and writing its output
beside it, over every engine of the front (a lost engine's lines go to the others, or wait
for it to be back), at batch priority (interactive requests go first). A batch's output
and error files are views of the job's output (the records that succeeded, and those that
did not), readable while it runs and after it ended.

Blocking Ray calls: the front calls these from a thread (`run_in_threadpool`)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from gptoss_ray.cluster.batch.format import SUPPORTED_URLS, errors_path
from gptoss_ray.cluster.runtime.ray_instance import NAMESPACE
from gptoss_ray.model.types import RequestError, UnknownRequest

FILES_ACTOR = "gptoss-ray-files"
COMPLETION_WINDOW_S = {"24h": 24 * 3600}
WAIT_FOR_ENGINE_S = 600.0  # a batch waits this long for an engine to be back


class FileStore:
    """Files by id in one folder: `<id>.json` (the file object) and `<id>.data` (its
    bytes), or a view of a batch job's output (its records that succeeded, or failed)."""

    def __init__(self, root: str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def folder(self) -> str:
        return str(self.root)

    def put(self, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        (self.root / f"{file_id}.data").write_bytes(data)
        return self._save(file_id, filename, purpose, len(data))

    def view(self, file_id: str, filename: str, output: str, failed: bool) -> dict[str, Any]:
        """A file whose content is the records of the job output `output` that failed
        (`failed`) or succeeded."""
        return self._save(file_id, filename, "batch_output", None, output, failed)

    def _save(self, file_id, filename, purpose, size, output=None, failed=False) -> dict:
        meta = {
            "id": file_id,
            "object": "file",
            "bytes": size,
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }
        stored = meta | ({"view": {"output": output, "failed": failed}} if output else {})
        (self.root / f"{file_id}.json").write_text(json.dumps(stored))
        return meta

    def get(self, file_id: str) -> dict[str, Any] | None:
        meta = self._meta(file_id)
        if meta is None:
            return None
        if "view" in meta:
            meta["bytes"] = len(self._view_bytes(meta["view"]))
        meta.pop("view", None)
        return meta

    def _meta(self, file_id: str) -> dict[str, Any] | None:
        if not file_id.replace("-", "").replace("_", "").isalnum():
            return None  # never a path outside the folder
        path = self.root / f"{file_id}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def path(self, file_id: str) -> str | None:
        meta = self._meta(file_id)
        return None if meta is None or "view" in meta else str(self.root / f"{file_id}.data")

    def content(self, file_id: str) -> bytes | None:
        meta = self._meta(file_id)
        if meta is None:
            return None
        if "view" in meta:
            return self._view_bytes(meta["view"])
        return (self.root / f"{file_id}.data").read_bytes()

    @staticmethod
    def _view_bytes(view: dict[str, Any]) -> bytes:
        # the job's errors file holds exactly its failed records; the output holds all
        path = errors_path(view["output"]) if view["failed"] else Path(view["output"])
        if not path.exists():
            return b""
        lines = [line for line in path.read_bytes().split(b"\n") if line.strip()]
        if not view["failed"]:
            lines = [line for line in lines if json.loads(line).get("error") is None]
        return b"".join(line + b"\n" for line in lines)

    def list(self, purpose: str | None = None) -> list[dict[str, Any]]:
        out = []
        for path in self.root.glob("file-*.json"):
            meta = self.get(path.stem)
            if meta is not None and (purpose is None or meta["purpose"] == purpose):
                out.append(meta)
        return sorted(out, key=lambda m: (m["created_at"], m["id"]), reverse=True)

    def delete(self, file_id: str) -> bool:
        meta = self._meta(file_id)
        if meta is None:
            return False
        for suffix in (".json", ".data"):
            (self.root / f"{file_id}{suffix}").unlink(missing_ok=True)
        return True


def file_store() -> Any:
    """The cluster's file store actor, started on this node the first time."""
    from gptoss_ray.model.model_folder import cache_dir

    return (
        ray.remote(FileStore)
        .options(
            name=FILES_ACTOR,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_concurrency=16,
            scheduling_strategy=NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=False
            ),
        )
        .remote(str(cache_dir() / "files"))
    )


class Batches:
    """/v1/batches for a front whose engines are the named coordinators `engines`."""

    def __init__(self, engines: list[str]) -> None:
        self.engines = engines
        self.files = file_store()

    def upload(self, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        if purpose != "batch":
            raise RequestError(
                f"purpose {purpose!r}: this server keeps files for batches only (purpose batch)",
                param="purpose",
            )
        return ray.get(self.files.put.remote(filename, purpose, data))

    def create(self, body: Any) -> dict[str, Any]:
        from gptoss_ray.cluster.batch.client import Client

        if not isinstance(body, dict):
            raise RequestError("the request body is a JSON object")
        endpoint, window = body.get("endpoint"), body.get("completion_window", "24h")
        if endpoint not in SUPPORTED_URLS:
            raise RequestError(
                f"endpoint {endpoint!r} is not supported (supported: {', '.join(SUPPORTED_URLS)})",
                param="endpoint",
            )
        if window not in COMPLETION_WINDOW_S:
            raise RequestError(
                f"completion_window {window!r}: only 24h is supported", param="completion_window"
            )
        metadata = body.get("metadata")
        if metadata is not None and not (
            isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
        ):
            raise RequestError("metadata: an object of strings", param="metadata")
        file_id = body.get("input_file_id")
        meta = ray.get(self.files.get.remote(str(file_id))) if isinstance(file_id, str) else None
        if meta is None:
            raise UnknownRequest(f"input_file_id: no file {file_id!r}", param="input_file_id")
        if meta["purpose"] != "batch":
            raise RequestError(
                f"input_file_id: file {file_id!r} has purpose {meta['purpose']!r}, not batch",
                param="input_file_id",
            )
        source = ray.get(self.files.path.remote(file_id))
        job_id = uuid.uuid4().hex[:24]
        output = str(Path(ray.get(self.files.folder.remote())) / f"batch_{job_id}.output.jsonl")
        batch = {
            "endpoint": endpoint,
            "input_file_id": file_id,
            "completion_window": window,
            "metadata": metadata,
            "created_at": int(time.time()),
            "output_file_id": f"file-{job_id}-output",
            "error_file_id": f"file-{job_id}-errors",
        }
        name = f"batch_{job_id}"
        ray.get(
            [
                self.files.view.remote(
                    batch["output_file_id"], f"{name}_output.jsonl", output, False
                ),
                self.files.view.remote(
                    batch["error_file_id"], f"{name}_errors.jsonl", output, True
                ),
            ]
        )
        job = Client(address=None, name=self.engines[0]).submit(
            source,
            output,
            job_id=job_id,
            engines=self.engines,
            node=ray.get(self.files.node.remote()),
            wait_for_engine_s=WAIT_FOR_ENGINE_S,
            batch=batch,
        )
        return batch_object(job.status())

    def _job(self, batch_id: str):
        from gptoss_ray.cluster.batch.client import Client

        job_id = batch_id.removeprefix("batch_")
        try:
            job = Client(address=None, name=self.engines[0]).job(job_id)
            info = job.status()
        except KeyError:
            info = None
        if not batch_id.startswith("batch_") or info is None or info.get("batch") is None:
            raise UnknownRequest(f"no batch {batch_id!r}")
        return job, info

    def get(self, batch_id: str) -> dict[str, Any]:
        return batch_object(self._job(batch_id)[1])

    def cancel(self, batch_id: str) -> dict[str, Any]:
        job, _ = self._job(batch_id)
        job.cancel()
        return batch_object(job.status())

    def list(self, after: str | None, limit: int) -> dict[str, Any]:
        from gptoss_ray.cluster.batch.client import Client

        infos = [job.status() for job in Client(address=None, name=self.engines[0]).jobs()]
        batches = sorted(
            (batch_object(i) for i in infos if i.get("batch")),
            key=lambda b: (b["created_at"], b["id"]),
            reverse=True,
        )
        if after is not None:
            ids = [b["id"] for b in batches]
            batches = batches[ids.index(after) + 1 :] if after in ids else []
        page = batches[:limit]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(batches) > limit,
        }


def batch_object(info: dict[str, Any]) -> dict[str, Any]:
    """A batch job's status as OpenAI's `batch` object."""
    meta, status = info["batch"], info["status"]
    state = {
        "running": "cancelling" if info.get("cancelling") else "in_progress",
        "completed": "completed",
        "failed": "failed",
        "cancelled": "cancelled",
    }[status]
    ended = None if info.get("finished_at") is None else int(info["finished_at"])
    created = meta["created_at"]
    errors = None
    if status == "failed":
        errors = {
            "object": "list",
            "data": [
                {"code": "engine_failed", "message": info["error"], "param": None, "line": None}
            ],
        }
    return {
        "id": f"batch_{info['job_id']}",
        "object": "batch",
        "endpoint": meta["endpoint"],
        "errors": errors,
        "input_file_id": meta["input_file_id"],
        "completion_window": meta["completion_window"],
        "status": state,
        # what finished so far, readable while the batch runs
        "output_file_id": meta["output_file_id"],
        "error_file_id": meta["error_file_id"],
        "created_at": created,
        "in_progress_at": int(info.get("started_at") or created),
        "expires_at": created + COMPLETION_WINDOW_S[meta["completion_window"]],
        "finalizing_at": ended if status == "completed" else None,
        "completed_at": ended if status == "completed" else None,
        "failed_at": ended if status == "failed" else None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": ended if status == "cancelled" else None,
        "request_counts": {
            "total": info["total"],
            "completed": info["done"] + info["skipped"],
            "failed": info["failed"],
        },
        "metadata": meta["metadata"],
    }

"""Stored responses (the Responses API's `store`, `previous_response_id`, GET, DELETE,
input items).

What holds them: the Ray cluster's key-value store (the GCS), as `jobs.JobRecords` holds
finished jobs. Every engine of the cluster, and a coordinator started again after a crash
or a `gptoss-ray stop`, reads the same store; nothing is process memory. It lasts as long
as the Ray cluster (a GCS with Redis fault tolerance keeps it across head restarts).
Bounds: `MAX_RESPONSES` (the oldest go first, checked every `PRUNE_EVERY` stores) and
`TTL_S` (30 days, as OpenAI keeps responses; an expired entry is never returned); an entry holds the response and the conversation's items, so a conversation
costs the store about twice its text. Without Ray (an engine loop in one process, as tests
run it) a dict stands in for the GCS.

A stored entry is the response object and the items of the whole conversation that led to
it, its own output included: continuing with `previous_response_id` sends those items and
the new input through the one mapping (`responses_to_chat`), so the model sees the same
tokens as when the client sends the whole conversation itself."""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Protocol

MAX_RESPONSES = 10_000
TTL_S = 30 * 24 * 3600
PREFIX = b"gptoss-ray-response/"
ORDER = b"gptoss-ray-response-order/"  # + zero-padded creation ns + id: oldest first
PRUNE_EVERY = 32  # stores between two prunings (listing the order keys costs O(entries))


class KeyValue(Protocol):
    def put(self, key: bytes, value: bytes) -> None: ...
    def get(self, key: bytes) -> bytes | None: ...
    def delete(self, key: bytes) -> None: ...
    def keys(self, prefix: bytes) -> list[bytes]: ...


class RayKeyValue:
    """The Ray cluster's key-value store, in this project's namespace."""

    def __init__(self) -> None:
        from ray.experimental import internal_kv

        from gptoss_ray.cluster.runtime.ray_instance import NAMESPACE

        self.kv, self.ns = internal_kv, NAMESPACE

    def put(self, key: bytes, value: bytes) -> None:
        self.kv._internal_kv_put(key, value, namespace=self.ns)

    def get(self, key: bytes) -> bytes | None:
        return self.kv._internal_kv_get(key, namespace=self.ns)

    def delete(self, key: bytes) -> None:
        self.kv._internal_kv_del(key, namespace=self.ns)

    def keys(self, prefix: bytes) -> list[bytes]:
        return list(self.kv._internal_kv_list(prefix, namespace=self.ns))


class ResponseStore:
    def __init__(
        self,
        kv: KeyValue | None = None,
        *,
        max_responses: int = MAX_RESPONSES,
        ttl_s: float = TTL_S,
    ) -> None:
        if kv is None:
            kv = RayKeyValue()
        self.kv, self.max_responses, self.ttl_s = kv, max_responses, ttl_s
        self._lock = threading.Lock()
        self._puts = 0

    def put(self, response: dict[str, Any], items: list[dict[str, Any]], inputs: int) -> None:
        """Stores a finished response with the conversation's items (`inputs` of them
        were its input, the rest its output)."""
        now = time.time_ns()
        rid = response["id"]
        entry = {"response": response, "items": items, "inputs": inputs, "stored_ns": now}
        with self._lock:
            self.kv.put(PREFIX + rid.encode(), json.dumps(entry).encode())
            self.kv.put(ORDER + f"{now:020d}/{rid}".encode(), rid.encode())
            self._puts += 1
            if self._puts % PRUNE_EVERY == 0:
                self._prune()

    def get(self, rid: str) -> dict[str, Any] | None:
        """The entry (response, items, inputs), or None if unknown, deleted or expired."""
        raw = self.kv.get(PREFIX + rid.encode())
        if raw is None:
            return None
        entry = json.loads(raw)
        if time.time_ns() - entry["stored_ns"] > self.ttl_s * 1e9:
            self.delete(rid)
            return None
        return entry

    def delete(self, rid: str) -> bool:
        raw = self.kv.get(PREFIX + rid.encode())
        if raw is None:
            return False
        stored = json.loads(raw)["stored_ns"]
        self.kv.delete(PREFIX + rid.encode())
        self.kv.delete(ORDER + f"{stored:020d}/{rid}".encode())
        return True

    def _prune(self) -> None:
        """Drops the expired entries and the oldest beyond the bound."""
        order = sorted(self.kv.keys(ORDER))
        cutoff = time.time_ns() - int(self.ttl_s * 1e9)
        excess = len(order) - self.max_responses
        for i, key in enumerate(order):
            stored = int(key[len(ORDER) :].split(b"/", 1)[0])
            if i >= excess and stored >= cutoff:
                break
            self.kv.delete(PREFIX + key.rsplit(b"/", 1)[1])
            self.kv.delete(key)

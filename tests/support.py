"""Fixtures shared by the test files: the production HTTP app (`http_api.api_app`, what
the Serve replicas run) served by uvicorn in this process over an engine loop of this
process, through the same engine client as the Serve front (`LocalEngineClient`)."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Iterator
from typing import Any

import openai_harmony as oh

from gptoss_ray.cluster.client.engine_client import EnginePool, LocalEngineClient
from gptoss_ray.cluster.front.app import FrontSettings, api_app
from gptoss_ray.cluster.front.response_store import ResponseStore


@contextlib.contextmanager
def served(
    engine: Any, api_key: str | None = None, *, idle_timeout_s: float = 5.0, **limits: Any
) -> Iterator[str]:
    """The API over `engine` (an `EngineLoop`) on a free local port -> its base URL
    (`http://127.0.0.1:PORT/v1`); `limits`: FrontSettings' fields."""
    import uvicorn

    pool, settings = (
        EnginePool([LocalEngineClient(engine)]),
        FrontSettings(api_key=api_key, **limits),
    )
    app = api_app(pool, settings, ResponseStore(MemoryKeyValue()))
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_level="warning",
        access_log=False,
        timeout_keep_alive=idle_timeout_s,
        timeout_graceful_shutdown=10,
        lifespan="off",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="http-api", daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the HTTP app could not start"
        time.sleep(0.01)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    try:
        yield f"http://{host}:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


class MemoryKeyValue:
    """A dict for the Ray cluster's key-value store (`response_store.KeyValue`)."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}

    def put(self, key: bytes, value: bytes) -> None:
        self.data[key] = value

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def delete(self, key: bytes) -> None:
        self.data.pop(key, None)

    def keys(self, prefix: bytes) -> list[bytes]:
        return [k for k in self.data if k.startswith(prefix)]


@functools.cache
def harmony_oracle() -> oh.HarmonyEncoding:
    """openai-harmony's encoding of gpt-oss (the chat format's oracle), offline: its
    vocabulary comes from the copy conftest points it at."""
    return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)

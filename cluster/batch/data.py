"""Batch inference the Ray Data way: `build_processor(config, preprocess, postprocess)` is
a `Dataset -> Dataset` stage over our engines, in the shape of `ray.data.llm`'s processors
(vLLM's, SGLang's), so a Parquet dataset of prompts chains into a Ray Data pipeline.

    config = GptOssProcessorConfig(model="gpt-oss-tiny", shards=2, concurrency=2)
    processor = build_processor(
        config,
        preprocess=lambda row: {"messages": [{"role": "user", "content": row["q"]}],
                                "sampling_params": {"max_tokens": 64, "temperature": 0}},
        postprocess=lambda row: {"q": row["q"], "answer": row["generated_text"]},
    )
    processor(ray.data.read_parquet("questions/")).write_parquet("answers/")

A row asks with `messages` (an OpenAI chat: `tools`, `response_format`,
`reasoning_effort` and `model` (a LoRA adapter) beside it) or `prompt` (text or token
ids), and `sampling_params` (OpenAI's and vLLM's names). Its reply is parsed as the HTTP
API parses it (`cluster.client.chat`): `generated_text` is the final channel's text,
`reasoning` the analysis channel's, `tool_calls` OpenAI's calls; with the token counts,
`generated_tokens` and `finish_reason`. A `prompt` that ends where an assistant turn
starts (`<|start|>assistant`, as harmony renders one) is parsed the same way; any other
prompt is a raw completion (its text, as /v1/completions).

Engines: `concurrency` of them, each `shards` shards, one per actor of the stage's pool,
started when the pool starts and shut down when Ray Data releases it; or the running
engines named in `engine_names` (`gptoss-ray serve`, `Engine.start(name=...)`), shared by
the stage's actors, which start and stop nothing. Each actor keeps `batch_size` x
`max_concurrent_batches` requests in its engine, so that continuous batching stays full
while Ray Data's blocks come and go.

A row that cannot run (a bad field, a prompt over the context) raises, naming the row
and the field, unless `should_continue_on_error`: then it is kept with the reason in
`__inference_error__` (empty for the rows that ran), as Ray's processors do, and skips
`postprocess`. Arrow fills a struct's missing keys with nulls, so a null in
`sampling_params`, a message or a tool means the key is absent; a JSON schema that needs
a literal null passes as a JSON string (`tools`, `response_format`)."""

from __future__ import annotations

import asyncio
import functools
import json
import uuid
import warnings
from collections.abc import AsyncIterator, Callable
from typing import Any

from pydantic import Field

from gptoss_ray.cluster.client.chat import ReplyBuilder, chat_request
from gptoss_ray.cluster.client.completions import completion_requests
from gptoss_ray.cluster.client.engine_client import EnginePool, RayEngineClient, RequestStream
from gptoss_ray.cluster.engine.config import EngineConfig
from gptoss_ray.cluster.engine.messages import EngineRequest
from gptoss_ray.model import tokenizer as tok
from gptoss_ray.model.harmony.openai_chat import SamplingFields
from gptoss_ray.model.types import RequestError

ERROR_COLUMN = "__inference_error__"  # the name Ray's own processors give it
ENGINE_PREFIX = "gptoss-ray-data-"  # the engines a processor starts are named so
# sampling_params keys a row may set: a row's reply is whole (no `stream`), its output
# columns hold no logprobs, and `model` is a column of its own
SAMPLING_KEYS = frozenset(SamplingFields.model_fields) - {
    "model",
    "stream",
    "stream_options",
    "logprobs",
    "top_logprobs",
}
CHAT_ONLY = frozenset({"max_reasoning_tokens"})  # a chat's reasoning budget (ours)
CHAT_COLUMNS = ("tools", "tool_choice", "response_format", "reasoning_effort", "model")
REQUEST_COLUMNS = ("messages", "prompt", "sampling_params", *CHAT_COLUMNS)  # what a row asks


class GptOssProcessorConfig(EngineConfig):
    """An engine's settings (`EngineConfig`: model, shards, device, dtype, KV budget, ...)
    and how Ray Data drives the engines."""

    concurrency: int = Field(
        1, ge=1, description="engines, one per actor of the stage (with engine_names: actors)"
    )
    batch_size: int = Field(32, ge=1, description="rows per Ray Data batch")
    max_concurrent_batches: int = Field(
        4, ge=1, description="batches in flight per actor: its engine's queue is their rows"
    )
    should_continue_on_error: bool = Field(
        False, description="a row that fails is kept with its error in __inference_error__"
    )
    engine_names: list[str] | None = Field(
        None,
        min_length=1,
        description="running engines (named coordinators) to use instead of starting any",
    )

    def engine_config(self) -> EngineConfig:
        return EngineConfig(**self.model_dump(include=set(EngineConfig.model_fields)))


class Processor:
    """`Dataset -> Dataset`: preprocess (a row map), generation, postprocess (a row map,
    failed rows skip it). Nothing runs until the dataset is consumed (Ray Data is lazy)."""

    def __init__(
        self,
        config: GptOssProcessorConfig,
        preprocess: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        postprocess: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.config = config
        self.preprocess = preprocess
        self.postprocess = postprocess

    def __call__(self, dataset: Any) -> Any:
        import ray.data

        config = self.config
        if config.engine_names is None:
            _check_room(config)
        if self.preprocess is not None:
            dataset = dataset.map(self.preprocess)
        dataset = dataset.map_batches(
            EngineStage,
            batch_size=config.batch_size,
            batch_format="pyarrow",
            fn_constructor_kwargs={"config": config.model_dump(mode="json")},
            compute=ray.data.ActorPoolStrategy(
                size=config.concurrency,
                max_concurrent_calls_per_actor=config.max_concurrent_batches,
                max_tasks_in_flight_per_actor=2 * config.max_concurrent_batches,
            ),
            num_cpus=0,  # it waits on its engine, whose shards hold the resources
        )
        if self.postprocess is not None:
            dataset = dataset.map(_skipping_errors(self.postprocess))
        return dataset


def build_processor(
    config: GptOssProcessorConfig,
    preprocess: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    postprocess: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> Processor:
    """A Ray Data stage that generates with gpt-oss on our engines (module docstring)."""
    if not isinstance(config, GptOssProcessorConfig):
        raise TypeError(f"config is a GptOssProcessorConfig, not {type(config).__name__}")
    if config.engine_names is None:  # a bad path fails here, not in every actor
        from gptoss_ray.cluster.runtime.coordinator import check_engine

        check_engine(config.engine_config())
    return Processor(config, preprocess, postprocess)


def _check_room(config: GptOssProcessorConfig) -> None:
    """Warns where the cluster, as it is now, cannot hold the engines and still run Ray
    Data's own tasks (a CPU each): the stage would wait for placement and retry. A
    warning, not an error: an autoscaling cluster may grow."""
    import ray

    engines = config.concurrency * config.shards
    need = {k: v * engines for k, v in config.engine_config().shard_bundle().items()}
    have = ray.cluster_resources()
    short = {k: n for k, n in need.items() if n > have.get(k, 0) - (k == "CPU")}
    if short:
        warnings.warn(
            f"{config.concurrency} engine(s) of {config.shards} shard(s) hold "
            f"{', '.join(f'{n:g} {k}' for k, n in need.items())}; this Ray cluster has "
            f"{', '.join(f'{have.get(k, 0):g} {k}' for k in need)}, and Ray Data's own tasks "
            "need a CPU: lower concurrency, shards or cpus_per_shard (a logical CPU on CPU "
            "shards), or add nodes",
            stacklevel=3,
        )


def _skipping_errors(postprocess: Callable[[dict[str, Any]], dict[str, Any]]):
    def apply(row: dict[str, Any]) -> dict[str, Any]:
        if row.get(ERROR_COLUMN):
            return row
        return postprocess(row)

    return apply


# -- the stage: one actor of Ray Data's pool -----------------------------------------------
class EngineStage:
    def __init__(self, config: dict[str, Any]) -> None:
        import ray

        self.config = GptOssProcessorConfig(**config)
        self.engine = None  # the engine this actor started, if it started one
        names = self.config.engine_names
        if names is None:
            from gptoss_ray.cluster.client.engine import Engine

            name = f"{ENGINE_PREFIX}{uuid.uuid4().hex[:12]}"
            self.engine = Engine.start(
                config=self.config.engine_config(),
                name=name,
                owner=ray.get_runtime_context().current_actor,
            )
            handles = [(self.engine.coordinator, name)]
        else:
            from gptoss_ray.cluster.runtime.ray_instance import NAMESPACE

            handles = [(ray.get_actor(n, namespace=NAMESPACE), n) for n in names]
        # the clients live on Ray Data's event loop for this actor: made at the first call
        self._handles = handles
        self._connecting = asyncio.Lock()
        self.engines: EnginePool | None = None
        self.info: dict[str, Any] = {}

    async def __call__(self, batch: Any) -> AsyncIterator[Any]:
        async with self._connecting:  # the first batch connects; the others wait for it
            if self.engines is None:
                self.engines = EnginePool([RayEngineClient(h, n) for h, n in self._handles])
                self.info = await self.engines.links[0].call("info")
        yield await generate_batch(
            batch, self.engines, self.info, self.config.should_continue_on_error
        )


async def generate_batch(batch: Any, engines: EnginePool, info: dict[str, Any], keep_errors: bool):
    """A pyarrow batch of rows -> the same with the output columns (`output_schema`), every
    row's request in the engines at once; keep_errors: should_continue_on_error."""
    import pyarrow as pa

    async def generate(row: dict[str, Any]) -> tuple:
        try:
            body = row_body(row)
            request, replies = row_request(body, info)
            (stream,) = await engines.pick(body).submit([request], [replies])
            return row_output(await _result(stream), len(request.prompt))
        except Exception as exc:
            if not keep_errors:
                raise RowError(f"the row {_describe(row)} failed: {exc}") from exc
            return (*([None] * (len(output_schema()) - 1)), f"{type(exc).__name__}: {exc}")

    asks = batch.select([c for c in REQUEST_COLUMNS if c in batch.column_names])
    outputs = await asyncio.gather(*(generate(row) for row in asks.to_pylist()))
    schema = output_schema()
    for k, name in enumerate(schema.names):
        if name == ERROR_COLUMN and not keep_errors:
            continue
        column = pa.array([out[k] for out in outputs], type=schema.field(name).type)
        if name in batch.column_names:
            batch = batch.set_column(batch.column_names.index(name), name, column)
        else:
            batch = batch.append_column(name, column)
    return batch


async def _result(stream: RequestStream) -> dict[str, Any]:
    try:
        return await stream.result()
    finally:
        stream.close()


# -- rows ------------------------------------------------------------------------------------
class RowError(ValueError):
    """A row that could not run, named (without should_continue_on_error)."""


def _describe(row: dict[str, Any], width: int = 80) -> str:
    text = json.dumps(row.get("messages") or row.get("prompt"), default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


@functools.cache
def output_schema():
    """The columns the stage adds, typed: a batch whose rows all failed, or called no
    tool, still has the columns of every other batch (Parquet wants one schema)."""
    import pyarrow as pa

    text = pa.string()
    call = pa.struct(
        [
            ("id", text),
            ("type", text),
            ("function", pa.struct([("name", text), ("arguments", text)])),
        ]
    )
    return pa.schema(
        [
            ("generated_text", text),
            ("reasoning", text),
            ("tool_calls", pa.list_(call)),
            ("finish_reason", text),
            ("num_input_tokens", pa.int64()),
            ("num_generated_tokens", pa.int64()),
            ("generated_tokens", pa.list_(pa.int64())),
            (ERROR_COLUMN, text),
        ]
    )


def _drop_nulls(value: Any) -> Any:
    """Arrow's struct columns give every row every key, null where it had none."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _json_or(value: Any, column: str) -> Any:
    """A column's value, or the JSON a string holds where it holds an object or a list
    (`tool_choice` may be the string "required")."""
    if not isinstance(value, str):
        return _drop_nulls(value)
    if not value.lstrip().startswith(("{", "[")):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise RequestError(f"{column}: not JSON ({exc})", param=column) from None


def row_body(row: dict[str, Any]) -> dict[str, Any]:
    """A row's request as an OpenAI body: a chat (`messages`) or a completion (`prompt`)."""
    messages, prompt = row.get("messages"), row.get("prompt")
    if (messages is None) == (prompt is None):
        raise RequestError(
            "a row has `messages` (a chat) or `prompt` (text or token ids), one of them; "
            f"this one has {'both' if messages is not None else 'neither'}",
            param="messages",
        )
    params = _drop_nulls(row.get("sampling_params") or {})
    if not isinstance(params, dict):
        raise RequestError("sampling_params is a mapping", param="sampling_params")
    unknown = sorted(set(params) - SAMPLING_KEYS - CHAT_ONLY)
    if unknown:
        raise RequestError(
            f"sampling_params: {', '.join(unknown)} not supported; known: "
            f"{', '.join(sorted(SAMPLING_KEYS | CHAT_ONLY))}",
            param="sampling_params",
        )
    if params.get("n", 1) != 1:
        raise RequestError("sampling_params.n: a row has one reply (repeat the row for more)")
    if prompt is not None:
        chat_only = [c for c in CHAT_COLUMNS if row.get(c) is not None and c != "model"]
        chat_only += sorted(CHAT_ONLY & set(params))
        if chat_only:
            raise RequestError(
                f"{', '.join(chat_only)}: for a chat (`messages`), not a `prompt`",
                param=chat_only[0],
            )
        return {**params, "prompt": prompt, "model": row.get("model")}
    body = {**params, "messages": _drop_nulls(messages)}
    for column in CHAT_COLUMNS:
        if row.get(column) is not None:
            body[column] = _json_or(row[column], column)
    return body


ASSISTANT_TURN = [tok.START, *tok.encode("assistant")]  # where a harmony prompt hands over


def row_request(body: dict[str, Any], info: dict[str, Any]) -> tuple[EngineRequest, list]:
    """The engine's request and the reply builder for a row's body."""
    if "messages" in body:
        return chat_request(body, info)
    parsed, (request,), (replies,) = completion_requests(body, info)
    if request.prompt[-len(ASSISTANT_TURN) :] == ASSISTANT_TURN:
        replies = [ReplyBuilder(parsed.stops())]
    return request, replies


def row_output(reply: dict[str, Any], prompt_tokens: int) -> tuple:
    """A finished reply as the output columns (`output_schema`'s order)."""
    message = reply.get("message")
    if message is None:  # a raw completion
        text, reasoning, calls = reply["text"], None, []
    else:
        text, reasoning, calls = (
            message["content"],
            message["reasoning_content"],
            message["tool_calls"],
        )
    return (
        text,
        reasoning,
        calls,
        reply["finish_reason"],
        prompt_tokens,
        reply["usage"]["completion_tokens"],
        list(reply["token_ids"]),
        "",
    )

"""The types that cross the layers, importable without torch: a request's sampling
parameters and its errors (each error type carries its OpenAI `code` and HTTP status),
the shards' KV layout and block arithmetic, and one engine step as data: what the
scheduler tells a shard to do, and what the shard answers.

The scheduler, the coordinator, the command line and the HTTP front read these without
loading the model's math."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from gptoss_ray.model.config import ModelConfig


# -- errors ------------------------------------------------------------------------------
class RequestError(ValueError):
    """A request that cannot be served as asked; the message names what and why. The
    class says how an API answers it: OpenAI's error `code` and the HTTP status."""

    code = "invalid_request"
    status = 400

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param  # the field at fault (`messages[2].role`), for OpenAI's `param`

    def __reduce__(self):  # keeps `param` when Ray sends the error to another process
        return (self.__class__, (str(self),), {"param": self.param})


class ContextLengthExceeded(RequestError):
    code = "context_length_exceeded"


class UnknownRequest(RequestError):
    code = "not_found"
    status = 404


class ModelNotFound(RequestError):
    code = "model_not_found"
    status = 404


class LoraInUse(RequestError):
    """An adapter unloaded while requests use it."""

    code = "lora_in_use"
    status = 409


class EngineUnavailable(RuntimeError):
    """The engine cannot serve now (a lost shard was not replaced, or its loop stopped):
    not the request's fault."""

    code = "engine_down"
    status = 503


class DeviceUnavailable(RuntimeError):
    """The device asked for is not there (no CUDA on this machine, fewer GPUs in the
    cluster than shards): the user's to fix, named with what there is."""


# -- sampling ----------------------------------------------------------------------------
class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(default=16, ge=1, description="new tokens at most")
    temperature: float = Field(default=1.0, ge=0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0, description="0 = no top-k cut")
    seed: int | None = Field(default=None, ge=0)
    stop_token_ids: list[int] | None = Field(
        default=None, description="None = the model's stop ids (<|return|>, <|call|>)"
    )
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0, description="stop ids are masked until this many")
    min_p: float = Field(
        default=0.0, ge=0, le=1, description="drop tokens under min_p x the top one"
    )
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    repetition_penalty: float = Field(default=1.0, gt=0, le=10, description="vLLM's; 1 = none")
    logit_bias: dict[int, float] | None = Field(default=None, description="token id -> -100..100")
    logprobs: int | None = Field(
        default=None, ge=0, le=20, description="with each token: its logprob and the top n"
    )
    n: int = Field(default=1, ge=1, le=16, description="choices of one prompt, prefilled once")
    prompt_logprobs: int | None = Field(
        default=None, ge=0, le=20, description="each prompt token's logprob and the top n"
    )
    grammar: str | None = Field(
        default=None, description="what the reply may be: a Lark grammar (model.grammar)"
    )
    speculative: bool = Field(
        default=True, description="False: no draft tokens for this request (the engine's on)"
    )
    lora: str | None = Field(
        default=None,
        min_length=1,
        description="the LoRA adapter to run with, by the name it is served under; None: "
        "the base model",
    )

    @model_validator(mode="after")
    def _consistent(self) -> SamplingParams:
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens {self.min_tokens} exceeds max_tokens {self.max_tokens}")
        for token, bias in (self.logit_bias or {}).items():
            if token < 0:
                raise ValueError(f"logit_bias: token id {token} is negative")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias[{token}]: {bias} is outside -100..100")
        return self

    @property
    def penalized(self) -> bool:
        """The draw depends on the sequence's earlier tokens (penalties)."""
        return bool(self.presence_penalty or self.frequency_penalty) or (
            self.repetition_penalty != 1.0
        )

    @property
    def needs_history(self) -> bool:
        """The shard must know the sequence's earlier tokens (penalties, a grammar)."""
        return self.penalized or self.grammar is not None

    def stop_ids(self, model_stop_ids: list[int]) -> frozenset[int]:
        if self.ignore_eos:
            return frozenset(self.stop_token_ids or ())
        return frozenset(self.stop_token_ids if self.stop_token_ids is not None else model_stop_ids)


def check_prompt(prompt: Sequence[int], max_tokens: int, config: ModelConfig, where: str) -> None:
    """Rejects an empty prompt, an id outside the vocabulary, or a prompt plus max_tokens
    beyond the context; the message starts with `where` ("prompt 3", "request X: the
    prompt")."""
    if len(prompt) == 0:
        raise RequestError(f"{where} is empty")
    for pos, token in enumerate(prompt):
        if not isinstance(token, int) or not 0 <= token < config.vocab_size:
            raise RequestError(
                f"{where}: token id {token!r} at position {pos} is outside "
                f"0..{config.vocab_size - 1}"
            )
    if len(prompt) + max_tokens > config.max_context_length:
        raise ContextLengthExceeded(
            f"{where}: {len(prompt)} prompt tokens + max_tokens {max_tokens} "
            f"exceed the context length {config.max_context_length}"
        )


# What a shard's collectives read from its environment (NCCL, gloo, libfabric/EFA, UCX):
# forwarded to the shards from the process that starts an engine, and shown by `status`.
COLLECTIVE_ENV = ("NCCL_", "GLOO_", "TP_SOCKET_IFNAME", "FI_", "UCX_")


# -- the KV cache's blocks -----------------------------------------------------------------
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class BlockTable:
    """A sequence's blocks on its shard: what the scheduler grants and a shard's cache
    reads (`shards.kv_cache.PlacedTable`)."""

    full: list[int] = field(default_factory=list)  # physical block of logical block i
    sliding_first: int = 0  # the logical block of sliding[0]
    sliding: list[int] = field(default_factory=list)  # the sliding blocks still visible
    committed: int = 0  # leading blocks registered in the prefix cache


def first_visible_block(length: int, window: int, block_size: int) -> int:
    """The first block a sliding layer still needs when the next query is at `length`:
    that query sees keys length-window+1 .. length."""
    return max(0, length - window + 1) // block_size


def blocks_held(length: int, new: int, block_size: int, window: int | None) -> tuple[int, int]:
    """(full blocks, sliding blocks) a sequence holds while its chunk of `new` tokens
    at positions length.. runs (and after it)."""
    end = length + new
    full = cdiv(end, block_size)
    if window is None or end == 0:
        return full, 0
    return full, (end - 1) // block_size - first_visible_block(length, window, block_size) + 1


def _kv_geometry(config: ModelConfig, bytes_per_value: int) -> tuple[int, int, int]:
    """(bytes of one token's keys and values in one layer, full-attention layers,
    sliding-window layers)."""
    per_token = 2 * config.num_key_value_heads * config.head_dim * bytes_per_value
    n_sliding = sum(config.is_sliding(i) for i in range(config.num_hidden_layers))
    return per_token, config.num_hidden_layers - n_sliding, n_sliding


@dataclass
class KVLayout:
    block_size: int
    full_blocks: int  # pool size of the full-attention layers
    sliding_blocks: int  # pool size of the sliding-window layers

    @classmethod
    def from_budget(
        cls,
        config: ModelConfig,
        budget_bytes: int,
        *,
        bytes_per_value: int,
        block_size: int = 16,
        max_seqs: int = 64,
        max_chunk: int = 256,
        draft_bytes_per_token: int = 0,
    ) -> KVLayout:
        """Split a memory budget (keys and values of `bytes_per_value` each: 2 for
        bfloat16): the sliding pool gets what max_seqs sequences can use at most (the
        window plus a chunk), the full pool the rest. An EAGLE-3 draft's keys
        (`draft_bytes_per_token`) take a block beside each full-attention block."""
        per_token, n_full, n_sliding = _kv_geometry(config, bytes_per_value)
        sliding_per_seq = cdiv(config.sliding_window + max_chunk, block_size) + 1
        sliding = max_seqs * sliding_per_seq if n_sliding else 0
        sliding_bytes = sliding * block_size * per_token * n_sliding
        sliding_bytes = min(sliding_bytes, budget_bytes // 2)
        sliding = sliding_bytes // (block_size * per_token * max(n_sliding, 1)) if n_sliding else 0
        full_block = block_size * (per_token * max(n_full, 1) + draft_bytes_per_token)
        full = (budget_bytes - sliding_bytes) // full_block
        if full < 1 or (n_sliding and sliding < sliding_per_seq):
            raise ValueError(
                f"a KV budget of {budget_bytes} bytes cannot hold even one sequence "
                f"({block_size}-token blocks, {per_token} bytes per token per layer)"
            )
        return cls(block_size, int(full), int(sliding))

    def capacity(self) -> dict[str, int]:
        """Tokens of keys the pools hold: full attention, and the sliding window's."""
        return {
            "full_tokens": self.full_blocks * self.block_size,
            "sliding_tokens": self.sliding_blocks * self.block_size,
        }

    def nbytes(
        self, config: ModelConfig, bytes_per_value: int, draft_bytes_per_token: int = 0
    ) -> int:
        """The bytes of keys and values the pools take on a shard (an EAGLE-3 draft's
        too, `from_budget`)."""
        per_token, n_full, n_sliding = _kv_geometry(config, bytes_per_value)
        blocks = self.full_blocks * n_full + self.sliding_blocks * n_sliding
        draft = self.full_blocks * self.block_size * draft_bytes_per_token
        return blocks * self.block_size * per_token + draft


DEFAULT_KV_BUDGET_MB = 256  # per shard, where free memory is not read (CPU shards)
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's


@dataclass(frozen=True)
class DeviceMemory:
    """A shard's device memory once its weights are loaded and its largest step has run
    (its activations kept by the allocator): bytes free and in all."""

    free: int
    total: int


def size_kv(
    config: ModelConfig,
    readings: Sequence[DeviceMemory],
    *,
    utilization: float,
    budget_bytes: int | None,
    bytes_per_value: int,
    block_size: int = 16,
    max_seqs: int = 64,
    max_chunk: int = 256,
    draft_bytes_per_token: int = 0,
) -> KVLayout:
    """The KV layout of every shard from each one's memory reading: an explicit budget
    (`--kv-budget-mb`) must fit in the least free memory; without one, each shard may use
    `utilization` of its memory in all (vLLM's --gpu-memory-utilization), the KV what is
    left of it after what is in use, the smallest across shards, and it must hold one
    sequence of the model's whole context. Errors name the numbers (ConfigError)."""
    from gptoss_ray.model.config import ConfigError

    def gib(n: float) -> str:
        return f"{n / 2**30:.2f} GiB"

    def layout(budget: int) -> KVLayout:
        return KVLayout.from_budget(
            config,
            budget,
            bytes_per_value=bytes_per_value,
            block_size=block_size,
            max_seqs=max_seqs,
            max_chunk=max_chunk,
            draft_bytes_per_token=draft_bytes_per_token,
        )

    if not 0 < utilization <= 1:
        raise ConfigError(f"gpu_memory_utilization {utilization}: expected a fraction in (0, 1]")
    if budget_bytes is not None:
        rank, least = min(enumerate(readings), key=lambda r: r[1].free)
        if budget_bytes > least.free:
            raise ConfigError(
                f"a KV budget of {gib(budget_bytes)} per shard exceeds the {gib(least.free)} "
                f"free on shard {rank} (of {gib(least.total)}) after its weights and warm-up: "
                "lower --kv-budget-mb, or leave it out to size the cache from free memory"
            )
        return layout(budget_bytes)
    left = [int(utilization * r.total) - (r.total - r.free) for r in readings]
    rank = min(range(len(readings)), key=lambda i: left[i])
    reading = readings[rank]
    whole = KVLayout(block_size, cdiv(config.max_context_length, block_size), 0)
    needs = whole.nbytes(
        config, bytes_per_value, draft_bytes_per_token
    )  # its full-attention layers' keys
    where = (
        f"gpu_memory_utilization {utilization:g} of shard {rank}'s {gib(reading.total)} "
        f"leaves {gib(max(left[rank], 0))} for the KV cache with "
        f"{gib(reading.total - reading.free)} in use after its weights and warm-up"
    )
    if left[rank] <= 0:
        raise ConfigError(f"{where}: raise --gpu-memory-utilization, or use more shards")
    try:
        sized = layout(left[rank])
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if sized.capacity()["full_tokens"] < config.max_context_length:
        raise ConfigError(
            f"{where}: under one {config.max_context_length}-token sequence (its "
            f"full-attention keys alone take {gib(needs)}): raise --gpu-memory-utilization, "
            "or use more shards"
        )
    return sized


@dataclass
class BlockGrant:
    """A sequence's KV blocks for one step, as the scheduler grants them: the full-attention
    blocks added at its table's end, and the whole run of sliding-window blocks that the
    step's queries can see (a few: the window and the chunk), from logical block
    `sliding_first`. A new sequence that reuses cached blocks gets its whole table, and
    `cached` says how many tokens' keys those blocks already hold."""

    full: list[int] = field(default_factory=list)
    sliding_first: int = 0
    sliding: list[int] = field(default_factory=list)
    cached: int = 0


# -- one engine step ---------------------------------------------------------------------
@dataclass
class SeqWork:
    """One sequence's part of a step on its home shard."""

    seq_id: str
    tokens: list[int]  # the next chunk, at positions start..
    start: int  # tokens already in this shard's cache for the sequence
    sample: bool  # the chunk ends at the sequence's last token: draw the next one
    draw_index: int = 0  # which token of the completion the draw is (seeds the sampler)
    # with the sequence's first work on its shard, which keeps them until it is released
    params: SamplingParams | None = None
    seed: int = 0
    blocks: BlockGrant = field(default_factory=BlockGrant)  # where its keys go
    # a decode of the token this shard drew for the sequence in the step before, which
    # the scheduler does not know yet (overlapped steps); `tokens` is empty then
    last_drawn: bool = False
    # the sequence's tokens before `start`, sent with its first chunk on a shard when its
    # draws depend on its history (`SamplingParams.needs_history`); the shard keeps the
    # history from there
    context: list[int] | None = None
    # other choices of the same prompt (n > 1), each drawing its first token from this
    # chunk's logits: (sequence id, seed); they decode from there on their own
    forks: list[tuple[str, int]] = field(default_factory=list)
    # the prompt's logprobs (top `score` alternatives) at every position of the chunk;
    # a chunk that does not draw says the token after it, which its last row scores
    score: int | None = None
    next_token: int | None = None
    # speculative decoding: the last `drafts` of `tokens` are proposed tokens after the
    # sequence's last known one; the shard draws at each of their positions and keeps the
    # longest prefix its draws agree with (`StepResult.accepted`)
    drafts: int = 0

    @property
    def size(self) -> int:
        """Tokens of the chunk."""
        return len(self.tokens) + self.last_drawn

    @property
    def proposed(self) -> list[int]:
        """The draft tokens to verify (the last `drafts` of `tokens`)."""
        return self.tokens[len(self.tokens) - self.drafts :]


@dataclass
class StepPlan:
    work: list[SeqWork] = field(default_factory=list)
    release: list[str] = field(default_factory=list)  # finished or preempted sequences
    # KV blocks to copy before the step, (sliding, source, destination): a forked
    # choice's own copy of the block its prompt ends in
    copies: list[tuple[bool, int, int]] = field(default_factory=list)
    # the rows every shard's expert exchange pads its tokens to in this step, the same in
    # every shard's plan (`step_bucket` of the most tokens any shard runs); None: this
    # shard's own tokens (one shard only)
    bucket: int | None = None
    # the LoRA slots' adapters (slot -> (name, PEFT folder, load count)), the same on every shard:
    # their experts run each other's rows, which name their adapter by slot; empty where
    # LoRA is off
    loras: list[tuple[str, str, int] | None] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        """Tokens this shard runs in the step."""
        return sum(w.size for w in self.work)


# The row counts a step's exchange buffers (and a decode step's CUDA graph) come in: a
# decode step's shapes depend on its bucket only, so that one graph per bucket holds it.
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


def step_bucket(tokens: int) -> int:
    """The smallest bucket that holds `tokens` rows (0 for none); past the largest, the
    next multiple of 64."""
    if tokens <= 0:
        return 0
    bucket = next((b for b in BUCKETS if b >= tokens), None)
    return bucket if bucket is not None else cdiv(tokens, 64) * 64


def with_buckets(plans: list[StepPlan]) -> list[StepPlan]:
    """Gives every shard's plan the step's one bucket: all shards exchange buffers of the
    same shape in every layer, a shard with nothing of its own too."""
    bucket = step_bucket(max((p.tokens for p in plans), default=0))
    for plan in plans:
        plan.bucket = bucket
    return plans


@dataclass
class TokenLogprob:
    """A drawn token's log probability and the most likely alternatives (best first), from
    the logits the draw used after penalties and bias, before temperature."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class StepResult:
    tokens: dict[str, int]  # seq_id -> sampled token
    seconds: dict[str, float]
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)  # of those asking
    # the logprobs of the tokens at positions start+1.. of a scored chunk (`SeqWork.score`)
    prompt_logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)
    # a drafted sequence's accepted draft tokens, which come before its `tokens` entry,
    # and their logprobs where asked
    accepted: dict[str, list[int]] = field(default_factory=dict)
    accepted_logprobs: dict[str, list[TokenLogprob | None]] = field(default_factory=dict)
    # the shard's own drafts (EAGLE-3) for a drawing sequence's next decode: the tokens
    # proposed to follow its tokens as this step leaves them
    drafts: dict[str, list[int]] = field(default_factory=dict)

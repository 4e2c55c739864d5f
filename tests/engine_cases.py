"""Shared inputs for the engine tests: prompts of different lengths (several longer than
the tiny model's 32-token sliding window) and the single-process baseline."""

from __future__ import annotations

import contextlib
import functools

import torch

from gptoss_ray.model.checkpoint import load_model
from gptoss_ray.model.generate import generate
from gptoss_ray.model.types import KVLayout, SamplingParams

LENGTHS = (5, 40, 70, 3, 100, 17, 33, 64, 1, 50)
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 201088, (n,), generator=g).tolist() for n in LENGTHS]


@functools.cache
def baseline_model():
    return load_model("gpt-oss-tiny", dtype=torch.float32)


@functools.cache
def baseline(params: SamplingParams = GREEDY) -> tuple[tuple[int, ...], ...]:
    out = generate(baseline_model(), prompts(), params)
    return tuple(tuple(c.token_ids) for c in out)


def tiny_shard(layout: KVLayout, kernels: bool = False, **options):
    """The built-in model as one in-process shard with every expert, float32; options
    go to the Shard."""
    from gptoss_ray.router.transport import LocalTransport
    from gptoss_ray.shards.shard import Shard

    return Shard(
        "gpt-oss-tiny",
        rank=0,
        world_size=1,
        transport=LocalTransport(),
        dtype=torch.float32,
        kv_layout=layout,
        kernels=kernels,
        **options,
    )


def expected_reply(body: dict) -> dict:
    """What the single-process baseline replies to a chat request (greedy)."""
    from gptoss_ray.cluster.client.chat import chat_prompt, chat_reply

    prompt, params, stops = chat_prompt(body, 131072)
    (c,) = generate(baseline_model(), [prompt], params)
    return chat_reply(c.token_ids, c.finish_reason, stop=stops, prompt_tokens=len(prompt))


@functools.cache
def transformers_model():
    """Hugging Face's GptOssForCausalLM on the built-in checkpoint (float32): the oracle."""
    from transformers import GptOssForCausalLM, Mxfp4Config

    from gptoss_ray.model.model_folder import resolve_model

    model = GptOssForCausalLM.from_pretrained(
        resolve_model("gpt-oss-tiny"),
        quantization_config=Mxfp4Config(dequantize=True),
        dtype=torch.float32,
        attn_implementation="eager",
    )
    return model.float().eval()


def assert_logprobs_match_transformers(prompt, token_ids, logprobs, tol: float = 1e-4) -> None:
    """Each drawn token's logprob and its top alternatives equal log_softmax of the
    oracle's logits for the same prefix (unprocessed sampling: no penalties or bias)."""
    ids = torch.tensor(list(prompt) + list(token_ids[:-1]))[None]
    with torch.no_grad():
        logits = transformers_model()(ids).logits[0, len(prompt) - 1 :].float()
    want = torch.log_softmax(logits, dim=-1)
    assert len(logprobs) == len(token_ids)
    for row, (token, lp) in enumerate(zip(token_ids, logprobs, strict=True)):
        assert lp.token == token
        assert abs(lp.logprob - float(want[row, token])) < tol
        top = torch.topk(want[row], len(lp.top))
        assert [t for t, _ in lp.top] == top.indices.tolist()
        values = zip([v for _, v in lp.top], top.values.tolist(), strict=True)
        assert max((abs(v - w) for v, w in values), default=0.0) < tol


def tiny_core(layout: KVLayout, **options):
    """An engine core on one in-process shard of the built-in model (`tiny_shard`);
    options go to EngineCore (token_budget, overlap, ...)."""
    from gptoss_ray.cluster.engine.core import EngineCore

    shard = tiny_shard(layout)
    return EngineCore(shard.config, 1, layout, lambda plans: [shard.step(plans[0])], **options)


@contextlib.contextmanager
def served_tiny_model(api_key: str, layout: KVLayout | None = None):
    """The HTTP API on the built-in model, one in-process shard (float32) -> its URL."""
    from gptoss_ray.cluster.engine.loop import EngineLoop
    from tests.support import served

    layout = layout or KVLayout(16, 256, 128)
    core = tiny_core(layout)
    engine = EngineLoop("/models/gpt-oss-tiny", core.config, layout, core)
    try:
        with served(engine, api_key) as url:
            yield url
    finally:
        engine.shutdown()

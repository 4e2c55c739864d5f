"""Shared inputs for the engine tests: prompts of different lengths (several longer than
the tiny model's 32-token sliding window) and the single-process baseline."""

from __future__ import annotations

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


def tiny_shard(layout: KVLayout, kernels: bool = False):
    """The built-in model as one in-process shard with every expert, float32."""
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
    )


def expected_reply(body: dict) -> dict:
    """What the single-process baseline replies to a chat request (greedy)."""
    from gptoss_ray.cluster.chat import chat_prompt, chat_reply

    prompt, params, stops = chat_prompt(body, 131072)
    (c,) = generate(baseline_model(), [prompt], params)
    return chat_reply(c.token_ids, c.finish_reason, stop=stops, prompt_tokens=len(prompt))

"""An `EngineLoop` whose shards are replaced by a script that speaks well-formed harmony,
so that the HTTP layer's reasoning, content and tool-call paths can be driven with
realistic replies (the built-in model's random weights never write a harmony header)."""

from __future__ import annotations

import time

from gptoss_ray.cluster.engine.core import EngineCore
from gptoss_ray.cluster.engine.loop import EngineLoop
from gptoss_ray.model import tokenizer as tok
from gptoss_ray.model.config import ModelConfig
from gptoss_ray.model.types import KVLayout, SamplingParams, StepPlan, StepResult, TokenLogprob

REPLIES = {
    "answer": "<|channel|>analysis<|message|>Thinking about it.<|end|><|start|>assistant"
    "<|channel|>final<|message|>Hello there, friend!<|return|>",
    "call": "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant"
    '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"loc": "SF"}'
    "<|call|>",
    "after_call": "<|channel|>analysis<|message|>It said 20.<|end|><|start|>assistant"
    "<|channel|>final<|message|>It is 20C in SF.<|return|>",
    "slow": "<|channel|>final<|message|>" + "la " * 400 + "<|return|>",
}


def choose(prompt: str) -> str:
    if "to=assistant" in prompt:  # a tool result is in the conversation
        return "after_call"
    if "get_weather" in prompt:
        return "call"
    return "slow" if "slowly" in prompt else "answer"


# A step's time: a front's abort (a stop string it found) comes within one step, as it
# does in front of a real model's steps, not after a dozen instant ones.
STEP_S = 0.01


class ScriptedShards:
    def __init__(self) -> None:
        self.prompts: dict[str, list[int]] = {}
        self.scripts: dict[str, list[int]] = {}
        self.released: set[str] = set()
        self.sampled: dict[str, int] = {}  # tokens drawn for each sequence
        # as a shard does: a sequence's parameters come with its first work here
        self.params: dict[str, SamplingParams] = {}

    def __call__(self, plans: list[StepPlan]) -> list[StepResult]:
        (plan,) = plans
        out: dict[str, int] = {}
        logprobs: dict[str, TokenLogprob] = {}
        slow = False
        for seq_id in plan.release:  # before the work, as a shard: it may be placed again
            self.params.pop(seq_id, None)
        for w in plan.work:
            self.prompts.setdefault(w.seq_id, []).extend(w.tokens)
            if w.params is not None:
                self.params[w.seq_id] = w.params
            if w.sample:
                if w.seq_id not in self.scripts:
                    kind = choose(tok.decode(self.prompts[w.seq_id]))
                    self.scripts[w.seq_id] = tok.encode(REPLIES[kind], allow_special=True)
                script = self.scripts[w.seq_id]
                slow |= len(script) > 200
                out[w.seq_id] = script[min(w.draw_index, len(script) - 1)]
                self.sampled[w.seq_id] = self.sampled.get(w.seq_id, 0) + 1
                params = self.params[w.seq_id]
                for fork_id, _ in w.forks:  # other choices (n > 1): the same script
                    self.prompts[fork_id] = self.prompts[w.seq_id]
                    self.scripts[fork_id] = script
                    self.params[fork_id] = params
                    out[fork_id] = out[w.seq_id]
                if params.logprobs is not None:
                    for seq_id in [w.seq_id, *(f for f, _ in w.forks)]:
                        logprobs[seq_id] = scripted_logprob(
                            out[seq_id], w.draw_index, params.logprobs
                        )
        for seq_id in plan.release:
            self.released.add(seq_id)
        time.sleep(0.02 if slow else STEP_S)
        return [StepResult(out, {"step": 0.0}, logprobs)]


def scripted_logprob(token: int, n: int, top: int) -> TokenLogprob:
    """A made-up logprob for the n-th token, and `top` alternatives, the token first."""
    logprob = -0.25 * (n % 5)
    others = [(1000 + j, logprob - 1.0 - j) for j in range(top - 1)]
    return TokenLogprob(token, logprob, [(token, logprob), *others][:top])


def scripted_engine(overlap: bool = False) -> tuple[EngineLoop, ScriptedShards]:
    config = ModelConfig.preset("gpt-oss-tiny")
    layout = KVLayout(16, 1000, 1000)
    shards = ScriptedShards()
    # the script reads each prompt whole from the plans: no cached prefix may be skipped
    # by default one step at a time, as CPU shards run (`EngineConfig.overlap`)
    core = EngineCore(
        config, 1, layout, shards, token_budget=4096, prefix_cache=False, overlap=overlap
    )
    return EngineLoop("/models/gpt-oss-tiny", config, layout, core), shards

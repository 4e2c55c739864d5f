"""`gptoss-ray bench prefix`: a multi-turn, agent-like workload with the prefix cache on
and off, in one run.

Every user's conversation starts with the same system and developer messages (about
`--system-tokens` of instructions and tool definitions) and goes on for `--turns` turns;
each turn's prompt is the whole conversation rendered in harmony, as a chat request is,
so earlier turns' reasoning is dropped and only their final answers stay. The built-in
model's replies are random tokens, so each earlier answer in the history is a stand-in
text of `--answer-words` words; the model still writes `--output-len` tokens a turn.
Users run at once, each turn waiting for the previous one.

Printed and saved: prefill tokens computed, the cache's hit rate against the most the
workload allows (each prompt's longest whole-block prefix shared with a prompt sent
before it, users' first turns taken as if one after another), time to first token p50
and p99, output tokens/s, and the ratios off / on."""

from __future__ import annotations

import argparse
import random
import threading
import time
from typing import Any

from gptoss_ray.benchmarks.common import describe, median, percentile, progress, save

WORDS = [
    "agent",
    "tool",
    "call",
    "result",
    "search",
    "file",
    "read",
    "write",
    "plan",
    "step",
    "check",
    "answer",
    "user",
    "ask",
    "data",
    "table",
    "query",
    "request",
    "response",
    "status",
    "error",
    "retry",
    "limit",
    "cache",
    "token",
    "model",
    "context",
    "window",
    "budget",
    "schedule",
    "queue",
    "batch",
    "stream",
    "event",
    "reply",
    "message",
    "system",
    "format",
    "json",
    "field",
    "value",
    "number",
    "string",
    "array",
    "object",
    "list",
    "item",
    "key",
    "path",
    "node",
    "shard",
    "expert",
    "route",
]


CONTEXT = 131072  # every gpt-oss model's


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def _tools(count: int) -> list[dict[str, Any]]:
    rng = random.Random(1)
    return [
        {
            "type": "function",
            "function": {
                "name": f"tool_{i}",
                "description": _text(rng, 25),
                "parameters": {
                    "type": "object",
                    "properties": {
                        f"arg_{j}": {
                            "type": rng.choice(["string", "integer"]),
                            "description": _text(rng, 8),
                        }
                        for j in range(4)
                    },
                    "required": ["arg_0"],
                },
            },
        }
        for i in range(count)
    ]


def conversations(
    users: int, turns: int, system_tokens: int, answer_words: int, seed: int = 0
) -> list[list[list[int]]]:
    """prompts[user][turn]: the rendered prompt of every turn (its history's answers are
    the stand-in texts). Another seed, other texts: nothing cached from a run before."""
    from gptoss_ray.cluster.client.chat import chat_prompt

    tools = _tools(8)

    def render(messages: list[dict[str, Any]]) -> list[int]:
        return chat_prompt({"messages": messages, "tools": tools}, CONTEXT)[0]

    # instructions long enough that system + developer messages come to system_tokens
    words = system_tokens
    for _ in range(4):
        system = [{"role": "system", "content": _text(random.Random(seed), words)}]
        have = len(render(system))
        words = max(1, words + (system_tokens - have) * words // max(1, have))
    out = []
    for u in range(users):
        rng = random.Random(1000 * seed + 100 + u)
        messages, prompts = list(system), []
        for _ in range(turns):
            messages.append({"role": "user", "content": _text(rng, rng.randint(30, 80))})
            prompts.append(render(messages))
            messages.append({"role": "assistant", "content": _text(rng, answer_words)})
        out.append(prompts)
    return out


def best_hit_tokens(prompts: list[list[list[int]]], block_size: int, *, together: bool) -> int:
    """The most prompt tokens any prefix cache could reuse: each prompt's longest prefix
    shared with one sent before it, in whole blocks, leaving its last token to compute.
    Turn t comes after turn t-1; within a turn, users count as one after another, or with
    `together`, as arriving at once (none reuses another's prompt of the same turn)."""
    total = 0
    for t, turn in enumerate(zip(*prompts, strict=True)):
        for u, p in enumerate(turn):
            earlier = [q for user in prompts for q in user[:t]]
            if not together:
                earlier += turn[:u]
            shared = max((_common_length(p, q) for q in earlier), default=0)
            total += min(shared, len(p) - 1) // block_size * block_size
    return total


def _common_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def run_workload(engine, prompts: list[list[list[int]]], output_len: int) -> dict[str, Any]:
    from gptoss_ray.model.types import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    ttft: list[float] = []
    tokens = [0]
    errors: list[str] = []
    lock = threading.Lock()

    def user(turns: list[list[int]]) -> None:
        for prompt in turns:
            (out,) = engine.generate([prompt], params)
            with lock:
                if not hasattr(out, "token_ids"):
                    errors.append(str(out))
                    return
                ttft.append(out.time_to_first_token)
                tokens[0] += len(out.token_ids)

    before = engine.stats()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=user, args=(turns,)) for turns in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = engine.stats()
    if errors:
        raise RuntimeError(f"a benchmark request failed: {errors[0]}")

    def delta(key: str) -> int:
        return sum(
            a[key] - b[key]
            for a, b in zip(after["prefix_cache"], before["prefix_cache"], strict=True)
        )

    return {
        "wall_s": wall,
        "tokens_per_s": tokens[0] / wall,
        "prefill_tokens": after["prefill_tokens"] - before["prefill_tokens"],
        "hit_tokens": delta("hit_tokens"),
        "queried_tokens": delta("queried_tokens"),
        "evictions": delta("evictions"),
        "ttft_p50_ms": percentile(ttft, 50) * 1e3,
        "ttft_p99_ms": percentile(ttft, 99) * 1e3,
        "ttft_ms": [t * 1e3 for t in ttft],
    }


def run(args: argparse.Namespace, data: dict[str, Any]) -> None:
    from gptoss_ray.benchmarks.engine_runs import ensure_ray
    from gptoss_ray.cluster.client.engine import Engine

    progress(f"rendering {args.repeats} x {args.users} users x {args.turns} turns")
    # one workload per repeat, so that a repeat finds nothing of the one before cached
    workloads = [
        conversations(args.users, args.turns, args.system_tokens, args.answer_words, seed=r)
        for r in range(args.repeats)
    ]
    data["workload"] = {
        "requests": args.users * args.turns,
        "prompt_tokens": median([sum(len(p) for u in w for p in u) for w in workloads]),
        "system_tokens": median([len(_common_prefix([u[0] for u in w])) for w in workloads]),
        "best_hit_tokens": median(
            [best_hit_tokens(w, args.block_size, together=False) for w in workloads]
        ),
        "best_hit_tokens_together": median(
            [best_hit_tokens(w, args.block_size, together=True) for w in workloads]
        ),
    }
    ensure_ray(args.shards + 1)
    data["results"] = {}
    for cache in (False, True):
        label = "on" if cache else "off"
        engine = Engine.start(
            args.model,
            shards=args.shards,
            device=args.device,
            dtype=args.dtype,
            kv_budget_mb=args.kv_budget_mb,
            block_size=args.block_size,
            prefix_cache=cache,
        )
        try:
            engine.generate([[1, 2, 3]], None)  # warm-up
            runs = []
            for r, prompts in enumerate(workloads):
                progress(f"   cache {label}, run {r + 1} of {args.repeats}")
                runs.append(run_workload(engine, prompts, args.output_len))
        finally:
            engine.shutdown()
        data["results"][label] = _summarize(runs)
    print_prefix(data)
    save("prefix", data, args.out, plot_prefix)


def _common_prefix(seqs: list[list[int]]) -> list[int]:
    return seqs[0][: min(_common_length(seqs[0], s) for s in seqs)]


def _summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("wall_s", "tokens_per_s", "prefill_tokens", "hit_tokens", "queried_tokens", "evictions")
    ttft = [t for r in runs for t in r["ttft_ms"]]
    return {k: median([r[k] for r in runs]) for k in keys} | {
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
        "repeats": len(runs),
    }


def print_prefix(data: dict[str, Any]) -> None:
    a, w, res = data["args"], data["workload"], data["results"]
    off, on = res["off"], res["on"]
    best = w["best_hit_tokens"] / w["prompt_tokens"]
    rate = on["hit_tokens"] / on["queried_tokens"] if on["queried_tokens"] else 0.0
    print(
        f"{a['model']} on {a['shards']} shard(s), {a['device']} {a['dtype']}; {w['requests']} "
        f"requests ({a['users']} users x {a['turns']} turns), {w['prompt_tokens']} prompt tokens, "
        f"{w['system_tokens']} shared by every conversation; median of {a['repeats']}"
    )
    print(f"{'':<22} {'cache off':>10} {'cache on':>10} {'off / on':>9}")
    for name, key, spec in (
        ("prefill tokens", "prefill_tokens", ".0f"),
        ("TTFT p50 (ms)", "ttft_p50_ms", ".0f"),
        ("TTFT p99 (ms)", "ttft_p99_ms", ".0f"),
        ("wall (s)", "wall_s", ".1f"),
    ):
        ratio = off[key] / on[key] if on[key] else float("nan")
        print(f"{name:<22} {off[key]:>10{spec}} {on[key]:>10{spec}} {ratio:>8.2f}x")
    ratio = on["tokens_per_s"] / off["tokens_per_s"] if off["tokens_per_s"] else float("nan")
    print(
        f"{'output tokens/s':<22} {off['tokens_per_s']:>10.1f} {on['tokens_per_s']:>10.1f} "
        f"{ratio:>8.2f}x (on / off)"
    )
    together = w["best_hit_tokens_together"] / w["prompt_tokens"]
    print(
        f"hit rate {rate:.1%} of prompt tokens ({on['hit_tokens']:.0f}); the workload allows "
        f"at most {best:.1%} ({w['best_hit_tokens']:.0f}) if users' first turns came one "
        f"after another, {together:.1%} ({w['best_hit_tokens_together']:.0f}) with them "
        f"arriving at once, as here; {on['evictions']:.0f} evictions"
    )


def plot_prefix(data: dict[str, Any], plt) -> None:
    res = data["results"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    labels = ["cache off", "cache on"]
    for ax, key, what in zip(
        axes,
        ("prefill_tokens", "ttft_p50_ms", "ttft_p99_ms", "tokens_per_s"),
        ("prefill tokens computed", "TTFT p50 (ms)", "TTFT p99 (ms)", "output tokens/s"),
        strict=True,
    ):
        ax.bar(labels, [res["off"][key], res["on"][key]], color=["#999999", "#3070b0"])
        ax.set(ylabel=what)
    a = data["args"]
    fig.suptitle(
        f"prefix cache, {a['users']} users x {a['turns']} turns, {a['model']} on "
        f"{a['shards']} shard(s); {describe(data['machine'])}",
        fontsize=9,
    )
    fig.tight_layout()

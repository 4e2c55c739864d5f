"""Speculative decoding on CPU shards: what verifying k draft tokens costs a decode step,
and the tokens a step gives with a draft that is always right and with n-gram drafts:

    gptoss-ray bench speculative [--shards 2] [--batches 1,16,64] [--ks 1,2,4,8]

W shard processes of the model in one gloo group (`shards.local_group`, no Ray) and an
engine core over them. Per batch: the replies without drafts first (greedy, --output-len
tokens after a --prompt-len prompt; every step timed), then for each k with the replies
themselves as the drafts ("self": every draft kept, k + 1 tokens a decode) and with
wrong ones ("wrong": none kept, the cost alone), then n-gram drafts (prompt lookup) on
the same prompts, repeated so that they can match, and EAGLE-3 drafts made on the shards
(--eagle3-draft, or a random draft of the published geometry: its drafts are seldom
kept, so its row is what drafting costs). Decode steps only (not the prefill's):
median seconds a step, tokens a step, and tokens a second of the whole decode. On the
random built-in model the replies do not repeat their prompts, so n-gram drafts seldom
match: its row says what the lookup costs, the "self" rows what a draft that matches is
worth."""

from __future__ import annotations

import argparse
from typing import Any

from gptoss_ray.benchmarks.common import progress, save
from gptoss_ray.benchmarks.engine_runs import decode_steps


class _Replies:
    """Drafts from known replies: right ones, or each token off by one."""

    def __init__(self, replies: dict[str, list[int]], right: bool) -> None:
        self.replies, self.right = replies, right

    def propose(self, seq, k: int) -> list[int]:
        reply = self.replies[seq.request_id]
        out = reply[len(seq.output) : len(seq.output) + k]
        return out if self.right else [(t + 1) % 100_000 for t in out]

    def forget(self, seq_id: str) -> None:
        pass


def one_run(group, config, layout, world, prompts, params, drafter=None, k=0) -> dict[str, Any]:
    """Runs the prompts to the end, timing each step -> the decode steps' figures and the
    replies."""
    from gptoss_ray.cluster.engine.core import EngineCore

    core = EngineCore(
        config,
        world,
        layout,
        launch_step=group.launch,
        token_budget=max(256, len(prompts) * (k + 1)),
        max_seqs=max(64, len(prompts)),
        drafter=drafter,
        num_draft_tokens=k,
        overlap=False,
    )
    ids = [core.submit(p, params, request_id=f"r{i}") for i, p in enumerate(prompts)]
    figures = decode_steps(core)
    snap = core.snapshot()
    return {
        "replies": {rid: core.output(rid).token_ids for rid in ids},
        **figures,
        "drafts_proposed": snap["drafts_proposed"],
        "drafts_accepted": snap["drafts_accepted"],
    }


def run(args: argparse.Namespace, data: dict[str, Any]) -> None:
    from gptoss_ray.benchmarks.engine_runs import local_setup, random_prompts
    from gptoss_ray.cluster.engine.drafts import NgramDrafter, ShardDrafts
    from gptoss_ray.shards.local_group import LocalShardGroup

    config, dtype, layout, params = local_setup(args)
    rows = []
    plains = {}
    with LocalShardGroup(
        args.model, args.shards, threads=args.threads, dtype=dtype, kv_layout=layout
    ) as group:
        for batch in args.batches:
            base = random_prompts(batch, args.prompt_len // 4, seed=batch)
            prompts = [p * 4 for p in base]  # a prompt that repeats itself: n-grams match
            progress(f"batch {batch}: no drafts ...")
            plain = one_run(group, config, layout, args.shards, prompts, params)
            rows.append({"batch": batch, "drafts": "none", "k": 0, **_figures(plain)})
            for k in args.ks:
                for mode in ("self", "wrong"):
                    progress(f"batch {batch}: k {k}, {mode} drafts ...")
                    drafter = _Replies(plain["replies"], mode == "self")
                    out = one_run(group, config, layout, args.shards, prompts, params, drafter, k)
                    assert out["replies"] == plain["replies"], "drafts changed a reply"
                    rows.append({"batch": batch, "drafts": mode, "k": k, **_figures(out)})
            k = max(args.ks)
            progress(f"batch {batch}: k {k}, n-gram drafts ...")
            out = one_run(
                group, config, layout, args.shards, prompts, params, NgramDrafter(2, 4), k
            )
            assert out["replies"] == plain["replies"], "drafts changed a reply"
            rows.append({"batch": batch, "drafts": "ngram", "k": k, **_figures(out)})
            plains[batch] = (prompts, plain["replies"])
    k = max(args.ks)
    draft = args.eagle3_draft or _random_draft(config)
    with LocalShardGroup(
        args.model,
        args.shards,
        threads=args.threads,
        dtype=dtype,
        kv_layout=layout,
        draft_model=str(draft),
        num_draft_tokens=k,
    ) as group:
        for batch, (prompts, replies) in plains.items():
            progress(f"batch {batch}: k {k}, EAGLE-3 drafts ...")
            out = one_run(group, config, layout, args.shards, prompts, params, ShardDrafts(), k)
            assert out["replies"] == replies, "drafts changed a reply"
            rows.append({"batch": batch, "drafts": "eagle3", "k": k, **_figures(out)})
    data["results"] = rows
    print(
        f"{args.model} ({args.dtype}), {args.shards} CPU shard(s), greedy, prompt "
        f"{args.prompt_len} tokens (a quarter repeated 4 times), {args.output_len} out; decode "
        "steps only (medians of each step's seconds)"
    )
    print("batch  drafts  k   step ms   x no drafts   tokens/step   tokens/s   kept/proposed")
    plain_s = {r["batch"]: r["step_s"] for r in rows if r["drafts"] == "none"}
    for r in rows:
        print(
            f"{r['batch']:5d}  {r['drafts']:6s} {r['k']:2d}  {r['step_s'] * 1e3:8.1f}   "
            f"{r['step_s'] / plain_s[r['batch']]:11.2f}   {r['tokens_per_step']:11.2f}   "
            f"{r['tokens_per_s']:8.1f}   {r['drafts_accepted']}/{r['drafts_proposed']}"
        )
    save("speculative", data, args.out, plot)


def _random_draft(config):
    """A random EAGLE-3 draft for the target (in a temporary folder), its ids spread
    over the vocabulary."""
    import tempfile

    import torch

    from gptoss_ray.model.eagle3 import Eagle3Config, write_random_draft

    eagle = Eagle3Config.for_target(config)
    n = eagle.draft_vocab
    spread = torch.arange(n) * (config.vocab_size // n) - torch.arange(n)
    return write_random_draft(eagle, tempfile.mkdtemp(prefix="eagle3-draft-"), d2t=spread)


def _figures(out: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in out.items() if k != "replies"}


def plot(data: dict[str, Any], plt: Any) -> None:
    rows = data["results"]
    batches = sorted({r["batch"] for r in rows})
    fig, (cost, gain) = plt.subplots(1, 2, figsize=(11, 4))
    for b in batches:
        plain = next(r for r in rows if r["batch"] == b and r["drafts"] == "none")
        wrong = [r for r in rows if r["batch"] == b and r["drafts"] == "wrong"]
        right = [r for r in rows if r["batch"] == b and r["drafts"] == "self"]
        cost.plot(
            [0] + [r["k"] for r in wrong],
            [1.0] + [r["step_s"] / plain["step_s"] for r in wrong],
            marker="o",
            label=f"batch {b}",
        )
        gain.plot(
            [0] + [r["k"] for r in right],
            [plain["tokens_per_s"]] + [r["tokens_per_s"] for r in right],
            marker="o",
            label=f"batch {b}, self-draft",
        )
    cost.set(xlabel="draft tokens k", ylabel="decode step time / without drafts", title="cost")
    gain.set(xlabel="draft tokens k", ylabel="tokens per second (decode)", title="with drafts kept")
    cost.legend()
    gain.legend()
    fig.tight_layout()

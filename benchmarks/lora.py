"""LoRA adapters on CPU shards: what serving adapters costs a decode step, by how many
distinct adapters a batch mixes:

    gptoss-ray bench lora [--shards 2] [--batches 16,64] [--adapters 0,1,4]

W shard processes of the model in one gloo group (`shards.local_group`, no Ray), with
random adapters in PEFT's layout (`model.lora.write_random_adapter`: q, k, v, o and the
experts' gate_up_proj and down_proj, rank --rank) served in --max-loras slots, and an
engine core over them. Per batch and per count of distinct adapters (0: the base model,
on shards that serve none; 1: every request the same adapter; 4: round robin over four),
greedy replies of --output-len tokens after a --prompt-len prompt, every step timed:
median seconds a decode step and tokens a second of the decode."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from gptoss_ray.benchmarks.common import progress, save
from gptoss_ray.benchmarks.engine_runs import decode_steps


def one_run(group, config, layout, world, prompts, params, served, slots) -> dict[str, Any]:
    from gptoss_ray.cluster.engine.core import EngineCore

    core = EngineCore(
        config,
        world,
        layout,
        launch_step=group.launch,
        token_budget=max(256, len(prompts)),
        max_seqs=max(64, len(prompts)),
        overlap=False,
        loras=served,
        max_loras=slots,
    )
    names = list(served)
    for i, p in enumerate(prompts):
        lora = names[i % len(names)] if names else None
        core.submit(p, params.model_copy(update={"lora": lora}), request_id=f"r{i}")
    return decode_steps(core)


def run(args: argparse.Namespace, data: dict[str, Any]) -> None:
    from gptoss_ray.benchmarks.engine_runs import local_setup, random_prompts
    from gptoss_ray.model.lora import write_random_adapter
    from gptoss_ray.shards.local_group import LocalShardGroup

    config, dtype, layout, params = local_setup(args)
    most = max(args.adapters)
    root = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    adapters = {
        f"lora{i}": str(
            write_random_adapter(config, root / f"lora{i}", r=args.rank, experts=True, seed=i)
        )
        for i in range(most)
    }
    rows = []
    counts = sorted(set(args.adapters))
    # shards that serve no LoRA for the base model's row; one group with slots for the rest
    groups = [(0, [c for c in counts if c == 0]), (args.max_loras, [c for c in counts if c])]
    for slots, mine in groups:
        if not mine:
            continue
        with LocalShardGroup(
            args.model,
            args.shards,
            threads=args.threads,
            dtype=dtype,
            kv_layout=layout,
            max_loras=slots,
        ) as group:
            for count in mine:
                mix = {n: adapters[n] for n in list(adapters)[:count]}
                for batch in args.batches:
                    progress(f"batch {batch}, {count} distinct adapter(s) ...")
                    prompts = random_prompts(batch, args.prompt_len, seed=batch)
                    out = one_run(group, config, layout, args.shards, prompts, params, mix, slots)
                    rows.append({"batch": batch, "adapters": count, **out})
    data["results"] = rows
    print(
        f"{args.model} ({args.dtype}), {args.shards} CPU shard(s), greedy, prompt "
        f"{args.prompt_len} tokens, {args.output_len} out; random rank-{args.rank} adapters "
        f"on attention and experts, {args.max_loras} slots; decode steps only (medians)"
    )
    print("batch  adapters   step ms   x base   tokens/s")
    base = {r["batch"]: r["step_s"] for r in rows if r["adapters"] == 0}
    for r in rows:
        ratio = r["step_s"] / base[r["batch"]] if r["batch"] in base else float("nan")
        print(
            f"{r['batch']:5d}  {r['adapters']:8d}  {r['step_s'] * 1e3:8.1f}  {ratio:7.2f}"
            f"  {r['tokens_per_s']:9.1f}"
        )
    save("lora", data, args.out, plot)


def plot(data: dict[str, Any], plt: Any) -> None:
    rows = data["results"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for batch in sorted({r["batch"] for r in rows}):
        mine = sorted((r for r in rows if r["batch"] == batch), key=lambda r: r["adapters"])
        ax.plot(
            [r["adapters"] for r in mine],
            [r["step_s"] * 1e3 for r in mine],
            marker="o",
            label=f"batch {batch}",
        )
    ax.set(xlabel="distinct adapters in the batch", ylabel="decode step (ms)", title="LoRA")
    ax.legend()
    fig.tight_layout()

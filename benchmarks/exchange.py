"""The expert exchange between shards, before and after, per MoE layer:

    gptoss-ray bench exchange --shards 2,4 --batches 1,16,64 [--steps 16]

For each shard count and path (`pairs`: each (token, slot) pair in routing-sized parts,
counts first; `tokens`: fixed-size buffers, router/moe.py), W shard processes of the model
join one gloo group (`shards.local_group`, no Ray) and decode `batch` sequences. Two
decode steps are counted from below (`model.op_counter`): collectives, host reads, and
the rows and bytes each shard sent to the others, per MoE layer. The next --steps are
timed: dispatch + combine per layer and the whole step (medians; the slowest shard's
phases). Then, computed, the traffic each path needs per MoE layer and decode step for
gpt-oss-120b (and 20b) at 1, 64 and 256 tokens a shard on 4 and 8 GPUs."""

from __future__ import annotations

import argparse
import time
from typing import Any

from gptoss_ray.benchmarks.common import fmt, median, progress, save

PATHS = ("pairs", "tokens")
PROMPT_LEN = 32
COUNTED_STEPS = 2


def per_layer(ops, rank: int, world: int, hidden: int) -> dict[str, float]:
    """One counted step of one shard -> its collectives, host reads, and the rows (of the
    hidden size or wider) and bytes it sent elsewhere, per MoE layer."""
    layers = len(ops.blocks)
    sent = [c.sent_elsewhere(rank, world) for b in ops.blocks for c in b.collectives]
    rows = [
        c.sent_elsewhere(rank, world)[0]
        for b in ops.blocks
        for c in b.collectives
        if len(c.shapes[-1]) == 2 and c.shapes[-1][1] >= hidden
    ]
    return {
        "collectives": sum(len(b.collectives) for b in ops.blocks) / layers,
        "host_reads": ops.host_reads_in_blocks() / layers,
        "rows_sent": sum(rows) / layers,
        "bytes_sent": sum(b for _, b in sent) / layers,
    }


def one_batch(group, config, layout, world: int, batch: int, steps: int) -> dict[str, Any]:
    import torch

    from gptoss_ray.cluster.engine.core import EngineCore
    from gptoss_ray.model.types import SamplingParams

    decodes = {"n": 0}
    timed: list[dict[str, float]] = []

    def launch(plans):
        works = [w for p in plans for w in p.work]
        decode = bool(works) and all(w.sample and w.size == 1 for w in works)
        steady = decode and len(works) == batch
        count = steady and decodes["n"] < COUNTED_STEPS
        decodes["n"] += steady
        t0 = time.perf_counter()
        wait = group.launch(plans, count=count)

        def results():
            out = wait()
            if steady and not count:
                slowest = max(out, key=lambda r: sum(r.seconds.values()))
                exchange = slowest.seconds.get("dispatch", 0.0) + slowest.seconds.get(
                    "combine", 0.0
                )
                timed.append(
                    {
                        "step_ms": 1e3 * (time.perf_counter() - t0),
                        "exchange_ms": 1e3 * exchange / config.num_hidden_layers,
                    }
                )
            return out

        return results

    # every prompt prefilled in one step, so that all decode together from the next
    core = EngineCore(
        config, world, layout, launch_step=launch, overlap=False, token_budget=batch * PROMPT_LEN
    )
    g = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=COUNTED_STEPS + steps + 1, temperature=0, ignore_eos=True)
    for _ in range(batch):
        core.submit(torch.randint(0, 100_000, (PROMPT_LEN,), generator=g).tolist(), params)
    core.run_until_done()
    counted = group.counted()
    counts = [
        per_layer(steps_of_shard[-1], rank, world, config.hidden_size)
        for rank, steps_of_shard in enumerate(counted)
    ]
    return {
        "batch": batch,
        # the shard that sent most (the exchange waits for it)
        "per_layer": max(counts, key=lambda c: c["bytes_sent"]),
        "collectives_per_layer": counts[0]["collectives"],
        "host_reads_per_layer": max(c["host_reads"] for c in counts),
        "exchange_ms_per_layer": median([t["exchange_ms"] for t in timed]),
        "step_ms": median([t["step_ms"] for t in timed]),
        "steps_timed": len(timed),
    }


def traffic(hidden: int, k: int, world: int, tokens: int, value_bytes: int = 2) -> dict[str, float]:
    """Bytes one shard sends to the others per MoE layer with `tokens` tokens of its own,
    routing spread evenly: the pair exchange's routed pairs (rows, 8-byte ids and counts)
    against the fixed buffers' whole parts (rows with their k ids; k slot outputs)."""
    remote = (world - 1) / world
    pairs = tokens * k * remote
    before = 2 * pairs * hidden * value_bytes + pairs * 8 + 8 * world
    after = (world - 1) * tokens * ((hidden + k) + k * hidden) * value_bytes
    return {"pairs": before, "tokens": after}


MODELS_FOR_TRAFFIC = {"gpt-oss-120b": (2880, 4, 36), "gpt-oss-20b": (2880, 4, 24)}


def traffic_table() -> list[dict[str, Any]]:
    rows = []
    for model, (hidden, k, layers) in MODELS_FOR_TRAFFIC.items():
        for world in (4, 8):
            for tokens in (1, 64, 256):
                t = traffic(hidden, k, world, tokens)
                rows.append(
                    {
                        "model": model,
                        "gpus": world,
                        "tokens_per_gpu": tokens,
                        "pairs_mb_per_layer": t["pairs"] / 1e6,
                        "tokens_mb_per_layer": t["tokens"] / 1e6,
                        "pairs_mb_per_step": t["pairs"] * layers / 1e6,
                        "tokens_mb_per_step": t["tokens"] * layers / 1e6,
                        "ratio": t["tokens"] / t["pairs"],
                    }
                )
    return rows


def run(args: argparse.Namespace, data: dict[str, Any]) -> None:
    import os

    import torch

    from gptoss_ray.model.model_folder import read_config, resolve_model
    from gptoss_ray.model.types import KVLayout
    from gptoss_ray.router.plan import expert_ranges
    from gptoss_ray.shards.local_group import LocalShardGroup

    config = read_config(resolve_model(args.model))
    for world in args.shards:  # refused here, before any shard process starts
        expert_ranges(config.num_experts, world)
    dtype = getattr(torch, args.dtype)
    layout = KVLayout.from_budget(
        config,
        int(args.kv_budget_mb * 2**20),
        bytes_per_value=dtype.itemsize,
        max_seqs=max(args.batches),
        max_chunk=max(args.batches) * PROMPT_LEN,
    )
    results = []
    for world in args.shards:
        threads = args.threads or max(1, (os.cpu_count() or 1) // world)
        for path in PATHS:
            progress(f"{world} shards, {path} exchange: starting")
            with LocalShardGroup(
                args.model, world, threads=threads, dtype=dtype, kv_layout=layout, exchange=path
            ) as group:
                for batch in args.batches:
                    progress(f"{world} shards, {path} exchange, batch {batch}")
                    r = one_batch(group, config, layout, world, batch, args.steps)
                    results.append({"shards": world, "path": path, **r})
    data["results"] = results
    data["traffic"] = traffic_table()
    print_tables(data)
    save("exchange", data, args.out, plot)


def print_tables(data: dict[str, Any]) -> None:
    print(
        "\nper MoE layer, one decode step (shard processes, gloo; host reads and bytes: "
        "the shard that sent most)"
    )
    print(
        f"{'shards':>6} {'path':>6} {'batch':>5} {'collectives':>11} {'host reads':>10} "
        f"{'rows sent':>9} {'KB sent':>8} {'dispatch+combine ms':>19} {'step ms':>8}"
    )
    for r in data["results"]:
        p = r["per_layer"]
        print(
            f"{r['shards']:>6} {r['path']:>6} {r['batch']:>5} {r['collectives_per_layer']:>11.1f} "
            f"{r['host_reads_per_layer']:>10.1f} {p['rows_sent']:>9.1f} "
            f"{p['bytes_sent'] / 1e3:>8.1f} {fmt(r['exchange_ms_per_layer'], '.3f'):>19} "
            f"{fmt(r['step_ms'], '.1f'):>8}"
        )
    print("\ncomputed: MB one GPU sends per MoE layer and per decode step (bf16, even routing)")
    print(
        f"{'model':>12} {'gpus':>4} {'tokens/gpu':>10} {'pairs/layer':>11} "
        f"{'tokens/layer':>12} {'pairs/step':>10} {'tokens/step':>11} {'ratio':>5}"
    )
    for t in data["traffic"]:
        print(
            f"{t['model']:>12} {t['gpus']:>4} {t['tokens_per_gpu']:>10} "
            f"{t['pairs_mb_per_layer']:>11.3f} {t['tokens_mb_per_layer']:>12.3f} "
            f"{t['pairs_mb_per_step']:>10.2f} {t['tokens_mb_per_step']:>11.2f} "
            f"{t['ratio']:>5.2f}"
        )


def plot(data: dict[str, Any], plt) -> None:
    worlds = sorted({r["shards"] for r in data["results"]})
    fig, axes = plt.subplots(1, len(worlds), figsize=(5 * len(worlds), 4), squeeze=False)
    for ax, world in zip(axes[0], worlds, strict=True):
        for path in PATHS:
            rs = [r for r in data["results"] if r["shards"] == world and r["path"] == path]
            batches = [r["batch"] for r in rs]
            ax.plot(batches, [r["step_ms"] for r in rs], marker="o", label=f"{path}: step")
            ax.plot(
                batches,
                [r["exchange_ms_per_layer"] for r in rs],
                marker="x",
                linestyle="--",
                label=f"{path}: dispatch+combine / layer",
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("decoding sequences")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{world} shards")
        ax.legend(fontsize=7)
    fig.tight_layout()

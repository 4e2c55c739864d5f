"""Benchmarks of the running engine (Ray, the coordinator, its shards).

sweep: throughput, time to first token and inter-token latency against the batch size
and the prompt/output lengths, with the host's share of each step (the coordinator's
planning and bookkeeping that no running step hid, and the round trip), over every step
and over steady decoding alone (no prefill, no batch's first step or last release): with
overlapped steps, with one step at a time, or both in one run (`--steps both`); driven by
actor calls or the compiled graph (`--driven-by`); with streaming consumers (`--stream`:
each request read token by token, as HTTP clients do); on the model or on shards that do
no model work (`--null-model`: the host loop's ceiling).

scaling: the same batch on 1, 2, 4, 8 expert-parallel shards, and beside each the
baseline a user would otherwise pick: that many independent one-shard replicas, each
serving its share of the batch (no all-to-all). On CPU every shard (and every replica)
gets an equal share of the cores.

The all-to-all is a barrier: a shard's dispatch and combine time includes waiting for
the slowest shard to reach the exchange."""

from __future__ import annotations

import argparse
import os
import threading
import time
from typing import Any

from gptoss_ray.benchmarks.common import describe, fmt, median, percentile, progress, save

PHASES = (
    "prepare",
    "attention",
    "gate",
    "dispatch",
    "experts",
    "combine",
    "decode graph",
    "head",
    "grammar wait",
    "sampling",
)
OVERHEAD = ("coordinator", "rpc")  # scheduling and bookkeeping; Ray round trip


def random_prompts(n: int, length: int, seed: int, vocab: int = 200000) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(n)]


def local_setup(args: argparse.Namespace):
    """The model's config, dtype, a KV layout from --kv-budget-mb and greedy params of
    --output-len tokens: what the benchmarks over in-process shard groups share."""
    import torch

    from gptoss_ray.model.model_folder import read_config, resolve_model
    from gptoss_ray.model.types import KVLayout, SamplingParams

    config = read_config(resolve_model(args.model))
    dtype = getattr(torch, args.dtype)
    layout = KVLayout.from_budget(
        config, int(args.kv_budget_mb * 2**20), bytes_per_value=dtype.itemsize, block_size=16
    )
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    return config, dtype, layout, params


def decode_steps(core) -> dict[str, Any]:
    """Runs an engine core's requests to the end, timing each step -> the decode steps'
    figures (steps that prefilled nothing and drew tokens): median seconds, tokens a step
    and a second."""
    times, tokens = [], []
    while core.has_work():
        before, prefill = core.stats.generated_tokens, core.stats.prefill_tokens
        t0 = time.perf_counter()
        core.step()
        wall = time.perf_counter() - t0
        if core.stats.prefill_tokens == prefill and core.stats.generated_tokens > before:
            times.append(wall)
            tokens.append(core.stats.generated_tokens - before)
    return {
        "step_s": median(times),
        "tokens_per_step": sum(tokens) / max(1, len(tokens)),
        "tokens_per_s": sum(tokens) / max(1e-9, sum(times)),
        "decode_steps": len(times),
    }


def ensure_ray(min_cpus: int) -> None:
    """One Ray instance for every engine of the run (each engine would start its own)."""
    from gptoss_ray.cluster.runtime.ray_instance import init_for_engine

    init_for_engine(None, min_cpus)


def _per_step(before: dict, after: dict, steps: float, phases: tuple[str, ...]) -> dict:
    """Milliseconds per step of each phase between two readings of seconds."""
    return {p: (after.get(p, 0.0) - before.get(p, 0.0)) / max(1, steps) * 1e3 for p in phases}


def _split(before: dict, after: dict) -> dict[str, float]:
    """Milliseconds per step of each phase between two stats snapshots."""
    steps = after["steps"] - before["steps"]
    return _per_step(before["seconds"], after["seconds"], steps, (*PHASES, *OVERHEAD, "step"))


def _decode_split(before: dict, after: dict) -> dict[str, float]:
    """The host's parts and the step, per steady decode step (and how many there were)."""
    b, a = before.get("decode", {}), after.get("decode", {})
    steps = a.get("steps", 0) - b.get("steps", 0)
    return _per_step(b, a, steps, (*OVERHEAD, "step")) | {"steps": steps}


def timed_generate(
    engine, prompts: list[list[int]], max_tokens: int, stream: bool = False
) -> dict[str, Any]:
    from gptoss_ray.model.types import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    before = engine.stats()
    t0 = time.perf_counter()
    outs = _streamed(engine, prompts, params) if stream else engine.generate(prompts, params)
    wall = time.perf_counter() - t0
    after = engine.stats()
    bad = [o for o in outs if not hasattr(o, "token_ids")]
    if bad:
        raise RuntimeError(f"a benchmark request failed: {bad[0]}")
    split = _split(before, after)
    return {
        "wall_s": wall,
        "tokens": sum(len(o.token_ids) for o in outs),
        "ttft_s": [o.time_to_first_token for o in outs],
        "itl_s": [o.inter_token_latency for o in outs if o.inter_token_latency is not None],
        "steps": after["steps"] - before["steps"],
        "split_ms": split,
        "decode_split_ms": _decode_split(before, after),
    }


def _streamed(engine, prompts: list[list[int]], params) -> list[Any]:
    """Each request read token by token by its own consumer thread -> its output."""
    from gptoss_ray.cluster.engine.core import RequestOutput

    outs: list[Any] = [None] * len(prompts)

    def consume(i: int) -> None:
        t0, first, ids = time.perf_counter(), None, []
        for new in engine.stream(prompts[i], params):
            first = first if first is not None else time.perf_counter() - t0
            ids += new
        wall = time.perf_counter() - t0
        itl = (wall - first) / (len(ids) - 1) if len(ids) > 1 else None
        outs[i] = RequestOutput(
            str(i),
            len(prompts[i]),
            ids,
            finished=True,
            finish_reason="length",
            time_to_first_token=first,
            inter_token_latency=itl,
        )

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outs


def sweep(
    model: str,
    *,
    shards: int,
    device: str,
    dtype: str,
    batches: list[int],
    shapes: list[tuple[int, int]],
    repeats: int,
    kv_budget_mb: float,
    overlap: bool = True,
    stream: bool = False,
    null_model: bool = False,
    compiled_steps: bool = False,
) -> list[dict[str, Any]]:
    from gptoss_ray.cluster.client.engine import Engine

    ensure_ray(shards + 1)
    engine = Engine.start(
        model,
        shards=shards,
        device=device,
        dtype=dtype,
        kv_budget_mb=kv_budget_mb,
        max_seqs=max(batches),
        token_budget=max(256, max(batches)),
        overlap=overlap,
        null_model=null_model,
        compiled_steps=compiled_steps,
    )
    rows = []
    try:
        timed_generate(engine, random_prompts(2, 8, seed=99), 4)  # warm-up
        for prompt_len, output_len in shapes:
            for batch in batches:
                runs = [
                    timed_generate(
                        engine, random_prompts(batch, prompt_len, seed=r), output_len, stream
                    )
                    for r in range(repeats)
                ]
                row = summarize(runs) | {
                    "batch": batch,
                    "prompt_len": prompt_len,
                    "output_len": output_len,
                    "overlap": overlap,
                    "compiled_steps": compiled_steps,
                }
                progress(
                    f"   {DRIVEN[compiled_steps]}, {STEPS[overlap]}, batch {batch:>3}, "
                    f"{prompt_len}+{output_len} tokens: {row['tokens_per_s']:.1f} tok/s, "
                    f"TTFT p50 {row['ttft_p50_ms']:.0f} ms, ITL p50 {row['itl_p50_ms']:.1f} ms, "
                    f"overhead {row['overhead_pct']:.1f}% (decoding {row['decode_overhead_pct']:.1f}%)"
                )
                rows.append(row)
    finally:
        engine.shutdown()
    return rows


def latency(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median tokens/s over runs; TTFT and ITL percentiles over all their requests."""
    ttft = [t for r in runs for t in r["ttft_s"]]
    itl = [t for r in runs for t in r["itl_s"]]
    return {
        "tokens_per_s": median([r["tokens"] / r["wall_s"] for r in runs]),
        "ttft_p50_ms": percentile(ttft, 50) * 1e3,
        "ttft_p99_ms": percentile(ttft, 99) * 1e3,
        "itl_p50_ms": percentile(itl, 50) * 1e3,
        "itl_p99_ms": percentile(itl, 99) * 1e3,
        "repeats": len(runs),
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    split = {p: median([r["split_ms"][p] for r in runs]) for p in runs[0]["split_ms"]}
    overhead = [100 * sum(r["split_ms"][p] for p in OVERHEAD) / r["split_ms"]["step"] for r in runs]
    decode = {
        p: median([r["decode_split_ms"][p] for r in runs]) for p in runs[0]["decode_split_ms"]
    }
    decode_overhead = [
        100 * sum(d[p] for p in OVERHEAD) / d["step"]
        for d in (r["decode_split_ms"] for r in runs)
        if d["steps"]
    ]
    return latency(runs) | {
        "step_ms": split["step"],
        "overhead_pct": median(overhead),
        "split_ms": split,
        "decode_step_ms": decode["step"],
        "decode_overhead_pct": median(decode_overhead) if decode_overhead else 0.0,
        "decode_split_ms": decode,
    }


def scaling(
    model: str,
    *,
    shard_counts: list[int],
    device: str,
    dtype: str,
    batch: int,
    prompt_len: int,
    output_len: int,
    repeats: int,
    kv_budget_mb: float,
    replicas: bool = True,
) -> list[dict[str, Any]]:
    from gptoss_ray.cluster.client.engine import Engine

    cores = os.cpu_count() or 1
    ensure_ray(2 * max(shard_counts) + 1)
    rows = []
    for n in shard_counts:
        threads = max(1, cores // n) if device == "cpu" else None
        common = dict(
            device=device,
            dtype=dtype,
            kv_budget_mb=kv_budget_mb,
            max_seqs=max(batch, 1),
            token_budget=max(256, batch),
            threads_per_shard=threads,
        )
        progress(f"-- {n} expert-parallel shard(s)")
        engine = Engine.start(model, shards=n, **common)
        try:
            timed_generate(engine, random_prompts(2, 8, seed=99), 4)
            runs = [
                timed_generate(engine, random_prompts(batch, prompt_len, seed=r), output_len)
                for r in range(repeats)
            ]
        finally:
            engine.shutdown()
        row = {"shards": n, "expert_parallel": summarize(runs)}
        progress(f"   {row['expert_parallel']['tokens_per_s']:.1f} tok/s")
        if replicas:
            progress(f"-- {n} independent replica(s) of one shard")
            row["replicas"] = _replicas(model, n, batch, prompt_len, output_len, repeats, common)
            progress(f"   {row['replicas']['tokens_per_s']:.1f} tok/s")
        rows.append(row)
    return rows


def _replicas(model, n, batch, prompt_len, output_len, repeats, common) -> dict[str, Any]:
    from gptoss_ray.cluster.client.engine import Engine

    engines = [Engine.start(model, shards=1, **common) for _ in range(n)]
    try:
        for e in engines:
            timed_generate(e, random_prompts(2, 8, seed=99), 4)
        runs = []  # each: the replicas' requests together, timed from the first start
        for r in range(repeats):
            prompts = random_prompts(batch, prompt_len, seed=r)
            shares = [prompts[i::n] for i in range(n)]
            results: list[dict | None] = [None] * n

            def run(i: int, shares=shares, results=results) -> None:
                if shares[i]:
                    results[i] = timed_generate(engines[i], shares[i], output_len)

            t0 = time.perf_counter()
            threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            done = [x for x in results if x is not None]
            runs.append(
                {
                    "wall_s": wall,
                    "tokens": sum(x["tokens"] for x in done),
                    "ttft_s": [t for x in done for t in x["ttft_s"]],
                    "itl_s": [t for x in done for t in x["itl_s"]],
                }
            )
    finally:
        for e in engines:
            e.shutdown()
    return latency(runs)


STEPS = {True: "overlapped", False: "one at a time"}
DRIVEN = {True: "compiled graph", False: "actor calls"}


def run_sweep(args: argparse.Namespace, data: dict[str, Any]) -> None:
    modes = {"overlapped": [True], "one-at-a-time": [False], "both": [False, True]}[args.steps]
    drivers = {"actor-calls": [False], "compiled-graph": [True], "both": [False, True]}
    data["results"] = [
        row
        for compiled in drivers[args.driven_by]
        for overlap in modes
        for row in sweep(
            args.model,
            shards=args.shards,
            device=args.device,
            dtype=args.dtype,
            batches=args.batches,
            shapes=args.shapes,
            repeats=args.repeats,
            kv_budget_mb=args.kv_budget_mb,
            overlap=overlap,
            stream=args.stream,
            null_model=args.null_model,
            compiled_steps=compiled,
        )
    ]
    print_sweep(data)
    save("sweep", data, args.out, plot_sweep)


def run_scaling(args: argparse.Namespace, data: dict[str, Any]) -> None:
    data["results"] = scaling(
        args.model,
        shard_counts=args.shards,
        device=args.device,
        dtype=args.dtype,
        batch=args.batch,
        prompt_len=args.prompt_len,
        output_len=args.output_len,
        repeats=args.repeats,
        kv_budget_mb=args.kv_budget_mb,
        replicas=not args.no_replicas,
    )
    print_scaling(data)
    save("scaling", data, args.out, plot_scaling)


def print_sweep(data: dict) -> None:
    a = data["args"]
    what = "null-model shards (no model work)" if a.get("null_model") else "shard(s)"
    consumers = ", each request streamed" if a.get("stream") else ""
    print(
        f"{a['model']} on {a['shards']} {what}, {a['device']} {a['dtype']}{consumers}, "
        f"median of {a['repeats']}"
    )
    print(
        "overhead: the coordinator's exposed time and the round trip, % of the step, over "
        "every step and over steady decoding (decode steps/s beside it)"
    )
    print(
        f"{'driven by':>14} {'steps':>13} {'batch':>5} {'prompt+out':>10} {'tok/s':>8} "
        f"{'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'step ms':>8} "
        f"{'steps/s':>8} {'overhead':>8} {'decoding':>8} {'steps/s':>8}"
    )
    for r in data["results"]:
        decode_ms = r.get("decode_step_ms", 0.0)
        print(
            f"{DRIVEN[r.get('compiled_steps', False)]:>14} {STEPS[r.get('overlap', False)]:>13} "
            f"{r['batch']:>5} {r['prompt_len']:>5}+{r['output_len']:<4} "
            f"{r['tokens_per_s']:>8.1f} {r['ttft_p50_ms']:>7.0f}ms {r['ttft_p99_ms']:>7.0f}ms "
            f"{r['itl_p50_ms']:>6.1f}ms {r['itl_p99_ms']:>6.1f}ms {r['step_ms']:>8.2f} "
            f"{1e3 / r['step_ms'] if r['step_ms'] else 0:>8.0f} {r['overhead_pct']:>7.1f}% "
            f"{r.get('decode_overhead_pct', 0.0):>7.1f}% "
            f"{1e3 / decode_ms if decode_ms else 0:>8.0f}"
        )


def plot_sweep(data: dict, plt) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))

    def line(r: dict) -> tuple:
        return (r["prompt_len"], r["output_len"], r.get("overlap", False), r.get("compiled_steps"))

    for p, o, overlap, compiled in dict.fromkeys(line(r) for r in data["results"]):
        rows = [r for r in data["results"] if line(r) == (p, o, overlap, compiled)]
        label = f"{p}+{o}, {STEPS[overlap]}" + (", compiled graph" if compiled else "")
        x = [r["batch"] for r in rows]
        axes[0].plot(x, [r["tokens_per_s"] for r in rows], "o-", label=label)
        axes[1].plot(x, [r["ttft_p50_ms"] for r in rows], "o-", label=f"{label} p50")
        axes[2].plot(x, [r["itl_p50_ms"] for r in rows], "o-", label=f"{label} p50")
    for ax, what in zip(
        axes,
        ("output tokens/s", "time to first token (ms)", "inter-token latency (ms)"),
        strict=True,
    ):
        ax.set(xscale="log", xlabel="batch (concurrent requests)", ylabel=what)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"{data['args']['model']}, {data['args']['shards']} shard(s) on "
        f"{describe(data['machine'])}",
        fontsize=9,
    )
    fig.tight_layout()


def print_scaling(data: dict) -> None:
    a = data["args"]
    print(
        f"{a['model']}, batch {a['batch']} x ({a['prompt_len']}+{a['output_len']}) tokens, "
        f"{a['device']} {a['dtype']}, median of {a['repeats']}"
    )
    print(
        f"{'shards':>6} {'EP tok/s':>9} {'replicas tok/s':>15} {'EP/replicas':>11} "
        f"{'EP ITL':>8} {'dispatch+combine':>17} {'experts':>8}"
    )
    for r in data["results"]:
        ep, rep = r["expert_parallel"], r.get("replicas")
        ratio = ep["tokens_per_s"] / rep["tokens_per_s"] if rep else None
        a2a = ep["split_ms"]["dispatch"] + ep["split_ms"]["combine"]
        print(
            f"{r['shards']:>6} {ep['tokens_per_s']:>9.1f} "
            f"{fmt(rep and rep['tokens_per_s'], '.1f'):>15} {fmt(ratio, '.2f'):>11} "
            f"{ep['itl_p50_ms']:>6.1f}ms {a2a:>15.2f}ms {ep['split_ms']['experts']:>6.2f}ms"
        )


def plot_scaling(data: dict, plt) -> None:
    rows = data["results"]
    x = [r["shards"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    ax1.plot(x, [r["expert_parallel"]["tokens_per_s"] for r in rows], "o-", label="expert-parallel")
    if all("replicas" in r for r in rows):
        ax1.plot(x, [r["replicas"]["tokens_per_s"] for r in rows], "x--", label="replicas")
    ax1.set(xlabel="shards / replicas", ylabel="output tokens/s (median)", xticks=x)
    ax1.legend()
    bottom = [0.0] * len(rows)
    for phase in (*PHASES, *OVERHEAD):
        values = [r["expert_parallel"]["split_ms"][phase] for r in rows]
        ax2.bar([str(v) for v in x], values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax2.set(xlabel="shards", ylabel="ms per step (median)", title="expert-parallel step split")
    ax2.legend(fontsize=7)
    fig.suptitle(f"{data['args']['model']} on {describe(data['machine'])}", fontsize=9)
    fig.tight_layout()

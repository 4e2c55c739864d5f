"""Engine throughput and where each step's time goes, for several shard counts.

    python benchmarks/bench_engine.py --shards 1 2 4 --prompts 8 --max-tokens 32

For each shard count: start the engine (local Ray, CPU shards unless --device cuda), warm
up, then run the batch --repeats times. Prints the median tokens/s and the median step
time split into attention, gate, dispatch, experts, combine, head (final norm,
unembedding, sampling) and coordinator overhead (the slowest shard's split, per step),
with the machine it ran on; saves JSON and a PNG plot under benchmarks/out/.

The all-to-all is a barrier: a shard's dispatch and combine time includes waiting for
the slowest shard to reach the exchange."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHASES = ("attention", "gate", "dispatch", "experts", "combine", "head", "coordinator")


def machine() -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run(args: argparse.Namespace) -> dict:
    import torch

    from cluster.engine import Engine
    from model.sampling import SamplingParams

    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, 201088, (args.prompt_len,), generator=g).tolist()
        for _ in range(args.prompts)
    ]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    results = []
    for shards in args.shards:
        print(f"-- {shards} shard(s): starting", file=sys.stderr, flush=True)
        engine = Engine.start(
            args.model, shards=shards, device=args.device, dtype=args.dtype,
            token_budget=args.token_budget,
        )  # fmt: skip
        try:
            engine.generate(prompts[:2], params.model_copy(update={"max_tokens": 4}))  # warm-up
            runs = []
            for r in range(args.repeats):
                before = engine.stats()
                t0 = time.perf_counter()
                outs = engine.generate(prompts, params)
                wall = time.perf_counter() - t0
                after = engine.stats()
                steps = after["steps"] - before["steps"]
                tokens = sum(len(o.token_ids) for o in outs)
                split = {
                    p: (after["seconds"].get(p, 0) - before["seconds"].get(p, 0)) / steps
                    for p in PHASES
                }
                step = (after["seconds"]["step"] - before["seconds"]["step"]) / steps
                runs.append({"tokens_per_s": tokens / wall, "wall_s": wall, "steps": steps,
                             "step_ms": step * 1e3,
                             "split_ms": {p: v * 1e3 for p, v in split.items()}})  # fmt: skip
                print(f"   run {r + 1}/{args.repeats}: {tokens / wall:.1f} tok/s, "
                      f"{step * 1e3:.1f} ms/step", file=sys.stderr, flush=True)  # fmt: skip
        finally:
            engine.shutdown()
        results.append({
            "shards": shards,
            "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "median_step_ms": statistics.median(r["step_ms"] for r in runs),
            "median_split_ms": {p: statistics.median(r["split_ms"][p] for r in runs)
                                for p in PHASES},
            "runs": runs,
        })  # fmt: skip
    return {"machine": machine(), "args": vars(args), "results": results}


def report(data: dict) -> None:
    m = data["machine"]
    print(f"machine: {m['platform']}, {m['cpus']} CPUs, torch {m['torch']}"
          + (f", {m['gpu']}" if "gpu" in m else ""))  # fmt: skip
    a = data["args"]
    print(f"model {a['model']} ({a['dtype']}, {a['device']}), {a['prompts']} prompts x "
          f"{a['prompt_len']} tokens, {a['max_tokens']} new tokens each, "
          f"median of {a['repeats']}")  # fmt: skip
    head = f"{'shards':>6} {'tok/s':>8} {'ms/step':>8} " + " ".join(f"{p:>11}" for p in PHASES)
    print(head)
    for r in data["results"]:
        split = " ".join(f"{r['median_split_ms'][p]:>11.2f}" for p in PHASES)
        print(f"{r['shards']:>6} {r['median_tokens_per_s']:>8.1f} {r['median_step_ms']:>8.2f} "
              f"{split}")  # fmt: skip


def plot(data: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no PNG", file=sys.stderr)
        return False
    results = data["results"]
    labels = [str(r["shards"]) for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.bar(labels, [r["median_tokens_per_s"] for r in results], color="tab:blue")
    ax1.set(xlabel="shards", ylabel="tokens/s (median)", title="throughput")
    bottom = [0.0] * len(results)
    for phase in PHASES:
        values = [r["median_split_ms"][phase] for r in results]
        ax2.bar(labels, values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax2.set(xlabel="shards", ylabel="ms per step (median)", title="step time split")
    ax2.legend(fontsize=8)
    m = data["machine"]
    where = m.get("gpu") or f"{m['cpus']} CPUs"
    fig.suptitle(f"{data['args']['model']} on {where}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt-oss-tiny")
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--token-budget", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "out"))
    args = parser.parse_args()
    data = run(args)
    report(data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"engine-{stamp}.json").write_text(json.dumps(data, indent=2))
    print(f"saved {out / f'engine-{stamp}.json'}")
    if plot(data, out / f"engine-{stamp}.png"):
        print(f"saved {out / f'engine-{stamp}.png'}")


if __name__ == "__main__":
    main()

"""`gptoss-ray bench sampling`: what drawing a step's tokens costs, alone and as a share of
a decode step, side by side with another version of the sampler (`--against FILE`: a
`model/sampling.py` of an earlier commit, `git show REV:model/sampling.py > FILE`).

Alone: ms per call of `sample_rows` on a step's logits ([batch, 201088] float32, owned as
a shard owns them) at each batch size, for greedy rows, temperature 1 + top-p 0.9, the
same with repetition / frequency / presence penalties over a 512-token history, and with a
JSON schema's grammar mask; medians of `--repeats` calls. In a step: one in-process shard
of the model decoding a batch at temperature 1 / top-p 0.9, the sampling phase's median
share of the step."""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from types import ModuleType
from typing import Any

from gptoss_ray.benchmarks.common import describe, fmt, median, progress, save

MODES = ("greedy", "top_p", "penalties", "json")
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


def samplers(against: str | None) -> dict[str, ModuleType]:
    from gptoss_ray.model import sampling

    out = {"this": sampling}
    if against:
        spec = importlib.util.spec_from_file_location("sampling_against", against)
        if spec is None or spec.loader is None:
            raise SystemExit(f"--against {against}: not a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        out["against"] = module
    return out


def draws(module: ModuleType, mode: str, batch: int, bitmask: Any) -> list[Any]:
    import random

    from gptoss_ray.model.types import SamplingParams

    kwargs: dict[str, Any] = {"temperature": 1.0, "top_p": 0.9}
    if mode == "greedy":
        kwargs = {"temperature": 0.0}
    elif mode == "penalties":
        kwargs |= {"repetition_penalty": 1.1, "frequency_penalty": 0.5, "presence_penalty": 0.3}
    params = SamplingParams(**kwargs)
    rng = random.Random(batch)
    out = []
    for row in range(batch):
        history = [rng.randrange(200_000) for _ in range(512)] if params.penalized else []
        allowed = bitmask if mode == "json" else None
        out.append(module.Draw(params, row, 7, history[:256], history[256:], allowed=allowed))
    return out


def alone(args: argparse.Namespace, module: ModuleType, mode: str, batch: int) -> float:
    import torch

    from gptoss_ray.model.grammar import Matchers, check_schema
    from gptoss_ray.model.tokenizer import VOCAB_SIZE

    bitmask = None
    if mode == "json":
        matchers = Matchers()
        matchers.start("0", check_schema(SCHEMA, "bench"), [])
        bitmask = matchers.masks(["0"])[0]
    device = torch.device(args.device)
    logits = torch.randn(batch, VOCAB_SIZE, generator=torch.Generator().manual_seed(0)) * 2
    logits = logits.to(device)
    rows = draws(module, mode, batch, bitmask)
    times = []
    for i in range(args.repeats + 2):  # two warm-ups
        owned = logits.clone()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        module.sample_rows(owned, rows, owned=True)  # reads the tokens back: synchronises
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 1e3 * median(times)


def in_a_step(args: argparse.Namespace, module: ModuleType) -> dict[str, float]:
    """A batch decoding at temperature 1 / top-p 0.9 on one in-process shard: the
    sampling phase's median ms and share of the step (`module`'s sampler)."""
    import random

    import torch

    from gptoss_ray.cluster.engine_core import EngineCore
    from gptoss_ray.model.types import KVLayout, SamplingParams
    from gptoss_ray.router.transport import LocalTransport
    from gptoss_ray.shards import shard as shard_module

    batch, steps = args.step_batch, args.step_steps
    layout = KVLayout(16, 8 * batch + 64, 256)
    shard = shard_module.Shard(
        args.model,
        rank=0,
        world_size=1,
        transport=LocalTransport(),
        dtype=torch.float32,
        device=args.device,
        kv_layout=layout,
    )
    phases: list[dict[str, float]] = []
    walls: list[float] = []

    def run_step(plans):
        t0 = time.perf_counter()
        result = shard.step(plans[0])
        walls.append(time.perf_counter() - t0)
        phases.append(dict(result.seconds))
        return [result]

    params = SamplingParams(max_tokens=steps + 8, temperature=1.0, top_p=0.9, ignore_eos=True)
    core = EngineCore(shard.config, 1, layout, run_step, overlap=False, max_seqs=max(64, batch))
    rng = random.Random(0)
    original = shard_module.sample_rows
    shard_module.sample_rows = module.sample_rows
    try:
        for _ in range(batch):
            core.submit([rng.randrange(1000, 100_000) for _ in range(16)], params)
        for _ in range(3):  # prefill and warm-up
            core.step()
        phases.clear(), walls.clear()
        for _ in range(steps):
            core.step()
    finally:
        shard_module.sample_rows = original
    sampling = [p.get("sampling", 0.0) for p in phases]
    return {
        "step_ms": 1e3 * median(walls),
        "sampling_ms": 1e3 * median(sampling),
        "share": median([s / w for s, w in zip(sampling, walls, strict=True)]),
    }


def run(args: argparse.Namespace, data: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    which = samplers(args.against)
    data["settings"] = {
        "device": args.device,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "against": args.against,
        "model": args.model,
        "step_batch": args.step_batch,
    }
    data["alone"] = {}
    for name, module in which.items():
        for batch in args.batches:
            for mode in MODES:
                progress(f"{name}: batch {batch}, {mode}")
                data["alone"][f"{name}/{mode}@{batch}"] = alone(args, module, mode, batch)
    data["in_a_step"] = {}
    if args.step_batch:
        for name, module in which.items():
            progress(f"{name}: batch {args.step_batch} decoding on {args.model}")
            data["in_a_step"][name] = in_a_step(args, module)
    print(describe(data["machine"]))
    print(f"sample_rows on [batch, 201088] float32 logits, {args.device}; medians, ms per call")
    print(f"{'sampler':>8} {'batch':>5} " + " ".join(f"{m:>10}" for m in MODES))
    for name in which:
        for batch in args.batches:
            cells = [data["alone"][f"{name}/{m}@{batch}"] for m in MODES]
            print(f"{name:>8} {batch:>5} " + " ".join(f"{fmt(c, '.2f'):>10}" for c in cells))
    for name, r in data["in_a_step"].items():
        print(
            f"{name}: {args.model} float32 decoding {args.step_batch} sequences at temperature 1 "
            f"/ top-p 0.9: step {r['step_ms']:.1f} ms, sampling {r['sampling_ms']:.1f} ms "
            f"({100 * r['share']:.1f}% of the step)"
        )
    save("sampling", data, args.out, plot)


def plot(data: dict[str, Any], plt: Any) -> None:
    fig, axes = plt.subplots(1, len(MODES), figsize=(4 * len(MODES), 3.5), sharey=True)
    keys = data["alone"]
    for ax, mode in zip(axes, MODES, strict=True):
        for name in sorted({k.split("/")[0] for k in keys}):
            points = sorted(
                (int(k.split("@")[1]), v)
                for k, v in keys.items()
                if k.startswith(f"{name}/{mode}@")
            )
            ax.plot([b for b, _ in points], [v for _, v in points], marker="o", label=name)
        ax.set_title(mode)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
    axes[0].set_ylabel("ms per call (median)")
    axes[0].legend()
    fig.tight_layout()

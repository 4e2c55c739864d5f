"""`gptoss-ray bench sampling`: what drawing a step's tokens costs, alone and as a share of
a decode step, side by side with another version of the sampler (`--against FILE`: a
`model/sampling.py` of an earlier commit, `git show REV:model/sampling.py > FILE`).

Alone: ms per call of `sample_rows` on a step's logits ([batch, 201088] float32, owned as
a shard owns them) at each batch size, for greedy rows, temperature 1 + top-p 0.9, the
same with repetition / frequency / presence penalties over a 512-token history, and with a
JSON schema's grammar mask; medians of `--repeats` calls. In a batch: `--step-batch`
requests submitted at once to one in-process shard of the model, greedy and then at
temperature 1 / top-p 0.9: the batch's wall time, and the sampling phase's median share of
a decode step."""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import sys
import time
from types import ModuleType
from typing import Any

from gptoss_ray.benchmarks.common import describe, fmt, median, progress, save
from gptoss_ray.model.types import cdiv

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


def in_a_batch(args: argparse.Namespace, module: ModuleType, temperature: float) -> dict:
    """`--step-batch` requests of `--step-tokens` tokens each (32-token prompts) on one
    in-process shard of the model, float32, all submitted at once and run to the end with
    `module`'s sampler -> the batch's wall time, and the sampling phase's median ms and
    share of a decode step."""
    import random

    import torch

    from gptoss_ray.cluster.engine.core import EngineCore
    from gptoss_ray.model.types import KVLayout, SamplingParams
    from gptoss_ray.router.transport import LocalTransport
    from gptoss_ray.shards import shard as shard_module

    batch, tokens = args.step_batch, args.step_tokens
    layout = KVLayout(16, batch * (cdiv(32 + tokens, 16) + 1) + 16, 256)
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
        phases.append(dict(result.seconds) if plans[0].tokens == batch else {})
        return [result]

    params = SamplingParams(
        max_tokens=tokens, temperature=temperature, top_p=0.9, seed=1, ignore_eos=True
    )
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 100_000) for _ in range(32)] for _ in range(batch)]
    original = shard_module.sample_rows
    shard_module.sample_rows = _without_unknown_options(module.sample_rows)
    try:
        core = EngineCore(shard.config, 1, layout, run_step, overlap=False, max_seqs=batch)
        core.submit(prompts[0], params.model_copy(update={"max_tokens": 2}))
        core.run_until_done()  # warm: the first step's one-time costs
        walls.clear(), phases.clear()
        t0 = time.perf_counter()
        for prompt in prompts:
            core.submit(prompt, params)
        core.run_until_done()
        wall = time.perf_counter() - t0
    finally:
        shard_module.sample_rows = original
    decode = [(p["sampling"], w) for p, w in zip(phases, walls, strict=True) if p]
    return {
        "batch_s": wall,
        "decode_step_ms": 1e3 * median([w for _, w in decode]),
        "sampling_ms": 1e3 * median([s for s, _ in decode]),
        "share": median([s / w for s, w in decode]),
    }


def _without_unknown_options(sample_rows: Any) -> Any:
    """An earlier sampler, called as the shard calls this one (options it lacks dropped)."""
    known = inspect.signature(sample_rows).parameters

    def call(logits: Any, draws: Any, **options: Any) -> Any:
        return sample_rows(logits, draws, **{k: v for k, v in options.items() if k in known})

    return call


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
    data["in_a_batch"] = {}
    if args.step_batch:
        for name, module in which.items():
            for temperature in (0.0, 1.0):
                progress(f"{name}: {args.step_batch} requests at temperature {temperature:g}")
                data["in_a_batch"][f"{name}@{temperature:g}"] = in_a_batch(
                    args, module, temperature
                )
    print(describe(data["machine"]))
    print(f"sample_rows on [batch, 201088] float32 logits, {args.device}; medians, ms per call")
    print(f"{'sampler':>8} {'batch':>5} " + " ".join(f"{m:>10}" for m in MODES))
    for name in which:
        for batch in args.batches:
            cells = [data["alone"][f"{name}/{m}@{batch}"] for m in MODES]
            print(f"{name:>8} {batch:>5} " + " ".join(f"{fmt(c, '.2f'):>10}" for c in cells))
    if data["in_a_batch"]:
        print(
            f"{args.step_batch} requests of {args.step_tokens} tokens at once, {args.model} "
            "float32, one in-process shard: greedy vs temperature 1 / top-p 0.9"
        )
        print(
            f"{'sampler':>8} {'temp':>5} {'batch s':>8} {'vs greedy':>9} {'step ms':>8} "
            f"{'sampling ms':>11} {'share':>6}"
        )
    for name in which:
        for temperature in ("0", "1"):
            r = data["in_a_batch"].get(f"{name}@{temperature}")
            if r is None:
                continue
            r["vs_greedy"] = r["batch_s"] / data["in_a_batch"][f"{name}@0"]["batch_s"]
            print(
                f"{name:>8} {temperature:>5} {r['batch_s']:>8.2f} {r['vs_greedy']:>9.2f} "
                f"{r['decode_step_ms']:>8.1f} {r['sampling_ms']:>11.2f} "
                f"{100 * r['share']:>5.1f}%"
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

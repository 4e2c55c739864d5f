"""The kernels alone, in gpt-oss shapes, against their memory floor: the grouped MXFP4
expert matmuls over block-size and warp variants, beside the torch path they replace,
and the paged sink attention for decode over a range of contexts.

The floor of a call is the bytes it must move (each expert weight it touches read once,
its activations read and written once) over the copy bandwidth measured in the same run.
On a GPU every time is the median of CUDA-event timings (`triton.testing.do_bench`), the
weights rotated over several layers' worth so that the 50 MB cache does not serve them;
on a CPU the kernels run in Triton's interpreter, which checks only that the program
works (use the tiny model there). Every variant's output is also checked against the
float32 torch reference (relative error of the whole output)."""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from gptoss_ray.benchmarks.common import describe, progress, save

# the first is the default (the kernel chosen from the shapes); then each kernel forced;
# launch options go straight to Triton. `gptoss-ray bench sass` tells, without a GPU, what
# each costs in instructions per byte.
VARIANTS: list[dict[str, int]] = [
    {},
    {"one_row": True, "block_n": 64, "num_warps": 2},
    {"one_row": True, "block_n": 128, "num_warps": 4},
    {"one_row": True, "block_n": 32, "num_warps": 1},
    {"one_row": False, "block_m": 16, "block_n": 128, "num_warps": 2},
    {"one_row": False, "block_m": 16, "block_n": 128, "num_warps": 4},
    {"one_row": False, "block_m": 16, "block_n": 256, "num_warps": 4},
    {"one_row": False, "block_m": 16, "block_n": 128, "num_warps": 2, "num_stages": 4},
    {"one_row": False, "block_m": 32, "block_n": 128, "num_warps": 2},
    {"one_row": False, "block_m": 32, "block_n": 128, "num_warps": 4},
    {"one_row": False, "block_m": 64, "block_n": 128, "num_warps": 4},
]


def bench(fn: Callable[[], Any], device: torch.device) -> float:
    """Median seconds of fn()."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    from gptoss_ray.benchmarks.scaling_model import median_time

    return median_time(fn, 3, device)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def _timing(sec: float, moved: int, floor: float, err: float) -> dict[str, float]:
    """One timed call against its memory floor (seconds at the bandwidth limit)."""
    return {
        "us": sec * 1e6,
        "bytes": moved,
        "gb_s": moved / sec / 1e9,
        "of_floor": floor / sec,
        "rel_error": err,
    }


def expert_bytes(config) -> int:
    """One expert's MXFP4 weights, scales and biases (both matmuls)."""
    h, i = config.hidden_size, config.intermediate_size
    return 2 * i * (h // 2 + h // 32 + 2) + h * (i // 2 + i // 32 + 2)


def moe(config, tokens: list[int], variants: list[dict[str, int]], device, bandwidth, layers):
    from gptoss_ray.model.checkpoint import randomize_
    from gptoss_ray.model.model import ExpertSlice

    e, k, h = config.num_experts, config.experts_per_token, config.hidden_size
    with torch.device(device):
        slices = [randomize_(ExpertSlice(config, 0, e), seed) for seed in range(layers)]
    g = torch.Generator().manual_seed(0)
    rows = []
    for t in tokens:
        experts = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).reshape(-1)
        x = torch.randn(t * k, h, generator=g).to(device, torch.bfloat16)
        experts = experts.to(device)
        touched = len(set(experts.tolist()))
        moved = touched * expert_bytes(config) + t * k * (4 * h + 4 * config.intermediate_size)
        floor = moved / bandwidth
        ref = slices[0].run_grouped(x.float(), experts)  # the torch path in float32
        cycle = itertools.cycle(slices)
        named = [(_name(v), partial(_moe_call, cycle, x, experts, v)) for v in variants]
        named.append(("torch", partial(_torch_call, cycle, x, experts)))
        for name, fn in named:
            err = rel_error(fn(), ref)
            sec = bench(fn, device)
            rows.append(
                {
                    "tokens": t,
                    "pairs": t * k,
                    "experts_touched": touched,
                    "variant": name,
                    **_timing(sec, moved, floor, err),
                }
            )
            progress(
                f"   moe, {t:>3} tokens, {name:<24} {sec * 1e6:9.1f} us  "
                f"{100 * floor / sec:5.1f}% of floor  err {err:.1e}"
            )
    return rows


def _moe_call(slices, x, experts, variant):
    from gptoss_ray.model.kernels.mxfp4_matmul import moe_mxfp4

    s = next(slices)  # the next layer's weights: not in the cache
    return moe_mxfp4(
        x,
        experts,
        (s.mlp1_blocks, s.mlp1_scales, s.mlp1_bias),
        (s.mlp2_blocks, s.mlp2_scales, s.mlp2_bias),
        alpha=s.alpha,
        limit=s.limit,
        **variant,
    )


def _torch_call(slices, x, experts):
    return next(slices).run_grouped(x, experts)


def _name(variant: dict[str, int]) -> str:
    if not variant:
        return "default"
    short = {"block_m": "m", "block_n": "n", "num_warps": "w", "num_stages": "s"}
    kernel = "rows" if variant.get("one_row") else "tiles"
    rest = " ".join(f"{short[key]}{value}" for key, value in variant.items() if key in short)
    return f"{kernel} {rest}"


def attention(config, batches: list[int], contexts: list[int], device, bandwidth):
    from gptoss_ray.model.kernels.attention import paged_attention
    from gptoss_ray.model.kv_cache import AttentionTables
    from gptoss_ray.model.model import attention_with_sinks

    hq, hkv, d, bs = config.num_attention_heads, config.num_key_value_heads, config.head_dim, 16
    g = torch.Generator().manual_seed(1)
    rows = []
    for s, length in itertools.product(batches, contexts):
        per_seq = -(-length // bs)
        blocks = s * per_seq
        k_pool = torch.randn(blocks, bs, hkv, d, generator=g).to(device, torch.bfloat16)
        v_pool = torch.randn(blocks, bs, hkv, d, generator=g).to(device, torch.bfloat16)
        q = torch.randn(s, hq, d, generator=g).to(device, torch.bfloat16)
        sinks = torch.randn(hq, generator=g).to(device)
        table = torch.randperm(blocks, generator=g).view(s, per_seq).to(torch.int32)
        tables = AttentionTables(
            table.to(device),
            torch.zeros(s, dtype=torch.int32, device=device),
            [length - 1] * s,
            [1] * s,
        )
        for window in (None, config.sliding_window):
            seen = length if window is None else min(length, window)
            moved = s * seen * hkv * d * 2 * 2 + 2 * q.numel() * 2
            floor = moved / bandwidth

            call = partial(paged_attention, q, k_pool, v_pool, sinks, tables, window=window)
            ref = torch.cat(
                [
                    attention_with_sinks(
                        q[i : i + 1].float(),
                        k_pool[table[i].long()].reshape(-1, hkv, d)[:length],
                        v_pool[table[i].long()].reshape(-1, hkv, d)[:length],
                        sinks,
                        q_offset=length - 1,
                        window=window,
                    ).float()
                    for i in range(s)
                ]
            )
            err = rel_error(call(), ref)
            sec = bench(call, device)
            kind = "full" if window is None else f"window {window}"
            rows.append(
                {
                    "sequences": s,
                    "context": length,
                    "layer": kind,
                    **_timing(sec, moved, floor, err),
                }
            )
            progress(
                f"   attention, {s:>3} x {length:>5} ({kind:<10}) {sec * 1e6:9.1f} us  "
                f"{100 * floor / sec:5.1f}% of floor  err {err:.1e}"
            )
    return rows


def kernels(
    config_name: str,
    *,
    device: str,
    tokens: list[int],
    contexts: list[int],
    batches: list[int],
    variants: list[int] | None = None,
    layers: int | None = None,
) -> dict[str, Any]:
    from gptoss_ray.benchmarks.fullsize import copy_bandwidth
    from gptoss_ray.model.config import ModelConfig

    config = ModelConfig.preset(config_name)
    dev = torch.device(device)
    chosen = [VARIANTS[i] for i in variants] if variants is not None else VARIANTS
    layers = layers or (4 if dev.type == "cuda" else 1)
    bandwidth = copy_bandwidth(device)
    progress(
        f"-- kernels in {config_name} shapes on {device}; copy bandwidth {bandwidth / 1e9:.0f} GB/s"
    )
    return {
        "model": config_name,
        "device": device,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "moe": moe(config, tokens, chosen, dev, bandwidth, layers),
        "attention": attention(config, batches, contexts, dev, bandwidth),
    }


def run(args: argparse.Namespace, data: dict[str, Any]) -> None:
    data["results"] = kernels(
        args.model,
        device=args.device,
        tokens=args.tokens,
        contexts=args.contexts,
        batches=args.batches,
        variants=args.variants,
    )
    print_table(data)
    save("kernels", data, args.out, plot)


def print_table(data: dict) -> None:
    r = data["results"]
    print(
        f"{r['model']} shapes on {r['device']}; copy bandwidth "
        f"{r['copy_bandwidth_gb_s']:.0f} GB/s; medians"
    )
    print(
        f"{'MoE tokens':>10} {'variant':<26} {'us':>9} {'GB/s':>7} {'of floor':>8} {'rel err':>8}"
    )
    for m in r["moe"]:
        print(
            f"{m['tokens']:>10} {m['variant']:<26} {m['us']:>9.1f} {m['gb_s']:>7.0f} "
            f"{100 * m['of_floor']:>7.1f}% {m['rel_error']:>8.1e}"
        )
    print(f"{'attention':>10} {'sequences x context':<26} {'us':>9} {'GB/s':>7} {'of floor':>8}")
    for a in r["attention"]:
        shape = f"{a['sequences']} x {a['context']} ({a['layer']})"
        print(
            f"{'':>10} {shape:<26} {a['us']:>9.1f} {a['gb_s']:>7.0f} "
            f"{100 * a['of_floor']:>7.1f}% {a['rel_error']:>8.1e}"
        )


def plot(data: dict, plt) -> None:
    r = data["results"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    for variant in dict.fromkeys(m["variant"] for m in r["moe"]):
        rows = [m for m in r["moe"] if m["variant"] == variant]
        ax1.plot(
            [m["tokens"] for m in rows], [100 * m["of_floor"] for m in rows], "o-", label=variant
        )
    ax1.set(
        xscale="log",
        xlabel="tokens per MoE call",
        ylabel="% of the memory floor",
        title="grouped MXFP4 experts (median)",
    )
    ax1.legend(fontsize=7)
    labels = [f"{a['sequences']}x{a['context']}\n{a['layer']}" for a in r["attention"]]
    ax2.bar(labels, [100 * a["of_floor"] for a in r["attention"]])
    ax2.set(ylabel="% of the memory floor", title="paged sink attention, decode (median)")
    ax2.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"{r['model']} shapes on {describe(data['machine'])}", fontsize=9)
    fig.tight_layout()

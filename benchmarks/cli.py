"""`gptoss-ray bench`: throughput and latency sweeps, shard scaling against replicas, the
calibrated scaling model, and full-size random-weight runs. Each prints its table with
the machine, and saves JSON and a PNG under --out."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from gptoss_ray.benchmarks.common import DEFAULT_OUT, describe, machine, save


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _shapes(text: str) -> list[tuple[int, int]]:
    """'128x64,512x128' -> [(128, 64), (512, 128)] (prompt x output tokens)."""
    out = []
    for part in text.split(","):
        try:
            p, o = part.lower().split("x")
            out.append((int(p), int(o)))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{part!r}: expected PROMPTxOUTPUT, like 128x64"
            ) from None
    return out


def build_parser() -> argparse.ArgumentParser:
    from gptoss_ray.benchmarks.scaling_model import Links

    parser = argparse.ArgumentParser(prog="gptoss-ray bench", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for JSON and PNG")
    sub = parser.add_subparsers(dest="what", required=True)

    def engine_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="gpt-oss-tiny")
        p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
        p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
        p.add_argument("--repeats", type=int, default=3)
        p.add_argument("--kv-budget-mb", type=float, default=512)

    sweep = sub.add_parser("sweep", help="throughput, TTFT and ITL against batch size")
    engine_args(sweep)
    sweep.add_argument("--shards", type=int, default=2)
    sweep.add_argument("--batches", type=_ints, default=[1, 4, 16, 64, 256])
    sweep.add_argument("--shapes", type=_shapes, default=[(128, 32), (512, 32)],
                       help="prompt x output tokens, comma-separated (default 128x32,512x32)")  # fmt: skip

    scaling = sub.add_parser("scaling", help="1..8 expert-parallel shards vs replicas")
    engine_args(scaling)
    scaling.add_argument("--shards", type=_ints, default=[1, 2, 4, 8])
    scaling.add_argument("--batch", type=int, default=32)
    scaling.add_argument("--prompt-len", type=int, default=64)
    scaling.add_argument("--output-len", type=int, default=32)
    scaling.add_argument("--no-replicas", action="store_true")

    model = sub.add_parser("model", help="calibrate on this device, predict 1..64 GPUs")
    model.add_argument("--calibrate-on", default="gpt-oss-20b",
                       help="layer shapes to time (default gpt-oss-20b; both models share them)")  # fmt: skip
    model.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    model.add_argument("--batches", type=_ints, default=[1, 8, 32, 64])
    model.add_argument("--contexts", type=_ints, default=[128, 1024])
    model.add_argument("--repeats", type=int, default=5)
    model.add_argument("--context", type=int, default=2048, help="context of the prediction")
    model.add_argument("--gpus", type=_ints, default=[1, 2, 4, 8, 16, 32, 64])
    model.add_argument("--gpu-memory-gb", type=float, default=80.0)
    model.add_argument("--calibration", help="reuse a saved calibration (JSON) instead")
    model.add_argument("--expert-load", help="JSON {model: [load per expert]} (measured routing)")
    for f in fields(Links):
        model.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)

    full = sub.add_parser("fullsize", help="random full-size model on one GPU vs transformers")
    full.add_argument(
        "--model", default="gpt-oss-20b", choices=("gpt-oss-20b", "gpt-oss-120b", "gpt-oss-tiny")
    )
    full.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    full.add_argument("--batches", type=_ints, default=[1, 64, 256])
    full.add_argument("--prompt-len", type=int, default=128)
    full.add_argument("--output-len", type=int, default=64)
    full.add_argument("--no-peer", action="store_true", help="skip transformers")
    full.add_argument("--kernels", choices=("auto", "on", "off"), default="auto")
    full.add_argument(
        "--graphs", choices=("auto", "on", "off"), default="auto",
        help="decode steps from CUDA graphs (auto: on a GPU with the kernels)",
    )  # fmt: skip
    static = sub.add_parser(
        "sass", help="the kernels compiled for a GPU, here: resources, issue cost per byte"
    )
    static.add_argument(
        "--model", default="gpt-oss-20b", choices=("gpt-oss-20b", "gpt-oss-120b", "gpt-oss-tiny")
    )
    static.add_argument("--arch", type=int, choices=(80, 90), default=90, help="sm_80 or sm_90")
    static.add_argument("--tokens", type=_ints, default=[1, 64], help="tokens per MoE call")
    static.add_argument("--contexts", type=_ints, default=[1024, 8192], help="decode contexts")
    kern = sub.add_parser("kernels", help="the Triton kernels alone against the memory floor")
    kern.add_argument(
        "--model", default="gpt-oss-20b", choices=("gpt-oss-20b", "gpt-oss-120b", "gpt-oss-tiny")
    )
    kern.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    kern.add_argument("--tokens", type=_ints, default=[1, 4, 16, 64, 256],
                      help="tokens per MoE call (4 expert rows each)")  # fmt: skip
    kern.add_argument("--batches", type=_ints, default=[1, 64], help="decoding sequences")
    kern.add_argument("--contexts", type=_ints, default=[1024, 8192], help="tokens of context")
    kern.add_argument("--variants", type=_ints, default=None,
                      help="which MoE block-size variants (indices; default all)")  # fmt: skip
    return parser


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.what == "sass":
        # compiled, never run: the interpreter would replace the kernels (cleared before the
        # kernel modules are imported, below)
        os.environ.pop("TRITON_INTERPRET", None)
    elif getattr(args, "device", None) == "cpu":
        # Triton kernels on CPU tensors run only in its interpreter, which must be on
        # before a kernel is defined (the kernel modules are imported lazily, below)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    data: dict[str, Any] = {"machine": machine(), "args": vars(args)}
    print(f"machine: {describe(data['machine'])}")
    if args.what == "sweep":
        from gptoss_ray.benchmarks.engine_runs import sweep

        data["results"] = sweep(
            args.model, shards=args.shards, device=args.device, dtype=args.dtype,
            batches=args.batches, shapes=args.shapes, repeats=args.repeats,
            kv_budget_mb=args.kv_budget_mb,
        )  # fmt: skip
        _print_sweep(data)
        save("sweep", data, args.out, _plot_sweep)
    elif args.what == "scaling":
        from gptoss_ray.benchmarks.engine_runs import scaling

        data["results"] = scaling(
            args.model, shard_counts=args.shards, device=args.device, dtype=args.dtype,
            batch=args.batch, prompt_len=args.prompt_len, output_len=args.output_len,
            repeats=args.repeats, kv_budget_mb=args.kv_budget_mb, replicas=not args.no_replicas,
        )  # fmt: skip
        _print_scaling(data)
        save("scaling", data, args.out, _plot_scaling)
    elif args.what == "model":
        data |= _model(args)
        _print_model(data)
        from gptoss_ray.benchmarks.scaling_model import plot

        save("scaling-model", data, args.out, plot)
    elif args.what == "sass":
        from gptoss_ray.benchmarks.sass import sass

        data["results"] = sass(args.model, arch=args.arch, tokens=args.tokens,
                               contexts=args.contexts)  # fmt: skip
        _print_sass(data)
        save("sass", data, args.out, _plot_sass)
    elif args.what == "kernels":
        from gptoss_ray.benchmarks.kernels import kernels

        data["results"] = kernels(
            args.model, device=args.device, tokens=args.tokens, contexts=args.contexts,
            batches=args.batches, variants=args.variants,
        )  # fmt: skip
        _print_kernels(data)
        save("kernels", data, args.out, _plot_kernels)
    else:
        from gptoss_ray.benchmarks.fullsize import fullsize

        switch = {"auto": None, "on": True, "off": False}
        data["results"] = fullsize(
            args.model, device=args.device, batches=args.batches, prompt_len=args.prompt_len,
            output_len=args.output_len, peer=not args.no_peer, kernels=switch[args.kernels],
            graphs=switch[args.graphs],
        )  # fmt: skip
        _print_fullsize(data)
        save("fullsize", data, args.out, None)
    return 0


def _model(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from gptoss_ray.benchmarks.scaling_model import Calibration, Links, calibrate, scaling_table

    if args.calibration:
        raw = json.loads(Path(args.calibration).read_text())
        cal = Calibration(**raw.get("calibration", raw))
    else:
        print(f"calibrating on {args.device} with {args.calibrate_on} layer shapes")
        cal = calibrate(
            args.calibrate_on, device=args.device, dtype=torch.bfloat16,
            batches=tuple(args.batches), contexts=tuple(args.contexts), repeats=args.repeats,
        )  # fmt: skip
    links = Links(**{f.name: getattr(args, f.name) for f in fields(Links)})
    loads = json.loads(Path(args.expert_load).read_text()) if args.expert_load else None
    return scaling_table(cal, gpu_counts=tuple(args.gpus), context=args.context, links=links,
                         gpu_memory_gb=args.gpu_memory_gb, loads=loads)  # fmt: skip


def _fmt(x: float | None, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def _print_sweep(data: dict) -> None:
    a = data["args"]
    print(f"{a['model']} on {a['shards']} shard(s), {a['device']} {a['dtype']}, "
          f"median of {a['repeats']}")  # fmt: skip
    print(f"{'batch':>5} {'prompt+out':>10} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'ITL p50':>8} {'ITL p99':>8} {'step ms':>8} {'overhead':>8}")  # fmt: skip
    for r in data["results"]:
        print(f"{r['batch']:>5} {r['prompt_len']:>5}+{r['output_len']:<4} "
              f"{r['tokens_per_s']:>8.1f} {r['ttft_p50_ms']:>7.0f}ms {r['ttft_p99_ms']:>7.0f}ms "
              f"{r['itl_p50_ms']:>6.1f}ms {r['itl_p99_ms']:>6.1f}ms {r['step_ms']:>8.2f} "
              f"{r['overhead_pct']:>7.1f}%")  # fmt: skip


def _plot_sweep(data: dict, plt) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    shapes = dict.fromkeys((r["prompt_len"], r["output_len"]) for r in data["results"])
    for p, o in shapes:
        rows = [r for r in data["results"] if (r["prompt_len"], r["output_len"]) == (p, o)]
        x = [r["batch"] for r in rows]
        axes[0].plot(x, [r["tokens_per_s"] for r in rows], "o-", label=f"{p}+{o}")
        axes[1].plot(x, [r["ttft_p50_ms"] for r in rows], "o-", label=f"{p}+{o} p50")
        axes[2].plot(x, [r["itl_p50_ms"] for r in rows], "o-", label=f"{p}+{o} p50")
    for ax, what in zip(axes, ("output tokens/s", "time to first token (ms)",
                               "inter-token latency (ms)"), strict=True):  # fmt: skip
        ax.set(xscale="log", xlabel="batch (concurrent requests)", ylabel=what)
        ax.legend(fontsize=8)
    fig.suptitle(f"{data['args']['model']}, {data['args']['shards']} shard(s) on "
                 f"{describe(data['machine'])}", fontsize=9)  # fmt: skip
    fig.tight_layout()


def _print_scaling(data: dict) -> None:
    a = data["args"]
    print(f"{a['model']}, batch {a['batch']} x ({a['prompt_len']}+{a['output_len']}) tokens, "
          f"{a['device']} {a['dtype']}, median of {a['repeats']}")  # fmt: skip
    print(f"{'shards':>6} {'EP tok/s':>9} {'replicas tok/s':>15} {'EP/replicas':>11} "
          f"{'EP ITL':>8} {'dispatch+combine':>17} {'experts':>8}")  # fmt: skip
    for r in data["results"]:
        ep, rep = r["expert_parallel"], r.get("replicas")
        ratio = ep["tokens_per_s"] / rep["tokens_per_s"] if rep else None
        a2a = ep["split_ms"]["dispatch"] + ep["split_ms"]["combine"]
        print(f"{r['shards']:>6} {ep['tokens_per_s']:>9.1f} "
              f"{_fmt(rep and rep['tokens_per_s'], '.1f'):>15} {_fmt(ratio, '.2f'):>11} "
              f"{ep['itl_p50_ms']:>6.1f}ms {a2a:>15.2f}ms {ep['split_ms']['experts']:>6.2f}ms")  # fmt: skip


def _plot_scaling(data: dict, plt) -> None:
    from gptoss_ray.benchmarks.engine_runs import OVERHEAD, PHASES

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


def _print_model(data: dict) -> None:
    cal = data["calibration"]
    print(f"calibrated on {cal['device']} ({cal['dtype']}, kernels "
          f"{'on' if cal['kernels'] else 'off'}); context {data['context']}; links "
          f"{data['links']}")  # fmt: skip
    print(f"{'model':>13} {'GPUs':>4} {'batch/GPU':>9} {'EP tok/s':>10} {'replicas':>10} "
          f"{'EP/rep':>6} {'a2a ms/layer':>12}")  # fmt: skip
    for r in data["predictions"]:
        ep, rep = r["expert_parallel_tokens_per_s"], r["replicas_tokens_per_s"]
        ratio = ep / rep if ep and rep else None
        batch = str(r["batch_per_gpu"])
        if r["batch_label"] == "max":
            batch = f"max {r['batch_per_gpu']}/{r['replica_batch_per_gpu']}"
        print(f"{r['model']:>13} {r['gpus']:>4} {batch:>9} {_fmt(ep):>10} {_fmt(rep):>10} "
              f"{_fmt(ratio, '.2f'):>6} {r['all_to_all_ms_per_layer']:>12.3f}")  # fmt: skip


def _print_fullsize(data: dict) -> None:
    r = data["results"]
    print(f"{r['model']} (random weights) on {r['device']}, kernels "
          f"{'on' if r['kernels'] else 'off'}, prompt {r['prompt_len']}, output "
          f"{r['output_len']}; copy bandwidth {r['copy_bandwidth_gb_s']:.0f} GB/s, batch-1 "
          f"limit {r['bandwidth_limit_tokens_per_s']:.0f} tok/s")  # fmt: skip
    peer = {p["batch"]: p for p in r["transformers"]} if isinstance(r["transformers"], list) else {}
    print(f"{'batch':>5} {'graphs':>6} {'ours tok/s':>10} {'decode tok/s':>12} "
          f"{'of limit':>8} {'coord.':>6} {'transformers':>12} {'ratio':>6}")  # fmt: skip
    for o in r["ours"]:
        p = peer.get(o["batch"])
        ratio = o["tokens_per_s"] / p["tokens_per_s"] if p else None
        share = o.get("share_of_bandwidth_limit")
        share = f"{100 * share:.0f}%" if share is not None else "-"
        print(f"{o['batch']:>5} {'on' if o['decode_graphs'] else 'off':>6} "
              f"{o['tokens_per_s']:>10.1f} {o['decode_tokens_per_s']:>12.1f} {share:>8} "
              f"{o['coordinator_pct']:>5.1f}% "
              f"{_fmt(p and p['tokens_per_s'], '.1f'):>12} {_fmt(ratio, '.2f'):>6}")  # fmt: skip
    if isinstance(r["transformers"], str):
        print(r["transformers"])


def _print_kernels(data: dict) -> None:
    r = data["results"]
    print(f"{r['model']} shapes on {r['device']}; copy bandwidth "
          f"{r['copy_bandwidth_gb_s']:.0f} GB/s; medians")  # fmt: skip
    print(
        f"{'MoE tokens':>10} {'variant':<26} {'us':>9} {'GB/s':>7} {'of floor':>8} {'rel err':>8}"
    )
    for m in r["moe"]:
        print(f"{m['tokens']:>10} {m['variant']:<26} {m['us']:>9.1f} {m['gb_s']:>7.0f} "
              f"{100 * m['of_floor']:>7.1f}% {m['rel_error']:>8.1e}")  # fmt: skip
    print(f"{'attention':>10} {'sequences x context':<26} {'us':>9} {'GB/s':>7} {'of floor':>8}")
    for a in r["attention"]:
        shape = f"{a['sequences']} x {a['context']} ({a['layer']})"
        print(f"{'':>10} {shape:<26} {a['us']:>9.1f} {a['gb_s']:>7.0f} "
              f"{100 * a['of_floor']:>7.1f}% {a['rel_error']:>8.1e}")  # fmt: skip


def _plot_kernels(data: dict, plt) -> None:
    r = data["results"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    for variant in dict.fromkeys(m["variant"] for m in r["moe"]):
        rows = [m for m in r["moe"] if m["variant"] == variant]
        ax1.plot([m["tokens"] for m in rows], [100 * m["of_floor"] for m in rows], "o-",
                 label=variant)  # fmt: skip
    ax1.set(xscale="log", xlabel="tokens per MoE call", ylabel="% of the memory floor",
            title="grouped MXFP4 experts (median)")  # fmt: skip
    ax1.legend(fontsize=7)
    labels = [f"{a['sequences']}x{a['context']}\n{a['layer']}" for a in r["attention"]]
    ax2.bar(labels, [100 * a["of_floor"] for a in r["attention"]])
    ax2.set(ylabel="% of the memory floor", title="paged sink attention, decode (median)")
    ax2.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"{r['model']} shapes on {describe(data['machine'])}", fontsize=9)
    fig.tight_layout()


def _print_sass(data: dict) -> None:
    r = data["results"]
    print(f"{r['model']} shapes compiled for sm_{r['arch']} (static: the main loop's "
          f"instructions, not a timing); bandwidth {r['bandwidth_gb_s']:.0f} GB/s")  # fmt: skip
    print(f"{'launch':<30} {'tokens':>6} {'warps':>5} {'regs':>4} {'spill':>5} {'smem':>6} "
          f"{'loop':>5} {'B/loop':>6} {'instr/B':>7} {'bound GB/s':>10} {'of HBM':>6}")  # fmt: skip
    for x in r["launches"]:
        print(f"{x['launch']:<30} {x['tokens']:>6} {x['warps']:>5} {x['registers']:>4} "
              f"{x['spill_bytes']:>5} {x['shared_bytes']:>6} {x['loop_instructions']:>5} "
              f"{x['loop_bytes']:>6} {x['warp_instructions_per_byte']:>7.3f} "
              f"{x['issue_bound_gb_s']:>10.0f} {100 * x['of_bandwidth']:>5.0f}%")  # fmt: skip


def _plot_sass(data: dict, plt) -> None:
    r = data["results"]
    fig, ax = plt.subplots(figsize=(10, 4))
    labels = [f"{x['launch']}\n{x['tokens']} tok" for x in r["launches"]]
    ax.bar(labels, [100 * min(x["of_bandwidth"], 3.0) for x in r["launches"]])
    ax.axhline(100, color="k", lw=0.8)
    ax.set(ylabel="issue-bound / HBM bandwidth (%)",
           title=f"main loops compiled for sm_{r['arch']}: above 100% issue is not the limit")  # fmt: skip
    ax.tick_params(axis="x", labelsize=6, rotation=60)
    fig.suptitle(f"{r['model']} shapes, compiled on {describe(data['machine'])}", fontsize=9)
    fig.tight_layout()


if __name__ == "__main__":
    raise SystemExit(main())

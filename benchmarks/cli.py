"""`gptoss-ray bench`: throughput and latency sweeps, shard scaling against replicas, the
calibrated scaling model, full-size random-weight runs, the kernels alone and compiled,
grammar masks against free decoding, the CPU of an idle engine, speculative decoding,
LoRA adapters, batch inference through Ray Data against batch files.
Each benchmark's module runs it, prints its table under the machine's line, and saves
JSON and a PNG under --out; this module only parses (no torch until a benchmark runs)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import fields
from importlib import import_module

from gptoss_ray.benchmarks.common import DEFAULT_OUT, Links, describe, machine

MODELS = ("gpt-oss-20b", "gpt-oss-120b", "gpt-oss-tiny")


def _ints(text: str) -> list[int]:
    """'1,16,64' -> [1, 16, 64]: counts (shards, batches, tokens), each at least 1."""
    return [_count(x) for x in text.split(",") if x]


def _indices(text: str) -> list[int]:
    """'0,2' -> [0, 2]: indices, each at least 0."""
    out = []
    for x in text.split(","):
        if x and not x.isdigit():
            raise argparse.ArgumentTypeError(f"{x!r}: expected an index (0, 1, ...)")
        if x:
            out.append(int(x))
    return out


def _count(text: str) -> int:
    """A count of something (requests, tokens, repeats): an int of at least 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected at least 1")
    return n


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
    parser = argparse.ArgumentParser(
        prog="gptoss-ray bench",
        description="Benchmarks: each prints its table with the machine, and saves JSON and a PNG.",
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for JSON and PNG")
    sub = parser.add_subparsers(dest="what", required=True)

    def command(name: str, run: str, help_text: str) -> argparse.ArgumentParser:
        """`run`: module.function of this package, called with (args, data)."""
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(run=run)
        return p

    def engine_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="gpt-oss-tiny")
        p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
        p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
        p.add_argument("--repeats", type=_count, default=3)
        p.add_argument("--kv-budget-mb", type=float, default=512)

    def any_device(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--device", choices=("cpu", "cuda"), default=None, help="default: cuda if any"
        )

    sweep = command("sweep", "engine_runs.run_sweep", "throughput, TTFT and ITL against batch size")
    engine_args(sweep)
    sweep.add_argument("--shards", type=_count, default=2)
    sweep.add_argument("--batches", type=_ints, default=[1, 4, 16, 64, 256])
    sweep.add_argument(
        "--shapes",
        type=_shapes,
        default=[(128, 32), (512, 32)],
        help="prompt x output tokens, comma-separated (default 128x32,512x32)",
    )
    sweep.add_argument(
        "--steps",
        choices=("overlapped", "one-at-a-time", "both"),
        default="overlapped",
        help="plan each step while the one before runs, or not, or both in one run",
    )
    sweep.add_argument(
        "--driven-by",
        choices=("actor-calls", "compiled-graph", "both"),
        default="actor-calls",
        help="steps sent as Ray actor calls, through a Ray compiled graph, or both in one run",
    )
    sweep.add_argument("--stream", action="store_true", help="read every request token by token")
    sweep.add_argument(
        "--null-model", action="store_true", help="shards that do no model work: the host alone"
    )

    idle = command("idle", "idle.run", "CPU of an idle engine, and the first request after idle")
    idle.add_argument("--model", default="gpt-oss-tiny")
    idle.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    idle.add_argument("--shards", type=_count, default=2)
    idle.add_argument("--seconds", type=float, default=30.0, help="idle time measured")
    idle.add_argument("--settle-s", type=float, default=3.0, help="idle before measuring")
    idle.add_argument("--repeats", type=_count, default=3, help="wake-ups timed")
    idle.add_argument("--steps", choices=("actor-calls", "compiled-graph", "both"), default="both")
    idle.add_argument(
        "--served",
        action="store_true",
        help="the whole `gptoss-ray serve --http` stack on its own local head, Ray's "
        "processes too: a plain head against the lean one serve starts",
    )
    idle.add_argument("--port", type=int, default=8765, help="--served: the API's port")

    prefix = command(
        "prefix", "prefix.run", "multi-turn conversations sharing a system prompt: cache on vs off"
    )
    engine_args(prefix)
    prefix.add_argument("--shards", type=_count, default=2)
    prefix.add_argument("--users", type=_count, default=8)
    prefix.add_argument("--turns", type=_count, default=6)
    prefix.add_argument(
        "--system-tokens", type=_count, default=2048, help="shared system prompt and tools"
    )
    prefix.add_argument(
        "--answer-words", type=_count, default=60, help="each earlier answer kept in the history"
    )
    prefix.add_argument("--output-len", type=_count, default=32, help="tokens written a turn")
    prefix.add_argument("--block-size", type=_count, default=16)

    grammar = command(
        "grammar", "grammar.run", "grammar masks: decode step free vs harmony frame vs JSON schema"
    )
    grammar.add_argument("--model", default="gpt-oss-tiny")
    grammar.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    grammar.add_argument("--batches", type=_ints, default=[1, 16, 64])
    grammar.add_argument("--steps", type=_count, default=30, help="decode steps measured")
    grammar.add_argument("--threads", type=int, default=None, help="torch threads")

    engines = command(
        "grammar-engines",
        "grammar.run_engines",
        "llguidance vs xgrammar vs outlines-core: JSON Schema coverage and mask cost",
    )
    engines.add_argument(
        "--engines", nargs="+", default=["llguidance", "xgrammar", "outlines-core"]
    )
    engines.add_argument("--schemas", type=_count, default=100)
    engines.add_argument("--walks", type=_count, default=5, help="schemas whose masks are timed")
    engines.add_argument("--batches", type=_ints, default=[1, 64])
    engines.add_argument("--steps", type=_count, default=20)

    scaling = command(
        "scaling", "engine_runs.run_scaling", "1..8 expert-parallel shards vs replicas"
    )
    engine_args(scaling)
    scaling.add_argument("--shards", type=_ints, default=[1, 2, 4, 8])
    scaling.add_argument("--batch", type=_count, default=32)
    scaling.add_argument("--prompt-len", type=_count, default=64)
    scaling.add_argument("--output-len", type=_count, default=32)
    scaling.add_argument("--no-replicas", action="store_true")

    speculative = command(
        "speculative",
        "speculative.run",
        "speculative decoding: a step's cost against k drafts, tokens a step with drafts",
    )
    speculative.add_argument("--model", default="gpt-oss-tiny")
    speculative.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    speculative.add_argument("--shards", type=_count, default=2)
    speculative.add_argument("--batches", type=_ints, default=[1, 16, 64])
    speculative.add_argument("--ks", type=_ints, default=[1, 2, 4, 8])
    speculative.add_argument("--prompt-len", type=_count, default=64)
    speculative.add_argument("--output-len", type=_count, default=33)
    speculative.add_argument("--threads", type=_count, default=1, help="torch threads a shard")
    speculative.add_argument("--kv-budget-mb", type=float, default=256)
    speculative.add_argument(
        "--eagle3-draft", default=None, help="an EAGLE-3 draft's folder (default: a random one)"
    )

    lora = command(
        "lora", "lora.run", "LoRA adapters: a decode step's time by distinct adapters a batch"
    )
    lora.add_argument("--model", default="gpt-oss-tiny")
    lora.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    lora.add_argument("--shards", type=_count, default=2)
    lora.add_argument("--batches", type=_ints, default=[16, 64])
    lora.add_argument("--adapters", type=_indices, default=[0, 1, 4], help="distinct per batch")
    lora.add_argument("--rank", type=_count, default=16)
    lora.add_argument("--max-loras", type=_count, default=4)
    lora.add_argument("--prompt-len", type=_count, default=32)
    lora.add_argument("--output-len", type=_count, default=17)
    lora.add_argument("--threads", type=_count, default=1, help="torch threads a shard")
    lora.add_argument("--kv-budget-mb", type=float, default=256)

    data = command(
        "ray-data", "ray_data.run", "batch inference: a Ray Data processor vs a batch file job"
    )
    data.add_argument("--model", default="gpt-oss-tiny")
    data.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    data.add_argument("--engines", type=_count, default=2)
    data.add_argument("--shards", type=_count, default=2, help="per engine")
    data.add_argument("--rows", type=_count, default=200)
    data.add_argument("--output-len", type=_count, default=32)
    data.add_argument("--in-flight", type=_count, default=64, help="requests in the engines")
    data.add_argument("--repeats", type=_count, default=3)
    data.add_argument("--kv-budget-mb", type=float, default=256)

    exchange = command(
        "exchange", "exchange.run", "the expert exchange per MoE layer: pair exchange vs fixed"
    )
    exchange.add_argument("--model", default="gpt-oss-tiny")
    exchange.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    exchange.add_argument("--shards", type=_ints, default=[2, 4])
    exchange.add_argument("--batches", type=_ints, default=[1, 16, 64])
    exchange.add_argument("--steps", type=_count, default=16, help="decode steps timed")
    exchange.add_argument("--threads", type=int, default=None, help="torch threads a shard")
    exchange.add_argument("--kv-budget-mb", type=float, default=64)

    sampling = command(
        "sampling", "sampling.run", "drawing a step's tokens: alone, and its share of a step"
    )
    sampling.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    sampling.add_argument("--batches", type=_ints, default=[1, 16, 64, 256])
    sampling.add_argument("--repeats", type=_count, default=7, help="calls timed")
    sampling.add_argument("--threads", type=int, default=None, help="torch threads")
    sampling.add_argument(
        "--against", help="another model/sampling.py to time side by side (an earlier commit's)"
    )
    sampling.add_argument("--model", default="gpt-oss-tiny")
    sampling.add_argument(
        "--step-batch", type=int, default=32, help="requests of the in-batch run (0: none)"
    )
    sampling.add_argument("--step-tokens", type=_count, default=48, help="tokens each")

    model = command("model", "scaling_model.run", "calibrate on this device, predict 1..64 GPUs")
    model.add_argument(
        "--calibrate-on",
        default="gpt-oss-20b",
        help="layer shapes to time (default gpt-oss-20b; both models share them)",
    )
    any_device(model)
    model.add_argument("--batches", type=_ints, default=[1, 8, 32, 64])
    model.add_argument("--contexts", type=_ints, default=[128, 1024])
    model.add_argument("--repeats", type=_count, default=5)
    model.add_argument("--context", type=int, default=2048, help="context of the prediction")
    model.add_argument("--gpus", type=_ints, default=[1, 2, 4, 8, 16, 32, 64])
    model.add_argument("--gpu-memory-gb", type=float, default=80.0)
    model.add_argument("--calibration", help="reuse a saved calibration (JSON) instead")
    model.add_argument("--expert-load", help="JSON {model: [load per expert]} (measured routing)")
    for f in fields(Links):
        model.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)

    full = command("fullsize", "fullsize.run", "random full-size model on one GPU vs transformers")
    full.add_argument("--model", default="gpt-oss-20b", choices=MODELS)
    any_device(full)
    full.add_argument("--batches", type=_ints, default=[1, 64, 256])
    full.add_argument("--prompt-len", type=_count, default=128)
    full.add_argument("--output-len", type=_count, default=64)
    full.add_argument("--no-peer", action="store_true", help="skip transformers")
    full.add_argument("--repeats", type=_count, default=3, help="runs of each, medians shown")
    full.add_argument("--kernels", choices=("auto", "on", "off"), default="auto")
    full.add_argument(
        "--graphs",
        choices=("auto", "on", "off"),
        default="auto",
        help="decode steps from CUDA graphs (auto: on a GPU with the kernels)",
    )

    static = command(
        "sass", "sass.run", "the kernels compiled for a GPU, here: resources, issue cost per byte"
    )
    static.add_argument("--model", default="gpt-oss-20b", choices=MODELS)
    static.add_argument("--arch", type=int, choices=(80, 90), default=90, help="sm_80 or sm_90")
    static.add_argument("--tokens", type=_ints, default=[1, 64], help="tokens per MoE call")
    static.add_argument("--contexts", type=_ints, default=[1024, 8192], help="decode contexts")

    kern = command("kernels", "kernels.run", "the Triton kernels alone against the memory floor")
    kern.add_argument("--model", default="gpt-oss-20b", choices=MODELS)
    any_device(kern)
    kern.add_argument(
        "--tokens",
        type=_ints,
        default=[1, 4, 16, 64, 256],
        help="tokens per MoE call (4 expert rows each)",
    )
    kern.add_argument("--batches", type=_ints, default=[1, 64], help="decoding sequences")
    kern.add_argument("--contexts", type=_ints, default=[1024, 8192], help="tokens of context")
    kern.add_argument(
        "--variants",
        type=_indices,
        default=None,
        help="which MoE block-size variants (indices; default all)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "device", "") is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.what == "sass":
        # compiled, never run: the interpreter would replace the kernels (cleared before the
        # kernel modules are imported, below)
        os.environ.pop("TRITON_INTERPRET", None)
    elif getattr(args, "device", None) == "cpu":
        # Triton kernels on CPU tensors run only in its interpreter, which must be on
        # before a kernel is defined (the kernel modules are imported lazily, below)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    data = {"machine": machine(), "args": vars(args)}
    print(f"machine: {describe(data['machine'])}")
    module, function = args.run.rsplit(".", 1)
    getattr(import_module(f"gptoss_ray.benchmarks.{module}"), function)(args, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())

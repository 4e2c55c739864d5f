"""`gptoss-ray`: the command line. Imports happen inside the commands, so that `--help` and
single-process commands do not pay for Ray."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

DTYPES = ("float32", "bfloat16")


def _prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--prompt-ids {text!r}: expected comma-separated integers such as 5,6,7"
        ) from None
    if not ids:
        raise argparse.ArgumentTypeError("--prompt-ids: empty prompt")
    return ids


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptoss-ray", description="Serve OpenAI's gpt-oss MoE models on Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    ckpt = sub.add_parser("checkpoint", help="write checkpoints")
    ckpt_sub = ckpt.add_subparsers(dest="checkpoint_command", required=True)
    tiny = ckpt_sub.add_parser("tiny", help="write a small model with random weights")
    tiny.add_argument("out_dir")
    tiny.add_argument("--layout", choices=("hf", "original"), default="hf")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--preset", default="gpt-oss-tiny")
    tiny.add_argument(
        "--shard-mb", type=float, default=None, help="split into files of at most this size (hf)"
    )

    gen = sub.add_parser("generate", help="generate from token ids, in one process")
    gen.add_argument("--model", required=True, help="checkpoint directory or small preset name")
    gen.add_argument("--prompt-ids", type=_prompt_ids, action="append", required=True)
    gen.add_argument("--max-tokens", type=int, default=16)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true", help="do not stop at <|return|>/<|call|>")
    gen.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt")

    demo = sub.add_parser("demo", help="generate a few completions with the built-in model")
    demo.add_argument("--model", default="gpt-oss-tiny")
    demo.add_argument("--max-tokens", type=int, default=24)
    demo.add_argument("--dtype", choices=DTYPES, default="float32")

    from cluster.cli_harmony import add_commands

    add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from pydantic import ValidationError

    from model.checkpoint import CheckpointError
    from model.config import ConfigError
    from model.generate import RequestError
    from model.harmony import HarmonyError
    from model.tokenizer import TokenizerError

    try:
        if args.command == "checkpoint":
            return _checkpoint_tiny(args)
        if args.command == "generate":
            return _generate(args)
        if args.command == "demo":
            return _demo(args)
        if args.command == "harmony":
            from cluster import cli_harmony

            return cli_harmony.run(args)
    except (
        CheckpointError,
        ConfigError,
        RequestError,
        TokenizerError,
        HarmonyError,
        FileNotFoundError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}={e.get('input')!r}: {e['msg']}" for e in exc.errors()
        )
        print(f"error: {problems}", file=sys.stderr)
        return 2
    raise AssertionError(args.command)


def _checkpoint_tiny(args: argparse.Namespace) -> int:
    from model.checkpoint import write_random_checkpoint
    from model.config import ModelConfig

    config = ModelConfig.preset(args.preset)
    shard = int(args.shard_mb * 2**20) if args.shard_mb else None
    out = write_random_checkpoint(
        config, args.out_dir, seed=args.seed, layout=args.layout, max_shard_bytes=shard
    )
    print(f"wrote {args.preset} (random weights, seed {args.seed}, {args.layout} layout) to {out}")
    return 0


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _generate(args: argparse.Namespace) -> int:
    from model.checkpoint import load_model
    from model.generate import generate
    from model.sampling import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    model = load_model(args.model, dtype=_dtype(args.dtype), device=args.device)
    completions = generate(model, args.prompt_ids, params)
    for i, (prompt, c) in enumerate(zip(args.prompt_ids, completions, strict=True)):
        if args.json:
            record = {
                "index": i,
                "token_ids": c.token_ids,
                "finish_reason": c.finish_reason,
                "usage": {"prompt_tokens": c.prompt_tokens, "completion_tokens": len(c.token_ids)},
            }
            print(json.dumps(record), flush=True)
        else:
            print(f"[{i}] {prompt} -> {c.token_ids} ({c.finish_reason})", flush=True)
    return 0


DEMO_PROMPTS = [
    "The capital of France is",
    "Mixture-of-experts models route every token to",
    "def fibonacci(n):",
    "Ray actors exchange rows through an all-to-all, so",
]


def _demo(args: argparse.Namespace) -> int:
    from model.checkpoint import load_model
    from model.generate import generate
    from model.sampling import SamplingParams
    from model.tokenizer import decode, encode

    print(
        f"gptoss-ray demo: model {args.model!r}. The built-in model has RANDOM weights, so its\n"
        "text is gibberish; it exercises the exact gpt-oss math end to end. For real output,\n"
        "pass --model DIR with a gpt-oss-20b or gpt-oss-120b checkpoint folder.\n"
        "(Single process for now; expert-parallel Ray shards are the engine's next step.)\n"
    )
    t0 = time.perf_counter()
    model = load_model(args.model, dtype=_dtype(args.dtype))
    loaded = time.perf_counter() - t0
    prompts = [encode(p) for p in DEMO_PROMPTS]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    t1 = time.perf_counter()
    completions = generate(model, prompts, params)
    elapsed = time.perf_counter() - t1
    for text, c in zip(DEMO_PROMPTS, completions, strict=True):
        print(
            f"> {text}\n  {decode(c.token_ids)!r}\n  ({len(c.token_ids)} tokens, {c.finish_reason})"
        )
    total = sum(len(c.token_ids) for c in completions)
    print(
        f"\n{len(prompts)} prompts, {total} tokens in {elapsed:.2f} s "
        f"({total / elapsed:.1f} tokens/s, batch of {len(prompts)}); model loaded in {loaded:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

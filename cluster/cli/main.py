"""`gptoss-ray`: the command line. Imports happen inside the commands, so that `--help` and
single-process commands do not pay for Ray."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

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
    tiny.set_defaults(run=_checkpoint_tiny)

    gen = sub.add_parser("generate", help="generate from token ids, in one process")
    gen.set_defaults(run=_generate)
    gen.add_argument("--model", required=True, help="checkpoint directory or small preset name")
    gen.add_argument("--prompt-ids", type=_prompt_ids, action="append", default=[])
    gen.add_argument(
        "--messages",
        metavar="FILE.json",
        help='chat input instead of ids: an OpenAI chat request ({"messages": [...], '
        '"tools": ...}), a list of chat messages, or a list of requests',
    )
    gen.add_argument(
        "--shards",
        type=int,
        default=None,
        help="serve on N expert-parallel Ray shards (default: one process, no Ray)",
    )
    gen.add_argument("--address", default=None, help="Ray cluster to join ('auto'); default local")
    gen.add_argument("--max-tokens", type=int, default=16)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true", help="do not stop at <|return|>/<|call|>")
    gen.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    gen.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt")
    gen.add_argument(
        "--harmony-frame",
        choices=("strict", "off"),
        default="strict",
        help="--messages: constrain every reply to a well-formed harmony frame (strict), or "
        "only those that ask for a format or a tool call (off)",
    )

    demo = sub.add_parser("demo", help="generate a few completions with the built-in model")
    demo.set_defaults(run=_demo)
    demo.add_argument("--model", default="gpt-oss-tiny")
    demo.add_argument("--shards", type=int, default=2)
    demo.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    demo.add_argument("--max-tokens", type=int, default=32)
    demo.add_argument("--dtype", choices=DTYPES, default="float32")
    demo.add_argument("--address", default=None, help="Ray cluster to join ('auto'); default local")

    serve = sub.add_parser(
        "serve", help="start the engine as a named, detached Ray actor (for clients and jobs)"
    )
    serve.set_defaults(run=_serve)
    serve.add_argument("--model", default="gpt-oss-tiny")
    serve.add_argument("--shards", type=int, default=2, help="shards of each engine")
    serve.add_argument(
        "--engines",
        type=int,
        default=1,
        help="engines of --shards shards each, data parallel behind one HTTP front",
    )
    serve.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    serve.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    serve.add_argument("--address", default=None, help="Ray cluster ('auto'); default: local")
    serve.add_argument("--name", default="gptoss-ray")
    serve.add_argument(
        "--kv-budget-mb",
        type=float,
        default=None,
        help="KV cache per shard (default: on cuda sized from free memory, on cpu 256)",
    )
    serve.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="share of each shard's device memory for weights, activations and KV "
        "(default 0.9 on cuda; on cpu, given, the host's memory is read)",
    )
    serve.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="refuse longer prompts (default: what the model's context allows)",
    )
    serve.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_false",
        help="compute every prompt in full instead of reusing the KV of cached prefixes",
    )
    serve.add_argument(
        "--harmony-frame",
        choices=("strict", "off"),
        default="strict",
        help="strict: every chat reply is constrained to a well-formed harmony frame (it "
        "always parses); off: only replies that ask for a format or a tool call",
    )
    serve.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable of every shard (repeatable; NCCL_*, GLOO_*, FI_* and "
        "UCX_* of this shell are passed unless given)",
    )
    serve.add_argument(
        "--collective-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long a step's collective waits for the other shards; a hang no lost "
        "shard announces ends there and the group is formed again (default: 60)",
    )
    serve.add_argument(
        "--speculative",
        choices=("ngram", "eagle3"),
        default=None,
        help="speculative decoding: ngram drafts each decode's next tokens by prompt lookup, "
        "eagle3 by an EAGLE-3 draft model on each shard (--draft-model); the reply is the "
        "same, in fewer steps where the drafts are right",
    )
    serve.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a LoRA adapter to serve, a PEFT folder (repeatable); requests name it as their "
        "model (vLLM's --lora-modules)",
    )
    serve.add_argument(
        "--enable-lora",
        action="store_true",
        help="load and unload LoRA adapters while serving (POST /v1/load_lora_adapter, "
        "/v1/unload_lora_adapter; their paths are read on the engines' machines)",
    )
    serve.add_argument(
        "--max-loras", type=int, default=None, help="LoRA adapters resident on a shard (4)"
    )
    serve.add_argument(
        "--max-lora-rank", type=int, default=None, help="the largest LoRA rank served (16)"
    )
    serve.add_argument(
        "--draft-model",
        default=None,
        help="the EAGLE-3 draft's folder (config.json, safetensors), for --speculative eagle3",
    )
    serve.add_argument(
        "--num-draft-tokens", type=int, default=None, help="draft tokens per decode (4)"
    )
    serve.add_argument("--ngram-min", type=int, default=None, help="shortest n-gram (2)")
    serve.add_argument("--ngram-max", type=int, default=None, help="longest n-gram (4)")
    serve.add_argument("--http", action="store_true", help="serve the OpenAI-compatible API")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP address (default loopback)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY")
    serve.add_argument(
        "--ingress-replicas", type=int, default=1, help="Ray Serve replicas of the HTTP front"
    )
    serve.add_argument(
        "--max-outstanding",
        type=int,
        default=1024,
        help="requests a front replica keeps in each engine; past it, 429 with Retry-After",
    )
    status = sub.add_parser("status", help="a served engine's shards, load, queue and jobs")
    status.set_defaults(run=_status)
    status.add_argument("--name", default="gptoss-ray")
    status.add_argument("--address", default="auto")
    status.add_argument("--json", action="store_true")
    stop = sub.add_parser("stop", help="shut down a served engine")
    stop.set_defaults(run=_stop)
    stop.add_argument("--name", default="gptoss-ray")
    stop.add_argument("--address", default="auto")
    stop.add_argument(
        "--ray",
        action="store_true",
        help="also end the local Ray instance that `gptoss-ray serve` started",
    )
    # the benchmarks are their own layer above this one (they drive the engine): the rest
    # of the command line is theirs to parse (`gptoss-ray bench --help`)
    bench = sub.add_parser(
        "bench",
        add_help=False,
        help="benchmarks: sweep, prefix, grammar, scaling, model, fullsize, kernels, sass "
        "(gptoss-ray bench --help)",
    )
    bench.set_defaults(run=_bench, takes_rest=True)

    from gptoss_ray.cluster.cli.harmony import add_commands

    add_commands(sub)
    from gptoss_ray.cluster.cli.batch import add_commands as add_batch_commands

    add_batch_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "takes_rest", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    try:
        return args.run(args)
    except Exception as exc:
        message = _user_error(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


def _user_error(exc: Exception) -> str | None:
    """What to tell the user of a failure that is theirs to fix (bad input, a missing file
    or engine), or None for a bug, which keeps its traceback. Imported only on failure:
    a command's happy path (and --help) loads nothing it does not need."""
    from pydantic import ValidationError

    from gptoss_ray.cluster.batch.format import BatchInputError
    from gptoss_ray.cluster.front.state import ApiKeyError
    from gptoss_ray.cluster.runtime.ray_instance import EngineNotFound
    from gptoss_ray.model.config import ConfigError
    from gptoss_ray.model.harmony import HarmonyError
    from gptoss_ray.model.model_folder import CheckpointError
    from gptoss_ray.model.tokenizer import TokenizerError
    from gptoss_ray.model.types import DeviceUnavailable, RequestError

    if isinstance(exc, ValidationError):  # a field's: its name and value; the whole's: why
        return "; ".join(
            f"{'.'.join(map(str, e['loc']))}={e.get('input')!r}: {e['msg']}"
            if e["loc"]
            else e["msg"].removeprefix("Value error, ")
            for e in exc.errors()
        )
    mine = (
        ApiKeyError,
        CheckpointError,
        ConfigError,
        RequestError,
        TokenizerError,
        HarmonyError,
        FileNotFoundError,
        BatchInputError,
        EngineNotFound,
        DeviceUnavailable,
        KeyError,
    )
    return str(exc) if isinstance(exc, mine) else None


def _bench(args: argparse.Namespace) -> int:
    from gptoss_ray.benchmarks.cli import main as bench_main

    return bench_main(args.rest)


def _checkpoint_tiny(args: argparse.Namespace) -> int:
    from gptoss_ray.model.checkpoint import write_random_checkpoint
    from gptoss_ray.model.config import ModelConfig

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
    from gptoss_ray.model.types import SamplingParams

    if bool(args.prompt_ids) == bool(args.messages):
        raise _usage("generate: give --prompt-ids (one or more) or --messages FILE.json")
    if args.shards is not None and args.shards < 1:
        raise _usage(f"--shards {args.shards}: at least 1")
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    if args.messages:
        return _generate_chat(args, params)
    if args.shards is None:
        from gptoss_ray.model.checkpoint import load_model
        from gptoss_ray.model.generate import generate

        model = load_model(args.model, dtype=_dtype(args.dtype), device=args.device)
        results = generate(model, args.prompt_ids, params)
        rows = [(c.token_ids, c.finish_reason, c.prompt_tokens) for c in results]
    else:
        with _engine(args) as engine:
            outs = engine.generate(args.prompt_ids, params)
        rows = []
        for out in outs:
            if isinstance(out, Exception):
                raise out  # a bad prompt: the CLI reports it like the single-process path
            rows.append((out.token_ids, out.finish_reason, out.prompt_tokens))
    for i, (prompt, (ids, reason, n_prompt)) in enumerate(zip(args.prompt_ids, rows, strict=True)):
        if args.json:
            record = {
                "index": i,
                "token_ids": ids,
                "finish_reason": reason,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(ids)},
            }
            print(json.dumps(record), flush=True)
        else:
            print(f"[{i}] {prompt} -> {ids} ({reason})", flush=True)
    return 0


def _captured(info: dict) -> str:
    """The decode graphs' capture at load, where there was one."""
    seconds = info.get("graph_capture_s", 0)
    return f"; decode graphs captured in {seconds:.1f} s" if seconds else ""


def _kv(info: dict) -> str:
    """Each shard's KV capacity in tokens, and what sized it."""
    kv = info["kv_capacity"]
    how = {"memory": "from free memory", "budget": "--kv-budget-mb", "default": "default budget"}
    return (
        f"KV cache per shard {kv['full_tokens']} tokens of full attention, "
        f"{kv['sliding_tokens']} of sliding window ({how[kv['sized_by']]})"
    )


def _serve(args: argparse.Namespace) -> int:
    from gptoss_ray.cluster.engine.config import EngineConfig
    from gptoss_ray.cluster.front.serve import serve

    t0 = time.perf_counter()
    config = EngineConfig(
        model=args.model,
        shards=args.shards,
        device=args.device,
        dtype=args.dtype,
        kv_budget_mb=args.kv_budget_mb,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_prompt_tokens=args.max_prompt_tokens,
        prefix_cache=args.prefix_cache,
        harmony_frame=args.harmony_frame,
        env=_env(args.env),
        loras=_env(args.lora, "--lora"),
        enable_lora=args.enable_lora,
        **_given(
            args,
            "max_loras",
            "max_lora_rank",
            "collective_timeout",
            "speculative",
            "draft_model",
            "num_draft_tokens",
            "ngram_min",
            "ngram_max",
        ),
    )
    info = serve(
        config,
        name=args.name,
        address=args.address,
        engines=args.engines,
        http=(args.host, args.port, args.api_key) if args.http else None,
        front={"max_outstanding": args.max_outstanding},
        ingress_replicas=args.ingress_replicas,
    )
    if args.http:
        key = " (API key required)" if args.api_key else ""
        print(f"OpenAI-compatible API at {info['url']}{key}")
    print(
        f"engine(s) {', '.join(info['engines'])} ready in {time.perf_counter() - t0:.1f} s: "
        f"{info['model']} on {info['shards']} {args.device} shard(s) each, experts "
        f"{info['expert_ranges']}{_captured(info)}; {_kv(info)}. "
        f"Submit with `gptoss-ray batch submit FILE --output OUT`; stop with "
        f"`gptoss-ray stop --name {args.name}`."
    )
    return 0


def _stop(args: argparse.Namespace) -> int:
    import ray

    from gptoss_ray.cluster.front.serve import stop
    from gptoss_ray.cluster.runtime.ray_instance import running_head, stop_head

    stopped = stop(args.name, args.address)
    print(f"stopped engine {args.name!r}" if stopped else f"no engine {args.name!r} running")
    joined = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
    ray.shutdown()
    head = running_head()
    if args.ray and head is not None:
        stop_head()
        print(
            f"stopped the local Ray instance at {head['address']} that `gptoss-ray serve` started"
        )
        return 0
    if args.ray:
        print("no local Ray instance that `gptoss-ray serve` started is running")
    if head is not None:
        print(
            f"the local Ray instance at {head['address']} that `gptoss-ray serve` started "
            "keeps running; `gptoss-ray stop --ray` ends it"
        )
    elif joined is not None:
        print(
            f"the Ray instance at {joined} keeps running (not started by `gptoss-ray serve`; "
            "`ray stop` ends it, with every other Ray instance on this machine)"
        )
    return 0 if stopped else 1


def _status(args: argparse.Namespace) -> int:
    import ray

    from gptoss_ray.cluster.batch.client import Client

    client = Client(address=args.address, name=args.name)
    status = ray.get(client.coordinator.status.remote(), timeout=60)
    jobs = [job.status() for job in client.jobs()]
    if args.json:
        print(json.dumps({**status, "jobs": jobs}, default=str))
        return 0
    health = "healthy" if status["healthy"] else "UNHEALTHY"
    print(
        f"engine {args.name!r}: {status['model']}, {status['shards']} shard(s), {health}; "
        f"{status['waiting']} waiting, {sum(status['running'])} running, "
        f"{len(status['recoveries'])} recoveries; {_kv(status)}"
    )
    st = status["stats"]
    if st.get("drafted_steps"):
        rate = st["drafts_accepted"] / max(1, st["drafts_proposed"])
        print(
            f"  speculative: {st['drafts_accepted']} of {st['drafts_proposed']} draft tokens "
            f"accepted ({rate:.1%}), {1 + st['drafts_accepted'] / st['drafted_steps']:.2f} "
            "tokens per drafted decode"
        )
    load = status["expert_load"]
    per_expert = [sum(col) for col in zip(*load, strict=True)] if load else []
    caches = status["stats"]["prefix_cache"]
    for s, cache in zip(status["shards_detail"], caches, strict=True):
        lo, hi = s.get("experts", (0, 0))
        kv_free, kv_total = s.get("kv_free_blocks", {}), s.get("kv_total_blocks", {})
        used = {k: kv_total[k] - kv_free[k] for k in kv_total}
        routed = sum(per_expert[lo:hi]) if per_expert else 0
        print(
            f"  shard {s['rank']}: node {s['node'][:12]} ({s['node_ip']}), {s['device']}, "
            f"experts [{lo}, {hi}), weights {s.get('weight_bytes', 0) / 2**20:.1f} MiB, "
            f"KV used {used.get('full', 0)}/{kv_total.get('full', 0)} full + "
            f"{used.get('sliding', 0)}/{kv_total.get('sliding', 0)} sliding blocks, "
            f"{s.get('sequences', 0)} sequences, {routed} expert rows routed"
        )
        gpu = (
            f"{s['gpu']} (CUDA_VISIBLE_DEVICES={s['cuda_visible_devices']}), " if "gpu" in s else ""
        )
        nccl = f" {s['nccl_version']}" if "nccl_version" in s else ""
        env = " ".join(f"{k}={v}" for k, v in sorted(s.get("env", {}).items())) or "none set"
        print(f"    {gpu}collectives {s.get('collectives', '?')}{nccl}; env: {env}")
        print(f"    prefix cache: {cache_line(cache)}")
    if per_expert:
        mean = sum(per_expert) / len(per_expert)
        print(
            f"  expert load (rows per expert, all layers): min {min(per_expert)}, "
            f"mean {mean:.1f}, max {max(per_expert)}"
        )
    for job in jobs:
        from gptoss_ray.cluster.batch.client import progress_line

        print(f"  job {job['job_id']}: {progress_line(job)}")
    return 0


def cache_line(cache: dict[str, int]) -> str:
    """One shard's prefix cache in words (`EngineCore.snapshot()["prefix_cache"]` rows)."""
    queried = cache["queried_tokens"]
    rate = f"{cache['hit_tokens'] / queried:.1%}" if queried else "-"
    return (
        f"hit rate {rate} ({cache['hit_tokens']} of {queried} prompt tokens), "
        f"{cache['cached_full_blocks']} full + {cache['cached_sliding_blocks']} sliding "
        f"blocks cached, {cache['evictions']} evictions"
    )


def _usage(message: str) -> Exception:
    from gptoss_ray.model.types import RequestError

    return RequestError(message)


def _env(pairs: list[str], flag: str = "--env") -> dict[str, str]:
    """NAME=VALUE pairs of a repeatable flag (--env, whose values may be empty; --lora,
    whose paths may not) -> a dict."""
    from gptoss_ray.model.config import ConfigError

    env = {}
    for pair in pairs:
        name, eq, value = pair.partition("=")
        if not eq or not name or (flag != "--env" and not value):
            raise ConfigError(
                f"{flag} {pair!r}: expected {'KEY=VALUE' if flag == '--env' else 'NAME=PATH'}"
            )
        env[name] = value
    return env


def _engine(args: argparse.Namespace):
    from gptoss_ray.cluster.client.engine import Engine
    from gptoss_ray.cluster.engine.config import EngineConfig

    config = EngineConfig(
        model=args.model,
        shards=args.shards or 1,
        device=args.device,
        dtype=args.dtype,
        harmony_frame=getattr(args, "harmony_frame", "strict"),
    )
    return Engine.start(config=config, address=args.address)


def _given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The options among `names` given on the command line (the others: EngineConfig's
    defaults, which its fields' descriptions give)."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _chat_requests(path: str) -> list[dict]:
    from gptoss_ray.model.types import RequestError

    try:
        data = json.loads(open(path, encoding="utf-8").read())  # noqa: SIM115
    except OSError as exc:
        raise RequestError(f"--messages {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise RequestError(f"--messages {path}: not valid JSON: {exc}") from None
    if isinstance(data, dict):
        return [data]
    if isinstance(data, list) and all(isinstance(m, dict) and "role" in m for m in data):
        return [{"messages": data}]
    if isinstance(data, list) and all(isinstance(r, dict) for r in data):
        return data
    raise RequestError(
        f"--messages {path}: expected a chat request, a list of messages or a list of requests"
    )


def _generate_chat(args: argparse.Namespace, params) -> int:
    from gptoss_ray.cluster.client.chat import chat_prompt, chat_reply

    requests = _chat_requests(args.messages)
    sampling = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
    } | ({"ignore_eos": True} if args.ignore_eos else {})
    requests = [sampling | r for r in requests]  # a request's own fields win
    if args.shards is None:
        from gptoss_ray.model.checkpoint import load_model
        from gptoss_ray.model.generate import generate

        model = load_model(args.model, dtype=_dtype(args.dtype), device=args.device)
        replies = []
        for i, request in enumerate(requests):
            try:  # a bad request becomes its error record; the others still run
                prompt, p, stops = chat_prompt(
                    request, model.config.max_context_length, frame=args.harmony_frame == "strict"
                )
                (c,) = generate(model, [prompt], p)
            except ValueError as exc:  # HarmonyError, RequestError, pydantic errors
                replies.append(exc)
                continue
            reply = chat_reply(
                c.token_ids,
                c.finish_reason,
                stop=stops,
                request_id=str(i),
                prompt_tokens=len(prompt),
            )
            replies.append(reply)
    else:
        with _engine(args) as engine:
            replies = engine.chat(requests)
    for i, reply in enumerate(replies):
        if isinstance(reply, Exception):
            print(
                json.dumps({"index": i, "error": str(reply)})
                if args.json
                else f"[{i}] error: {reply}"
            )
            continue
        if args.json:
            print(json.dumps({"index": i, **reply}, ensure_ascii=False), flush=True)
        else:
            msg = reply["message"]
            print(f"[{i}] ({reply['finish_reason']}) {json.dumps(msg, ensure_ascii=False)}")
    return 0


DEMO_CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Explain mixture-of-experts routing in one sentence."},
    ],
    [{"role": "user", "content": "Write a haiku about Ray actors."}],
    [{"role": "user", "content": "What is 17 * 23?"}],
]


def _demo(args: argparse.Namespace) -> int:
    from gptoss_ray.model.tokenizer import decode

    print(
        f"gptoss-ray demo: model {args.model!r} on {args.shards} expert-parallel "
        f"{args.device.upper()} shard(s) (Ray, all-to-all over "
        f"{'NCCL' if args.device == 'cuda' else 'gloo'}).\n"
        "The built-in model has RANDOM weights, so its replies are gibberish; it runs the exact\n"
        "gpt-oss math and the harmony chat format end to end. For real replies pass\n"
        "--model DIR (a gpt-oss-20b or gpt-oss-120b checkpoint folder, e.g. a local copy of\n"
        "openai/gpt-oss-20b) and --device cuda.\n",
        flush=True,
    )
    requests = [
        {"messages": m, "max_tokens": args.max_tokens, "temperature": 0} for m in DEMO_CONVERSATIONS
    ]
    t0 = time.perf_counter()
    with _engine(args) as engine:
        info = engine.info()
        started = time.perf_counter() - t0
        print(
            f"started in {started:.1f} s; experts per shard: {info['expert_ranges']}"
            f"{_captured(info)}; {_kv(info)}\n",
            flush=True,
        )
        t1 = time.perf_counter()
        replies = engine.chat(requests)
        elapsed = time.perf_counter() - t1
        stats = engine.stats()
    total = 0
    for conv, reply in zip(DEMO_CONVERSATIONS, replies, strict=True):
        print(f"> {conv[-1]['content']}")
        if isinstance(reply, Exception):
            print(f"  error: {reply}\n")
            continue
        total += reply["usage"]["completion_tokens"]
        msg = reply["message"]
        for m in reply["harmony"]:
            print(f"  [{m.get('channel') or 'no channel'}] {m['content'][0]['text']!r}")
        if not reply["harmony"]:
            raw = decode(reply["token_ids"])
            print(f"  (no harmony message parsed; the raw completion: {raw[:70]!r}...)")
        print(
            f"  reply: content={msg.get('content')!r} finish={reply['finish_reason']} "
            f"tokens={reply['usage']['completion_tokens']}\n"
        )
    print(
        f"{len(requests)} conversations, {total} tokens in {elapsed:.2f} s "
        f"({total / elapsed:.1f} tokens/s), {stats['steps']} engine steps, "
        f"{args.shards} shard(s); engine shut down."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Batch inference two ways over the same running engines: a Ray Data processor
(`cluster.batch.data`) against an OpenAI batch file job (`cluster.batch.jobs`):

    gptoss-ray bench ray-data [--engines 2] [--shards 2] [--rows 200] [--output-len 32]

--engines engines of --shards CPU shards each are started once (named, as `serve` starts
them); then, --repeats times in alternating order, the same --rows chat requests (greedy,
--output-len tokens each: ignore_eos, no harmony frame) run through each path with
--in-flight requests in the engines at most (the job's max_in_flight; the processor's
batch_size x max_concurrent_batches). Timed from submission to the last row, what each
path's user waits for: the job's actor and file, Ray Data's planning, actors and blocks.
Median rows a second and output tokens a second."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from gptoss_ray.benchmarks.common import median, progress, save


def bodies(rows: int, output_len: int) -> list[dict[str, Any]]:
    return [
        {
            "messages": [{"role": "user", "content": f"Request {i}: " + "word " * (i % 50)}],
            "max_tokens": output_len,
            "temperature": 0.0,
            "ignore_eos": True,
        }
        for i in range(rows)
    ]


def via_batch_file(names: list[str], requests: list[dict], in_flight: int, root: Path) -> dict:
    from gptoss_ray.cluster.batch.client import Client, read_results

    source, output = root / "input.jsonl", root / f"output-{time.monotonic_ns()}.jsonl"
    with open(source, "w", encoding="utf-8") as f:
        for i, body in enumerate(requests):
            line = {"custom_id": str(i), "method": "POST", "url": "/v1/chat/completions"}
            f.write(json.dumps({**line, "body": body}) + "\n")
    start = time.perf_counter()
    job = Client(address=None, name=names[0]).submit(
        source, output, engines=names, max_in_flight=in_flight
    )
    info = job.wait()
    seconds = time.perf_counter() - start
    records = list(read_results(output))
    assert info["status"] == "completed" and len(records) == len(requests), info
    tokens = sum(r["response"]["body"]["usage"]["completion_tokens"] for r in records)
    return {"seconds": seconds, "tokens": tokens}


def via_ray_data(names: list[str], requests: list[dict], in_flight: int, engine: dict) -> dict:
    import ray.data

    from gptoss_ray.cluster.batch.data import GptOssProcessorConfig, build_processor

    batches = 4
    config = GptOssProcessorConfig(
        **engine,
        engine_names=names,
        batch_size=max(1, in_flight // batches),
        max_concurrent_batches=batches,
    )
    rows = [
        {"messages": b["messages"], "sampling_params": {k: b[k] for k in b if k != "messages"}}
        for b in requests
    ]
    start = time.perf_counter()
    out = build_processor(config)(ray.data.from_items(rows)).take_all()
    seconds = time.perf_counter() - start
    assert len(out) == len(requests)
    return {"seconds": seconds, "tokens": sum(r["num_generated_tokens"] for r in out)}


def run(args: argparse.Namespace, data: dict[str, Any]) -> None:
    from gptoss_ray.benchmarks.engine_runs import ensure_ray
    from gptoss_ray.cluster.engine.config import EngineConfig
    from gptoss_ray.cluster.front.serve import stop
    from gptoss_ray.cluster.runtime.coordinator import engine_names, start_engines

    engine = {
        "model": args.model,
        "shards": args.shards,
        "dtype": args.dtype,
        "kv_budget_mb": args.kv_budget_mb,
        "harmony_frame": "off",
    }
    ensure_ray(args.engines * args.shards + 2)
    names = engine_names(f"bench-data-{time.monotonic_ns()}", args.engines)
    progress(f"starting {args.engines} engine(s) of {args.shards} shard(s) ...")
    start_engines(names, EngineConfig(**engine))
    requests = bodies(args.rows, args.output_len)
    runs: dict[str, list[dict]] = {"batch file": [], "ray data": []}
    root = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        for r in range(args.repeats):
            order = list(runs) if r % 2 == 0 else list(reversed(runs))
            for path in order:
                progress(f"repeat {r + 1}/{args.repeats}: {path} ...")
                if path == "batch file":
                    got = via_batch_file(names, requests, args.in_flight, root)
                else:
                    got = via_ray_data(names, requests, args.in_flight, engine)
                runs[path].append(got)
    finally:
        stop(names[0], address=None)
    rows = []
    for path, results in runs.items():
        rows.append(
            {
                "path": path,
                "seconds": median([x["seconds"] for x in results]),
                "rows_per_s": median([args.rows / x["seconds"] for x in results]),
                "tokens_per_s": median([x["tokens"] / x["seconds"] for x in results]),
                "runs": results,
            }
        )
    data["results"] = rows
    print(
        f"{args.model} ({args.dtype}), {args.engines} engine(s) x {args.shards} CPU shard(s); "
        f"{args.rows} chat rows, {args.output_len} tokens out each (greedy, ignore_eos), "
        f"{args.in_flight} in flight; medians of {args.repeats}"
    )
    print("path         seconds   rows/s   output tok/s")
    for r in rows:
        print(
            f"{r['path']:11s}  {r['seconds']:7.2f}  {r['rows_per_s']:7.2f}  {r['tokens_per_s']:12.1f}"
        )
    save("ray_data", data, args.out, plot)


def plot(data: dict[str, Any], plt: Any) -> None:
    rows = data["results"]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.bar([r["path"] for r in rows], [r["tokens_per_s"] for r in rows])
    ax.set(ylabel="output tokens / s (median)", title="batch inference: same engines")
    fig.tight_layout()

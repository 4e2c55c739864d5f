"""Load on the OpenAI-compatible HTTP API: N concurrent streaming clients.

    python benchmarks/bench_http.py --clients 64 --requests 2 --shards 2

Starts the engine (local Ray, CPU shards unless --device cuda) with its HTTP server, then
N client threads each send --requests streaming chat completions back to back. Prints
requests/s, tokens/s and the latency percentiles (whole request, and time to the first
streamed chunk after the role chunk), with the machine; saves JSON and a PNG (latency
CDF) under benchmarks/out/."""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
from pathlib import Path
from typing import Any

from gptoss_ray.benchmarks.common import describe, machine, median, percentile, progress, save


def stream_once(host: str, port: int, body: dict) -> tuple[float, float, int]:
    """-> (seconds to the first chunk after the role chunk, total seconds, tokens)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=600)
    conn.request(
        "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
    )
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    first = None
    tokens = 0
    chunks = 0
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunks += 1
        if chunks == 2 and first is None:
            first = time.perf_counter() - t0
        event = json.loads(line[6:])
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    conn.close()
    total = time.perf_counter() - t0
    return first if first is not None else total, total, tokens


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt-oss-tiny")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2, help="per client")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", default=str(Path(__file__).parent / "out"))
    return parser.parse_args()


def run_clients(
    host: str, port: int, args: argparse.Namespace
) -> tuple[list[tuple[float, float, int]], float]:
    """Every client's requests, back to back, all clients at once -> (results, wall s)."""
    body = {
        "model": args.model,
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    stream_once(host, port, {**body, "messages": [{"role": "user", "content": "hi"}]})
    results: list[tuple[float, float, int]] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        for r in range(args.requests):
            msg = [{"role": "user", "content": f"Client {k} asks question {r}."}]
            out = stream_once(host, port, {**body, "messages": msg})
            with lock:
                results.append(out)

    progress(f"{args.clients} clients x {args.requests} streaming requests ...")
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def summarize(results: list[tuple[float, float, int]], wall: float) -> dict[str, Any]:
    firsts = [r[0] for r in results]
    totals = [r[1] for r in results]
    return {
        "requests": len(results),
        "wall_s": wall,
        "requests_per_s": len(results) / wall,
        "tokens_per_s": sum(r[2] for r in results) / wall,
        "latency_s": {f"p{q}": percentile(totals, q) for q in (50, 90, 99)},
        "first_chunk_s": {f"p{q}": percentile(firsts, q) for q in (50, 90, 99)},
        "latency_median_s": median(totals),
    }


def plot(data: dict[str, Any], plt: Any) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, key in (("whole request", "latency_s"), ("first chunk", "first_chunk_s")):
        ordered = sorted(r[key] for r in data["raw"])
        ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=label)
    args = data["args"]
    ax.set(
        xlabel="seconds",
        ylabel="fraction of requests",
        title=f"{args['clients']} streaming clients, {args['shards']} shards",
    )
    ax.legend()
    fig.tight_layout()


def main() -> None:
    args = parse_args()

    import ray

    from gptoss_ray.cluster.engine import Engine
    from gptoss_ray.cluster.http_api import serve_api

    engine = Engine.start(args.model, shards=args.shards, device=args.device, dtype=args.dtype)
    try:
        url = ray.get(engine.coordinator.attach.remote(serve_api, "127.0.0.1", 0, None))
        host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
        results, wall = run_clients(host, int(port), args)
    finally:
        engine.shutdown()

    summary = summarize(results, wall)
    m = machine()
    print(f"machine: {describe(m)}")
    print(
        f"model {args.model} ({args.dtype}, {args.device}), {args.shards} shards, "
        f"{args.clients} concurrent streaming clients x {args.requests} requests, "
        f"{args.max_tokens} tokens each"
    )
    print(f"{summary['requests_per_s']:.2f} requests/s, {summary['tokens_per_s']:.1f} tokens/s")
    lat, first = summary["latency_s"], summary["first_chunk_s"]
    print(f"latency s: p50 {lat['p50']:.2f}  p90 {lat['p90']:.2f}  p99 {lat['p99']:.2f}")
    print(f"first chunk s: p50 {first['p50']:.2f}  p90 {first['p90']:.2f}  p99 {first['p99']:.2f}")
    raw = [{"first_chunk_s": f, "latency_s": t, "tokens": n} for f, t, n in results]
    data = {"machine": m, "args": vars(args), "summary": summary, "raw": raw}
    save("http", data, args.out, plot)


if __name__ == "__main__":
    main()

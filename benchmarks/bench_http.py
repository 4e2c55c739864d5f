"""Load on the OpenAI-compatible HTTP front (Ray Serve): N concurrent streaming clients,
and the engine's step time with clients attached against the same batch driven by the
Python API.

    python benchmarks/bench_http.py --clients 1000 --engines 2 --shards 1
    python benchmarks/bench_http.py --isolation --clients 500 --max-seqs 64

Starts the engines (a private local Ray, CPU shards unless --device cuda) behind the Serve
front, then N clients (one asyncio loop, a connection each) send --requests streaming chat
completions back to back. Prints requests/s, tokens/s, errors and the latency percentiles
(whole request, and the first streamed chunk after the role chunk), with the machine;
saves JSON and a PNG (latency CDF) under benchmarks/out/.

--isolation: one engine with --max-seqs running sequences; the decode step time (the
engine's own step seconds over its steps, medians of windows of steady decoding) with N
streaming HTTP clients attached, then with the same N requests submitted through the
Python API (`Coordinator.submit_chat`), in one run; their ratio is what the clients cost
the engine."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from gptoss_ray.benchmarks.common import describe, machine, median, percentile, progress, save


async def stream_once(host: str, port: int, body: dict) -> tuple[float, float, int]:
    """One streaming chat completion over a fresh connection -> (seconds to the first
    chunk after the role chunk, total seconds, completion tokens)."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    data = json.dumps(body).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
        + data
    )
    await writer.drain()
    status = (await reader.readline()).split()
    if len(status) < 2 or status[1] != b"200":
        rest = await reader.read(400)
        writer.close()
        raise RuntimeError(f"HTTP {status[1:2]}: {rest!r}")
    first, tokens, chunks = None, 0, 0
    async for raw in reader:
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "error" in event:
            raise RuntimeError(f"stream error: {event['error']['message']}")
        chunks += 1
        if chunks == 2:
            first = time.perf_counter() - t0
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    writer.close()
    total = time.perf_counter() - t0
    return first if first is not None else total, total, tokens


def body(args: argparse.Namespace, k: int, r: int) -> dict[str, Any]:
    return {
        "model": args.model,
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": f"Client {k} asks question {r}."}],
    }


async def run_clients(host: str, port: int, args: argparse.Namespace) -> tuple[list, list, float]:
    """Every client's requests back to back, all clients at once -> (results, errors, s)."""
    results: list[tuple[float, float, int]] = []
    errors: list[str] = []

    async def client(k: int) -> None:
        for r in range(args.requests):
            try:
                results.append(await stream_once(host, port, body(args, k, r)))
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    await stream_once(host, port, body(args, -1, 0))  # the first request pays for warming
    progress(f"{args.clients} clients x {args.requests} streaming requests ...")
    t0 = time.perf_counter()
    await asyncio.wait_for(
        asyncio.gather(*(client(k) for k in range(args.clients))), args.time_limit
    )
    return results, errors, time.perf_counter() - t0


def summarize(results: list[tuple[float, float, int]], errors: list, wall: float) -> dict:
    firsts = [r[0] for r in results]
    totals = [r[1] for r in results]
    return {
        "requests": len(results),
        "errors": len(errors),
        "error_examples": errors[:5],
        "wall_s": wall,
        "requests_per_s": len(results) / wall,
        "tokens_per_s": sum(r[2] for r in results) / wall,
        "latency_s": {f"p{q}": percentile(totals, q) for q in (50, 90, 99)},
        "first_chunk_s": {f"p{q}": percentile(firsts, q) for q in (50, 90, 99)},
        "latency_median_s": median(totals),
    }


# -- isolation -------------------------------------------------------------------------------
def step_times(engine: Any, windows: int, window_s: float, batch: int) -> list[float]:
    """Mean step seconds of each window in which the engine ran `batch` sequences."""
    import ray

    out = []
    deadline = time.monotonic() + windows * window_s * 6
    while len(out) < windows and time.monotonic() < deadline:
        a = ray.get(engine.stats.remote())
        time.sleep(window_s)
        b = ray.get(engine.stats.remote())
        steps = b["steps"] - a["steps"]
        full = sum(a["running"]) == batch and sum(b["running"]) == batch
        if steps > 0 and full:
            out.append((b["seconds"]["step"] - a["seconds"]["step"]) / steps)
    return out


def isolation(args: argparse.Namespace, url: str, engine: Any) -> dict[str, Any]:
    """The step time at batch --max-seqs with --clients streaming HTTP clients attached,
    then with as many requests through the Python API (same engine, same run)."""
    import ray

    host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
    long = argparse.Namespace(**{**vars(args), "max_tokens": args.isolation_tokens})

    async def attached() -> list[float]:
        tasks = [
            asyncio.ensure_future(stream_once(host, int(port), body(long, k, 0)))
            for k in range(args.clients)
        ]
        await asyncio.sleep(args.settle_s)  # every client connected, the batch full
        times = await asyncio.to_thread(step_times, engine, args.windows, 1.0, args.max_seqs)
        for t in tasks:
            t.cancel()  # the clients leave: their requests are cancelled
        await asyncio.gather(*tasks, return_exceptions=True)
        return times

    progress(f"step time at batch {args.max_seqs} with {args.clients} HTTP clients ...")
    http = asyncio.run(attached())
    time.sleep(3)  # the cancelled requests leave the engine
    progress(f"step time at batch {args.max_seqs} through the Python API ...")
    ids = [
        ray.get(
            engine.submit_chat.remote(
                {k: v for k, v in body(long, k, 0).items() if "stream" not in k}
            )
        )[0]
        for k in range(args.clients)
    ]
    time.sleep(args.settle_s / 2)
    api = step_times(engine, args.windows, 1.0, args.max_seqs)
    for rid in ids:
        engine.release.remote(rid)
    return {
        "batch": args.max_seqs,
        "clients": args.clients,
        "http_step_ms": [t * 1e3 for t in http],
        "api_step_ms": [t * 1e3 for t in api],
        "http_median_ms": median(http) * 1e3,
        "api_median_ms": median(api) * 1e3,
        "ratio": median(http) / median(api) if api and http else float("nan"),
    }


# -- main ------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt-oss-tiny")
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--shards", type=int, default=1, help="shards of each engine")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=1, help="per client")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--max-seqs", type=int, default=64, help="running sequences per shard")
    parser.add_argument(
        "--threads-per-shard",
        type=int,
        default=None,
        help="torch threads of a CPU shard (default: the cores over the shards)",
    )
    parser.add_argument("--time-limit", type=float, default=1800, help="seconds for the load")
    parser.add_argument("--isolation", action="store_true", help="see the module's doc")
    parser.add_argument("--isolation-tokens", type=int, default=400)
    parser.add_argument("--windows", type=int, default=5, help="isolation: 1-s windows")
    parser.add_argument("--settle-s", type=float, default=20.0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "out"))
    return parser.parse_args()


def plot(data: dict[str, Any], plt: Any) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, key in (("whole request", "latency_s"), ("first chunk", "first_chunk_s")):
        ordered = sorted(r[key] for r in data["raw"])
        ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=label)
    args = data["args"]
    ax.set(
        xlabel="seconds",
        ylabel="fraction of requests",
        title=f"{args['clients']} streaming clients, {args['engines']} x {args['shards']} shards",
    )
    ax.legend()
    fig.tight_layout()


def plot_isolation(data: dict[str, Any], plt: Any) -> None:
    r = data["result"]
    fig, ax = plt.subplots(figsize=(5, 4))
    labels = [f"{r['clients']} HTTP clients", "Python API"]
    ax.bar(labels, [r["http_median_ms"], r["api_median_ms"]])
    ax.set(ylabel="decode step, ms (median)", title=f"batch {r['batch']}: ratio {r['ratio']:.3f}")
    fig.tight_layout()


def main() -> None:
    args = parse_args()
    import os

    import ray

    from gptoss_ray.cluster.ray_instance import NAMESPACE, start_private
    from gptoss_ray.cluster.serve import serve, stop

    engines = 1 if args.isolation else args.engines
    start_private(max(os.cpu_count() or 1, engines * args.shards + 1))
    name = "bench-http"
    info = serve(
        args.model,
        args.shards,
        engines=engines,
        name=name,
        device=args.device,
        dtype=args.dtype,
        max_seqs=args.max_seqs,
        threads_per_shard=args.threads_per_shard,
        http=("127.0.0.1", 0, None),
        front={"max_outstanding": max(1024, args.clients)},
    )
    m = machine()
    try:
        if args.isolation:
            result = isolation(args, info["url"], ray.get_actor(name, namespace=NAMESPACE))
        else:
            host, port = info["url"].removeprefix("http://").removesuffix("/v1").split(":")
            results, errors, wall = asyncio.run(run_clients(host, int(port), args))
    finally:
        stop(name, address=None)
        ray.shutdown()

    print(f"machine: {describe(m)}")
    if args.isolation:
        print(
            f"model {args.model} ({args.dtype}, {args.device}), 1 engine x {args.shards} "
            f"shard(s), batch {args.max_seqs}, {args.clients} requests"
        )
        print(
            f"decode step ms (median of {args.windows} 1-s windows): "
            f"{result['http_median_ms']:.1f} with {args.clients} HTTP clients attached, "
            f"{result['api_median_ms']:.1f} through the Python API; ratio {result['ratio']:.3f}"
        )
        data = {"machine": m, "args": vars(args), "result": result}
        save("http-isolation", data, args.out, plot_isolation)
        return
    summary = summarize(results, errors, wall)
    print(
        f"model {args.model} ({args.dtype}, {args.device}), {args.engines} engine(s) x "
        f"{args.shards} shard(s), {args.clients} concurrent streaming clients x "
        f"{args.requests} requests, {args.max_tokens} tokens each"
    )
    print(
        f"{summary['requests']} ok, {summary['errors']} errors in {wall:.1f} s: "
        f"{summary['requests_per_s']:.2f} requests/s, {summary['tokens_per_s']:.1f} tokens/s"
    )
    lat, first = summary["latency_s"], summary["first_chunk_s"]
    print(f"latency s: p50 {lat['p50']:.2f}  p90 {lat['p90']:.2f}  p99 {lat['p99']:.2f}")
    print(f"first chunk s: p50 {first['p50']:.2f}  p90 {first['p90']:.2f}  p99 {first['p99']:.2f}")
    for e in summary["error_examples"]:
        print(f"error: {e}")
    raw = [{"first_chunk_s": f, "latency_s": t, "tokens": n} for f, t, n in results]
    data = {"machine": m, "args": vars(args), "summary": summary, "raw": raw}
    save("http", data, args.out, plot)


if __name__ == "__main__":
    main()

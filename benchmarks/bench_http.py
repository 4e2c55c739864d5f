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
engine's own step seconds over its steps, in windows of steady decoding: the batch full, no
prompt prefilled) with N streaming HTTP clients attached, and with the same N requests
submitted through the Python API's client (`engine_client.RayEngineClient`); the two phases alternate
--rounds times in one run (HTTP, API, API, HTTP, ...), each measured once every request is
in. The median of the rounds' ratios is what the clients cost the engine. On a virtual
machine the host may steal CPU time: each window records the share stolen, and the ratio
is also given over the quiet windows only (--quiet), which measure us and not the host."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from gptoss_ray.benchmarks.common import (
    describe,
    machine,
    median,
    percentile,
    process_cpu_s,
    progress,
    save,
)


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
def engine_stats(engine: Any) -> dict[str, Any]:
    import ray

    return ray.get(engine.stats.remote())


def wait_for(engine: Any, done: Any, timeout: float) -> dict[str, Any]:
    """Polls the engine's stats until done(stats) or timeout -> the last stats."""
    deadline = time.monotonic() + timeout
    while True:
        s = engine_stats(engine)
        if done(s) or time.monotonic() > deadline:
            return s
        time.sleep(0.2)


def cpu_ticks() -> tuple[int, int]:
    """(all, stolen) CPU ticks of this machine so far (Linux; zeros elsewhere): a virtual
    machine's stolen time is noise that no step here controls."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0, 0
    return sum(ticks), ticks[7] if len(ticks) > 7 else 0


def step_times(engine: Any, windows: int, window_s: float, batch: int) -> list[dict[str, float]]:
    """Each window of steady decoding (`batch` sequences running at both ends and no
    prompt token prefilled in between): its mean step ms, the host part of it (beyond the
    shard's own work: the coordinator and the round trip), the CPU ms its coordinator's
    process spent per step, and the share of the machine's CPU time that the VM's host
    stole meanwhile."""
    import ray

    out = []
    pid = ray.get(engine.info.remote())["pid"]  # the coordinator's process (this machine)
    deadline = time.monotonic() + windows * window_s * 6
    while len(out) < windows and time.monotonic() < deadline:
        a, (t0, s0), c0 = engine_stats(engine), cpu_ticks(), process_cpu_s(pid)
        time.sleep(window_s)
        b, (t1, s1), c1 = engine_stats(engine), cpu_ticks(), process_cpu_s(pid)
        steps = b["steps"] - a["steps"]
        full = sum(a["running"]) == batch and sum(b["running"]) == batch
        if steps > 0 and full and b["prefill_tokens"] == a["prefill_tokens"]:
            spent = {k: b["seconds"][k] - a["seconds"].get(k, 0.0) for k in b["seconds"]}
            host = spent.get("coordinator", 0.0) + spent.get("rpc", 0.0)
            out.append(
                {
                    "step_ms": spent["step"] / steps * 1e3,
                    "host_ms": host / steps * 1e3,
                    "coordinator_cpu_ms": (c1 - c0) / steps * 1e3,
                    "stolen": (s1 - s0) / max(1, t1 - t0),
                }
            )
    return out


def pin_shard(engine: Any) -> dict[str, Any]:
    """The shard's process alone on this machine's last core, every other thread of this
    run (this process, its private Ray, the front, the coordinator) on the others: as a
    GPU shard's step leaves the host's cores to the front. Linux. -> what went where."""
    import ray

    (shard,) = ray.get(engine.status.remote())["shards_detail"]
    cores = sorted(os.sched_getaffinity(0))
    alone, rest = {cores[-1]}, set(cores[:-1])
    pinned = 0
    from gptoss_ray.cluster.runtime.head_supervisor import descendants

    for pid in [os.getpid(), *descendants(os.getpid())]:
        try:
            threads = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in threads:  # affinity is a thread's own: each is set
            try:
                os.sched_setaffinity(int(tid), alone if pid == shard["pid"] else rest)
                pinned += 1
            except OSError:  # gone meanwhile
                pass
    return {
        "shard_pid": shard["pid"],
        "shard_cores": sorted(alone),
        "other_cores": sorted(rest),
        "threads_pinned": pinned,
    }


def isolation(args: argparse.Namespace, url: str, engine: Any) -> dict[str, Any]:
    """The step time at batch --max-seqs with --clients streaming HTTP clients attached and
    with as many requests through the Python API, alternated --rounds times in one run
    (A B B A ...: a drift of the machine weighs on both) -> the median ratio."""
    host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
    long = argparse.Namespace(**{**vars(args), "max_tokens": args.isolation_tokens})
    pinned = pin_shard(engine) if args.pin_shard else None

    def all_in(s: dict[str, Any]) -> bool:
        return s["waiting"] + sum(s["running"]) >= args.clients

    def measure() -> list[dict[str, float]]:
        wait_for(engine, all_in, args.settle_s)  # every request queued or running
        return step_times(engine, args.windows, args.window_s, args.max_seqs)

    def drained() -> None:
        wait_for(engine, lambda s: s["waiting"] + sum(s["running"]) == 0, 60)

    async def attached(r: int) -> list[dict[str, float]]:
        tasks = [
            asyncio.ensure_future(stream_once(host, int(port), body(long, k, r)))
            for k in range(args.clients)
        ]
        times = await asyncio.to_thread(measure)
        for t in tasks:
            t.cancel()  # the clients leave: their requests are cancelled
        await asyncio.gather(*tasks, return_exceptions=True)
        return times

    def through_api(r: int) -> list[dict[str, float]]:
        import ray

        from gptoss_ray.cluster.client.chat import chat_request
        from gptoss_ray.cluster.client.engine_client import LoopThread, RayEngineClient

        info = ray.get(engine.info.remote())
        chats = [
            chat_request(
                {key: v for key, v in body(long, k, r).items() if "stream" not in key}, info
            )
            for k in range(args.clients)
        ]
        loop, client = LoopThread(), RayEngineClient(engine, "bench")
        streams = loop.run(client.submit([c[0] for c in chats], [c[1] for c in chats]))
        times = measure()
        for stream in streams:
            loop.loop.call_soon_threadsafe(stream.close)
        return times

    def of(windows: list[dict[str, float]], key: str) -> float:
        return median([w[key] for w in windows])

    rounds = []
    for r in range(args.rounds):
        phases: dict[str, list[dict[str, float]]] = {}
        for phase in ("http", "api") if r % 2 == 0 else ("api", "http"):
            progress(
                f"round {r + 1}/{args.rounds}: step time at batch {args.max_seqs}, {phase} ..."
            )
            phases[phase] = asyncio.run(attached(r)) if phase == "http" else through_api(r)
            drained()
        http, api = phases["http"], phases["api"]
        ratio = of(http, "step_ms") / of(api, "step_ms")
        progress(
            f"round {r + 1}: step {of(http, 'step_ms'):.1f} ms with HTTP clients, "
            f"{of(api, 'step_ms'):.1f} ms through the API, ratio {ratio:.3f}; host part "
            f"{of(http, 'host_ms'):.2f} / {of(api, 'host_ms'):.2f} ms; CPU stolen by the VM's "
            f"host {of(http, 'stolen'):.1%} / {of(api, 'stolen'):.1%}"
        )
        rounds.append({"http": http, "api": api, "ratio": ratio})
    every = {p: [w for r in rounds for w in r[p]] for p in ("http", "api")}
    # windows in which the VM's host took more than --quiet of the CPU measure the host
    quiet = {p: [w for w in every[p] if w["stolen"] < args.quiet] for p in every}
    return {
        "batch": args.max_seqs,
        "clients": args.clients,
        "rounds": rounds,
        "ratio": median([r["ratio"] for r in rounds if r["ratio"] == r["ratio"]]),
        "http_median_ms": of(every["http"], "step_ms"),
        "api_median_ms": of(every["api"], "step_ms"),
        "http_host_median_ms": of(every["http"], "host_ms"),
        "api_host_median_ms": of(every["api"], "host_ms"),
        "http_coordinator_cpu_ms": of(every["http"], "coordinator_cpu_ms"),
        "api_coordinator_cpu_ms": of(every["api"], "coordinator_cpu_ms"),
        "pinned": pinned,
        "quiet_windows": {p: len(quiet[p]) for p in quiet},
        "quiet_ratio": of(quiet["http"], "step_ms") / of(quiet["api"], "step_ms"),
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
    parser.add_argument("--rounds", type=int, default=4, help="isolation: HTTP/API alternations")
    parser.add_argument("--windows", type=int, default=5, help="isolation: windows per phase")
    parser.add_argument("--window-s", type=float, default=2.0)
    parser.add_argument(
        "--pin-shard",
        action="store_true",
        help="isolation: the shard alone on the last core (one torch thread), all else on "
        "the others, as a GPU shard leaves the host's cores to the front (Linux)",
    )
    parser.add_argument(
        "--quiet",
        type=float,
        default=0.03,
        help="isolation: a window is quiet when the VM's host stole less of the CPU than this",
    )
    parser.add_argument(
        "--settle-s", type=float, default=120.0, help="isolation: at most, for every request in"
    )
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
    fig, ax = plt.subplots(figsize=(6, 4))
    x = range(1, len(r["rounds"]) + 1)
    for label, key, shift in (
        (f"{r['clients']} HTTP clients", "http", -0.2),
        ("Python API", "api", 0.2),
    ):
        medians = [median([w["step_ms"] for w in rnd[key]]) for rnd in r["rounds"]]
        ax.bar([i + shift for i in x], medians, 0.4, label=label)
    ax.set(
        xlabel="round",
        ylabel="decode step, ms (median)",
        title=f"batch {r['batch']}: median ratio {r['ratio']:.3f}",
        xticks=list(x),
    )
    ax.legend()
    fig.tight_layout()


def main() -> None:
    args = parse_args()
    import ray

    from gptoss_ray.cluster.engine.config import EngineConfig
    from gptoss_ray.cluster.front.serve import serve, stop
    from gptoss_ray.cluster.runtime.ray_instance import NAMESPACE, start_private

    engines = 1 if args.isolation else args.engines
    if args.isolation and args.pin_shard:
        args.threads_per_shard, args.shards = 1, 1
    start_private(max(os.cpu_count() or 1, engines * args.shards + 1))
    name = "bench-http"
    config = EngineConfig(
        model=args.model,
        shards=args.shards,
        device=args.device,
        dtype=args.dtype,
        max_seqs=args.max_seqs,
        threads_per_shard=args.threads_per_shard,
    )
    info = serve(
        config,
        engines=engines,
        name=name,
        http=("127.0.0.1", 0, None),
        front={"max_outstanding": max(1024, args.clients)},
    )
    m = machine()
    try:
        if args.isolation:
            result = isolation(args, info["url"], ray.get_actor(name, namespace=NAMESPACE))
        else:
            host, port = info["url"].removeprefix("http://").removesuffix("/v1").split(":")
            # the coordinators' processes: their CPU per token streamed is the engines'
            # share of the front's work (none, when text is built in the front)
            handles = [ray.get_actor(n, namespace=NAMESPACE) for n in info["engines"]]
            pids = [ray.get(h.info.remote())["pid"] for h in handles]
            steps0 = sum(s["steps"] for s in ray.get([h.stats.remote() for h in handles]))
            cpu0 = sum(process_cpu_s(p) for p in pids)
            results, errors, wall = asyncio.run(run_clients(host, int(port), args))
            coordinator_cpu_s = sum(process_cpu_s(p) for p in pids) - cpu0
            steps = sum(s["steps"] for s in ray.get([h.stats.remote() for h in handles])) - steps0
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
            f"decode step ms (median of {args.rounds} rounds x {args.windows} windows of "
            f"{args.window_s:g} s): {result['http_median_ms']:.1f} with {args.clients} HTTP "
            f"clients attached, {result['api_median_ms']:.1f} through the Python API"
        )
        ratios = ", ".join(f"{r['ratio']:.3f}" for r in result["rounds"])
        print(f"ratio per round: {ratios}; median ratio {result['ratio']:.3f}")
        print(
            f"host part of the step (coordinator + round trip), median ms: "
            f"{result['http_host_median_ms']:.2f} with HTTP clients, "
            f"{result['api_host_median_ms']:.2f} through the Python API"
        )
        print(
            f"coordinator process CPU per step, median ms: {result['http_coordinator_cpu_ms']:.2f} "
            f"with HTTP clients, {result['api_coordinator_cpu_ms']:.2f} through the Python API"
        )
        q = result["quiet_windows"]
        print(
            f"quiet windows only (CPU stolen by the VM's host < {args.quiet:.0%}; {q['http']} "
            f"with HTTP clients, {q['api']} through the API): ratio {result['quiet_ratio']:.3f}"
        )
        data = {"machine": m, "args": vars(args), "result": result}
        save("http-isolation", data, args.out, plot_isolation)
        return
    summary = summarize(results, errors, wall)
    tokens = sum(r[2] for r in results)
    summary["coordinator_cpu_s"] = coordinator_cpu_s
    summary["coordinator_cpu_ms_per_token"] = 1000 * coordinator_cpu_s / max(1, tokens)
    summary["coordinator_cpu_ms_per_step"] = 1000 * coordinator_cpu_s / max(1, steps)
    summary["steps"] = steps
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
    print(
        f"coordinator process CPU: {summary['coordinator_cpu_s']:.2f} s, "
        f"{summary['coordinator_cpu_ms_per_token']:.3f} ms per streamed token, "
        f"{summary['coordinator_cpu_ms_per_step']:.2f} ms per engine step ({steps} steps)"
    )
    for e in summary["error_examples"]:
        print(f"error: {e}")
    raw = [{"first_chunk_s": f, "latency_s": t, "tokens": n} for f, t, n in results]
    data = {"machine": m, "args": vars(args), "summary": summary, "raw": raw}
    save("http", data, args.out, plot)


if __name__ == "__main__":
    main()

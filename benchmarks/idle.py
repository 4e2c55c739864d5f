"""Idle CPU of an engine: its coordinator and shards with nothing to do, and what the
first request after an idle spell pays for waking them.

    gptoss-ray bench idle --shards 2 [--seconds 30] [--steps both]

Starts an engine (CPU shards unless --device cuda), runs one request, waits until the
engine has gone idle, then reads each of its processes' CPU time from /proc over --seconds,
per process and per thread (so what is left has a name). Then a one-token request after
the idle spell is timed against the same request again at once. With steps through actor
calls, through the compiled graph, or both in one run. Linux, one node: the processes are
read from this machine's /proc."""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from typing import Any

from gptoss_ray.benchmarks.common import median, proc_stat, progress, save

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def thread_ticks(pid: int) -> Counter:
    """CPU ticks (user + system) of each thread name of a process so far."""
    out: Counter = Counter()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name, fields = proc_stat(f"/proc/{pid}/task/{tid}/stat")
        except OSError:  # the thread ended
            continue
        out[name] += int(fields[11]) + int(fields[12])
    return out


def idle_cpu(pids: dict[str, int], seconds: float) -> dict[str, Any]:
    """% of one core each process (and each of its thread names) used over `seconds`."""
    before = {who: thread_ticks(pid) for who, pid in pids.items()}
    t0 = time.monotonic()
    time.sleep(seconds)
    after = {who: thread_ticks(pid) for who, pid in pids.items()}
    wall = time.monotonic() - t0
    out: dict[str, Any] = {}
    for who in pids:
        spent = after[who] - before[who]
        threads = {n: 100 * t / TICK / wall for n, t in spent.most_common() if t > 0}
        out[who] = {"percent": sum(threads.values()), "threads": threads}
    return out


def one_mode(args: argparse.Namespace, compiled: bool) -> dict[str, Any]:
    import ray

    from gptoss_ray.benchmarks.engine_runs import random_prompts
    from gptoss_ray.cluster.client.engine import Engine
    from gptoss_ray.model.types import SamplingParams

    engine = Engine.start(
        args.model, shards=args.shards, device=args.device, compiled_steps=compiled
    )
    try:
        prompt = random_prompts(1, 16, seed=0)
        one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        status = ray.get(engine.coordinator.status.remote())
        pids = {"coordinator": status["pid"]}
        pids |= {f"shard {d['rank']}": d["pid"] for d in status["shards_detail"]}
        time.sleep(args.settle_s)  # the engine goes idle (engine_loop.IDLE_AFTER_S)
        progress(f"idle CPU over {args.seconds:g} s ...")
        cpu = idle_cpu(pids, args.seconds)
        wake = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            engine.generate(prompt, one)
            after_idle = time.perf_counter() - t0
            t0 = time.perf_counter()
            engine.generate(prompt, one)
            busy = time.perf_counter() - t0
            wake.append((after_idle, busy))
            time.sleep(args.settle_s)
        return {
            "cpu": cpu,
            "total_percent": sum(p["percent"] for p in cpu.values()),
            "first_after_idle_ms": median([w[0] * 1e3 for w in wake]),
            "again_at_once_ms": median([w[1] * 1e3 for w in wake]),
        }
    finally:
        engine.shutdown()


def run(args: argparse.Namespace, data: dict[str, Any]) -> None:
    modes = {"actor calls": False, "compiled graph": True}
    if args.steps != "both":
        modes = {k: v for k, v in modes.items() if k == args.steps.replace("-", " ")}
    data["results"] = {}
    for label, compiled in modes.items():
        progress(f"{label}: {args.shards} shard(s) ...")
        data["results"][label] = one_mode(args, compiled)
    print_idle(data)
    save("idle", data, args.out, plot_idle)


def print_idle(data: dict[str, Any]) -> None:
    a = data["args"]
    print(
        f"model {a['model']} ({a['device']}), {a['shards']} shard(s): % of one core over "
        f"{a['seconds']:g} s idle; a 1-token request after {a['settle_s']:g} s idle vs at once "
        f"(median of {a['repeats']})"
    )
    for label, r in data["results"].items():
        parts = ", ".join(f"{who} {c['percent']:.2f}" for who, c in r["cpu"].items())
        print(
            f"{label}: total {r['total_percent']:.2f}% ({parts}); first request after idle "
            f"{r['first_after_idle_ms']:.0f} ms, again at once {r['again_at_once_ms']:.0f} ms"
        )
        for who, c in r["cpu"].items():
            top = ", ".join(f"{n} {p:.2f}" for n, p in list(c["threads"].items())[:4])
            print(f"    {who}: {top}")


def plot_idle(data: dict[str, Any], plt: Any) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = list(data["results"])
    bottom = [0.0] * len(labels)
    for who in next(iter(data["results"].values()))["cpu"]:
        values = [data["results"][m]["cpu"][who]["percent"] for m in labels]
        ax.bar(labels, values, bottom=bottom, label=who)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.axhline(2.0, color="k", linestyle="--", linewidth=1, label="2% of a core")
    ax.set(ylabel="% of one core, idle", title=f"engine idle, {data['args']['shards']} shard(s)")
    ax.legend()
    fig.tight_layout()

"""Idle CPU of an engine: its coordinator and shards with nothing to do, and what the
first request after an idle spell pays for waking them.

    gptoss-ray bench idle --shards 2 [--seconds 30] [--steps both]
    gptoss-ray bench idle --served [--shards 2] [--seconds 30] [--repeats 3]

Starts an engine (CPU shards unless --device cuda), runs one request, waits until the
engine has gone idle, then reads each of its processes' CPU time from /proc over --seconds,
per process and per thread (so what is left has a name). Then a one-token request after
the idle spell is timed against the same request again at once. With steps through actor
calls, through the compiled graph, or both in one run.

--served: the whole served stack as `gptoss-ray serve --http` runs it on its own local
head (Ray's processes, Serve's controller, proxy and replica, the engine), every process
under the head's supervisor counted, once on a head started with only the dashboard UI
and usage stats left out and once on the lean head that `serve` starts
(`ray_instance.LEAN_HEAD_FLAGS`, `LEAN_HEAD_ENV`); --repeats windows each, medians. Linux,
one node: the processes are read from this machine's /proc."""

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


def process_kind(pid: int) -> str:
    """A process's kind: a Ray worker's title (ray::ServeController, ...), a Python
    program's module or script, else its command's name."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().decode(errors="replace").split("\0")
    name, _ = proc_stat(f"/proc/{pid}/stat")
    if argv[0].startswith("ray::"):
        return argv[0].split()[0]
    if "python" in name or "python" in os.path.basename(argv[0]):
        rest = [a for a in argv[1:] if a and not a.startswith("-")]
        module = argv[argv.index("-m") + 1] if "-m" in argv else (rest[0] if rest else name)
        return os.path.basename(module).removesuffix(".py")
    return name


def tree_cpu(root: int, seconds: float) -> dict[str, float]:
    """% of one core each kind of process under `root` (and root) used over `seconds`."""
    from gptoss_ray.cluster.runtime.head_supervisor import descendants

    def ticks() -> dict[int, tuple[str, int]]:
        out = {}
        for pid in [root, *descendants(root)]:
            try:
                _, fields = proc_stat(f"/proc/{pid}/stat")
                out[pid] = (process_kind(pid), int(fields[11]) + int(fields[12]))
            except (OSError, ValueError):  # gone meanwhile
                continue
        return out

    before, t0 = ticks(), time.monotonic()
    time.sleep(seconds)
    after, wall = ticks(), time.monotonic() - t0
    kinds: Counter = Counter()
    for pid, (kind, t) in after.items():
        kinds[kind] += 100 * (t - before.get(pid, (kind, t))[1]) / TICK / wall
    return dict(kinds.most_common())


def served_stack(args: argparse.Namespace, lean: bool) -> dict[str, Any]:
    import json as json_
    import subprocess
    import sys
    import tempfile
    import urllib.request

    from gptoss_ray.cluster.runtime.ray_instance import start_head, stop_head

    key, port = "bench-idle-key", args.port
    head = start_head(args.shards + 2, lean=lean)
    try:
        with tempfile.TemporaryDirectory() as cwd:  # a user's folder: no model/ of ours
            serve = [sys.executable, "-m", "gptoss_ray.cluster.cli.main", "serve", "--http"]
            subprocess.run(
                [*serve, "--shards", str(args.shards), "--port", str(port), "--api-key", key],
                cwd=cwd,
                check=True,
                capture_output=True,
            )
        body = {"model": args.model, "messages": [{"role": "user", "content": "hi"}]}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json_.dumps(body | {"max_tokens": 4}).encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        urllib.request.urlopen(request, timeout=60).read()
        time.sleep(args.settle_s)
        windows = []
        for i in range(args.repeats):
            progress(f"{'lean' if lean else 'plain'} head: window {i + 1}/{args.repeats} ...")
            windows.append(tree_cpu(head["pid"], args.seconds))
        kinds = sorted({k for w in windows for k in w})
        per_kind = {k: median([w.get(k, 0.0) for w in windows]) for k in kinds}
        return {
            "total_percent": median([sum(w.values()) for w in windows]),
            "windows_total": [sum(w.values()) for w in windows],
            "per_kind": dict(sorted(per_kind.items(), key=lambda kv: -kv[1])),
        }
    finally:
        stop_head()


def run_served(args: argparse.Namespace, data: dict[str, Any]) -> None:
    data["results"] = {}
    for label, lean in (("plain head", False), ("lean head", True)):
        progress(f"{label}: gptoss-ray serve --http, {args.shards} shard(s) ...")
        data["results"][label] = served_stack(args, lean)
    a = data["args"]
    print(
        f"served stack idle (`gptoss-ray serve --http`, {a['model']}, {a['shards']} cpu "
        f"shards): % of one core, median of {a['repeats']} windows of {a['seconds']:g} s"
    )
    for label, r in data["results"].items():
        print(f"{label}: total {r['total_percent']:.2f}%")
        for kind, pct in r["per_kind"].items():
            if pct >= 0.05:
                print(f"    {pct:6.2f}  {kind}")
    save("idle-served", data, args.out, plot_served)


def plot_served(data: dict[str, Any], plt: Any) -> None:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = list(data["results"])
    kinds = list(next(iter(data["results"].values()))["per_kind"])
    for r in data["results"].values():
        kinds += [k for k in r["per_kind"] if k not in kinds]
    bottom = [0.0] * len(labels)
    for kind in kinds:
        values = [data["results"][m]["per_kind"].get(kind, 0.0) for m in labels]
        ax.bar(labels, values, bottom=bottom, label=kind)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set(ylabel="% of one core, idle", title="served stack idle, every process")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()


def run(args: argparse.Namespace, data: dict[str, Any]) -> None:
    if args.served:
        run_served(args, data)
        return
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

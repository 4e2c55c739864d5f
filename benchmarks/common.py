"""What every benchmark shares: the machine it ran on, medians and percentiles, and
saving results as JSON (and a PNG when matplotlib is installed)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("benchmarks") / "out"


@dataclass
class Links:
    """The links of a cluster that the scaling model assumes (`bench model` options)."""

    gpus_per_node: int = 8
    nvlink_gb_s: float = 450.0  # per GPU and direction (H100 SXM: 900 GB/s both ways)
    ib_gb_s: float = 50.0  # per GPU (one 400 Gb/s NIC per GPU)
    nvlink_latency_us: float = 10.0  # per all-to-all, launch included
    ib_latency_us: float = 25.0
    step_overhead_ms: float = 0.3  # coordinator and launch per step


def machine() -> dict[str, Any]:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }
    try:  # the kernels' machine code depends on it (bench sass: 3.6 and 3.9 differ)
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30)
    return info


def describe(m: dict[str, Any]) -> str:
    where = f"{m['gpu']}" if "gpu" in m else f"{m['cpus']} CPUs, no GPU"
    triton = f", triton {m['triton']}" if "triton" in m else ""
    return f"{where}; {m['platform']}; torch {m['torch']}{triton}"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def save(
    name: str, data: dict[str, Any], out: str | Path, plot: Callable[[dict, Any], None] | None
) -> list[Path]:
    """Writes out/<name>-<time>.json and, with matplotlib, the PNG that `plot(data, plt)`
    draws. Returns the paths written."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    paths = [stem.with_suffix(".json")]
    paths[0].write_text(json.dumps(data, indent=2))
    if plot is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            progress("matplotlib is not installed (pip install -e '.[bench]'): no PNG")
        else:
            plot(data, plt)
            plt.gcf().savefig(stem.with_suffix(".png"), dpi=110)
            plt.close("all")
            paths.append(stem.with_suffix(".png"))
    for p in paths:
        print(f"saved {p}")
    return paths


def fmt(x: float | None, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def process_cpu_s(pid: int) -> float:
    """Seconds of CPU a process used so far, user and system, all threads (Linux)."""
    fields = proc_stat(f"/proc/{pid}/stat")[1]
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_stat(path: str) -> tuple[str, list[str]]:
    """A Linux /proc/<pid>/stat (or .../task/<tid>/stat) -> the command's name and the
    fields after it (the name may hold spaces and parentheses: it ends at the last ')').
    Raises OSError when the process or thread is gone."""
    with open(path) as f:
        stat = f.read()
    return stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()

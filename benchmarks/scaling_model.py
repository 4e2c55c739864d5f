"""A calibrated model of decode throughput on 1 to 64 GPUs, expert-parallel against
independent replicas, for gpt-oss-20b and gpt-oss-120b.

Calibration (`calibrate`) measures on the device at hand, in the real layer shapes
(hidden 2880, 64 query and 8 KV heads, experts of 2880 x 2880; both models share them):
  dense(b, c)    one layer's attention plus norms and gate for b decoding sequences at
                 context c: a0 + a1 b + a2 b c (sliding layers see min(c, window))
  experts(e, r)  one layer's expert work for r rows touching e distinct experts:
                 e0 + e1 e + e2 r (weights read once per touched expert, rows computed)
  head(b)        final norm and unembedding: h0 + h1 b
each a least-squares fit of timed points (medians).

Prediction (`predict`) for N GPUs and b sequences per GPU, one token each per step:
  expert-parallel  L (dense(b, c) + experts(e_max, r_max) + dispatch + combine) + head(b)
  replicas         L (dense(b, c) + experts(e_1, b k)) + head(b)
where r_max and e_max are the busiest shard's rows and distinct experts, drawn from the
routing (uniform, or a measured per-expert load), and the all-to-all moves each row that
leaves its home (b k (1 - 1/N) rows of 2 H bytes, plus the expert id on the way out)
over NVLink within a node and InfiniBand between nodes, in parallel, after a latency
per exchange (our dispatch exchanges counts first: two latencies; combine one).
With more GPUs than experts, expert-parallel groups of at most E GPUs are replicated.
Memory decides the largest batch: weights (dense + all experts for a replica, dense +
1/N of the experts for a shard) and the KV cache per sequence must fit the GPU."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from gptoss_ray.benchmarks.common import Links, fmt, progress, save


@dataclass
class Calibration:
    device: str
    dtype: str
    kernels: bool
    dense: list[float]  # a0, a1, a2 (seconds)
    experts: list[float]  # e0, e1, e2
    head: list[float]  # h0, h1
    points: dict[str, list[list[float]]] = field(default_factory=dict)

    def dense_s(self, b: float, c: float) -> float:
        a0, a1, a2 = self.dense
        return a0 + a1 * b + a2 * b * c

    def experts_s(self, touched: float, rows: float) -> float:
        if rows <= 0:
            return 0.0
        e0, e1, e2 = self.experts
        return e0 + e1 * touched + e2 * rows

    def head_s(self, b: float) -> float:
        h0, h1 = self.head
        return h0 + h1 * b


def _fit(xs: list[list[float]], ys: list[float]) -> list[float]:
    """Least squares with non-negative coefficients (a negative cost has no meaning):
    drop the most negative term and refit until none is left."""
    active = list(range(len(xs[0])))
    while True:
        a = torch.tensor([[x[i] for i in active] for x in xs], dtype=torch.float64)
        y = torch.tensor(ys, dtype=torch.float64)[:, None]
        coef = torch.linalg.lstsq(a, y).solution[:, 0].tolist()
        worst = min(range(len(active)), key=lambda j: coef[j])
        if coef[worst] >= 0 or len(active) == 1:
            out = [0.0] * len(xs[0])
            for j, i in enumerate(active):
                out[i] = max(coef[j], 0.0)
            return out
        del active[worst]


def median_time(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of fn() over repeats, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def calibrate(
    config_name: str = "gpt-oss-20b",
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    kernels: bool | None = None,
    batches: tuple[int, ...] = (1, 8, 32, 64),
    contexts: tuple[int, ...] = (128, 1024),
    repeats: int = 5,
) -> Calibration:
    """Times one sliding and one full layer, their experts and the head, with random
    weights in the shapes of `config_name`, on `device`."""
    from gptoss_ray.model.checkpoint import randomize_
    from gptoss_ray.model.config import ModelConfig
    from gptoss_ray.model.model import RMSNorm, TransformerBlock

    config = ModelConfig.preset(config_name)
    dev = torch.device(device)
    kernels = dev.type == "cuda" if kernels is None else kernels
    h = config.hidden_size
    layers = [TransformerBlock(config, i, dtype, (0, config.num_experts)).to(dev) for i in (0, 1)]
    for block in layers:
        randomize_(block, seed=block.attn.layer)
        block.attn.use_kernels = block.mlp.experts.use_kernels = kernels
    g = torch.Generator(device=dev).manual_seed(0)

    dense_x, dense_y = _time_dense(layers, config, contexts, batches, repeats, dtype, g)
    exp_x, exp_y = _time_experts(layers[1].mlp.experts, config, batches, repeats, dtype, g)
    norm = RMSNorm(h, config.rms_norm_eps).to(dev)
    unembed = torch.nn.Linear(h, config.vocab_size, bias=False, dtype=dtype).to(dev)
    unembed.weight.normal_(generator=g)
    head_x, head_y = [], []
    for b in batches:
        x = torch.randn(b, h, generator=g, device=dev).to(dtype)
        head_x.append([1.0, b])
        head_y.append(median_time(lambda x=x: unembed(norm(x)).float().argmax(-1), repeats, dev))

    return Calibration(
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        dtype=str(dtype).removeprefix("torch."),
        kernels=kernels,
        dense=_fit(dense_x, dense_y),
        experts=_fit(exp_x, exp_y),
        head=_fit(head_x, head_y),
        points={
            "dense [1, b, b*c] -> s": [[*x, y] for x, y in zip(dense_x, dense_y, strict=True)],
            "experts [1, touched, rows] -> s": [[*x, y] for x, y in zip(exp_x, exp_y, strict=True)],
            "head [1, b] -> s": [[*x, y] for x, y in zip(head_x, head_y, strict=True)],
        },
    )


def _time_dense(layers, config, contexts, batches, repeats, dtype, g):
    """Attention and the router of each layer, for each batch and cached context ->
    (features [1, b, b * c_eff], seconds)."""
    from gptoss_ray.cluster.engine.kv_blocks import KVBlocks
    from gptoss_ray.model.kv_cache import SequenceBatch
    from gptoss_ray.model.model import RotaryEmbedding
    from gptoss_ray.model.types import KVLayout
    from gptoss_ray.shards.kv_cache import PagedBatchView, PagedKVCache

    dev, h = g.device, config.hidden_size
    rope = RotaryEmbedding(config)
    dense_x, dense_y = [], []
    for c in contexts:
        for b in batches:
            tokens = b * (c + 1)
            bs = 16
            layout = KVLayout(bs, b * (-(-(c + 1) // bs)) + 1, b * (-(-(c + 1) // bs)) + 1)
            cache = PagedKVCache(config, layout, dtype=dtype, device=dev)
            for pool in (*cache.k, *cache.v):
                pool.normal_(generator=g)
            blocks, seqs = KVBlocks(layout, config.attention_window), []
            for i in range(b):
                cache.place(str(i), 0, blocks.grow(str(i), 0, c))
                cache.tables[str(i)].length = c  # c tokens already cached
                seqs.append(cache.place(str(i), c, blocks.grow(str(i), c, 1)))
            batch = SequenceBatch(seqs, [1] * b, PagedBatchView(seqs, [1] * b))
            cos, sin = rope.cos_sin(batch.positions(dev))
            x = torch.randn(b, h, generator=g, device=dev).to(dtype)
            for block in layers:
                c_eff = min(c, config.sliding_window) if block.attn.window else c

                def run(block=block, x=x, batch=batch, cos=cos, sin=sin):
                    y = block.attn(x, batch, cos, sin)
                    block.mlp.router(block.mlp.norm(y))

                dense_x.append([1.0, b, b * c_eff])
                dense_y.append(median_time(run, repeats, dev))
            progress(f"   dense: {b} sequences at context {c} ({tokens} tokens cached)")
            del cache, seqs, batch
    return dense_x, dense_y


def _time_experts(experts, config, batches, repeats, dtype, g):
    """The grouped expert matmuls for each batch, the rows spread over a pool of experts ->
    (features [1, experts touched, rows], seconds)."""
    dev, k = g.device, config.experts_per_token
    e, h = config.num_experts, config.hidden_size
    exp_x, exp_y = [], []
    for b in batches:
        for pool in sorted({e, max(k, e // 4), k}):  # experts the rows may go to
            rows = b * k
            ids = torch.stack([torch.randperm(pool, generator=g, device=dev)[:k] for _ in range(b)])
            ids = ids.flatten()
            x = torch.randn(rows, h, generator=g, device=dev).to(dtype)
            touched = int(torch.unique(ids).numel())
            exp_x.append([1.0, touched, rows])
            exp_y.append(
                median_time(lambda x=x, ids=ids: experts.run_grouped(x, ids), repeats, dev)
            )
        progress(f"   experts: {b * k} rows")
    return exp_x, exp_y


def model_bytes(config) -> tuple[int, int]:
    """(bytes of everything but the experts, bytes of all experts) as served: bf16
    dense weights, MXFP4 expert weights and bf16 expert biases."""
    from gptoss_ray.model.checkpoint import tensor_specs

    dense = experts = 0
    for spec in tensor_specs(config):
        n = math.prod(spec.shape)
        size = n if spec.packed else 2 * n
        if spec.expert:
            experts += size
        else:
            dense += size
    return dense, experts


def kv_bytes_per_sequence(config, context: int, window_slack: int = 16) -> int:
    """bf16 keys and values of one sequence at `context` over all layers; a sliding layer
    holds its window plus `window_slack` (the partly used block at the window's start)."""
    per_token = 2 * config.num_key_value_heads * config.head_dim * 2  # k and v, bf16
    total = 0
    for layer in range(config.num_hidden_layers):
        sliding = config.is_sliding(layer)
        kept = min(context, config.sliding_window + window_slack) if sliding else context
        total += kept * per_token
    return total


@dataclass
class Routing:
    """Expected busiest-shard load for a batch, by sampling top-k routes: uniform over the
    experts, or in proportion to a measured per-expert load."""

    num_experts: int
    top_k: int
    load: list[float] | None = None
    samples: int = 16

    def busiest(self, tokens: int, shards: int, seed: int = 0) -> tuple[float, float, float]:
        """tokens routed from all shards -> (rows, distinct experts) of the busiest shard,
        and the fraction of rows that leave their home shard (homes are equal shares)."""
        g = torch.Generator().manual_seed(seed)
        weight = torch.tensor(self.load or [1.0] * self.num_experts, dtype=torch.float64)
        owner = torch.arange(self.num_experts) * shards // self.num_experts
        home = torch.arange(tokens) * shards // max(tokens, 1)
        rows = touched = remote = 0.0
        for _ in range(self.samples):
            # top-k without replacement in proportion to the weights (Gumbel top-k)
            keys = weight.log() - torch.log(
                -torch.log(torch.rand(tokens, self.num_experts, generator=g, dtype=torch.float64))
            )
            ids = keys.topk(self.top_k, dim=-1).indices  # [tokens, k]
            dest = owner[ids]
            per_shard = torch.bincount(dest.flatten(), minlength=shards)
            rows += per_shard.max().item()
            touched += max(
                torch.unique(ids[dest == s]).numel() if (dest == s).any() else 0
                for s in range(shards)
            )
            remote += (dest != home[:, None]).float().mean().item() if tokens else 0.0
        n = self.samples
        return rows / n, touched / n, remote / n


def predict(
    cal: Calibration,
    config,
    *,
    gpus: int,
    batch_per_gpu: int,
    context: int,
    links: Links,
    routing: Routing | None = None,
    gpu_memory_gb: float = 80.0,
) -> dict[str, Any]:
    """Tokens/s of expert parallelism over `gpus` and of `gpus` independent replicas, each
    GPU serving batch_per_gpu decoding sequences at the given context (None: does not fit
    in memory)."""
    routing = routing or Routing(config.num_experts, config.experts_per_token)
    if gpus > config.num_experts:
        # a shard holds at least one expert: beyond that, whole expert-parallel groups
        # are replicated (the largest group size that divides the GPUs)
        group = max(d for d in range(1, config.num_experts + 1) if gpus % d == 0)
        one = predict(
            cal,
            config,
            gpus=group,
            batch_per_gpu=batch_per_gpu,
            context=context,
            links=links,
            routing=routing,
            gpu_memory_gb=gpu_memory_gb,
        )
        copies = gpus // group
        for key in ("expert_parallel_tokens_per_s", "replicas_tokens_per_s"):
            if one[key] is not None:
                one[key] *= copies
        return one | {"gpus": gpus, "expert_parallel_groups": copies}
    layers, h, k = config.num_hidden_layers, config.hidden_size, config.experts_per_token
    b = batch_per_gpu
    dense_w, expert_w = model_bytes(config)
    kv = kv_bytes_per_sequence(config, context)
    usable = gpu_memory_gb * 1e9 * 0.92  # activations, allocator slack

    def layer_dense() -> float:
        n_sliding = sum(config.is_sliding(i) for i in range(layers))
        sliding = cal.dense_s(b, min(context, config.sliding_window))
        return (n_sliding * sliding + (layers - n_sliding) * cal.dense_s(b, context)) / layers

    # replicas: everything local
    _, touched_1, _ = routing.busiest(b, 1)
    replica_step = (
        layers * (layer_dense() + cal.experts_s(touched_1, b * k))
        + cal.head_s(b)
        + links.step_overhead_ms * 1e-3
    )
    replica_fits = dense_w + expert_w + b * kv <= usable
    # expert parallel
    rows, touched, remote = routing.busiest(b * gpus, gpus)
    sent = b * k * remote  # rows leaving each shard, and as many coming back
    intra = (min(gpus, links.gpus_per_node) - 1) / (gpus - 1) if gpus > 1 else 1.0
    latency = (
        links.nvlink_latency_us if gpus <= links.gpus_per_node else links.ib_latency_us
    ) * 1e-6

    def exchange(bytes_per_row: int) -> float:
        if gpus == 1:
            return 0.0
        volume = sent * bytes_per_row
        return latency + max(
            volume * intra / (links.nvlink_gb_s * 1e9),
            volume * (1 - intra) / (links.ib_gb_s * 1e9),
        )

    dispatch = latency * (gpus > 1) + exchange(2 * h + 8)  # counts first, then rows and ids
    combine = exchange(2 * h)
    ep_step = (
        layers * (layer_dense() + cal.experts_s(touched, rows) + dispatch + combine)
        + cal.head_s(b)
        + links.step_overhead_ms * 1e-3
    )
    ep_fits = dense_w + expert_w / gpus + b * kv <= usable
    return {
        "gpus": gpus,
        "batch_per_gpu": b,
        "context": context,
        "expert_parallel_groups": 1,
        "expert_parallel_tokens_per_s": gpus * b / ep_step if ep_fits else None,
        "replicas_tokens_per_s": gpus * b / replica_step if replica_fits else None,
        "expert_parallel_step_ms": ep_step * 1e3,
        "replica_step_ms": replica_step * 1e3,
        "all_to_all_ms_per_layer": (dispatch + combine) * 1e3,
        "rows_busiest_shard": rows,
        "experts_busiest_shard": touched,
        "max_batch_per_gpu": {
            "expert_parallel": max(0, int((usable - dense_w - expert_w / gpus) // kv)),
            "replicas": max(0, int((usable - dense_w - expert_w) // kv)),
        },
    }


def scaling_table(
    cal: Calibration,
    *,
    models: tuple[str, ...] = ("gpt-oss-20b", "gpt-oss-120b"),
    gpu_counts: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64),
    batches: tuple[int | str, ...] = (1, 16, 64, 256, "max"),
    context: int = 2048,
    links: Links | None = None,
    gpu_memory_gb: float = 80.0,
    loads: dict[str, list[float]] | None = None,
) -> dict[str, Any]:
    """Predictions for every model, GPU count and batch per GPU ("max": each side at the
    largest batch per GPU that its memory holds, at most 1024)."""
    from gptoss_ray.model.config import ModelConfig

    links = links or Links()
    rows = []
    for name in models:
        config = ModelConfig.preset(name)
        routing = Routing(config.num_experts, config.experts_per_token, (loads or {}).get(name))
        for gpus in gpu_counts:

            def at(b: int, gpus=gpus, config=config, routing=routing) -> dict[str, Any]:
                return predict(
                    cal,
                    config,
                    gpus=gpus,
                    batch_per_gpu=b,
                    context=context,
                    links=links,
                    routing=routing,
                    gpu_memory_gb=gpu_memory_gb,
                )

            for batch in batches:
                if batch != "max":
                    rows.append({"model": name, "batch_label": str(batch)} | at(int(batch)))
                    continue
                # each side at the largest batch it fits (at most 1024 per GPU)
                most = at(1)["max_batch_per_gpu"]
                ep = at(max(1, min(1024, most["expert_parallel"])))
                rep = at(max(1, min(1024, most["replicas"])))
                row = ep | {
                    "replicas_tokens_per_s": rep["replicas_tokens_per_s"],
                    "replica_step_ms": rep["replica_step_ms"],
                    "replica_batch_per_gpu": rep["batch_per_gpu"],
                }
                rows.append({"model": name, "batch_label": "max"} | row)
    return {
        "calibration": asdict(cal),
        "links": asdict(links),
        "gpu_memory_gb": gpu_memory_gb,
        "context": context,
        "predictions": rows,
    }


def plot(data: dict[str, Any], plt) -> None:
    models = sorted({r["model"] for r in data["predictions"]})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, name in zip(axes[0], models, strict=True):
        rows = [r for r in data["predictions"] if r["model"] == name]
        for label in dict.fromkeys(r["batch_label"] for r in rows):
            sel = [r for r in rows if r["batch_label"] == label]
            x = [r["gpus"] for r in sel]
            (line,) = ax.plot(
                x,
                [r["expert_parallel_tokens_per_s"] for r in sel],
                "o-",
                label=f"expert-parallel, batch/GPU {label}",
            )
            ax.plot(
                x,
                [r["replicas_tokens_per_s"] for r in sel],
                "x--",
                color=line.get_color(),
                label=f"replicas, batch/GPU {label}",
            )
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="GPUs",
            ylabel="tokens/s (predicted)",
            title=f"{name}, context {data['context']}",
        )
        ax.legend(fontsize=7)
    cal = data["calibration"]
    fig.suptitle(
        f"scaling model calibrated on {cal['device']} ({cal['dtype']}, "
        f"kernels {'on' if cal['kernels'] else 'off'})"
    )
    fig.tight_layout()


def run(args: argparse.Namespace, data: dict[str, Any]) -> None:
    import torch

    if args.calibration:
        raw = json.loads(Path(args.calibration).read_text())
        cal = Calibration(**raw.get("calibration", raw))
    else:
        print(f"calibrating on {args.device} with {args.calibrate_on} layer shapes")
        cal = calibrate(
            args.calibrate_on,
            device=args.device,
            dtype=torch.bfloat16,
            batches=tuple(args.batches),
            contexts=tuple(args.contexts),
            repeats=args.repeats,
        )
    links = Links(**{f.name: getattr(args, f.name) for f in fields(Links)})
    loads = json.loads(Path(args.expert_load).read_text()) if args.expert_load else None
    data |= scaling_table(
        cal,
        gpu_counts=tuple(args.gpus),
        context=args.context,
        links=links,
        gpu_memory_gb=args.gpu_memory_gb,
        loads=loads,
    )
    print_table(data)
    save("scaling-model", data, args.out, plot)


def print_table(data: dict) -> None:
    cal = data["calibration"]
    print(
        f"calibrated on {cal['device']} ({cal['dtype']}, kernels "
        f"{'on' if cal['kernels'] else 'off'}); context {data['context']}; links "
        f"{data['links']}"
    )
    print(
        f"{'model':>13} {'GPUs':>4} {'batch/GPU':>9} {'EP tok/s':>10} {'replicas':>10} "
        f"{'EP/rep':>6} {'a2a ms/layer':>12}"
    )
    for r in data["predictions"]:
        ep, rep = r["expert_parallel_tokens_per_s"], r["replicas_tokens_per_s"]
        ratio = ep / rep if ep and rep else None
        batch = str(r["batch_per_gpu"])
        if r["batch_label"] == "max":
            batch = f"max {r['batch_per_gpu']}/{r['replica_batch_per_gpu']}"
        print(
            f"{r['model']:>13} {r['gpus']:>4} {batch:>9} {fmt(ep):>10} {fmt(rep):>10} "
            f"{fmt(ratio, '.2f'):>6} {r['all_to_all_ms_per_layer']:>12.3f}"
        )

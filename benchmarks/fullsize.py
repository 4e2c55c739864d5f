"""Full-size decode without downloads: random weights in the exact shapes of gpt-oss-20b
or gpt-oss-120b, built in place on the device, served by one shard (the engine loop in
this process, no Ray), side by side with transformers on the same weights.

Reports, with the machine:
  copy bandwidth    a large device-to-device copy (bytes read + written over time)
  batch-1 decode    tokens/s of one sequence (median inter-token latency), and its
                    share of the memory-bandwidth limit: the bytes one decode step must
                    read (dense weights, the unembedding, 4 experts per layer, the KV
                    cache) over the copy bandwidth
  batch 64, 256     output tokens/s of that many sequences decoding together
  transformers      the same figures for GptOssForCausalLM (eager attention, experts
                    dequantized to bf16), where it fits in memory."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from gptoss_ray.benchmarks.common import fmt, progress, save


def build(config_name: str, device: str, *, kernels: bool | None = None, seed: int = 0):
    from gptoss_ray.model.checkpoint import randomize_
    from gptoss_ray.model.config import ModelConfig
    from gptoss_ray.model.model import Transformer

    config = ModelConfig.preset(config_name)
    with torch.device(device):
        model = Transformer(config, dtype=torch.bfloat16)
    randomize_(model, seed)
    return model.use_kernels(model.device.type == "cuda" if kernels is None else kernels)


def copy_bandwidth(device: str, nbytes: int | None = None, repeats: int = 20) -> float:
    """Bytes per second of a device-to-device copy (read + write): 1 GiB on a GPU (far
    past its caches), 256 MiB on a CPU."""
    if nbytes is None:
        nbytes = 2**30 if torch.device(device).type == "cuda" else 2**28
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 2):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times[2:])


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def decode_bytes(config, context: int) -> int:
    """Bytes that one batch-1 decode step must read at a given context: the dense weights
    (one row of the embedding), top-k of the experts, the keys and values it attends to."""
    from gptoss_ray.benchmarks.scaling_model import kv_bytes_per_sequence, model_bytes

    dense, experts = model_bytes(config)
    embedding = config.vocab_size * config.hidden_size * 2
    return (
        dense
        - embedding
        + 2 * config.hidden_size
        + experts * config.experts_per_token // config.num_experts
        + kv_bytes_per_sequence(config, context, window_slack=0)
    )


def run_ours(
    model, batch: int, prompt_len: int, output_len: int, graphs: bool | None = None
) -> dict[str, Any]:
    from gptoss_ray.cluster.engine.core import EngineCore
    from gptoss_ray.model.types import KVLayout, SamplingParams
    from gptoss_ray.router.transport import LocalTransport
    from gptoss_ray.shards.shard import Shard

    config = model.config
    bs = 16
    # exactly what the batch needs: every token in full layers, window + chunk in sliding
    full = batch * -(-(prompt_len + output_len) // bs)
    sliding = batch * (-(-(config.sliding_window + prompt_len) // bs) + 2)
    layout = KVLayout(bs, full + batch, sliding + batch)
    shard = Shard(
        model,
        rank=0,
        world_size=1,
        transport=LocalTransport(),
        device=model.device,
        kv_layout=layout,
        kernels=model.block[0].attn.use_kernels,
        decode_graphs=graphs,
    )
    capture_s = shard.capture_graphs()  # every bucket, as a shard does at load
    core = EngineCore(
        config,
        1,
        layout,
        lambda plans: [shard.step(plans[0])],
        token_budget=max(256, batch),
        max_seqs=batch,
    )
    g = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    warm = core.submit(
        torch.randint(0, 200000, (16,), generator=g).tolist(),
        params.model_copy(update={"max_tokens": 4}),
    )
    core.run_until_done()
    core.forget(warm)
    ids = [
        core.submit(torch.randint(0, 200000, (prompt_len,), generator=g).tolist(), params)
        for _ in range(batch)
    ]
    before = dict(core.stats.seconds)
    t0 = time.perf_counter()
    core.run_until_done()
    _sync(str(model.device))
    wall = time.perf_counter() - t0
    spent = {p: core.stats.seconds[p] - before.get(p, 0.0) for p in ("coordinator", "step")}
    outs = [core.output(i) for i in ids]
    itl = statistics.median(o.inter_token_latency for o in outs)
    return {
        "batch": batch,
        "decode_graphs": shard.graphs is not None,
        "graph_capture_s": capture_s,
        "tokens_per_s": sum(len(o.token_ids) for o in outs) / wall,
        "decode_tokens_per_s": batch / itl,
        "itl_ms": itl * 1e3,
        "ttft_ms": statistics.median(o.time_to_first_token for o in outs) * 1e3,
        # scheduling and bookkeeping over the whole step (no Ray hop in this process:
        # `bench sweep` measures the round trip to shard actors)
        "coordinator_pct": 100 * spent["coordinator"] / spent["step"],
    }


@torch.inference_mode()
def run_peer(peer, batch: int, prompt_len: int, output_len: int) -> dict[str, Any]:
    """transformers' generate: decode time per step from two runs (output_len and 1 new
    token), so that the prefill drops out."""
    device = next(peer.parameters()).device
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, 200000, (batch, prompt_len), generator=g).to(device)

    def timed(new: int) -> float:
        _sync(str(device))
        t0 = time.perf_counter()
        peer.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        _sync(str(device))
        return time.perf_counter() - t0

    timed(2)  # warm-up
    whole = timed(output_len)
    step = (whole - timed(1)) / (output_len - 1)
    return {
        "batch": batch,
        "tokens_per_s": batch * output_len / whole,
        "decode_tokens_per_s": batch / step,
        "itl_ms": step * 1e3,
    }


def fullsize(
    config_name: str,
    *,
    device: str,
    batches: list[int],
    prompt_len: int,
    output_len: int,
    peer: bool,
    kernels: bool | None = None,
    graphs: bool | None = None,
    repeats: int = 3,
) -> dict[str, Any]:
    """graphs: decode steps from CUDA graphs (default: where the kernels run on a GPU);
    with graphs, batch 1 also runs without them, to show what they save. Each figure is
    the median of `repeats` runs."""
    progress(f"-- building {config_name} with random weights on {device}")
    model = build(config_name, device, kernels=kernels)
    bandwidth = copy_bandwidth(device)
    limit = bandwidth / decode_bytes(model.config, prompt_len + output_len // 2)
    progress(f"   copy bandwidth {bandwidth / 1e9:.0f} GB/s; batch-1 limit {limit:.0f} tok/s")
    ours: dict[tuple[int, bool], list[dict[str, Any]]] = {}
    for repeat in range(repeats):
        runs = [(b, graphs) for b in batches]
        while runs:
            b, g = runs.pop(0)
            r = run_ours(model, b, prompt_len, output_len, g)
            if b == 1:
                r["share_of_bandwidth_limit"] = r["decode_tokens_per_s"] / limit
                if r["decode_graphs"] and g is not False:
                    runs.insert(0, (1, False))  # beside it, what the graphs save
            ours.setdefault((b, r["decode_graphs"]), []).append(r)
            progress(
                f"   ours, batch {b}, graphs {'on' if r['decode_graphs'] else 'off'}, run "
                f"{repeat + 1}/{repeats}: {r['tokens_per_s']:.1f} tok/s, decode "
                f"{r['decode_tokens_per_s']:.1f} tok/s"
            )
    theirs: list[dict[str, Any]] | str = []
    if peer:
        try:
            from gptoss_ray.benchmarks.hf_peer import to_transformers

            hf = to_transformers(model)
            for b in batches:
                rs = []
                for repeat in range(repeats):
                    rs.append(run_peer(hf, b, prompt_len, output_len))
                    progress(
                        f"   transformers, batch {b}, run {repeat + 1}/{repeats}: "
                        f"{rs[-1]['tokens_per_s']:.1f} tok/s, decode "
                        f"{rs[-1]['decode_tokens_per_s']:.1f} tok/s"
                    )
                theirs.append(_medians(rs))
            del hf
        except torch.OutOfMemoryError as exc:
            theirs = f"transformers did not fit: {str(exc).splitlines()[0]}"
            progress(f"   {theirs}")
    return {
        "model": config_name,
        "device": device,
        "kernels": model.block[0].attn.use_kernels,
        "prompt_len": prompt_len,
        "output_len": output_len,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "decode_bytes_batch1": decode_bytes(model.config, prompt_len + output_len // 2),
        "bandwidth_limit_tokens_per_s": limit,
        "repeats": repeats,
        "ours": [_medians(rs) for rs in ours.values()],
        "transformers": theirs,
    }


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs of one configuration -> one, each number the median of the runs'."""
    out = dict(runs[0])
    for key, value in out.items():
        if isinstance(value, float):
            out[key] = statistics.median(r[key] for r in runs)
    return out


def run(args: argparse.Namespace, data: dict[str, Any]) -> None:
    switch = {"auto": None, "on": True, "off": False}
    data["results"] = fullsize(
        args.model,
        device=args.device,
        batches=args.batches,
        prompt_len=args.prompt_len,
        output_len=args.output_len,
        peer=not args.no_peer,
        kernels=switch[args.kernels],
        graphs=switch[args.graphs],
        repeats=args.repeats,
    )
    print_table(data)
    save("fullsize", data, args.out, None)


def print_table(data: dict) -> None:
    r = data["results"]
    print(
        f"{r['model']} (random weights) on {r['device']}, kernels "
        f"{'on' if r['kernels'] else 'off'}, prompt {r['prompt_len']}, output "
        f"{r['output_len']}; copy bandwidth {r['copy_bandwidth_gb_s']:.0f} GB/s, batch-1 "
        f"limit {r['bandwidth_limit_tokens_per_s']:.0f} tok/s"
    )
    peer = {p["batch"]: p for p in r["transformers"]} if isinstance(r["transformers"], list) else {}
    print(f"medians of {r.get('repeats', 1)} runs; ratio: ours over transformers")
    print(
        f"{'batch':>5} {'graphs':>6} {'ours tok/s':>10} {'decode tok/s':>12} "
        f"{'of limit':>8} {'coord.':>6} {'hf tok/s':>9} {'hf decode':>9} {'ratio':>6} "
        f"{'decode ratio':>12}"
    )
    for o in r["ours"]:
        p = peer.get(o["batch"])
        ratio = o["tokens_per_s"] / p["tokens_per_s"] if p else None
        decode = o["decode_tokens_per_s"] / p["decode_tokens_per_s"] if p else None
        share = o.get("share_of_bandwidth_limit")
        share = f"{100 * share:.0f}%" if share is not None else "-"
        print(
            f"{o['batch']:>5} {'on' if o['decode_graphs'] else 'off':>6} "
            f"{o['tokens_per_s']:>10.1f} {o['decode_tokens_per_s']:>12.1f} {share:>8} "
            f"{o['coordinator_pct']:>5.1f}% "
            f"{fmt(p and p['tokens_per_s'], '.1f'):>9} "
            f"{fmt(p and p['decode_tokens_per_s'], '.1f'):>9} {fmt(ratio, '.2f'):>6} "
            f"{fmt(decode, '.2f'):>12}"
        )
    if isinstance(r["transformers"], str):
        print(r["transformers"])

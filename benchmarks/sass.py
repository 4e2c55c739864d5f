"""The Triton kernels compiled for a GPU architecture on a machine that has no GPU: the
exact launches the engine makes in gpt-oss shapes (recorded from the real wrappers with
CPU tensors, specialised as a launch would be), compiled by Triton's own NVIDIA backend
and ptxas, then read back from the machine code.

What it tells without a GPU: that every kernel compiles for the target; its registers,
spills and shared memory; and how many instructions its main loop issues per byte it
reads. That last figure bounds speed: an SM issues at most 4 warp-instructions per cycle,
so a loop needing more issue slots per byte than the memory system delivers bytes per
issue slot cannot run at the bandwidth limit however it is scheduled. The bound is
static (it counts the loop body once, and ignores latency, occupancy and caches): it
shows which way a change moves the kernel, the GPU run says where it lands."""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from gptoss_ray.benchmarks.common import describe, progress, save

# sm_90: H100 SXM, sm_80: A100 80 GB SXM: SMs, boost clock, HBM bandwidth (datasheets)
GPU_FIGURES = {90: (132, 1.98e9, 3.35e12), 80: (108, 1.41e9, 2.04e12)}
WARP_ISSUE_PER_CYCLE = 4  # one warp-instruction per cycle from each of an SM's 4 schedulers


@dataclass
class Launch:
    """One kernel launch as the wrapper made it: the kernel, its arguments, and the bytes
    of global memory one trip of its main loop reads (per program)."""

    name: str
    tokens: int  # new tokens of the step
    kernel: Any
    args: tuple
    kwargs: dict[str, Any]
    loop_bytes: int


@contextmanager
def recording(*kernels) -> Iterator[list[tuple[Any, tuple, dict[str, Any]]]]:
    """Calls kernel[grid](...) made inside are recorded, in order, instead of launched."""
    if not all(hasattr(kernel, "params") for kernel in kernels):
        raise RuntimeError(
            "the kernels were defined under TRITON_INTERPRET=1; compile them in a process "
            "without it (gptoss-ray bench sass clears it)"
        )
    calls: list[tuple[Any, tuple, dict[str, Any]]] = []
    for kernel in kernels:
        kernel.run = partial(_record, calls, kernel)
    try:
        yield calls
    finally:
        for kernel in kernels:
            del kernel.run


def _record(calls, kernel, *args, grid, warmup, **kwargs) -> None:
    calls.append((kernel, args, kwargs))


def compile_for(launch: Launch, arch: int):
    """The launch compiled for sm_<arch> as the JIT would specialise it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    kernel = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    try:  # the JIT's own binding and specialisation: internals, as of Triton 3.9
        from triton.runtime.jit import create_function_from_signature

        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*launch.args, **launch.kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(
            backend, launch.kwargs, bound, specialization, options
        )
    except (ImportError, AttributeError, TypeError, ValueError) as e:
        raise RuntimeError(
            f"bench sass binds arguments through Triton's JIT internals (written for 3.9), "
            f"which differ in Triton {triton.__version__}: {e}"
        ) from e
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options.__dict__)


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def machine_code(compiled, workdir: str) -> tuple[dict[str, int], str]:
    """(registers, spill/stack bytes, shared bytes) and the SASS text of a compiled kernel."""
    path = os.path.join(workdir, f"{compiled.metadata.name}.cubin")
    with open(path, "wb") as f:
        f.write(compiled.asm["cubin"])
    usage = subprocess.run(
        [_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True
    ).stdout
    found = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    sass = subprocess.run(
        [_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True
    ).stdout
    return {key.lower(): int(value) for key, value in found.items()}, sass


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")


def main_loop(sass: str) -> tuple[int, collections.Counter]:
    """The largest loop of the kernel (a backward branch and what it jumps over): its
    instruction count and opcodes. (0, empty) when the kernel has no loop."""
    code = [(int(a, 16), text) for a, text in _LINE.findall(sass)]
    best: list[str] = []
    for addr, text in code:
        m = _BRANCH.search(text)
        if m and int(m.group(1), 16) < addr:
            body = [t for a, t in code if int(m.group(1), 16) <= a <= addr]
            best = max(best, body, key=len)
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in best)
    return len(best), ops


def moe_launches(config, tokens: int, variant: dict[str, Any]) -> list[Launch]:
    """Both matmuls of one MoE call for `tokens` tokens (4 expert rows each), with every
    expert of the model local (torch.empty: the stacks are never touched)."""
    from gptoss_ray.model.kernels import mxfp4_matmul as mm

    h, inter, e = config.hidden_size, config.intermediate_size, config.num_experts
    mlp1 = (
        torch.empty(e, 2 * inter, h // 32, 16, dtype=torch.uint8),
        torch.empty(e, 2 * inter, h // 32, dtype=torch.uint8),
        torch.empty(e, 2 * inter, dtype=torch.bfloat16),
    )
    mlp2 = (
        torch.empty(e, h, inter // 32, 16, dtype=torch.uint8),
        torch.empty(e, h, inter // 32, dtype=torch.uint8),
        torch.empty(e, h, dtype=torch.bfloat16),
    )
    rows = tokens * config.experts_per_token
    x = torch.zeros(rows, h, dtype=torch.bfloat16)
    experts = torch.arange(rows) % e
    with recording(mm._moe_mxfp4_kernel, mm._moe_mxfp4_row_kernel) as calls:
        mm.moe_mxfp4(x, experts, mlp1, mlp2, alpha=1.702, limit=7.0, **variant)
    launches = []
    for which, (kernel, args, kwargs) in zip(("mlp1", "mlp2"), calls, strict=True):
        n = kwargs["BLOCK_N"]
        if kernel is mm._moe_mxfp4_kernel:
            name = f"moe {which} tiles of {kwargs['BLOCK_M']}"
            kwargs = {**kwargs, "BF16_DOT": True}  # as on a GPU (these tensors are on the CPU)
            loop_bytes = n * 16 + n  # one MX block of each column: codes and scale
        else:
            name = f"moe {which} one row"
            loop_bytes = kwargs["UNROLL"] * (n * 16 + n)
        launches.append(Launch(name, tokens, kernel, args, kwargs, loop_bytes))
    return launches


def attention_launch(
    config, sequences: int, context: int, new_tokens: int, sliding: bool
) -> Launch:
    """The paged attention launch for `sequences` sequences adding `new_tokens` each."""
    from gptoss_ray.model.kernels import attention
    from gptoss_ray.model.kv_cache import AttentionTables

    hq, hkv, d, bs = config.num_attention_heads, config.num_key_value_heads, config.head_dim, 16
    per_seq = -(-context // bs)
    pool = torch.zeros(sequences * per_seq, bs, hkv, d, dtype=torch.bfloat16)
    q = torch.zeros(sequences * new_tokens, hq, d, dtype=torch.bfloat16)
    tables = AttentionTables(
        torch.zeros(sequences, per_seq, dtype=torch.int32),
        torch.zeros(sequences, dtype=torch.int32),
        [context - new_tokens] * sequences,
        [new_tokens] * sequences,
    )
    kernel = attention._paged_attention_kernel
    with recording(kernel) as calls:
        attention.paged_attention(
            q,
            pool,
            pool,
            torch.zeros(hq),
            tables,
            window=config.sliding_window if sliding else None,
        )
    ((_, args, kwargs),) = calls
    kwargs = {**kwargs, "BF16_DOT": True}
    name = f"attention {'prefill' if new_tokens > 1 else 'decode'}"  # one key block per trip
    kind = "window" if sliding else "full"
    return Launch(
        f"{name} {kind} {context}",
        sequences * new_tokens,
        kernel,
        args,
        kwargs,
        2 * bs * kwargs["BLOCK_D"] * 2,
    )


def issue_bound(warp_instructions_per_byte: float, arch: int) -> float:
    """Bytes/s the GPU of `GPU_FIGURES[arch]` could feed this loop at its full issue rate."""
    sms, clock, _ = GPU_FIGURES[arch]
    return sms * WARP_ISSUE_PER_CYCLE * clock / warp_instructions_per_byte


def sass(config_name: str, *, arch: int, tokens: list[int], contexts: list[int]) -> dict[str, Any]:
    """Every kernel launch of a decode step (and a prefill chunk) in the model's shapes,
    compiled for sm_<arch>: resources and the main loop's issue cost per byte."""
    import tempfile

    from gptoss_ray.model.config import ModelConfig

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted")
    config = ModelConfig.preset(config_name)
    launches = [launch for t in tokens for launch in moe_launches(config, t, {})]
    for context in contexts:
        for sliding in (False, True):
            launches.append(attention_launch(config, 1, context, 1, sliding))
    launches.append(attention_launch(config, 1, max(contexts), 128, True))
    _, _, bandwidth = GPU_FIGURES[arch]
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for launch in launches:
            compiled = compile_for(launch, arch)
            usage, code = machine_code(compiled, workdir)
            loop, ops = main_loop(code)
            warps = compiled.metadata.num_warps
            per_byte = loop * warps / launch.loop_bytes
            row = {
                "launch": launch.name,
                "tokens": launch.tokens,
                "warps": warps,
                "stages": compiled.metadata.num_stages,
                "registers": usage.get("reg", 0),
                "spill_bytes": usage.get("local", 0) + usage.get("stack", 0),
                "shared_bytes": compiled.metadata.shared,
                "loop_instructions": loop,
                "loop_bytes": launch.loop_bytes,
                "warp_instructions_per_byte": per_byte,
                "issue_bound_gb_s": issue_bound(per_byte, arch) / 1e9,
                "of_bandwidth": issue_bound(per_byte, arch) / bandwidth,
                "top_ops": dict(ops.most_common(8)),
                "constants": {k: v for k, v in launch.kwargs.items() if k.isupper()},
            }
            rows.append(row)
            progress(
                f"   {launch.name:<26} {launch.tokens:>5} {row['registers']:>4} regs "
                f"{per_byte:6.3f} warp-instr/B  bound {row['issue_bound_gb_s']:6.0f} GB/s"
            )
    return {"model": config_name, "arch": arch, "bandwidth_gb_s": bandwidth / 1e9, "launches": rows}


def run(args: argparse.Namespace, data: dict[str, Any]) -> None:
    data["results"] = sass(args.model, arch=args.arch, tokens=args.tokens, contexts=args.contexts)
    print_table(data)
    save("sass", data, args.out, plot)


def print_table(data: dict) -> None:
    r = data["results"]
    print(
        f"{r['model']} shapes compiled for sm_{r['arch']} (static: the main loop's "
        f"instructions, not a timing); bandwidth {r['bandwidth_gb_s']:.0f} GB/s"
    )
    print(
        f"{'launch':<30} {'tokens':>6} {'warps':>5} {'regs':>4} {'spill':>5} {'smem':>6} "
        f"{'loop':>5} {'B/loop':>6} {'instr/B':>7} {'bound GB/s':>10} {'of HBM':>6}"
    )
    for x in r["launches"]:
        print(
            f"{x['launch']:<30} {x['tokens']:>6} {x['warps']:>5} {x['registers']:>4} "
            f"{x['spill_bytes']:>5} {x['shared_bytes']:>6} {x['loop_instructions']:>5} "
            f"{x['loop_bytes']:>6} {x['warp_instructions_per_byte']:>7.3f} "
            f"{x['issue_bound_gb_s']:>10.0f} {100 * x['of_bandwidth']:>5.0f}%"
        )


def plot(data: dict, plt) -> None:
    r = data["results"]
    fig, ax = plt.subplots(figsize=(10, 4))
    labels = [f"{x['launch']}\n{x['tokens']} tok" for x in r["launches"]]
    ax.bar(labels, [100 * min(x["of_bandwidth"], 3.0) for x in r["launches"]])
    ax.axhline(100, color="k", lw=0.8)
    ax.set(
        ylabel="issue-bound / HBM bandwidth (%)",
        title=f"main loops compiled for sm_{r['arch']}: above 100% issue is not the limit",
    )
    ax.tick_params(axis="x", labelsize=6, rotation=60)
    fig.suptitle(f"{r['model']} shapes, compiled on {describe(data['machine'])}", fontsize=9)
    fig.tight_layout()

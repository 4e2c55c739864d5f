"""What a step asks of the host, counted from below the code: every host read (a tensor's
value brought to Python, or an op whose output size depends on the data) and every
collective, attributed to the transformer block it happens in.

Two torch modes watch together, so that neither path can hide a read: a function mode
sees the Python-level reads (`tolist`, `item`, `bool(t)`, `int(t)`, `numpy`, `cpu`),
which on a CPU tensor never reach the dispatcher, and a dispatch mode sees every aten op
(`nonzero`, `unique`, `bincount`, `masked_select`, boolean-mask indexing, copies to the
host) and every `c10d` collective with its tensors' shapes. On a GPU each host read is a
wait for the device; on a CPU the same reads are counted, which is how tests prove a
decode step free of them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Python-level reads of a tensor's value (function mode)
HOST_READ_METHODS = frozenset(
    {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "__complex__", "numpy"}
)
# aten ops that read values on the host or size their output from the data
HOST_SYNC_OPS = frozenset(
    {
        "aten::item",
        "aten::_local_scalar_dense",
        "aten::is_nonzero",
        "aten::equal",
        "aten::nonzero",
        "aten::nonzero_static",
        "aten::argwhere",
        "aten::unique_dim",
        "aten::_unique",
        "aten::_unique2",
        "aten::unique_consecutive",
        "aten::bincount",
        "aten::masked_select",
        "aten::histc",
    }
)


@dataclass
class Collective:
    name: str  # "c10d::alltoall_base_", ...
    shapes: list[tuple[int, ...]]  # of its tensor arguments, in order
    row_bytes: int  # of one row (along dim 0) of its last tensor argument (what is sent)
    # rows sent to each rank (all-to-all's input split sizes); empty: equal parts
    splits: list[int] = field(default_factory=list)

    def sent_elsewhere(self, rank: int, world_size: int) -> tuple[int, int]:
        """-> (rows, bytes) this rank sent to the others."""
        rows = self.shapes[-1][0] if self.shapes else 0
        remote = rows - self.splits[rank] if self.splits else rows * (world_size - 1) // world_size
        return remote, remote * self.row_bytes


@dataclass
class BlockOps:
    host_reads: list[str] = field(default_factory=list)
    collectives: list[Collective] = field(default_factory=list)


@dataclass
class StepOps:
    """One step's count: per transformer block, and outside every block (embedding,
    head, sampling)."""

    blocks: list[BlockOps]
    outside: BlockOps = field(default_factory=BlockOps)

    def host_reads_in_blocks(self) -> int:
        return sum(len(b.host_reads) for b in self.blocks)

    def collectives_per_block(self) -> list[int]:
        return [len(b.collectives) for b in self.blocks]

    def shapes(self) -> list[list[tuple[str, list[tuple[int, ...]]]]]:
        """Each block's collectives as (name, shapes): equal across steps iff the
        exchange's buffers do not depend on the routing."""
        return [[(c.name, c.shapes) for c in b.collectives] for b in self.blocks]


def _tensors(args, kwargs) -> list[torch.Tensor]:
    found = []

    def visit(a) -> None:
        if isinstance(a, torch.Tensor):
            found.append(a)
        elif isinstance(a, list | tuple):
            for x in a:
                visit(x)

    visit(list(args) + list((kwargs or {}).values()))
    return found


def _ints(values) -> bool:
    return all(isinstance(v, int) for v in values)


def _op_name(func) -> str:
    schema = getattr(func, "_schema", None)
    return schema.name if schema is not None else str(func)


class _Reads(TorchFunctionMode):
    def __init__(self, counter: OpCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READ_METHODS or name == "cpu":  # .cpu(): a no-op on a CPU, not on a GPU
            self.counter._read(name)
        return func(*args, **(kwargs or {}))


class _Ops(TorchDispatchMode):
    def __init__(self, counter: OpCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = _op_name(func)
        tensors = _tensors(args, kwargs)
        if name.startswith("c10d::"):
            sent = tensors[-1] if tensors else None
            rows = sent.shape[0] if sent is not None and sent.dim() else 0
            row = sent.numel() // rows * sent.element_size() if rows else 0
            int_lists = [a for a in args if isinstance(a, list | tuple) and a and _ints(a)]
            splits = list(int_lists[-1]) if int_lists else []
            shapes = [tuple(t.shape) for t in tensors]
            self.counter._collective(Collective(name, shapes, row, splits))
        elif name in HOST_SYNC_OPS:
            self.counter._read(name)
        elif name in ("aten::index.Tensor", "aten::index_put_", "aten::index_put"):
            if any(t.dtype == torch.bool for t in tensors[1:]):  # a mask: sized by its count
                self.counter._read(name + " (mask)")
        elif name in ("aten::_to_copy", "aten::copy_") and len(tensors) >= 1:
            src = tensors[-1] if name == "aten::copy_" else tensors[0]
            to_host = (
                tensors[0].device.type == "cpu"
                if name == "aten::copy_"
                else (kwargs or {}).get("device") == torch.device("cpu")
            )
            if src.device.type != "cpu" and to_host:
                self.counter._read(name + " (to host)")
        return func(*args, **(kwargs or {}))


class OpCounter:
    """Counts the host reads and collectives of a model's steps, per transformer block
    (`model.block[i]`: from its attention's start to its MoE block's end, told by
    forward hooks). `with counter.step():` counts one
    step; `counter.steps` keeps them."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.blocks = list(model.block)  # type: ignore[attr-defined]
        self.steps: list[StepOps] = []
        self._in: int | None = None
        self._current: StepOps | None = None
        self._hooks = []
        for i, block in enumerate(self.blocks):
            # the forward loop calls each block's attention, then its MoE block
            self._hooks.append(block.attn.register_forward_pre_hook(self._enter(i)))
            self._hooks.append(block.mlp.register_forward_hook(self._leave))

    def _enter(self, i: int):
        def hook(module, args) -> None:
            self._in = i

        return hook

    def _leave(self, module, args, out) -> None:
        self._in = None

    def _here(self) -> BlockOps | None:
        if self._current is None:
            return None
        return self._current.outside if self._in is None else self._current.blocks[self._in]

    def _read(self, name: str) -> None:
        here = self._here()
        if here is not None:
            here.host_reads.append(name)

    def _collective(self, c: Collective) -> None:
        here = self._here()
        if here is not None:
            here.collectives.append(c)

    @contextlib.contextmanager
    def step(self) -> Iterator[StepOps]:
        ops = StepOps([BlockOps() for _ in self.blocks])
        self._current = ops
        try:
            with _Reads(self), _Ops(self):
                yield ops
        finally:
            self._current = None
            self._in = None
            self.steps.append(ops)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

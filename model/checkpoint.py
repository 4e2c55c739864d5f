"""Safetensors checkpoints in gpt-oss's two layouts: reading (any expert range, only its
bytes) and writing, plus the built-in small random model.

Layouts, detected from the tensor names:
  hf        model.layers.N.self_attn.q_proj.weight, ...mlp.experts.gate_up_proj_blocks, ...
            one model.safetensors, or shards listed by model.safetensors.index.json
  original  block.N.attn.qkv.weight, ...mlp.mlp1_weight.blocks, ... (the `original/` folder)
Internal names are the model's parameter names (model/model.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from gptoss_ray.model.checkpoint_format import (
    _FLOAT_DTYPES,
    INDEX_FILE,
    SINGLE_FILE,
    Layout,
    TensorSpec,
    _nbytes,
    model_tensors,
    random_tensors,
    randomize_,
    save_checkpoint,
    stored_parts,
    tensor_specs,
    write_random_checkpoint,
)
from gptoss_ray.model.model import Transformer
from gptoss_ray.model.model_folder import (
    CheckpointError,
    read_config,
    resolve_model,
    safetensors_files,
    weights_folder,
)
from gptoss_ray.model.progress import Progress
from gptoss_ray.model.types import DeviceUnavailable

# what importers of this module used before the layouts had a module of their own
__all__ = [
    "INDEX_FILE",
    "SINGLE_FILE",
    "Checkpoint",
    "CheckpointError",
    "Layout",
    "TensorSpec",
    "check_device",
    "load_model",
    "model_tensors",
    "random_tensors",
    "randomize_",
    "save_checkpoint",
    "stored_parts",
    "tensor_specs",
    "write_random_checkpoint",
]


class Checkpoint:
    """A checkpoint directory: its config, layout and tensor index (headers only)."""

    def __init__(self, path: str | Path) -> None:
        self.path = weights_folder(path)
        self.config = read_config(self.path)
        self.files = self._locate_tensors()
        self.layout = self._detect_layout()

    def _locate_tensors(self) -> dict[str, Path]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index ({exc})") from exc
            files = {name: self.path / fname for name, fname in weight_map.items()}
            for f in sorted(set(files.values())):
                if not f.is_file():
                    raise CheckpointError(f"{index} lists {f.name}, which does not exist")
            return files
        paths = safetensors_files(self.path)
        if not paths:
            raise CheckpointError(f"{self.path}: no *.safetensors files")
        files: dict[str, Path] = {}
        for p in paths:
            with _open(p) as f:
                files.update(dict.fromkeys(f.keys(), p))
        return files

    def _detect_layout(self) -> Layout:
        if any(
            n.startswith("model.layers.") or n == "model.embed_tokens.weight" for n in self.files
        ):
            return "hf"
        if any(n.startswith("block.") or n == "embedding.weight" for n in self.files):
            return "original"
        raise CheckpointError(
            f"{self.path}: neither the Hugging Face layout (model.layers.N...) nor the original "
            "layout (block.N...) of gpt-oss"
        )

    def validate(self) -> None:
        """Checks that every tensor is present with the expected shape and dtype, from the
        headers alone."""
        with ExitStack() as stack:
            handles: dict[Path, object] = {}
            for spec in tensor_specs(self.config):
                for stored, rows in stored_parts(self.layout, spec, self.config):
                    if stored not in self.files:
                        raise CheckpointError(
                            f"{self.path}: missing tensor {stored} (expected shape "
                            f"{[rows, *spec.shape[1:]]})"
                        )
                    path = self.files[stored]
                    if path not in handles:
                        handles[path] = stack.enter_context(_open(path))
                    try:
                        view = handles[path].get_slice(stored)
                    except SafetensorError as exc:
                        raise CheckpointError(f"{path.name}: cannot read {stored}: {exc}") from exc
                    shape, dtype = tuple(view.get_shape()), view.get_dtype()
                    expected = (rows, *spec.shape[1:])
                    if shape != expected:
                        raise CheckpointError(
                            f"{stored} in {path.name}: shape {list(shape)}, expected "
                            f"{list(expected)} for this config.json"
                        )
                    if spec.packed and dtype != "U8":
                        raise CheckpointError(
                            f"{stored} in {path.name}: dtype {dtype}, expected U8 (MXFP4 bytes)"
                        )
                    if not spec.packed and dtype not in _FLOAT_DTYPES:
                        raise CheckpointError(
                            f"{stored} in {path.name}: dtype {dtype}, expected a float dtype "
                            "(BF16 in gpt-oss checkpoints)"
                        )

    def iter_tensors(
        self, experts: tuple[int, int] | None = None
    ) -> Iterator[tuple[TensorSpec, torch.Tensor]]:
        """Yields (spec, tensor) for every internal tensor; expert tensors hold only experts
        [lo, hi), read as slices (only those bytes leave the file)."""
        lo, hi = experts if experts is not None else (0, self.config.num_experts)
        with ExitStack() as stack:
            handles: dict[Path, object] = {}
            for spec in tensor_specs(self.config):
                parts = []
                for stored, _ in stored_parts(self.layout, spec, self.config):
                    path = self.files[stored]
                    if path not in handles:
                        handles[path] = stack.enter_context(_open(path))
                    try:
                        view = handles[path].get_slice(stored)
                        parts.append(view[lo:hi] if spec.expert else view[:])
                    except SafetensorError as exc:
                        raise CheckpointError(f"{path.name}: cannot read {stored}: {exc}") from exc
                yield spec, parts[0] if len(parts) == 1 else torch.cat(parts)

    def load(
        self,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        experts: tuple[int, int] | None = None,
        progress: bool | None = None,
    ) -> Transformer:
        """Builds the model with experts [lo, hi) (all by default), copying tensors one at a
        time into place. Experts stay MXFP4; non-expert weights take `dtype`."""
        self.validate()
        check_device(device)
        with torch.device("meta"):
            model = Transformer(self.config, dtype=dtype, experts=experts)
        model.to_empty(device=device)
        targets = dict(model.named_parameters()) | dict(model.named_buffers())
        lo, hi = model.expert_range
        total = sum(_nbytes(s, hi - lo) for s in tensor_specs(self.config))
        if progress is None:
            progress = total > 1 << 30
        bar = Progress(total / 2**30, f"loading {self.path.name}", unit=" GiB", enabled=progress)
        for spec, tensor in self.iter_tensors(experts=(lo, hi)):
            targets[spec.name].copy_(tensor)
            bar.advance(tensor.numel() * tensor.element_size() / 2**30)
        bar.close()
        return model


def check_device(device: torch.device | str) -> None:
    """Fails with a clear error where torch has no such device."""
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        built = (
            "torch was built without CUDA" if torch.version.cuda is None else "no GPU is visible"
        )
        raise DeviceUnavailable(
            f"device cuda: this machine has none ({built}, torch {torch.__version__})"
        )


def load_model(
    spec: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    experts: tuple[int, int] | None = None,
    progress: bool | None = None,
) -> Transformer:
    """A checkpoint directory, or the name of a small preset (its random built-in model)."""
    return Checkpoint(resolve_model(spec)).load(
        dtype=dtype, device=device, experts=experts, progress=progress
    )


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open ({exc})") from exc

"""Where a model's files are, read without torch: a checkpoint folder (or its `original/`,
where a repository keeps its weights only there), its config, and the small presets'
built-in checkpoints under the cache folder (written once). The coordinator and the
command line read these; only the shards load tensors (`model.checkpoint`)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from gptoss_ray.model.config import CheckpointError, ConfigError, ModelConfig

__all__ = [
    "CheckpointError",
    "builtin_checkpoint",
    "cache_dir",
    "read_config",
    "resolve_model",
    "safetensors_files",
    "weights_folder",
]


def cache_dir() -> Path:
    root = os.environ.get("GPTOSS_RAY_CACHE") or Path.home() / ".cache" / "gptoss-ray"
    return Path(root)


def safetensors_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def weights_folder(path: str | Path) -> Path:
    """The folder that holds a checkpoint's config.json and safetensors files: `path`, or
    its `original/` when only that has weights."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    folder = root
    if not safetensors_files(root) and (root / "original").is_dir():
        folder = root / "original"
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{folder}: no config.json (a gpt-oss checkpoint folder holds config.json and "
            "*.safetensors)"
        )
    return folder


def read_config(path: str | Path) -> ModelConfig:
    """The config of the checkpoint at `path` (a folder, as `weights_folder` finds it)."""
    try:
        return ModelConfig.from_file(weights_folder(path) / "config.json")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from exc


def builtin_checkpoint(preset: str, seed: int = 0) -> Path:
    """The random model of a small preset, written once under the cache directory."""
    config = ModelConfig.preset(preset)
    target = cache_dir() / "models" / f"{preset}-seed{seed}"
    if (target / "config.json").is_file():
        return target
    from gptoss_ray.model.checkpoint_format import write_random_checkpoint  # torch: to write

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{preset}-", dir=target.parent))
    try:
        write_random_checkpoint(config, tmp, seed=seed)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_preset(spec: str | Path) -> bool:
    return not Path(spec).exists() and "/" not in str(spec)


def resolve_model(spec: str | Path) -> Path:
    """A checkpoint directory as given, or a small preset's built-in checkpoint (written
    once, then cached)."""
    return builtin_checkpoint(str(spec)) if _is_preset(spec) else Path(spec)


def model_config(spec: str | Path) -> ModelConfig:
    """The config of a checkpoint directory or a preset, without writing the preset's
    checkpoint (no torch)."""
    return ModelConfig.preset(str(spec)) if _is_preset(spec) else read_config(spec)

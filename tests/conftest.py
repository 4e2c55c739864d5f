"""Shared fixtures: offline oracles, a private cache directory, the gpu marker, one Ray
instance, and the HTTP app (the production one, `cluster.front.app`) over the built-in
model or over scripted shards, each started once for every test file that uses it."""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    # openai-harmony reads the vocabulary from here instead of downloading it. Not pytest's
    # cache folder: benchmarks/gpu.sh runs without that plugin (`-p no:cacheprovider`).
    folder = Path(tempfile.mkdtemp(prefix="gptoss-tiktoken-"))
    config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))
    with resources.as_file(
        resources.files("gptoss_ray.model").joinpath("data", "o200k_base.tiktoken")
    ) as src:
        shutil.copyfile(src, folder / "o200k_base.tiktoken")
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(folder)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not torch.cuda.is_available():
        # Triton kernels run in its interpreter on CPU tensors; it must be set before
        # any kernel module is imported (triton.jit reads it when decorating).
        os.environ.setdefault("TRITON_INTERPRET", "1")
        _check_the_interpreter_runs()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _check_the_interpreter_runs() -> None:
    """Triton 3.6's interpreter (torch 2.11 pins it) takes a loop bound with int() of a
    one-element array, which numpy 2.4 refuses: every kernel test would fail deep inside
    Triton. Say so once, with the fix."""
    import numpy
    import triton
    from packaging.version import Version

    old_triton = Version(triton.__version__).release < (3, 7)
    if old_triton and Version(numpy.__version__).release >= (2, 4):
        raise pytest.UsageError(
            f"Triton {triton.__version__}'s interpreter (the kernel tests on CPU) fails with "
            f"numpy {numpy.__version__}: install numpy<2.4, or Triton 3.7 or later"
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is false)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["GPTOSS_RAY_CACHE"] = str(tmp_path_factory.mktemp("gptoss-cache"))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session (starting Ray takes seconds)."""
    import ray

    from gptoss_ray.cluster.runtime.ray_instance import start_private

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    start_private(num_cpus=5)  # private: whatever Ray runs on this machine (or ran)
    yield ray
    ray.shutdown()


API_KEY = "k"  # the key of the served apps below


@pytest.fixture(scope="session")
def tiny_url():
    """The HTTP app over the built-in model, one in-process shard (float32) -> its URL."""
    from tests.engine_cases import served_tiny_model

    with served_tiny_model(API_KEY) as url:
        yield url


@pytest.fixture
def tiny_client(tiny_url):
    import openai

    return openai.OpenAI(base_url=tiny_url, api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="session")
def scripted_api():
    """The HTTP app over an engine whose shards speak scripted harmony
    (`tests.scripted_engine`) -> (its URL, the engine loop, the scripted shards)."""
    from tests.scripted_engine import scripted_engine
    from tests.support import served

    engine, shards = scripted_engine()
    with served(engine, API_KEY) as url:
        yield url, engine, shards
    engine.shutdown()


@pytest.fixture
def scripted_client(scripted_api):
    import openai

    return openai.OpenAI(base_url=scripted_api[0], api_key=API_KEY, max_retries=0)

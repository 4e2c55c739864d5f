"""The KV cache sized from each shard's free memory (`size_kv`, vLLM's
--gpu-memory-utilization), with fake readings: the layout, and the errors that name the
numbers. And a shard's reading and resize, its measuring function injected."""

from __future__ import annotations

import pytest
import torch

from gptoss_ray.model.config import ConfigError
from gptoss_ray.model.model_folder import read_config, resolve_model
from gptoss_ray.model.types import DeviceMemory, KVLayout, size_kv

GIB = 2**30
SIZES = {"bytes_per_value": 2, "block_size": 16, "max_seqs": 64, "max_chunk": 256}


def tiny():
    return read_config(resolve_model("gpt-oss-tiny"))


def test_the_kv_takes_what_the_utilization_leaves_on_the_fullest_shard():
    readings = [DeviceMemory(free=60 * GIB, total=80 * GIB), DeviceMemory(50 * GIB, 80 * GIB)]
    layout = size_kv(tiny(), readings, utilization=0.9, budget_bytes=None, **SIZES)
    # shard 1: 0.9 x 80 - 30 in use = 42 GiB
    assert layout == KVLayout.from_budget(tiny(), 42 * GIB, **SIZES)
    assert layout.nbytes(tiny(), 2) <= 42 * GIB
    assert layout.capacity()["full_tokens"] == layout.full_blocks * 16


@pytest.mark.parametrize(
    ("readings", "utilization", "budget", "says"),
    [
        ([DeviceMemory(5 * GIB, 80 * GIB)], 0.9, None, r"leaves 0\.00 GiB .* 75\.00 GiB in use"),
        (
            [DeviceMemory(8 * GIB + 8 * 2**20, 80 * GIB)],  # 8 MiB left: 16k tokens
            0.9,
            None,
            r"shard 0's 80\.00 GiB leaves 0\.01 GiB .* under one 131072-token sequence",
        ),
        ([DeviceMemory(8 * GIB, 80 * GIB)] * 2, 0.9, 9 * GIB, r"9\.00 GiB per shard exceeds"),
        ([DeviceMemory(8 * GIB, 80 * GIB)], 1.5, None, r"utilization 1\.5: expected a fraction"),
    ],
    ids=["nothing-left", "short-of-one-sequence", "budget-over-free", "bad-fraction"],
)
def test_a_budget_that_cannot_be_served_is_an_error_naming_the_numbers(
    readings, utilization, budget, says
):
    with pytest.raises(ConfigError, match=says):
        size_kv(tiny(), readings, utilization=utilization, budget_bytes=budget, **SIZES)


def test_an_explicit_budget_within_free_memory_is_taken_as_it_is():
    readings = [DeviceMemory(8 * GIB, 80 * GIB)]
    layout = size_kv(tiny(), readings, utilization=0.9, budget_bytes=GIB, **SIZES)
    assert layout == KVLayout.from_budget(tiny(), GIB, **SIZES)


def test_a_shard_reads_its_memory_with_its_kv_counted_free_and_takes_the_new_size():
    from gptoss_ray.cluster.engine.core import EngineCore
    from tests.engine_cases import GREEDY, baseline, prompts, tiny_shard

    shard = tiny_shard(KVLayout(16, 8, 32))
    seen = []

    def measure(device: torch.device) -> tuple[int, int]:
        seen.append(device)
        return 3 * GIB, 16 * GIB

    reading = shard.measure_memory(measure)
    assert seen == [torch.device("cpu")]
    assert reading == DeviceMemory(3 * GIB + shard.kv.nbytes(), 16 * GIB)
    layout = KVLayout(16, 256, 128)
    shard.resize_kv(layout)
    assert shard.kv.layout == layout and shard.kv.nbytes() == (
        # one scratch block past each pool
        KVLayout(16, 257, 129).nbytes(shard.config, 4)
    )
    # and steps on the new cache give the baseline's tokens
    core = EngineCore(shard.config, 1, layout, lambda plans: [shard.step(plans[0])])
    ids = [core.submit(p, GREEDY) for p in prompts()[:3]]
    core.run_until_done()
    assert [tuple(core.output(i).token_ids) for i in ids] == list(baseline()[:3])

"""One engine configuration, validated where it enters: a bad or unknown field is named,
before any Ray instance or shard starts."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gptoss_ray.cluster.engine.config import EngineConfig


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"shards": 0}, r"shards\n  Input should be greater than or equal to 1"),
        ({"device": "tpu"}, r"device\n  Input should be 'cpu' or 'cuda'"),
        ({"gpu_memory_utilization": 1.5}, r"gpu_memory_utilization\n  Input should be less"),
        ({"kv_budget_mb": 0}, r"kv_budget_mb\n  Input should be greater than 0"),
        ({"kv_budget": 64}, r"kv_budget\n  Extra inputs are not permitted"),
    ],
)
def test_a_bad_field_is_named(fields, says):
    with pytest.raises(ValidationError, match=says):
        EngineConfig(**fields)


def test_the_kv_budget_in_bytes():
    assert EngineConfig(kv_budget_mb=0.25).kv_budget_bytes == 2**18
    assert EngineConfig().kv_budget_bytes is None


def test_engine_start_and_the_cli_refuse_a_bad_field_before_starting_anything(capsys):
    from gptoss_ray.cluster.cli.main import main
    from gptoss_ray.cluster.client.engine import Engine

    with pytest.raises(ValidationError, match="shards"):
        Engine.start("gpt-oss-tiny", shards=0)
    with pytest.raises(ValueError, match=r"options \['dtype'\] beside a config"):
        Engine.start(config=EngineConfig(), dtype="float32")
    assert main(["serve", "--shards", "0"]) == 2
    assert "shards=0: Input should be greater than or equal to 1" in capsys.readouterr().err


def test_a_serve_config_holds_one_engine_config():
    from gptoss_ray.cluster.front.serve_app import AppArgs

    spec = AppArgs(engine={"model": "gpt-oss-tiny", "shards": 3, "dtype": "float32"})
    assert spec.engine == EngineConfig(shards=3, dtype="float32")
    with pytest.raises(ValidationError, match="engine_options"):
        AppArgs(engine_options={"dtype": "float32"})  # the old key, refused by name

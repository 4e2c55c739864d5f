"""Settings for the shards' collectives travel with the engine's config: `--env` and the
starting shell's NCCL_* reach every shard through Ray's runtime_env, whatever the
coordinator's own environment (on a cluster, the raylet's) holds."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gptoss_ray.cluster.cli.main import _env
from gptoss_ray.cluster.engine.config import EngineConfig
from gptoss_ray.model.config import ConfigError


def test_the_starting_shells_collective_settings_are_forwarded_unless_given():
    config = EngineConfig(env={"NCCL_DEBUG": "WARN", "MY_FLAG": "1"})
    shell = {"NCCL_DEBUG": "INFO", "NCCL_SOCKET_IFNAME": "eth0", "GLOO_SOCKET_IFNAME": "eth0"}
    shell |= {"FI_PROVIDER": "efa", "HOME": "/root", "PATH": "/bin"}
    assert config.forwarding_env(shell).env == {
        "NCCL_DEBUG": "WARN",  # given: it wins
        "MY_FLAG": "1",
        "NCCL_SOCKET_IFNAME": "eth0",
        "GLOO_SOCKET_IFNAME": "eth0",
        "FI_PROVIDER": "efa",
    }
    with pytest.raises(ValidationError, match="not an environment variable's name"):
        EngineConfig(env={"BAD NAME": "1"})
    assert _env(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        _env(["NOEQUALS"])


def test_env_reaches_every_shard(ray_session, monkeypatch):
    from gptoss_ray.cluster.client.engine import Engine

    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "lo")  # the "shell" that starts the engine
    engine = Engine.start(
        "gpt-oss-tiny",
        shards=2,
        dtype="float32",
        env={"GPTOSS_MARK": "on"},
        collective_timeout=45,
    )
    try:
        status = ray_session.get(engine.coordinator.status.remote())
        for shard in status["shards_detail"]:
            assert shard["env"]["GPTOSS_MARK"] == "on"
            assert shard["env"]["NCCL_SOCKET_IFNAME"] == "lo"
            assert shard["collectives"] == "gloo"
            assert shard["collective_timeout_s"] == 45  # the steps' timeout, set once loaded
    finally:
        engine.shutdown()

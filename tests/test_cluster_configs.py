"""The `ray up` cluster YAMLs pass Ray's own config validation, and say what we promise:
nodes whose Python can install us (the image's tag against pyproject's requires-python),
the project installed on every node, the object store sized, the dashboard on loopback,
and on AWS one zone, a cluster placement group and EFA."""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.commands import prepare_config
from ray.autoscaler._private.util import validate_config

ROOT = Path(__file__).parents[1]
CONFIGS = sorted((ROOT / "configs" / "clusters").glob("*.yaml"))


def required_python() -> tuple[int, int]:
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    major, minor = re.fullmatch(r">=(\d+)\.(\d+)", spec).groups()
    return int(major), int(minor)


def image_python(image: str) -> tuple[int, int]:
    """rayproject/ray:2.60.0-py311-gpu -> (3, 11); Ray's tags name their Python so."""
    tag = re.search(r"-py(\d)(\d+)", image)
    assert tag, f"{image}: the tag names no Python version"
    return int(tag[1]), int(tag[2])


def validated(raw: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return prepared


def test_there_are_aws_gcp_and_onprem_configs():
    providers = {yaml.safe_load(p.read_text())["provider"]["type"] for p in CONFIGS}
    assert providers == {"aws", "gcp", "local"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_passes_ray_validation_and_keeps_promises(path):
    raw = yaml.safe_load(path.read_text())
    validated(raw)
    assert raw["file_mounts"] == {"~/gptoss-ray": "."}
    assert any("pip install -e ~/gptoss-ray" in c for c in raw["setup_commands"])
    head = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "--object-store-memory=" in head
    assert "--object-store-memory=" in " ".join(raw["worker_start_ray_commands"])
    assert "gptoss-ray serve" in path.read_text()
    # every node runs a GPU image whose Python this project installs on, and installs it
    # in there (setup_commands run inside the container)
    image = raw["docker"]["image"]
    assert image.startswith("rayproject/ray:") and image.endswith("-gpu")
    assert image_python(image) >= required_python()
    assert not any(re.search(r"python3\.(\d+)", c) for c in raw["setup_commands"])
    ray_version = image.split(":")[1].split("-")[0]
    assert ray_version == __import__("ray").__version__  # the Ray the tests run
    assert any('"torch==' in c for c in raw["setup_commands"])  # the pinned CPU/GPU torch


def test_aws_is_one_zone_one_placement_group_and_efa():
    raw = yaml.safe_load((CONFIGS[0].parent / "aws-h100.yaml").read_text())
    assert "," not in raw["provider"]["availability_zone"]
    workers = raw["available_node_types"]["h100x8"]["node_config"]
    assert workers["Placement"]["GroupName"]
    assert workers["NetworkInterfaces"][0]["InterfaceType"] == "efa"
    options = " ".join(raw["docker"]["worker_run_options"])
    assert "FI_PROVIDER=efa" in options and "/dev/infiniband" in options


def test_the_fake_multinode_config_validates_too():
    path = CONFIGS[0].parent / "fake" / "fake-multinode.yaml"
    raw = yaml.safe_load(path.read_text())
    assert raw["provider"]["type"] == "fake_multinode"
    # the wheel lacks this provider's defaults file, so prepare_config cannot run; every
    # field is spelled out instead, and the schema check applies as is
    validate_config(raw)


def test_validation_rejects_a_broken_config():
    raw = yaml.safe_load(CONFIGS[0].read_text())
    raw["head_start_ray_comands"] = raw.pop("head_start_ray_commands")  # a typo
    with pytest.raises(jsonschema.ValidationError):
        validated(raw)

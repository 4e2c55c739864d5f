"""Multi-node placement and node loss, on fake nodes of `ray.cluster_utils.Cluster`
(each scenario in its own process: it needs its own Ray cluster)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run(scenario: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.multinode_scenarios", scenario],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, f"no result (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_shards_span_nodes_packed_per_node_with_the_same_tokens():
    result = run("span")
    nodes = result["nodes"]
    assert len(set(nodes)) == 2  # 4 shards, one per (fake) GPU, 2 GPUs per node
    assert nodes[0] == nodes[1] and nodes[2] == nodes[3]  # packed: ranks fill a node first
    assert result["same_tokens"]


def test_a_removed_node_moves_its_shards_to_another_node():
    result = run("remove")
    assert result["victim"] in result["before"]
    assert result["victim"] not in result["after"]
    assert result["recoveries"] >= 1 and result["same_tokens"]


@pytest.mark.slow
def test_no_spare_resources_fail_clearly_without_hanging():
    result = run("no_spare")
    assert "no replacement could be placed within 8 s" in result["error"]
    assert result["seconds"] < 60 and result["healthy"] is False

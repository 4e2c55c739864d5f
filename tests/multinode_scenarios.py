"""Multi-node scenarios on one machine with `ray.cluster_utils.Cluster` (fake nodes that
declare GPUs; the shards run on CPU, pinned to those fake GPUs). Run as a script, one
scenario per process (a test process already has its own Ray), printing a JSON result:

    python -m tests.multinode_scenarios span|remove|no_spare
"""

from __future__ import annotations

import json
import sys
import threading
import time

import ray
from ray.cluster_utils import Cluster

from gptoss_ray.cluster.client.engine import Engine
from gptoss_ray.model.types import EngineUnavailable
from tests.engine_cases import GREEDY, baseline, prompts

OPTIONS = {"dtype": "float32", "gpus_per_shard": 1, "token_budget": 32}


def shard_nodes(engine: Engine) -> list[str]:
    status = ray.get(engine.coordinator.status.remote())
    return [s["node"] for s in status["shards_detail"]]


def spread_and_compare(coordinator_node: str) -> dict:
    """A 4-shard engine: where its shards landed, and whether its greedy tokens equal
    the single-process baseline."""
    engine = Engine.start("gpt-oss-tiny", shards=4, coordinator_node=coordinator_node, **OPTIONS)
    try:
        nodes = shard_nodes(engine)
        outs = engine.generate(prompts(), GREEDY)
        return {
            "nodes": nodes,
            "same_tokens": tuple(tuple(o.token_ids) for o in outs) == baseline(),
        }
    finally:
        engine.shutdown()


def span() -> dict:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=3, num_gpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        return spread_and_compare(cluster.head_node.node_id)
    finally:
        ray.shutdown()
        cluster.shutdown()


def remove() -> dict:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=3, num_gpus=2) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    engine = Engine.start(
        "gpt-oss-tiny", shards=2, coordinator_node=cluster.head_node.node_id, **OPTIONS
    )
    try:
        before = shard_nodes(engine)
        victim = next(n for n in workers if n.node_id == before[0])

        def remove_node() -> None:
            while engine.stats()["steps"] < 3:
                time.sleep(0.01)
            cluster.remove_node(victim)

        thread = threading.Thread(target=remove_node, daemon=True)
        thread.start()
        outs = engine.generate(prompts(), GREEDY)
        thread.join(timeout=60)
        after = shard_nodes(engine)
        same = tuple(tuple(o.token_ids) for o in outs) == baseline()
        recoveries = engine.stats()["recoveries"]
    finally:
        engine.shutdown()
        ray.shutdown()
        cluster.shutdown()
    return {
        "before": before,
        "after": after,
        "victim": victim.node_id,
        "same_tokens": same,
        "recoveries": recoveries,
    }


def no_spare() -> dict:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    node = cluster.add_node(num_cpus=3, num_gpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    engine = Engine.start(
        "gpt-oss-tiny",
        shards=2,
        recovery_timeout=8,
        coordinator_node=cluster.head_node.node_id,
        **OPTIONS,
    )
    start = time.monotonic()
    error = None
    try:

        def remove_node() -> None:
            while engine.stats()["steps"] < 2:
                time.sleep(0.01)
            cluster.remove_node(node)

        threading.Thread(target=remove_node, daemon=True).start()
        try:
            engine.generate(prompts(), GREEDY)
        except EngineUnavailable as exc:
            error = str(exc)
        seconds = time.monotonic() - start
        health = ray.get(engine.coordinator.info.remote())["healthy"]
    finally:
        ray.kill(engine.coordinator)
        ray.shutdown()
        cluster.shutdown()
    return {"error": error, "seconds": seconds, "healthy": health}


def autoscaler() -> dict:
    """On a running fake multi-node cluster (`RAY_FAKE_CLUSTER=1 ray start --head
    --autoscaling-config=...`) whose autoscaler brought up GPU nodes."""
    ray.init(address="auto", log_to_driver=False)
    head = next(
        n["NodeID"]
        for n in ray.nodes()
        if n["Alive"] and "node:__internal_head__" in n["Resources"]
    )
    try:
        return spread_and_compare(head)
    finally:
        ray.shutdown()


def autoscaler_kill() -> dict:
    """On the fake multi-node cluster (as `autoscaler`): a 4-shard engine over both GPU
    nodes; mid-batch, one worker node's raylet and every process under it are killed (the
    node is gone, as when a machine dies); the coordinator replaces its shards on the node the autoscaler brings
    up instead, and the greedy tokens equal the baseline."""
    import os
    import signal

    ray.init(address="auto", log_to_driver=False)
    head = next(
        n["NodeID"]
        for n in ray.nodes()
        if n["Alive"] and "node:__internal_head__" in n["Resources"]
    )
    engine = Engine.start("gpt-oss-tiny", shards=4, coordinator_node=head, **OPTIONS)
    try:
        status = ray.get(engine.coordinator.status.remote())
        before = [s["node"] for s in status["shards_detail"]]
        shard_pid = status["shards_detail"][0]["pid"]
        with open(f"/proc/{shard_pid}/stat") as f:
            stat = f.read()
        raylet = int(stat[stat.rindex(")") + 2 :].split()[1])  # a worker's parent
        killed = {}

        def kill_node() -> None:
            from gptoss_ray.cluster.runtime.head_supervisor import descendants

            while engine.stats()["steps"] < 3:
                time.sleep(0.01)
            killed["at"] = time.monotonic()
            for pid in [raylet, *descendants(raylet)]:  # the node: its raylet and workers
                os.kill(pid, signal.SIGKILL)

        thread = threading.Thread(target=kill_node, daemon=True)
        thread.start()
        long = GREEDY.model_copy(update={"max_tokens": 64})  # the kill lands mid-batch
        outs = engine.generate(prompts(), long)
        done = time.monotonic()
        thread.join(timeout=60)
        stats = engine.stats()
        return {
            "nodes_before": before,
            "nodes_after": shard_nodes(engine),
            "killed_raylet_pid": raylet,
            "same_tokens": tuple(tuple(o.token_ids) for o in outs) == baseline(long),
            "recoveries": stats["recoveries"],
            "recovery": ray.get(engine.coordinator.__ray_call__.remote(lambda c: c.recoveries)),
            "seconds_from_kill_to_batch_done": round(done - killed["at"], 1),
        }
    finally:
        engine.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    scenarios = {
        "span": span,
        "remove": remove,
        "no_spare": no_spare,
        "autoscaler": autoscaler,
        "autoscaler_kill": autoscaler_kill,
    }
    result = scenarios[sys.argv[1]]()
    print("RESULT " + json.dumps(result))

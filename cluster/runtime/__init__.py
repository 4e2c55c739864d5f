"""The Ray runtime of an engine: the coordinator actor (placement, process group, the step
loop over its shard actors, recovery), and the Ray instance it runs in."""

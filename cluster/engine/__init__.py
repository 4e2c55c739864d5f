"""The engine core, without Ray: token requests in, token deltas out. The scheduler and its
KV block manager, the step loop and its config (`EngineConfig`). Imports nothing of the
layers above (runtime, client, batch, front, cli)."""

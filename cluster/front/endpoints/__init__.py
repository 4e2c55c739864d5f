"""One module per endpoint of the OpenAI-compatible API (`cluster.front.app` routes to
them)."""

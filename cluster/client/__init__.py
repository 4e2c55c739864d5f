"""A front's side of an engine, in any process: typed token requests out, pushed token
deltas in (`engine_client`), rendering chat and completions requests and building their
replies (`chat`, `completions`), and the Python API (`engine.Engine`). The HTTP front,
batch jobs and the CLI all use it."""

"""Expert routing across shards: the top-k gate, dispatch plans, the all-to-all transport and
the fixed-order combine. Imports `model/` only."""

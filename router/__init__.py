"""Expert routing across shards: the dispatch plan, the all-to-all transport, combine."""

"""Tests of `shards/`'s layer."""

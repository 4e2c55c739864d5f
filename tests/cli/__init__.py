"""Tests of `cli/`'s layer."""

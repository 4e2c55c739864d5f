"""Tests of `runtime/`'s layer."""

"""Tests of `batch/`'s layer."""

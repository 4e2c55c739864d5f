"""Tests of `router/`'s layer."""

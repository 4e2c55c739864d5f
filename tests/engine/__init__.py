"""Tests of `engine/`'s layer."""

"""Tests of `model/`'s layer."""

"""Tests of `client/`'s layer."""

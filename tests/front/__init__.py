"""Tests of `front/`'s layer."""

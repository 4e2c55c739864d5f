"""The per-device worker: replicated non-expert weights, an expert slice, the KV cache of its
own sequences, and one engine step. Imports `model/` and `router/` only."""

"""Tiny model configurations for tests."""

from __future__ import annotations

from gptoss_ray.model.config import ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    base = dict(
        num_hidden_layers=3,
        num_experts=8,
        experts_per_token=4,
        vocab_size=512,
        hidden_size=64,
        intermediate_size=64,
        head_dim=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
    )
    return ModelConfig(**(base | overrides))


# Three shapes for the oracle comparisons: GQA / MQA / MHA, 8 to 32 experts, an odd number
# of layers, windows shorter than the prompts.
ORACLE_CONFIGS = {
    "gqa-3layers-8experts": tiny_config(),
    "mqa-2layers-32experts": tiny_config(
        num_hidden_layers=2,
        num_experts=32,
        hidden_size=96,
        intermediate_size=32,
        head_dim=32,
        num_attention_heads=8,
        num_key_value_heads=1,
        sliding_window=4,
    ),
    "mha-5layers-16experts": tiny_config(
        num_hidden_layers=5,
        num_experts=16,
        hidden_size=32,
        intermediate_size=96,
        head_dim=8,
        num_attention_heads=4,
        num_key_value_heads=4,
        sliding_window=16,
        vocab_size=300,
    ),
}


def place(cache, blocks, seq_id: str, n: int):
    """As a step's plan does: the scheduler's blocks (`blocks`, a KVBlocks) for n more
    tokens of a sequence, placed on a shard's cache -> the sequence's view."""
    start = cache.tables[seq_id].length if seq_id in cache.tables else 0
    return cache.place(seq_id, start, blocks.grow(seq_id, start, n))

import json
import math

import pytest
import torch
from transformers import GptOssConfig

from gptoss_ray.model.config import ConfigError, ModelConfig, preset_names
from gptoss_ray.model.model import RotaryEmbedding

SHARED = dict(
    hidden_size=2880,
    intermediate_size=2880,
    head_dim=64,
    num_attention_heads=64,
    num_key_value_heads=8,
    vocab_size=201088,
    sliding_window=128,
    experts_per_token=4,
    rope_theta=150000.0,
    rope_scaling_factor=32.0,
    rope_ntk_beta=32.0,
    rope_ntk_alpha=1.0,
    initial_context_length=4096,
    max_context_length=131072,
    rms_norm_eps=1e-5,
    swiglu_limit=7.0,
    swiglu_alpha=1.702,
)


@pytest.mark.parametrize(
    ("name", "layers", "experts"), [("gpt-oss-20b", 24, 32), ("gpt-oss-120b", 36, 128)]
)
def test_real_presets_have_the_published_values(name, layers, experts):
    c = ModelConfig.preset(name)
    assert c.num_hidden_layers == layers and c.num_experts == experts
    for field, value in SHARED.items():
        assert getattr(c, field) == value, field
    assert c.eos_token_ids == [200002, 200012] and c.pad_token_id == 199999
    assert c.is_sliding(0) and not c.is_sliding(1) and c.is_sliding(layers - 2)
    assert (c.q_dim, c.kv_dim) == (4096, 512)


def test_presets_listed():
    assert {"gpt-oss-20b", "gpt-oss-120b", "gpt-oss-tiny"} <= set(preset_names())
    with pytest.raises(ConfigError, match="unknown preset 'gpt-oss-7b'"):
        ModelConfig.preset("gpt-oss-7b")


HUB_20B = {  # config.json of openai/gpt-oss-20b (rope_scaling + rope_theta style)
    "architectures": ["GptOssForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 200002,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072,
    "model_type": "gpt_oss",
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "output_router_logits": False,
    "pad_token_id": 199999,
    "quantization_config": {
        "modules_to_not_convert": ["model.embed_tokens"],
        "quant_method": "mxfp4",
    },
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "use_cache": True,
    "vocab_size": 201088,
}

ORIGINAL_120B = {
    "num_hidden_layers": 36,
    "num_experts": 128,
    "experts_per_token": 4,
    "vocab_size": 201088,
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "swiglu_limit": 7.0,
    "head_dim": 64,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "sliding_window": 128,
    "initial_context_length": 4096,
    "rope_theta": 150000,
    "rope_scaling_factor": 32.0,
    "rope_ntk_alpha": 1,
    "rope_ntk_beta": 32,
}


def strip_layer_types(c: ModelConfig) -> ModelConfig:
    return c.model_copy(update={"layer_types": None})


def test_reads_hub_hf_config():
    c = ModelConfig.from_dict(HUB_20B)
    assert strip_layer_types(c) == ModelConfig.preset("gpt-oss-20b")


def test_reads_transformers5_rope_parameters_style(tmp_path):
    """transformers 5 writes `rope_parameters` with rope_theta inside it."""
    hf = GptOssConfig(
        num_hidden_layers=24,
        num_local_experts=32,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 4096,
            "rope_theta": 150000.0,
        },
        pad_token_id=199999,
    )
    hf.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in raw and "rope_scaling" not in raw
    c = ModelConfig.from_file(tmp_path / "config.json")
    assert strip_layer_types(c) == ModelConfig.preset("gpt-oss-20b")


def test_reads_original_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(ORIGINAL_120B))
    assert ModelConfig.from_file(path) == ModelConfig.preset("gpt-oss-120b")


def test_round_trips_both_styles():
    c = ModelConfig.preset("gpt-oss-tiny")
    assert strip_layer_types(ModelConfig.from_dict(c.to_hf_dict())) == c
    assert ModelConfig.from_dict(c.to_original_dict()) == c
    assert set(c.to_original_dict()) == set(ORIGINAL_120B)


def test_yarn_correction_range_is_not_rounded():
    rope = RotaryEmbedding(ModelConfig.preset("gpt-oss-20b"))
    # low 8.0928 and high 17.3980 (SPEC): dims 0..8 keep extrapolation, 18.. interpolate.
    extrapolation = 1 / 150000 ** (torch.arange(0, 64, 2).float() / 64)
    assert rope.inv_freq[8].item() == pytest.approx(extrapolation[8].item(), rel=1e-6)
    assert rope.inv_freq[18].item() == pytest.approx(extrapolation[18].item() / 32, rel=1e-6)
    # dimension 9 sits between: ramp (9 - 8.0928) / (17.3980 - 8.0928) = 0.0975
    mix = 1 - 0.09749
    expected = extrapolation[9].item() / 32 * (1 - mix) + extrapolation[9].item() * mix
    assert rope.inv_freq[9].item() == pytest.approx(expected, rel=1e-3)
    assert rope.concentration == pytest.approx(0.1 * math.log(32) + 1)


def test_bad_configs_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="multiples of 32"):
        ModelConfig.from_dict({**ORIGINAL_120B, "hidden_size": 2890})
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        ModelConfig.from_dict({**ORIGINAL_120B, "num_key_value_heads": 7})
    with pytest.raises(ConfigError, match="experts_per_token"):
        ModelConfig.from_dict({**ORIGINAL_120B, "experts_per_token": 200})
    with pytest.raises(ConfigError, match="truncate"):
        ModelConfig.from_dict(
            {**HUB_20B, "rope_scaling": {**HUB_20B["rope_scaling"], "truncate": True}}
        )
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        ModelConfig.from_dict({k: v for k, v in ORIGINAL_120B.items() if k != "num_hidden_layers"})
    with pytest.raises(ConfigError, match="layer_types"):
        ModelConfig.from_dict({**HUB_20B, "layer_types": ["full_attention"] * 3})
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(bad)

"""LoRA adapters in PEFT's layout (model/lora.py), against transformers + peft: random
adapters made by PEFT itself on Hugging Face's GptOssForCausalLM (the oracle), loaded by
our loader, give the same float32 logits; several adapters and the base model in one
batch give each sequence what it gets alone; a bad adapter folder names what is wrong."""

from __future__ import annotations

import json

import pytest
import torch

from gptoss_ray.model.config import CheckpointError, ConfigError
from gptoss_ray.model.kv_cache import SequenceBatch, SequenceKV
from gptoss_ray.model.lora import LoraAdapter, LoraSlots
from gptoss_ray.model.op_counter import OpCounter
from tests.tiny import tiny_config

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A tiny random gpt-oss checkpoint: our model and transformers' on it (float32)."""
    from transformers import GptOssForCausalLM, Mxfp4Config

    from gptoss_ray.model.checkpoint import Checkpoint, write_random_checkpoint

    config = tiny_config(num_hidden_layers=2, hidden_size=64, intermediate_size=64)
    folder = write_random_checkpoint(config, tmp_path_factory.mktemp("t") / "m", seed=4)
    ours = Checkpoint(folder).load(dtype=torch.float32)
    theirs = GptOssForCausalLM.from_pretrained(
        folder,
        quantization_config=Mxfp4Config(dequantize=True),
        dtype=torch.float32,
        attn_implementation="eager",
    )
    return config, folder, ours, theirs.float().eval()


EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def make_adapter(theirs, folder, *, seed: int, r: int, experts, rslora: bool = False):
    """PEFT's own adapter on the oracle, its A and B random (no zero init), saved.
    experts: the target parameters (in PEFT's order, which decides how it nests them),
    or None."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r + 1,
        use_rslora=rslora,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=experts,
        init_lora_weights=False,
    )
    model = get_peft_model(theirs, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(0.5)  # random, small enough to keep the logits sane
    model.save_pretrained(folder)
    return model


def our_logits(model, slots, tokens: list[list[int]], adapters: list[int]) -> list[torch.Tensor]:
    c = model.config
    caches = [
        SequenceKV(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, dtype=torch.float32)
        for _ in tokens
    ]
    slot = torch.tensor([a for t, a in zip(tokens, adapters, strict=True) for _ in t])
    batch = SequenceBatch(caches, [len(t) for t in tokens], adapters=slot)
    model.attach_lora(slots)
    flat = torch.tensor([x for t in tokens for x in t])
    logits = model(flat, batch, all_logits=True)
    return list(logits.split([len(t) for t in tokens]))


@pytest.mark.parametrize(
    "experts",
    [None, EXPERTS, EXPERTS[::-1], EXPERTS[1:]],
    ids=["attention", "attention+experts", "experts-listed-down-first", "down_proj-only"],
)
def test_logits_equal_transformers_with_peft(target, tmp_path, experts):
    config, _, ours, theirs = target
    rslora = experts is not None
    peft_model = make_adapter(theirs, tmp_path / "a", seed=1, r=4, experts=experts, rslora=rslora)
    adapter = LoraAdapter.load("a", tmp_path / "a", config)
    slots = LoraSlots(config, max_loras=2, max_rank=8)
    slots.put(1, adapter)
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n in (11, 7)]
    # sequence 0 with the adapter (slot 1), sequence 1 the base model, in one batch
    got = our_logits(ours, slots, tokens, [1, -1])
    with torch.no_grad():
        want = peft_model(torch.tensor([tokens[0]])).logits[0]
        with peft_model.disable_adapter():
            base = peft_model(torch.tensor([tokens[1]])).logits[0]
    peft_model.unload()  # the oracle back to its base weights for the next case
    assert torch.allclose(got[0], want, atol=1e-4, rtol=1e-4), (got[0] - want).abs().max()
    assert torch.allclose(got[1], base, atol=1e-4, rtol=1e-4)
    # the adapter changes the logits (else the comparison proves nothing)
    plain = our_logits(ours, slots, tokens[:1], [-1])[0]
    assert (plain - want).abs().max() > 1e-2


def test_a_batch_of_adapters_gives_each_sequence_what_it_gets_alone(target, tmp_path):
    """Two adapters (one with experts, ranks 2 and 6) and the base model in one batch,
    every sequence's logits as in a batch of its own; no host read in any layer (the op
    counter)."""
    config, _, ours, theirs = target
    make_adapter(theirs, tmp_path / "x", seed=2, r=2, experts=EXPERTS).unload()
    make_adapter(theirs, tmp_path / "y", seed=3, r=6, experts=None).unload()
    slots = LoraSlots(config, max_loras=3, max_rank=8)
    slots.put(0, LoraAdapter.load("x", tmp_path / "x", config))
    slots.put(2, LoraAdapter.load("y", tmp_path / "y", config))
    g = torch.Generator().manual_seed(1)
    tokens = [torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n in (5, 9, 3, 6)]
    adapters = [0, 2, -1, 0]
    counter = OpCounter(ours)
    with counter.step() as ops:  # the LoRA products read nothing on the host
        together = our_logits(ours, slots, tokens, adapters)
    counter.close()
    assert ops.host_reads_in_blocks() == 0
    for t, a, got in zip(tokens, adapters, together, strict=True):
        alone = our_logits(ours, slots, [t], [a])[0]
        assert torch.allclose(got, alone, atol=1e-5, rtol=1e-5)
    slots.clear(0)  # a cleared slot is the base model again
    assert torch.allclose(
        our_logits(ours, slots, tokens[:1], [0])[0], our_logits(ours, slots, tokens[:1], [-1])[0]
    )


def test_a_bad_adapter_names_what_is_wrong(target, tmp_path):
    config, _, _, theirs = target
    folder = tmp_path / "a"
    make_adapter(theirs, folder, seed=1, r=4, experts=EXPERTS).unload()
    raw = json.loads((folder / "adapter_config.json").read_text())

    def with_config(**changes):
        (folder / "adapter_config.json").write_text(json.dumps({**raw, **changes}))

    for field, value, words in (
        ("use_dora", True, "use_dora=True is not supported"),
        ("bias", "all", "bias='all' is not supported"),
        ("target_modules", ["gate_proj"], "target_modules names 'gate_proj'"),
        ("peft_type", "IA3", "only LORA adapters"),
        ("r", 0, "r: Input should be greater than 0"),
    ):
        with_config(**{field: value})
        with pytest.raises(ConfigError, match=words):
            LoraAdapter.load("a", folder, config)
    with_config()
    with pytest.raises(ConfigError, match="rank 4 exceeds max_lora_rank 2"):
        LoraSlots(config, max_loras=1, max_rank=2).put(0, LoraAdapter.load("a", folder, config))
    with pytest.raises(
        CheckpointError, match=r"q_proj.lora_A.weight: shape \[4, 64\], expected \[4, 32\]"
    ):
        LoraAdapter.load("a", folder, tiny_config(num_hidden_layers=2, hidden_size=32))
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no adapter_model\.safetensors"):
        LoraAdapter.load("a", folder, config)

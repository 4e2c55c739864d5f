from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptoss_ray.model.checkpoint import (
    Checkpoint,
    load_model,
    model_tensors,
    random_tensors,
    save_checkpoint,
    tensor_specs,
)
from gptoss_ray.model.model import combine
from gptoss_ray.model.model_folder import CheckpointError
from tests.tiny import tiny_config

CONFIG = tiny_config()


@pytest.fixture(scope="module")
def tensors():
    return random_tensors(CONFIG, seed=3)


@pytest.fixture
def hf_dir(tmp_path, tensors):
    return save_checkpoint(tensors, CONFIG, tmp_path / "hf", layout="hf")


def state(model) -> dict[str, torch.Tensor]:
    return model_tensors(model)


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def test_layouts_are_detected_and_load_bit_identical(tmp_path, tensors):
    hf = save_checkpoint(tensors, CONFIG, tmp_path / "hf", layout="hf")
    orig = save_checkpoint(tensors, CONFIG, tmp_path / "original", layout="original")
    sharded = save_checkpoint(tensors, CONFIG, tmp_path / "sharded", max_shard_bytes=100_000)
    assert Checkpoint(hf).layout == "hf" and Checkpoint(orig).layout == "original"
    assert Checkpoint(sharded).layout == "hf"
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    assert (sharded / "model.safetensors.index.json").is_file()
    reference = state(Checkpoint(hf).load(dtype=torch.bfloat16))
    assert_bit_identical(reference, state(Checkpoint(orig).load(dtype=torch.bfloat16)))
    assert_bit_identical(reference, state(Checkpoint(sharded).load(dtype=torch.bfloat16)))
    # the loaded tensors are the ones written (floats were bfloat16 already)
    for name, t in tensors.items():
        assert torch.equal(reference[name].to(t.dtype), t), name


def test_original_layout_names_and_config(tmp_path, tensors):
    orig = save_checkpoint(tensors, CONFIG, tmp_path / "o", layout="original")
    names = set(load_file(orig / "model.safetensors"))
    assert {"embedding.weight", "norm.scale", "unembedding.weight"} <= names
    for leaf in (
        "attn.qkv.weight",
        "attn.sinks",
        "mlp.gate.bias",
        "mlp.mlp1_weight.blocks",
        "mlp.mlp1_weight.scales",
        "mlp.mlp2_bias",
    ):
        assert f"block.0.{leaf}" in names
    cfg = json.loads((orig / "config.json").read_text())
    assert set(cfg) == {
        "num_hidden_layers",
        "num_experts",
        "experts_per_token",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "swiglu_limit",
        "head_dim",
        "num_attention_heads",
        "num_key_value_heads",
        "sliding_window",
        "initial_context_length",
        "rope_theta",
        "rope_scaling_factor",
        "rope_ntk_alpha",
        "rope_ntk_beta",
    }


def test_round_trip_through_a_loaded_model(tmp_path, hf_dir):
    model = Checkpoint(hf_dir).load(dtype=torch.float32)
    again = save_checkpoint(model_tensors(model), CONFIG, tmp_path / "again", layout="original")
    assert_bit_identical(
        state(Checkpoint(hf_dir).load(dtype=torch.bfloat16)),
        state(Checkpoint(again).load(dtype=torch.bfloat16)),
    )


class SpySlice:
    """A safetensors slice view that records which rows were read."""

    def __init__(self, view, name, log):
        self.view, self.name, self.log = view, name, log

    def get_shape(self):
        return self.view.get_shape()

    def get_dtype(self):
        return self.view.get_dtype()

    def __getitem__(self, index):
        self.log.append((self.name, index))
        return self.view[index]


class SpyFile:
    def __init__(self, handle, log):
        self.handle, self.log = handle, log

    def __enter__(self):
        self.file = self.handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

    def keys(self):
        return self.file.keys()

    def get_slice(self, name):
        return SpySlice(self.file.get_slice(name), name, self.log)


def test_expert_range_reads_only_that_slice(hf_dir, monkeypatch):
    import gptoss_ray.model.checkpoint as ckpt

    full = state(Checkpoint(hf_dir).load(dtype=torch.float32))
    reads: list[tuple[str, object]] = []
    real_open = ckpt._open
    monkeypatch.setattr(ckpt, "_open", lambda path: SpyFile(real_open(path), reads))
    part = Checkpoint(hf_dir).load(dtype=torch.float32, experts=(3, 6))
    assert part.expert_range == (3, 6)
    expert_reads = [index for name, index in reads if ".experts." in name]
    assert len(expert_reads) == 6 * CONFIG.num_hidden_layers
    assert all(index == slice(3, 6) for index in expert_reads)
    for name, t in state(part).items():
        if ".experts." in name:
            assert torch.equal(t, full[name][3:6]), name
        else:
            assert torch.equal(t, full[name]), name


def test_expert_slices_partial_sums_recombine_exactly(hf_dir):
    """Shards holding disjoint expert ranges fill disjoint slots; their contributions add
    up (exactly: the other slots are zero) to the full layer's, in any order."""
    full = Checkpoint(hf_dir).load(dtype=torch.float32)
    ranges = [(0, 3), (3, 5), (5, 8)]
    parts = [Checkpoint(hf_dir).load(dtype=torch.float32, experts=r) for r in ranges]
    x = torch.randn(11, CONFIG.hidden_size, generator=torch.Generator().manual_seed(0))
    for layer in range(CONFIG.num_hidden_layers):
        whole = slot_contributions(full.block[layer].mlp, x)
        pieces = [slot_contributions(p.block[layer].mlp, x) for p in parts]
        assert torch.equal(pieces[2] + pieces[0] + pieces[1], whole)
        assert torch.equal(combine(sum(pieces)), combine(whole))
        # every slot was filled by exactly one shard
        filled = sum((p.abs().sum(-1) > 0).int() for p in pieces)
        assert (filled <= 1).all() and filled.sum() > 0


def slot_contributions(block, x):
    """[T, k, H] float32: weights[t, j] * expert(h[t]) in each slot (t, j) whose expert this
    block's slice holds, zero elsewhere (a shard's share before the combine)."""
    h = block.norm(x)
    expert_ids, weights = block.router(h)
    experts = block.experts
    out = torch.zeros(*expert_ids.shape, x.shape[1])
    tok, slot = ((expert_ids >= experts.lo) & (expert_ids < experts.hi)).nonzero(as_tuple=True)
    if tok.numel():
        y = experts.run_grouped(h[tok], expert_ids[tok, slot])
        out[tok, slot] = y.float() * weights[tok, slot, None]
    return out


def test_partial_model_refuses_a_whole_forward(hf_dir):
    part = Checkpoint(hf_dir).load(dtype=torch.float32, experts=(0, 4))
    with pytest.raises(RuntimeError, match=r"experts \[0, 4\)"):
        part(torch.tensor([1]), None)


def test_builtin_preset_is_written_once_and_cached():
    a = load_model("gpt-oss-tiny", dtype=torch.float32)
    b = load_model("gpt-oss-tiny", dtype=torch.float32)
    assert a.config.vocab_size == 201088
    assert_bit_identical(state(a), state(b))


# -- bad input ------------------------------------------------------------------------------


def test_directory_without_config(tmp_path, hf_dir):
    (hf_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        Checkpoint(hf_dir)
    with pytest.raises(CheckpointError, match="not a directory"):
        Checkpoint(tmp_path / "nowhere")


def test_directory_without_weights(tmp_path, hf_dir):
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        Checkpoint(hf_dir)


def rewrite(folder, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_tensor_is_named(hf_dir):
    rewrite(hf_dir, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(
        CheckpointError, match=r"missing tensor model\.layers\.1\.self_attn\.k_proj\.bias"
    ):
        Checkpoint(hf_dir).load()


def test_wrong_shape_names_tensor_and_expected_shape(hf_dir):
    name = "model.layers.2.mlp.experts.down_proj_blocks"

    def edit(t):
        t[name] = t[name][:, :-1].contiguous()

    rewrite(hf_dir, edit)
    with pytest.raises(
        CheckpointError, match=rf"{name}.*shape \[8, 63, 2, 16\], expected \[8, 64, 2, 16\]"
    ):
        Checkpoint(hf_dir).load()


def test_wrong_dtype_is_named(hf_dir):
    name = "model.layers.0.mlp.experts.gate_up_proj_scales"

    def edit(t):
        t[name] = t[name].to(torch.float32)

    rewrite(hf_dir, edit)
    with pytest.raises(CheckpointError, match=rf"{name}.*dtype F32, expected U8"):
        Checkpoint(hf_dir).load()

    def edit_int(t):
        t[name] = t[name].to(torch.uint8)
        t["model.norm.weight"] = t["model.norm.weight"].to(torch.int32)

    rewrite(hf_dir, edit_int)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*dtype I32, expected a float"):
        Checkpoint(hf_dir).load()


def test_truncated_file_is_named(hf_dir):
    path = hf_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors"):
        Checkpoint(hf_dir)


def test_index_naming_a_missing_shard(tmp_path, tensors):
    folder = save_checkpoint(tensors, CONFIG, tmp_path / "s", max_shard_bytes=100_000)
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"lists {victim.name}, which does not exist"):
        Checkpoint(folder)


def test_config_that_does_not_match_the_weights(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["num_local_experts"] = 16
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError, match=r"router\.weight.*shape \[8, 64\], expected \[16, 64\]"
    ):
        Checkpoint(hf_dir).load()


def test_not_a_gpt_oss_layout(tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG.to_hf_dict()))
    save_file({"transformer.h.0.weight": torch.zeros(2)}, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="neither the Hugging Face layout"):
        Checkpoint(folder)


def test_hub_style_folder_with_only_original(tmp_path, tensors):
    repo = tmp_path / "repo"
    save_checkpoint(tensors, CONFIG, repo / "original", layout="original")
    shutil.copy(repo / "original" / "config.json", repo / "README.md")  # something else on top
    assert Checkpoint(repo).layout == "original"


def test_every_spec_becomes_a_model_tensor(hf_dir):
    model = Checkpoint(hf_dir).load(dtype=torch.float32)
    assert set(state(model)) == {s.name for s in tensor_specs(CONFIG)}

"""EAGLE-3 drafts (`--speculative eagle3`): a random draft in the published layout. Its
layer's math is Hugging Face's Llama pieces composed the EAGLE-3 way; the proposals the
shard makes, with its cached keys, are those of an uncached recomputation from the
target's taps; and the replies with its drafts are the replies without drafts (here on
one shard with a vocabulary of 16, where some drafts are kept; on 1-3 shards with
preemption, prefix hits, n > 1 and a grammar in test_speculative.py)."""

from __future__ import annotations

import pytest
import torch

from gptoss_ray.cluster.engine.core import EngineCore
from gptoss_ray.cluster.engine.drafts import ShardDrafts
from gptoss_ray.model.config import ConfigError
from gptoss_ray.model.eagle3 import (
    Eagle3Config,
    Eagle3Draft,
    causal_attention,
    load_draft,
    write_random_draft,
)
from gptoss_ray.model.model_folder import CheckpointError
from gptoss_ray.model.types import KVLayout, SamplingParams
from tests.tiny import tiny_config

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def draft_config(hidden: int, vocab: int, draft_vocab: int, taps=(0, 1, 2)) -> Eagle3Config:
    return Eagle3Config(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=vocab,
        draft_vocab_size=draft_vocab,
        rope_theta=10000.0,
        rope_scaling=LLAMA3,
        aux_layers=taps,
    )


def test_the_draft_layer_is_llamas_pieces_composed_the_eagle3_way(tmp_path):
    """Oracle: transformers' LlamaRotaryEmbedding (llama3 scaling), LlamaRMSNorm,
    LlamaAttention (its q/k/v reading the 2H-wide input) and LlamaMLP, loaded with the
    same tensors, composed as EAGLE-3's layer: [norm(embeds), norm(hidden)] -> attention
    -> + hidden -> MLP -> +; then norm and lm_head."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (
        LlamaAttention,
        LlamaMLP,
        LlamaRMSNorm,
        LlamaRotaryEmbedding,
    )

    config = draft_config(64, 512, 128)
    folder = write_random_draft(
        config, tmp_path / "d", own_embedding=True, d2t=torch.arange(128) * 3
    )
    draft = load_draft(folder, tiny_config(), dtype=torch.float32)
    hf = LlamaConfig(**{**config.to_hf_dict(), "attention_bias": False, "mlp_bias": False})
    hf._attn_implementation = "eager"
    n = 40  # past the llama3 scaling's original context
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 512, (n,), generator=g)
    hidden = draft.combine(torch.randn(n, 3 * 64, generator=g))
    positions = torch.arange(n)

    def attend(q, k, v):
        return causal_attention(q, k, v)

    ours = draft(tokens, hidden, positions, attend)

    sd = {k: v.float() for k, v in draft.state_dict().items()}
    norms = {}
    for name in ("input_layernorm", "hidden_norm", "post_attention_layernorm"):
        norms[name] = LlamaRMSNorm(64, eps=config.rms_norm_eps)
        norms[name].weight.data = sd[f"midlayer.{name}.scale"]
    attn = LlamaAttention(hf, layer_idx=0)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        weight = sd[f"midlayer.self_attn.{proj}.weight"]
        setattr(attn, proj, torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False))
        getattr(attn, proj).weight.data = weight
    mlp = LlamaMLP(hf)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        getattr(mlp, proj).weight.data = sd[f"midlayer.mlp.{proj}.weight"]
    rotary = LlamaRotaryEmbedding(hf)
    with torch.no_grad():
        embeds = draft.embed_tokens(tokens)
        x = torch.cat((norms["input_layernorm"](embeds), norms["hidden_norm"](hidden)), -1)[None]
        cos_sin = rotary(x, positions[None])
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        a, _ = attn(x, position_embeddings=cos_sin, attention_mask=mask)
        residual = hidden + a[0]
        want = residual + mlp(norms["post_attention_layernorm"](residual))
        final = LlamaRMSNorm(64, eps=config.rms_norm_eps)
        final.weight.data = sd["norm.scale"]
        want_logits = final(want) @ sd["lm_head.weight"].T
    assert torch.allclose(ours, want, atol=1e-5, rtol=1e-5)
    assert torch.allclose(draft.logits(ours), want_logits, atol=1e-4, rtol=1e-4)


def test_a_bad_draft_checkpoint_names_the_tensor_and_the_shape(tmp_path):
    config = draft_config(64, 512, 128)
    folder = write_random_draft(config, tmp_path / "d", d2t=torch.zeros(128, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"hidden states of size 64.*target.s are 32"):
        load_draft(folder, tiny_config(hidden_size=32))
    with pytest.raises(ConfigError, match="vocab_size 512, the target's is 1000"):
        load_draft(folder, tiny_config(vocab_size=1000))
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors["fc.weight"] = tensors["fc.weight"][:, :100].contiguous()
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"fc.weight .*shape \[64, 100\], expected \[64, 192\]"
    ):
        load_draft(folder, tiny_config())
    del tensors["fc.weight"], tensors["d2t"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"missing tensor fc.weight \(expected shape \[64, 192\]"
    ):
        load_draft(folder, tiny_config())
    with pytest.raises(ConfigError, match="rope_scaling type 'yarn'"):
        Eagle3Config.from_dict({**config.to_hf_dict(), "rope_scaling": {"rope_type": "yarn"}})
    with pytest.raises(ConfigError, match=r"the target has layers 0\.\.2"):
        draft_config(64, 512, 128, taps=(0, 1, 5)).taps(3)
    assert Eagle3Config.from_dict(
        {
            **config.to_hf_dict(),
            "eagle_config": None,
            "eagle_aux_hidden_state_layer_ids": [1, 17, 33],
        }
    ).taps(36) == (1, 17, 33)
    assert draft_config(64, 512, 128, taps=None).taps(36) == (2, 18, 33)


class Recording(ShardDrafts):
    """ShardDrafts that keeps every proposal it was sent: (sequence, length, tokens)."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, int, list[int]]] = []

    def receive(self, seq_id: str, length: int, tokens: list[int]) -> None:
        self.log.append((seq_id, length, list(tokens)))
        super().receive(seq_id, length, tokens)


def reference_proposals(target, draft: Eagle3Draft, tokens: list[int], k: int) -> list[int]:
    """The draft's k proposals after `tokens`, recomputed without a cache: the target's
    taps at every position from one forward over the whole sequence, then the draft over
    every position again for each proposal (its own pre-norm output as the hidden input
    past the target's)."""
    from gptoss_ray.model.kv_cache import SequenceBatch, SequenceKV

    c = target.config
    taps = draft.config.taps(c.num_hidden_layers)
    cache = SequenceKV(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, dtype=torch.float32)
    tapped = []
    target(torch.tensor(tokens), SequenceBatch([cache], [len(tokens)]), taps=taps, tapped=tapped)
    hidden = draft.combine(tapped[0][:-1])  # positions 0 .. L-2: the last token's comes next
    inputs = list(tokens[1:])
    out = []
    for _ in range(k):
        n = len(inputs)
        result = draft(torch.tensor(inputs), hidden, torch.arange(n), causal_attention)
        token = int(draft.propose(result[-1:])[0])
        out.append(token)
        hidden = torch.cat((hidden, result[-1:]))
        inputs.append(token)
    return out


def test_the_shards_proposals_are_an_uncached_recomputations_and_replies_are_exact(tmp_path):
    """A target with a vocabulary of 16 and a random draft with 8 ids mapped into it by
    d2t, k = 3, on one shard with a 16-token block (chunks of a 40-token budget cross
    blocks): every proposal the shard sent equals `reference_proposals` for the tokens it
    followed; the greedy replies equal those without drafts; and some drafts were kept, so
    that rows past a kept draft were fed to the draft too."""
    from gptoss_ray.model.checkpoint import Checkpoint, write_random_checkpoint
    from gptoss_ray.router.transport import LocalTransport
    from gptoss_ray.shards.shard import Shard

    config = tiny_config(vocab_size=16, num_hidden_layers=3)
    target_folder = write_random_checkpoint(config, tmp_path / "t", seed=5)
    to_target = torch.tensor([3, 0, 7, 2, 9, 1, 4, 8])  # draft id d -> d + d2t[d]
    draft_folder = write_random_draft(
        draft_config(64, 16, 8), tmp_path / "d", seed=2, d2t=to_target - torch.arange(8)
    )
    layout = KVLayout(16, 64, 64)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 16, (n,), generator=g).tolist() for n in (5, 37, 20, 1)]

    def core(draft=None, drafter=None) -> EngineCore:
        shard = Shard(
            target_folder,
            rank=0,
            world_size=1,
            transport=LocalTransport(),
            dtype=torch.float32,
            kv_layout=layout,
            draft_model=draft,
            num_draft_tokens=3,
        )
        return EngineCore(
            shard.config,
            1,
            layout,
            lambda plans: [shard.step(plans[0])],
            token_budget=40,
            drafter=drafter,
            num_draft_tokens=3,
        )

    def replies(c: EngineCore) -> dict[str, list[int]]:
        ids = [c.submit(p, params, request_id=f"r{i}") for i, p in enumerate(prompts)]
        c.run_until_done()
        return {rid: c.output(rid).token_ids for rid in ids}

    plain = replies(core())
    recording = Recording()
    drafted = core(draft_folder, recording)
    assert replies(drafted) == plain
    s = drafted.scheduler
    assert 0 < s.drafts_accepted < s.drafts_proposed
    target = Checkpoint(target_folder).load(dtype=torch.float32)
    draft = load_draft(draft_folder, config, dtype=torch.float32)
    draft.share_embedding(target.embedding)
    assert len(recording.log) >= 40
    for seq_id, length, proposed in recording.log:  # one choice each: the request's id
        tokens = (prompts[int(seq_id[1:])] + plain[seq_id])[:length]
        assert proposed == reference_proposals(target, draft, tokens, 3), (seq_id, length)


def test_eagle3_through_ray_gives_the_baseline_across_a_lost_shard(ray_session, tmp_path):
    """`Engine.start(speculative="eagle3", draft_model=...)` on 2 shards: each shard loads
    the draft beside the target and drafts for its sequences; one shard is killed at step
    4 and replaced (loading the draft too). The greedy replies are the single-process
    baseline's, and the drafts are counted."""
    import threading
    import time

    from gptoss_ray.cluster.client.engine import Engine
    from gptoss_ray.model.model_folder import read_config, resolve_model
    from tests.engine_cases import GREEDY, baseline, prompts

    config = read_config(resolve_model("gpt-oss-tiny"))
    eagle = draft_config(128, config.vocab_size, 4096, taps=(0, 1, 3))
    folder = write_random_draft(eagle, tmp_path / "eagle3", d2t=torch.arange(4096) * 47)
    engine = Engine.start(
        "gpt-oss-tiny",
        shards=2,
        dtype="float32",
        speculative="eagle3",
        draft_model=str(folder),
        num_draft_tokens=3,
    )
    ray = ray_session
    coordinator = engine.coordinator

    def kill_at_step_4() -> None:
        while ray.get(coordinator.stats.remote())["steps"] < 4:
            time.sleep(0.01)
        workers = ray.get(coordinator.__ray_call__.remote(lambda c: c.workers))
        ray.kill(workers[1])

    try:
        thread = threading.Thread(target=kill_at_step_4, daemon=True)
        thread.start()
        outs = engine.generate(prompts(), GREEDY)
        thread.join(timeout=60)
        assert tuple(tuple(o.token_ids) for o in outs) == baseline()
        assert engine.stats()["drafts_proposed"] > 0
        assert len(ray.get(coordinator.status.remote())["recoveries"]) == 1
    finally:
        engine.shutdown()


def test_eagle3_settings_are_checked_where_they_enter():
    from pydantic import ValidationError

    from gptoss_ray.cluster.engine.config import EngineConfig

    with pytest.raises(ValidationError, match="speculative 'eagle3' needs draft_model"):
        EngineConfig(speculative="eagle3")
    with pytest.raises(ValidationError, match="draft_model is for speculative 'eagle3'"):
        EngineConfig(speculative="ngram", draft_model="/d")
    drafter, k = EngineConfig(speculative="eagle3", draft_model="/d", num_draft_tokens=5).drafter()
    assert isinstance(drafter, ShardDrafts) and k == 5


def test_the_draft_layer_reads_nothing_on_the_host(tmp_path):
    """The op counter (a TorchDispatchMode and a function mode) around every step, with
    the draft's layer as its one block: no host read inside it, in the pass over the
    chunks nor in the proposals' steps."""
    from types import SimpleNamespace

    from gptoss_ray.model.op_counter import OpCounter
    from tests.engine_cases import prompts, tiny_shard

    eagle = draft_config(128, 201088, 4096, taps=(0, 1, 3))
    folder = write_random_draft(eagle, tmp_path / "eagle3", d2t=torch.arange(4096) * 47)
    layout = KVLayout(16, 64, 64)
    shard = tiny_shard(layout, draft_model=folder, num_draft_tokens=3)
    layer = shard.proposer.draft.midlayer
    counter = OpCounter(SimpleNamespace(block=[SimpleNamespace(attn=layer, mlp=layer)]))

    def launch(plans):
        with counter.step():
            return [shard.step(plans[0])]

    core = EngineCore(shard.config, 1, layout, launch, drafter=ShardDrafts(), num_draft_tokens=3)
    for p in prompts()[:3]:
        core.submit(p, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    core.run_until_done()
    assert core.scheduler.drafts_proposed > 0
    assert [s.host_reads_in_blocks() for s in counter.steps] == [0] * len(counter.steps)


def test_the_drafts_keys_count_in_the_kv_budget(tmp_path):
    """A shard with a draft sizes its cache for both: the target's pools and the draft's
    (a block beside each full-attention block) fit the budget together, with fewer full
    blocks than without the draft."""
    from gptoss_ray.model.eagle3_config import Eagle3Config
    from tests.engine_cases import tiny_shard

    eagle = draft_config(128, 201088, 4096, taps=(0, 1, 3))
    folder = write_random_draft(eagle, tmp_path / "eagle3", d2t=torch.arange(4096) * 47)
    budget = 4 * 2**20
    shard = tiny_shard(None, kv_budget_bytes=budget, draft_model=folder)
    alone = KVLayout.from_budget(shard.config, budget, bytes_per_value=4)
    layout = shard.kv.layout
    draft_bytes = Eagle3Config.from_folder(folder).kv_bytes_per_token(4)
    assert draft_bytes == 2 * 2 * 16 * 4
    assert layout.full_blocks < alone.full_blocks
    assert layout.nbytes(shard.config, 4, draft_bytes) <= budget
    assert alone.nbytes(shard.config, 4) <= budget
    assert shard.proposer.keys.shape[0] == layout.full_blocks + 1  # and its scratch block

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai_harmony import HarmonyEncodingName, load_harmony_encoding

from gptoss_ray.model import tokenizer
from gptoss_ray.model.tokenizer import TokenizerError


@functools.cache
def harmony_encoding():
    # Loading parses the whole vocabulary: once per session, not once per example.
    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


@pytest.fixture
def harmony():
    return harmony_encoding()


SAMPLES = [
    "",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "line\r\nbreaks\n\n\ttabs",
    "It's they're we've I'm you'll he'd",
    "日本語のテキスト and 한국어 and العربية",
    "emoji 🎉🚀 and combining é (e\u0301)",
    "numbers 1234567 3.14159 -42",
    "code: def f(x):\n    return x**2  # comment",
    "<|start|>user<|message|> spelled as text",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_encode_matches_openai_harmony(harmony, text):
    assert tokenizer.encode(text) == harmony.encode(text, disallowed_special=())
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=80))
def test_encode_matches_on_any_text(text):
    assert tokenizer.encode(text) == harmony_encoding().encode(text, disallowed_special=())


def test_special_tokens_at_their_ids(harmony):
    named = {
        "<|startoftext|>": 199998,
        "<|endoftext|>": 199999,
        "<|return|>": 200002,
        "<|constrain|>": 200003,
        "<|channel|>": 200005,
        "<|start|>": 200006,
        "<|end|>": 200007,
        "<|message|>": 200008,
        "<|call|>": 200012,
    }
    for text, token in named.items():
        assert tokenizer.encode(text, allow_special=True) == [token]
        assert harmony.encode(text, allowed_special="all") == [token]
    # every id past the base vocabulary decodes as openai-harmony decodes it
    for token in range(tokenizer.NUM_BASE_TOKENS, tokenizer.VOCAB_SIZE):
        assert tokenizer.decode([token]) == harmony.decode([token]), token
    assert set(harmony.stop_tokens_for_assistant_actions()) == {tokenizer.RETURN, tokenizer.CALL}


def test_special_text_is_plain_text_by_default():
    ids = tokenizer.encode("<|start|>")
    assert tokenizer.START not in ids and len(ids) > 1


def test_decode_rejects_out_of_range_ids():
    with pytest.raises(TokenizerError, match="201088 at index 1"):
        tokenizer.decode([5, 201088])


def test_corrupt_vocabulary_is_refused(monkeypatch):
    monkeypatch.setattr(tokenizer, "VOCAB_SHA256", "0" * 64)
    tokenizer._load_encoding.cache_clear()
    try:
        with pytest.raises(TokenizerError, match=r"sha256 446a9538.*the file is corrupt"):
            tokenizer.get_encoding()
    finally:
        monkeypatch.undo()
        tokenizer._load_encoding.cache_clear()
    assert tokenizer.encode("ok") == tokenizer.get_encoding().encode("ok")


def test_threads_asking_at_once_load_the_vocabulary_once(monkeypatch):
    """A coordinator's first requests arrive together on its threads: one load, not one
    each (they once cost a core for a minute and gigabytes)."""
    from concurrent.futures import ThreadPoolExecutor

    loads = []
    real = tokenizer._load_ranks
    monkeypatch.setattr(tokenizer, "_load_ranks", lambda: loads.append(1) or real())
    tokenizer._load_encoding.cache_clear()
    try:
        with ThreadPoolExecutor(8) as pool:
            encodings = list(pool.map(lambda _: tokenizer.get_encoding(), range(8)))
    finally:
        monkeypatch.undo()
    assert len(loads) == 1 and all(e is encodings[0] for e in encodings)

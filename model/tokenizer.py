"""o200k_harmony: the o200k_base vocabulary shipped with the package plus the harmony
special tokens, built through tiktoken without any network access."""

from __future__ import annotations

import base64
import hashlib
import threading
from functools import cache
from importlib import resources

import tiktoken

VOCAB_FILE = "o200k_base.tiktoken"
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
NUM_BASE_TOKENS = 199998

# The split pattern of o200k_base (shared by o200k_harmony).
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

START_OF_TEXT = 199998
END_OF_TEXT = 199999
RETURN = 200002
CONSTRAIN = 200003
CHANNEL = 200005
START = 200006
END = 200007
MESSAGE = 200008
CALL = 200012
END_OF_PROMPT = 200018
VOCAB_SIZE = 201088  # ids 0..201087, the model's embedding rows

_NAMED = {
    "<|startoftext|>": START_OF_TEXT,
    "<|endoftext|>": END_OF_TEXT,
    "<|return|>": RETURN,
    "<|constrain|>": CONSTRAIN,
    "<|channel|>": CHANNEL,
    "<|start|>": START,
    "<|end|>": END,
    "<|message|>": MESSAGE,
    "<|call|>": CALL,
}


class TokenizerError(ValueError):
    """The shipped vocabulary is missing or corrupt, or a token id is out of range."""


def special_tokens() -> dict[str, int]:
    """Every special token of o200k_harmony, name -> id: the named ones and
    `<|reserved_N|>` for every other id from 199998 to 201087. As in openai-harmony, id
    200018 (end of prompt in o200k_base) is named `<|reserved_200018|>`: one name per id,
    so that decoding is unambiguous."""
    named_ids = set(_NAMED.values())
    reserved = {
        f"<|reserved_{i}|>": i for i in range(NUM_BASE_TOKENS, VOCAB_SIZE) if i not in named_ids
    }
    return _NAMED | reserved


def _load_ranks() -> dict[bytes, int]:
    ref = resources.files("gptoss_ray.model").joinpath("data", VOCAB_FILE)
    try:
        data = ref.read_bytes()
    except FileNotFoundError as exc:
        raise TokenizerError(f"the package's vocabulary file {VOCAB_FILE} is missing") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != VOCAB_SHA256:
        raise TokenizerError(
            f"{VOCAB_FILE} has sha256 {digest}, expected {VOCAB_SHA256}: the file is corrupt"
        )
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != NUM_BASE_TOKENS:
        raise TokenizerError(f"{VOCAB_FILE} holds {len(ranks)} tokens, expected {NUM_BASE_TOKENS}")
    return ranks


_LOADING = threading.Lock()


def get_encoding() -> tiktoken.Encoding:
    """The o200k_harmony encoding, loaded once per process: threads that ask for it at
    once (a coordinator's first requests arrive together) wait for the one load instead
    of each building its own (hundreds of them cost a core for a minute and gigabytes)."""
    with _LOADING:
        return _load_encoding()


@cache
def _load_encoding() -> tiktoken.Encoding:
    return tiktoken.Encoding(
        name="o200k_harmony",
        pat_str=O200K_PATTERN,
        mergeable_ranks=_load_ranks(),
        special_tokens=special_tokens(),
    )


def encode(text: str, *, allow_special: bool = False) -> list[int]:
    """Text -> ids. Text that spells a special token (`<|start|>`) is encoded as ordinary
    text unless allow_special, so user content cannot inject control tokens."""
    enc = get_encoding()
    if allow_special:
        return enc.encode(text, allowed_special="all")
    return enc.encode(text, disallowed_special=())


def decode(ids: list[int]) -> str:
    for i, t in enumerate(ids):
        if not 0 <= t < VOCAB_SIZE:
            raise TokenizerError(f"token id {t} at index {i} is outside 0..{VOCAB_SIZE - 1}")
    return get_encoding().decode(ids)


def token_bytes(token: int) -> bytes:
    """One token's bytes (a piece of a UTF-8 character, for some)."""
    if not 0 <= token < VOCAB_SIZE:
        raise TokenizerError(f"token id {token} is outside 0..{VOCAB_SIZE - 1}")
    return get_encoding().decode_single_token_bytes(token)

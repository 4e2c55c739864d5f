"""vLLM's /tokenize, /detokenize and /tokenizer_info (evaluation harnesses count tokens
with them)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gptoss_ray.cluster.client.chat import chat_prompt
from gptoss_ray.cluster.front.state import (
    ApiError,
    FrontState,
    read_json,
)
from gptoss_ray.model import tokenizer as tok
from gptoss_ray.model.types import RequestError


# -- vLLM's tokenizer endpoints (evaluation harnesses count tokens with them) -------------
async def tokenize(front: FrontState, request: Request) -> Response:
    """{"prompt": text} or {"messages": chat} (rendered for completion) -> ids."""
    body = await read_json(front, request)
    if not isinstance(body, dict) or not isinstance(
        body.get("prompt", body.get("messages")), str | list
    ):
        raise ApiError(
            400, "give a prompt (a string) or messages (a chat)", "invalid_request", "prompt"
        )
    context = (await front.info())["max_context_length"]
    try:
        if "messages" in body:
            tokens = chat_prompt(body, context)[0]
        elif isinstance(body["prompt"], str):
            tokens = tok.encode(body["prompt"], allow_special=True)  # as /v1/completions
        else:
            raise ApiError(400, "prompt: a string", "invalid_request", "prompt")
    except RequestError as exc:
        raise ApiError.of(exc) from None
    return JSONResponse({"count": len(tokens), "max_model_len": context, "tokens": tokens})


async def detokenize(front: FrontState, request: Request) -> Response:
    body = await read_json(front, request)
    tokens = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise ApiError(400, "tokens: a list of token ids", "invalid_request", "tokens")
    try:
        return JSONResponse({"prompt": tok.decode(tokens)})
    except tok.TokenizerError as exc:
        raise ApiError(400, str(exc), "invalid_request", "tokens") from None


async def tokenizer_info(front: FrontState, request: Request) -> Response:
    return JSONResponse(
        {
            "tokenizer_class": "tiktoken:o200k_harmony",
            "eos_token": "<|return|>",
            "bos_token": None,
            "pad_token": "<|endoftext|>",
            "model_max_length": (await front.info())["max_context_length"],
            "vocab_size": tok.VOCAB_SIZE,
        }
    )

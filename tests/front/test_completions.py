"""`/v1/completions` on the built-in model (one in-process shard, float32) through the
official `openai` client: raw prompts (text, ids, several), echo with prompt logprobs
(what evaluation harnesses score with) against transformers, stop strings, n, streaming
equal to the whole reply, and clear 400s."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import torch

from gptoss_ray.model import tokenizer as tok
from gptoss_ray.model.generate import generate
from gptoss_ray.model.types import SamplingParams
from tests.conftest import API_KEY
from tests.engine_cases import baseline_model, prompts, transformers_model

KEY = API_KEY


def text_of(ids: list[int]) -> str:
    return tok.decode([t for t in ids if t < tok.NUM_BASE_TOKENS])


def test_greedy_completions_of_several_id_prompts_equal_the_baseline(tiny_client):
    ps = [prompts()[0], prompts()[3]]
    r = tiny_client.completions.create(model="gpt-oss-tiny", prompt=ps, max_tokens=7, temperature=0)
    want = generate(baseline_model(), ps, SamplingParams(max_tokens=7, temperature=0))
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [text_of(w.token_ids) for w in want]
    assert r.usage.prompt_tokens == sum(map(len, ps))
    assert r.usage.completion_tokens == sum(len(w.token_ids) for w in want)
    assert r.object == "text_completion"


def test_echo_scores_the_prompt_as_transformers_does(tiny_client):
    """lm-evaluation-harness's loglikelihood request: echo, logprobs 1, max_tokens 0 or 1."""
    prompt = prompts()[2]  # 70 tokens: longer than the window
    for max_tokens in (0, 1):
        r = tiny_client.completions.create(
            model="gpt-oss-tiny",
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            echo=True,
            logprobs=3,
        )
        (choice,) = r.choices
        lps = choice.logprobs
        assert len(lps.token_logprobs) == len(prompt) + max_tokens
        assert lps.token_logprobs[0] is None and lps.top_logprobs[0] is None
        assert lps.tokens[: len(prompt)] == [
            tok.token_bytes(t).decode(errors="replace") for t in prompt
        ]
        assert choice.text.startswith(tok.decode(prompt))
        ids = torch.tensor(prompt)[None]
        with torch.no_grad():
            want = torch.log_softmax(transformers_model()(ids).logits[0].float(), dim=-1)
        expected = [float(want[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]
        assert lps.token_logprobs[1 : len(prompt)] == pytest.approx(expected, abs=1e-4)
        assert all(len(top) == 3 for top in lps.top_logprobs[1:])
        assert lps.text_offset[1] == len(lps.tokens[0])
        assert r.usage.completion_tokens == max_tokens


def test_a_text_prompt_with_stop_strings_n_and_a_stream_equal_to_the_reply(tiny_client):
    args = dict(model="gpt-oss-tiny", prompt="The capital of France is", max_tokens=12, seed=3)
    free = tiny_client.completions.create(**args, temperature=1.0)
    stop = free.choices[0].text[4:7]
    assert stop.strip()
    r = tiny_client.completions.create(**args, temperature=1.0, stop=[stop], n=2, logprobs=2)
    assert r.choices[0].text == free.choices[0].text[: free.choices[0].text.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    chunks = list(
        tiny_client.completions.create(
            **args, temperature=1.0, stop=[stop], n=2, logprobs=2, stream=True
        )
    )
    for choice in r.choices:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        assert mine[-1].finish_reason == choice.finish_reason
        streamed = [x for c in mine if c.logprobs for x in c.logprobs.token_logprobs]
        assert streamed == choice.logprobs.token_logprobs


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url + "/completions",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"prompt": "x", "suffix": "y"}, None, "suffix"),
        ({"prompt": 5}, "prompt", ""),
        ({"prompt": []}, None, "empty"),
        ({"prompt": [[1, 2], [3, 300000]]}, None, "prompt 1"),
        ({"prompt": "x", "logprobs": 21}, "logprobs", ""),
        ({"prompt": "x", "n": 17}, "n", ""),
        ({"prompt": "x", "echo": True, "logprobs": 1, "stream": True}, "echo", "not streamed"),
        ({"prompt": "x", "model": "other"}, "model", ""),
    ],
)
def test_bad_completions_are_400s_that_say_what(tiny_url, body, param, says):
    status, out = post(tiny_url, {"model": "gpt-oss-tiny", **body})
    assert status in (400, 404), out
    assert says in out["error"]["message"]
    if param:
        assert out["error"]["param"] == param


def test_penalties_bias_and_vllm_extensions_through_the_client(tiny_client):
    """Every sampling field from the official client (vLLM's extensions in extra_body)
    draws what the single-process baseline draws with the same parameters."""
    prompt = prompts()[5]
    fields = dict(
        temperature=0.9,
        top_p=0.95,
        seed=12,
        presence_penalty=0.6,
        frequency_penalty=0.4,
        logit_bias={"1000": 3.0, "2000": -100},
    )
    extra = dict(repetition_penalty=1.2, min_p=0.02, top_k=50, min_tokens=6, ignore_eos=True)
    r = tiny_client.completions.create(
        model="gpt-oss-tiny", prompt=prompt, max_tokens=10, extra_body=extra, **fields
    )
    params = SamplingParams(
        max_tokens=10,
        **{**fields, "logit_bias": {1000: 3.0, 2000: -100}},
        **extra,
    )
    (want,) = generate(baseline_model(), [prompt], params)
    assert r.choices[0].text == text_of(want.token_ids)
    assert r.usage.completion_tokens == 10  # no stop token ends it (ignore_eos)
    forced = tiny_client.completions.create(
        model="gpt-oss-tiny", prompt=prompt, max_tokens=4, temperature=0, logit_bias={"1000": 100}
    )
    assert forced.choices[0].text == tok.decode([1000] * 4)


def test_vllm_tokenizer_endpoints(tiny_url):
    """What lm-evaluation-harness's remote tokenizer reads (`/tokenizer_info`,
    `/tokenize`, `/detokenize`): the same ids /v1/completions computes for the text."""
    root = tiny_url.removesuffix("/v1")

    def call(path: str, body: dict | None = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            root + path, data=data, headers={"Authorization": f"Bearer {KEY}"}
        )
        try:
            with urllib.request.urlopen(request) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    status, info = call("/tokenizer_info")
    assert status == 200 and info["eos_token"] == "<|return|>"
    text = "Q: What is 2 plus 3?\nA:<|end|>"
    status, out = call("/tokenize", {"prompt": text, "add_special_tokens": False})
    assert out["tokens"] == tok.encode(text, allow_special=True) and out["count"] == len(
        out["tokens"]
    )
    assert call("/detokenize", {"tokens": out["tokens"]})[1]["prompt"] == text
    status, chat = call("/tokenize", {"messages": [{"role": "user", "content": "Hi"}]})
    assert status == 200 and chat["tokens"][-2:] == tok.encode(
        "<|start|>assistant", allow_special=True
    )
    assert call("/detokenize", {"tokens": [300000]})[0] == 400
    assert call("/tokenize", {"prompt": 5})[0] == 400

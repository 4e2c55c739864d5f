"""LoRA adapters served by the engine (`EngineConfig.loras`, `SamplingParams.lora`): on
the built-in model with adapters PEFT made on transformers' GptOssForCausalLM, greedy
replies equal transformers + peft's; a batch of three adapters and the base model with
two slots gives each request the tokens it gets alone; the prefix cache never serves one
adapter's blocks to another; an unknown adapter is refused by name; attention-only
adapters on 2 shards give the 1-shard replies."""

from __future__ import annotations

import pytest
import torch

from gptoss_ray.cluster.engine.core import EngineCore
from gptoss_ray.model.types import KVLayout, ModelNotFound, RequestError, SamplingParams
from tests.engine_cases import prompts, tiny_shard, transformers_model

pytest.importorskip("peft")

LAYOUT = KVLayout(16, 128, 128)
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Three PEFT adapters on the built-in model: attention only (rank 4), attention and
    experts (rank 8), attention only (rank 2); -> name -> folder."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("loras")
    out = {}
    for name, r, experts, seed in (("a", 4, None, 1), ("b", 8, EXPERTS, 2), ("c", 2, None, 3)):
        torch.manual_seed(seed)
        config = LoraConfig(
            r=r,
            lora_alpha=r,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            target_parameters=experts,
            init_lora_weights=False,
        )
        model = get_peft_model(transformers_model(), config)
        with torch.no_grad():
            for p_name, p in model.named_parameters():
                if "lora_" in p_name:
                    p.mul_(0.3)
        model.save_pretrained(root / name)
        model.unload()
        out[name] = str(root / name)
    return out


def core(
    loras: dict[str, str], max_loras: int = 2, max_lora_rank: int = 16, **options
) -> EngineCore:
    shard = tiny_shard(LAYOUT, max_loras=max_loras, max_lora_rank=max_lora_rank)
    c = EngineCore(
        shard.config,
        1,
        LAYOUT,
        lambda plans: [shard.step(plans[0])],
        loras=loras,
        max_loras=max_loras,
        max_lora_rank=max_lora_rank,
        **options,
    )
    c.shard = shard  # (the tests look at its slots)
    return c


def replies(c: EngineCore, asks: list[tuple[list[int], str | None]]) -> list[list[int]]:
    ids = [c.submit(p, GREEDY.model_copy(update={"lora": lora})) for p, lora in asks]
    c.run_until_done()
    return [c.output(i).token_ids for i in ids]


def test_greedy_replies_equal_transformers_with_peft(adapters):
    """Each adapter's greedy reply (experts too for "b") is transformers + peft's."""
    from peft import PeftModel

    prompt = prompts()[1]
    got = replies(core(adapters), [(prompt, "a"), (prompt, "b"), (prompt, None)])
    assert got[0] != got[2] and got[1] != got[2]  # the adapters change the reply
    for name, tokens in zip(("a", "b"), got[:2], strict=True):
        model = PeftModel.from_pretrained(transformers_model(), adapters[name])
        with torch.no_grad():
            want = model.generate(
                torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8
            )[0, len(prompt) :].tolist()
        model.unload()
        assert tokens == want, name


def test_a_batch_of_adapters_gives_each_request_what_it_gets_alone(adapters):
    """Three adapters and the base model, two slots: the scheduler keeps each step to two
    adapters (the third waits, then takes the least recently used slot), and every reply
    is the one its request gets alone."""
    ps = prompts()
    asks = [(ps[0], "a"), (ps[1], "b"), (ps[2], None), (ps[3], "c"), (ps[4], "a"), (ps[5], "c")]
    c = core(adapters)
    together = replies(c, asks)
    assert sorted(k[0] for k in c.shard.loras.host) == ["a", "b", "c"]  # all ran, in 2 slots
    assert len(c.shard.loras.slots.names) == 2
    for ask, got in zip(asks, together, strict=True):
        assert got == replies(core(adapters), [ask])[0], ask[1]


def test_the_prefix_cache_keeps_adapters_apart(adapters):
    prompt = prompts()[4]  # 100 tokens: six whole blocks
    c = core(adapters)
    hits = []
    for lora in ("a", None, "b", "a"):
        replies(c, [(prompt, lora)])
        hits.append(c.snapshot()["prefix_cache"][0]["hit_tokens"])
    # only the second "a" finds cached blocks: its own from the first
    assert hits[:3] == [0, 0, 0] and hits[3] >= 96


def test_an_unknown_adapter_is_refused_by_name(adapters):
    c = core(adapters)
    with pytest.raises(ModelNotFound, match=r"no LoRA adapter 'z' is served \(served: a, b, c\)"):
        c.submit(prompts()[0], GREEDY.model_copy(update={"lora": "z"}))


@pytest.mark.parametrize("world", [2, 3])
def test_adapters_on_several_shards_give_the_one_shard_replies(adapters, world):
    """Expert LoRA too ("b"): each row carries its adapter's slot through the exchange to
    the shards that own its experts, which hold every slot's adapter (the plan's table);
    two slots for three adapters."""
    from gptoss_ray.model.model_folder import read_config, resolve_model
    from gptoss_ray.shards.local_group import LocalShardGroup

    ps = prompts()
    asks = [(ps[0], "a"), (ps[1], None), (ps[2], "b"), (ps[3], "c"), (ps[5], "b")]
    alone = replies(core(adapters), asks)
    config = read_config(resolve_model("gpt-oss-tiny"))
    with LocalShardGroup(
        "gpt-oss-tiny", world, dtype=torch.float32, kv_layout=LAYOUT, max_loras=2
    ) as group:
        several = EngineCore(
            config, world, LAYOUT, launch_step=group.launch, loras=adapters, max_loras=2
        )
        assert replies(several, asks) == alone


def test_the_api_serves_each_adapter_as_a_model(adapters):
    """Over HTTP, read with OpenAI's client: /v1/models lists the adapters beside the base
    model; a chat request naming one runs with it (its reply differs from the base
    model's, and equals the engine's own reply for that adapter); an unknown model is a
    404 that names what is served."""
    import openai

    from gptoss_ray.cluster.client.chat import chat_prompt, chat_reply
    from gptoss_ray.cluster.engine.loop import EngineLoop
    from tests.support import served

    c = core(adapters)
    engine = EngineLoop("/models/gpt-oss-tiny", c.config, LAYOUT, c)
    body = {"messages": [{"role": "user", "content": "Say something."}], "max_tokens": 12}
    try:
        with served(engine, "k") as url:
            client = openai.OpenAI(base_url=url, api_key="k")
            listed = client.models.list().data
            assert [m.id for m in listed] == ["gpt-oss-tiny", "a", "b", "c"]
            base = client.chat.completions.create(model="gpt-oss-tiny", temperature=0, **body)
            tuned = client.chat.completions.create(model="b", temperature=0, **body)
            chunks = list(client.chat.completions.create(model="b", stream=True, **body))
            text = client.completions.create(model="b", prompt="Hi", max_tokens=2)
            answer = client.responses.create(model="b", input="Hi", max_output_tokens=4)
            assert {c.model for c in chunks} == {text.model} == {answer.model} == {"b"}
            with pytest.raises(openai.NotFoundError, match="serves 'gpt-oss-tiny', 'a', 'b'"):
                client.chat.completions.create(model="z", **body)
    finally:
        engine.shutdown()
    prompt, params, stops = chat_prompt({**body, "temperature": 0}, 131072)
    alone = core(adapters)
    rid = alone.submit(prompt, params.model_copy(update={"lora": "b"}))
    alone.run_until_done()
    out = alone.output(rid)
    want = chat_reply(out.token_ids, out.finish_reason, stop=stops, prompt_tokens=len(prompt))
    got = tuned.choices[0].message.model_dump()
    assert {k: got.get(k) for k in want["message"]} == want["message"]
    assert tuned.choices[0].message != base.choices[0].message
    assert (tuned.model, base.model) == ("b", "gpt-oss-tiny")  # each names what it ran


def test_adapters_through_ray(adapters, ray_session, tmp_path):
    """`Engine.start(loras=...)` on 2 shards: each request's adapter by its params, the
    replies of one in-process shard; `info()` names the adapters; a batch file's records
    name the model each line ran."""
    from gptoss_ray.cluster.batch.client import Client
    from gptoss_ray.cluster.client.engine import Engine

    ps = prompts()
    asks = [(ps[0], "b"), (ps[1], None), (ps[2], "a")]
    alone = replies(core(adapters), asks)
    engine = Engine.start(
        "gpt-oss-tiny", shards=2, dtype="float32", loras=adapters, max_loras=2, name="lora-ray"
    )
    try:
        assert engine.info()["loras"] == ["a", "b", "c"]
        outs = [
            engine.generate([p], GREEDY.model_copy(update={"lora": lora}))[0] for p, lora in asks
        ]
        assert [list(o.token_ids) for o in outs] == alone
        chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        line = {"method": "POST", "url": "/v1/chat/completions"}
        lines = [
            line | {"custom_id": m, "body": chat | {"model": m}} for m in ("b", "gpt-oss-tiny")
        ]
        job = Client(address=None, name="lora-ray").submit(lines, tmp_path / "out.jsonl")
        assert job.wait(timeout=120)["status"] == "completed"
        named = {r["custom_id"]: r["response"]["body"]["model"] for r in job.results()}
        assert named == {"b": "b", "gpt-oss-tiny": "gpt-oss-tiny"}
    finally:
        engine.shutdown()


def test_adapters_load_and_unload_while_serving(adapters, tmp_path):
    """Over HTTP: an engine started with LoRA slots and no adapter loads one (then
    /v1/models lists it and requests name it), refuses a rank above max_lora_rank and a
    name taken, refuses to unload an adapter a running request uses (409), and unloads it
    once idle (then it is a 404 again). A reload under the same name reads the new
    folder."""
    import threading

    from gptoss_ray.cluster.engine.loop import EngineLoop
    from tests.support import served

    fixed = core(adapters)  # adapters given at the start only: no loading while serving
    with pytest.raises(RequestError, match="start it with --enable-lora"):
        fixed.add_lora("d", adapters["a"])
    c = core({}, max_loras=2, max_lora_rank=4, lora_updates=True)
    engine = EngineLoop("/models/gpt-oss-tiny", c.config, LAYOUT, c)
    chat = {"messages": [{"role": "user", "content": "Hi."}], "max_tokens": 24, "temperature": 0}
    try:
        with served(engine, "k") as url:
            http = Http(url)
            assert http.post("/chat/completions", json={**chat, "model": "a"}).status == 404
            load = {"lora_name": "a", "lora_path": adapters["a"]}
            r = http.post("/load_lora_adapter", json=load)
            assert r.status == 200, r.text
            assert [m["id"] for m in http.get("/models").json()["data"]] == ["gpt-oss-tiny", "a"]
            r = http.post("/load_lora_adapter", json=load)
            assert r.status == 400 and "loaded already" in r.json()["error"]["message"]
            r = http.post("/load_lora_adapter", json={"lora_name": "b", "lora_path": adapters["b"]})
            assert r.status == 400 and "rank 8 exceeds max_lora_rank 4" in r.text
            tuned = http.post("/chat/completions", json={**chat, "model": "a"}).json()
            base = http.post("/chat/completions", json=chat).json()
            assert tuned["choices"][0]["message"] != base["choices"][0]["message"]
            # a long request with the adapter: unloading it waits for nothing, it is refused
            long = {**chat, "model": "a", "max_tokens": 120, "min_tokens": 120}
            reply = {}
            worker = threading.Thread(
                target=lambda: reply.update(r=http.post("/chat/completions", json=long))
            )
            worker.start()
            while not c.scheduler.live:
                pass
            r = http.post("/unload_lora_adapter", json={"lora_name": "a"})
            assert r.status == 409 and "in use by 1 sequence" in r.text
            worker.join()
            assert reply["r"].status == 200
            assert http.post("/unload_lora_adapter", json={"lora_name": "a"}).status == 200
            assert http.post("/chat/completions", json={**chat, "model": "a"}).status == 404
            assert c.scheduler.lora_slots.count("a") == 0
            # a reload under the name reads the folder it names now ("c", rank 2)
            load = {"lora_name": "a", "lora_path": adapters["c"]}
            assert http.post("/load_lora_adapter", json=load).status == 200
            again = http.post("/chat/completions", json={**chat, "model": "a"}).json()
    finally:
        engine.shutdown()
    from gptoss_ray.cluster.client.chat import chat_prompt, chat_reply

    alone = core({"c": adapters["c"]})
    prompt, params, stops = chat_prompt(chat, 131072)
    rid = alone.submit(prompt, params.model_copy(update={"lora": "c"}))
    alone.run_until_done()
    out = alone.output(rid)
    want = chat_reply(out.token_ids, out.finish_reason, stop=stops, prompt_tokens=len(prompt))
    got = again["choices"][0]["message"]
    assert {k: got.get(k) for k in want["message"]} == want["message"]
    assert got != tuned["choices"][0]["message"]


class Http:
    """POST and GET JSON on the API with its key (urllib: no client library needed)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def post(self, path: str, json: dict) -> _Reply:
        return self._send(path, __import__("json").dumps(json).encode())

    def get(self, path: str) -> _Reply:
        return self._send(path, None)

    def _send(self, path: str, data: bytes | None) -> _Reply:
        import urllib.error
        import urllib.request

        headers = {"Authorization": "Bearer k", "Content-Type": "application/json"}
        req = urllib.request.Request(self.url + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(req) as r:
                return _Reply(r.status, r.read().decode())
        except urllib.error.HTTPError as err:
            return _Reply(err.code, err.read().decode())


class _Reply:
    def __init__(self, status: int, text: str) -> None:
        self.status, self.text = status, text

    def json(self) -> dict:
        import json

        return json.loads(self.text)

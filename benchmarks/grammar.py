"""`gptoss-ray bench grammar`: what grammar-constrained decoding costs a decode step, in
one run: the same batch of chat requests free (frame off), under the harmony frame
(`--harmony-frame strict`, free text inside it) and under a JSON schema, at each batch
size, on one in-process shard of the model.

Per decode step (medians over `--steps` steps, every sequence decoding): the step's wall
time, the shard's own phases, the time the shard waited for the masks after its forward
("grammar wait": what building them added to the critical path), the time building them
took in their thread (off the path), and the sampling phase (where the masks are applied).
A JSON reply's string is long (minLength), so no sequence ends inside the measured steps."""

from __future__ import annotations

import argparse
import time
from typing import Any

from gptoss_ray.benchmarks.common import describe, fmt, median, progress, save

MODES = ("free", "frame", "json")
SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string", "minLength": 4000}},
    "required": ["text"],
}


def request(mode: str, seed: int, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": f"Write about the number {seed}."}],
        "temperature": 1.0,
        "seed": seed,
        "max_tokens": max_tokens,
        "max_reasoning_tokens": 0,  # every measured step inside the answer
    }
    if mode == "json":
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "essay", "schema": SCHEMA},
        }
    return body


def measure(args: argparse.Namespace, mode: str, batch: int) -> dict[str, Any]:
    import torch

    from gptoss_ray.cluster.client.chat import chat_prompt
    from gptoss_ray.cluster.engine.core import EngineCore
    from gptoss_ray.model.types import KVLayout
    from gptoss_ray.router.transport import LocalTransport
    from gptoss_ray.shards.shard import Shard

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    layout = KVLayout(16, 64 * batch + 64, 256)
    shard = Shard(
        args.model, rank=0, world_size=1, transport=LocalTransport(), dtype=dtype, kv_layout=layout
    )
    phases: list[dict[str, float]] = []

    def run_step(plans):
        result = shard.step(plans[0])
        phases.append(dict(result.seconds))
        return [result]

    core = EngineCore(shard.config, 1, layout, run_step, overlap=False, max_seqs=max(64, batch))
    ids = []
    for i in range(batch):
        prompt, params, _ = chat_prompt(
            request(mode, i, args.steps + 64), 131072, frame=mode != "free"
        )
        ids.append(core.submit(prompt, params))
    while any(not core.output(i).token_ids for i in ids):  # prefill, first draws
        core.step()
    for _ in range(3):  # warm: matchers started, allocations settled
        core.step()
    walls, builds = [], []
    phases.clear()
    for _ in range(args.steps):
        before = shard.mask_seconds
        t0 = time.perf_counter()
        core.step()
        walls.append(time.perf_counter() - t0)
        builds.append(shard.mask_seconds - before)
    alive = sum(not core.output(i).finished for i in ids)
    if alive != batch:
        raise RuntimeError(f"{mode} batch {batch}: {batch - alive} sequences ended early")
    ms = {p: 1e3 * median([s.get(p, 0.0) for s in phases]) for p in phases[0]}
    return {
        "step_ms": 1e3 * median(walls),
        "phases_ms": ms,
        "mask_build_ms": 1e3 * median(builds),
        "grammar_wait_ms": ms.get("grammar wait", 0.0),
        "sampling_ms": ms.get("sampling", 0.0),
        "tokens_per_s": batch / median(walls),
    }


def run(args: argparse.Namespace, data: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    data["settings"] = {
        "model": args.model,
        "dtype": args.dtype,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
    }
    data["results"] = {}
    for batch in args.batches:
        for mode in MODES:
            progress(f"batch {batch}, {mode}")
            data["results"][f"{mode}@{batch}"] = {"mode": mode, "batch": batch} | measure(
                args, mode, batch
            )
    print(describe(data["machine"]))
    print(
        f"{args.model} {args.dtype}, one in-process shard, {torch.get_num_threads()} threads; "
        f"medians of {args.steps} decode steps"
    )
    print(
        f"{'batch':>5} {'mode':>6} {'step ms':>8} {'vs free':>8} {'build ms':>9} "
        f"{'wait ms':>8} {'wait %':>7} {'sampling ms':>12} {'tok/s':>7}"
    )
    for batch in args.batches:
        free = data["results"][f"free@{batch}"]["step_ms"]
        for mode in MODES:
            r = data["results"][f"{mode}@{batch}"]
            r["vs_free"] = r["step_ms"] / free
            r["wait_share"] = r["grammar_wait_ms"] / r["step_ms"]
            print(
                f"{batch:>5} {mode:>6} {fmt(r['step_ms'], '.2f'):>8} {r['vs_free']:>8.3f} "
                f"{fmt(r['mask_build_ms'], '.3f'):>9} {fmt(r['grammar_wait_ms'], '.3f'):>8} "
                f"{100 * r['wait_share']:>6.2f}% {fmt(r['sampling_ms'], '.2f'):>12} "
                f"{fmt(r['tokens_per_s'], '.0f'):>7}"
            )
    save("grammar", data, args.out, plot)


def plot(data: dict[str, Any], plt: Any) -> None:
    results = data["results"]
    batches = sorted({r["batch"] for r in results.values()})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.25
    for k, mode in enumerate(MODES):
        xs = [i + (k - 1) * width for i in range(len(batches))]
        steps = [results[f"{mode}@{b}"]["step_ms"] for b in batches]
        waits = [results[f"{mode}@{b}"]["grammar_wait_ms"] for b in batches]
        ax.bar(xs, steps, width, label=f"{mode}: step")
        ax.bar(xs, waits, width, color="black", alpha=0.6, label=None if k else "grammar wait")
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel("decode step, ms (median)")
    ax.set_title("Grammar masks: step time free vs constrained")
    ax.legend()
    fig.tight_layout()


# -- grammar engines side by side --------------------------------------------------------
def random_schema(rng: Any, depth: int = 0) -> dict[str, Any]:
    """A generated JSON Schema: nested objects, arrays with min/max items, enums, integer
    and number bounds, required and optional properties, anyOf, nullable values, string
    patterns (the tests' schemas, and the engines' common ground)."""
    kinds = ["string", "pattern", "integer", "number", "enum", "boolean", "nullable"]
    if depth < 2:
        kinds += ["object", "array", "anyOf"]
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 12)}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice([r"^[a-z]{2,5}$", r"^\d{3}-\d{2}$"])}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 100)}
    if kind == "number":
        return {"type": "number", "minimum": -1.5, "maximum": rng.choice([2.5, 1000])}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 7, None, True], rng.randint(1, 4))}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "nullable":
        return {"type": ["integer", "null"], "minimum": 0, "maximum": 9}
    if kind == "array":
        low = rng.randint(0, 2)
        item = random_schema(rng, depth + 1)
        return {
            "type": "array",
            "items": item,
            "minItems": low,
            "maxItems": low + rng.randint(0, 2),
        }
    if kind == "anyOf":
        return {"anyOf": [random_schema(rng, depth + 1), random_schema(rng, depth + 1)]}
    names = rng.sample(["id", "name", "size", "tags", "when", "ok", "note"], rng.randint(1, 4))
    return {
        "type": "object",
        "properties": {n: random_schema(rng, depth + 1) for n in names},
        "required": [n for n in names if rng.random() < 0.6],
        "additionalProperties": False,
    }


# JSON Schema features beyond the generated ones: a schema, a compact instance that is
# valid and one that is not (an engine that compiles the schema but takes the invalid one
# ignores the feature without saying so)
FEATURES: dict[str, tuple[dict[str, Any], str, str]] = {
    "$ref/$defs": (
        {
            "$defs": {"p": {"type": "integer"}},
            "type": "object",
            "properties": {"a": {"$ref": "#/$defs/p"}},
            "required": ["a"],
        },
        '{"a":1}',
        '{"a":"x"}',
    ),
    "recursive $ref": (
        {
            "$defs": {
                "n": {
                    "type": "object",
                    "properties": {"k": {"type": "array", "items": {"$ref": "#/$defs/n"}}},
                    "additionalProperties": False,
                }
            },
            "$ref": "#/$defs/n",
        },
        '{"k":[{"k":[]}]}',
        '{"k":[{"j":1}]}',
    ),
    "oneOf": ({"oneOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}]}, "7", '"abcd"'),
    "allOf": (
        {
            "allOf": [
                {"type": "object", "properties": {"a": {"type": "integer"}}},
                {"required": ["a"]},
            ]
        },
        '{"a":1}',
        "{}",
    ),
    "const": ({"const": "x1"}, '"x1"', '"x2"'),
    "format date-time": (
        {"type": "string", "format": "date-time"},
        '"2026-12-01T10:00:00Z"',
        '"tomorrow"',
    ),
    "format email": ({"type": "string", "format": "email"}, '"a@b.io"', '"a.b.io"'),
    "format uuid": (
        {"type": "string", "format": "uuid"},
        '"123e4567-e89b-12d3-a456-426614174000"',
        '"123"',
    ),
    "additionalProperties schema": (
        {"type": "object", "additionalProperties": {"type": "integer"}},
        '{"q":1}',
        '{"q":"x"}',
    ),
    "patternProperties": (
        {
            "type": "object",
            "patternProperties": {"^x_": {"type": "integer"}},
            "additionalProperties": False,
        },
        '{"x_a":1}',
        '{"y":1}',
    ),
    "prefixItems": (
        {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}]},
        '[1,"a"]',
        '["a",1]',
    ),
    "minLength/maxLength": ({"type": "string", "minLength": 2, "maxLength": 5}, '"abc"', '"a"'),
    "exclusiveMinimum": ({"type": "integer", "exclusiveMinimum": 0}, "1", "0"),
    "multipleOf": ({"type": "integer", "multipleOf": 5}, "10", "7"),
    "uniqueItems": (
        {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
        "[1,2]",
        "[1,1]",
    ),
    "minProperties": ({"type": "object", "minProperties": 1}, '{"a":1}', "{}"),
    "if/then/else": (
        {"if": {"type": "integer"}, "then": {"minimum": 0}, "else": {"type": "string"}},
        "3",
        "-3",
    ),
    "not": ({"not": {"type": "string"}}, "1", '"a"'),
    "dependentRequired": (
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "dependentRequired": {"a": ["b"]},
        },
        '{"a":1,"b":2}',
        '{"a":1}',
    ),
}


class _Engine:
    """One grammar engine behind the same three calls: compile a schema (raising on what
    it refuses), start matchers, fill a batch's bitmasks [B, words] int32, advance."""

    name = ""

    def compile(self, schema: dict[str, Any]) -> Any: ...
    def matcher(self, compiled: Any) -> Any: ...
    def fill(self, matchers: list[Any], bitmask: Any) -> None: ...
    def advance(self, matcher: Any, token: int) -> None: ...
    def accepts(self, compiled: Any, tokens: list[int]) -> bool:
        """Whether a reply of exactly these tokens (then the end) is allowed."""


class _LLGuidance(_Engine):
    name = "llguidance"

    def __init__(self) -> None:
        import llguidance

        from gptoss_ray.model.grammar import harmony_tokenizer

        self.lib, self.tokenizer = llguidance, harmony_tokenizer()
        self.executor = llguidance.LLExecutor()

    def compile(self, schema):
        from gptoss_ray.model.grammar import check_schema

        return check_schema(schema, "schema")  # what the server enforces, or its 400

    def matcher(self, compiled):
        return self.lib.LLMatcher(self.tokenizer, compiled, log_level=0)

    def fill(self, matchers, bitmask):
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask_par(
            self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask
        )

    def advance(self, matcher, token):
        assert matcher.consume_token(token)

    def accepts(self, compiled, tokens):
        m = self.matcher(compiled)
        return all(m.consume_token(t) for t in tokens) and m.is_accepting()


def _vocabulary() -> list[bytes]:
    """Every id's bytes: regular tokens as tiktoken has them, specials by name."""
    from gptoss_ray.model import tokenizer as tok

    enc = tok.get_encoding()
    specials = {i: n.encode() for n, i in tok.special_tokens().items()}
    return [
        specials[i] if i in specials else enc.decode_single_token_bytes(i)
        for i in range(tok.VOCAB_SIZE)
    ]


class _XGrammar(_Engine):
    name = "xgrammar"

    def __init__(self) -> None:
        import xgrammar

        from gptoss_ray.model import tokenizer as tok

        self.lib = xgrammar
        info = xgrammar.TokenizerInfo(
            _vocabulary(), vocab_size=tok.VOCAB_SIZE, stop_token_ids=[tok.RETURN]
        )
        self.compiler = xgrammar.GrammarCompiler(info)

    def compile(self, schema):
        return self.compiler.compile_json_schema(
            schema, any_whitespace=False, separators=(",", ":")
        )

    def matcher(self, compiled):
        return self.lib.GrammarMatcher(compiled)

    def fill(self, matchers, bitmask):
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)

    def advance(self, matcher, token):
        assert matcher.accept_token(token)

    def accepts(self, compiled, tokens):
        from gptoss_ray.model import tokenizer as tok

        m = self.matcher(compiled)
        return all(m.accept_token(t) for t in tokens) and m.accept_token(tok.RETURN)


class _OutlinesCore(_Engine):
    name = "outlines-core"

    def __init__(self) -> None:
        import outlines_core

        from gptoss_ray.model import tokenizer as tok

        self.lib = outlines_core
        vocab: dict[bytes, list[int]] = {}
        for i, b in enumerate(_vocabulary()[: tok.START_OF_TEXT]):  # no special token
            vocab.setdefault(b, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(tok.RETURN, vocab)

    def compile(self, schema):
        import json

        regex = self.lib.json_schema.build_regex_from_schema(json.dumps(schema), "")
        return self.lib.Index(regex, self.vocabulary)

    def matcher(self, compiled):
        return self.lib.Guide(compiled)

    def fill(self, matchers, bitmask):
        row = bitmask.shape[1]
        for i, m in enumerate(matchers):
            m.write_mask_into(bitmask[i].data_ptr(), row, 4)

    def advance(self, matcher, token):
        matcher.advance(token)

    def accepts(self, compiled, tokens):
        from gptoss_ray.model import tokenizer as tok

        m = self.matcher(compiled)
        for t in tokens:
            if t not in m.get_tokens():
                return False
            m.advance(t)
        return tok.RETURN in m.get_tokens()


ENGINES = {"llguidance": _LLGuidance, "xgrammar": _XGrammar, "outlines-core": _OutlinesCore}


def _walk_cost(engine: _Engine, compiled: Any, batch: int, steps: int, seed: int) -> list[float]:
    """Seconds to fill a batch's masks, each step, while every matcher walks a random
    path of allowed tokens (a finished one starts over)."""
    import random

    import numpy
    import torch

    from gptoss_ray.model import tokenizer as tok

    rng = random.Random(seed)
    words = (tok.VOCAB_SIZE + 31) // 32
    matchers = [engine.matcher(compiled) for _ in range(batch)]
    seconds = []
    for _ in range(steps):
        bitmask = torch.full((batch, words), -1, dtype=torch.int32)
        t0 = time.perf_counter()
        engine.fill(matchers, bitmask)
        seconds.append(time.perf_counter() - t0)
        bits = numpy.unpackbits(bitmask.numpy().view(numpy.uint8), axis=1, bitorder="little")
        for i in range(batch):
            allowed = numpy.flatnonzero(bits[i, : tok.VOCAB_SIZE])
            allowed = allowed[allowed != tok.RETURN]
            if len(allowed) == 0:  # only the end is left: start over
                matchers[i] = engine.matcher(compiled)
                continue
            engine.advance(matchers[i], int(allowed[rng.randrange(len(allowed))]))
    return seconds


def _verdict(engine: _Engine, schema: dict[str, Any], valid: str, invalid: str) -> str:
    from gptoss_ray.model import tokenizer as tok

    try:
        compiled = engine.compile(schema)
    except Exception as exc:
        return f"refused: {str(exc).splitlines()[0][:100]}"
    if not engine.accepts(compiled, tok.encode(valid)):
        return f"wrong: refuses {valid}"
    if engine.accepts(compiled, tok.encode(invalid)):
        return f"IGNORED: takes {invalid}"
    return "enforced"


def run_engines(args: argparse.Namespace, data: dict[str, Any]) -> None:
    import importlib.metadata
    import random

    rng = random.Random(0)
    generated = [random_schema(rng) for _ in range(args.schemas)]
    data["settings"] = {"schemas": args.schemas, "batches": args.batches, "steps": args.steps}
    data["results"] = {}
    for name in args.engines:
        try:
            version = importlib.metadata.version(name.replace("-", "_"))
        except importlib.metadata.PackageNotFoundError:
            progress(f"{name} is not installed (pip install -e '.[compare]'): skipped")
            continue
        progress(f"{name} {version}: vocabulary")
        t0 = time.perf_counter()
        engine = ENGINES[name]()
        setup = time.perf_counter() - t0
        compiled, compile_s, refused = [], [], []
        for i, schema in enumerate(generated):
            t0 = time.perf_counter()
            try:
                compiled.append(engine.compile(schema))
                compile_s.append(time.perf_counter() - t0)
            except Exception as exc:
                refused.append(f"schema {i}: {str(exc)[:120]}")
        features = {}
        for feature, (schema, valid, invalid) in FEATURES.items():
            features[feature] = _verdict(engine, schema, valid, invalid)
        progress(f"{name}: masks")
        costs = {}
        for batch in args.batches:
            per_step = []
            for k, c in enumerate(compiled[: args.walks]):
                per_step += _walk_cost(engine, c, batch, args.steps, seed=k)
            costs[batch] = {
                "step_ms": 1e3 * median(per_step),
                "per_token_us": 1e6 * median(per_step) / batch,
            }
        data["results"][name] = {
            "version": version,
            "setup_s": setup,
            "compiled": len(compiled),
            "refused": refused,
            "compile_ms": 1e3 * median(compile_s),
            "features": features,
            "masks": costs,
        }
    print(describe(data["machine"]))
    print(
        f"{args.schemas} generated schemas (compact JSON), masks while {args.walks} of them walk "
        f"random allowed paths, {args.steps} steps each; o200k_harmony (201,088 tokens)"
    )
    head = " ".join(f"{'b=' + str(b) + ' ms (us/tok)':>20}" for b in args.batches)
    print(f"{'engine':<14} {'setup s':>8} {'compiled':>9} {'compile ms':>11} {head}")
    for name, r in data["results"].items():
        cells = " ".join(
            f"{r['masks'][b]['step_ms']:>10.3f} ({r['masks'][b]['per_token_us']:>6.0f})"
            for b in args.batches
        )
        print(
            f"{name:<14} {r['setup_s']:>8.1f} {r['compiled']:>5}/{args.schemas:<3} "
            f"{r['compile_ms']:>11.1f} {cells}"
        )
    print("features (beyond the generated schemas):")
    names = list(data["results"])
    print(f"{'':<28}" + "".join(f"{n:>16}" for n in names))
    for feature in FEATURES:
        marks = [data["results"][n]["features"][feature].split(":")[0] for n in names]
        print(f"{feature:<28}" + "".join(f"{m:>16}" for m in marks))
    print("enforced: takes the valid instance, refuses the invalid one; refused: a clear")
    print("error at compile time; IGNORED: compiles and takes the invalid one; wrong: refuses")
    print("the valid one")
    save("grammar-engines", data, args.out, None)

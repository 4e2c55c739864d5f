import json
import subprocess
import sys

import pytest

from gptoss_ray.cluster.cli.main import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gptoss_ray.cluster.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_checkpoint_tiny_then_generate_json(tmp_path, layout, capsys):
    out = tmp_path / layout
    assert main(["checkpoint", "tiny", str(out), "--layout", layout, "--seed", "5"]) == 0
    assert (out / "config.json").is_file()
    capsys.readouterr()
    args = [
        "generate",
        "--model",
        str(out),
        "--prompt-ids",
        "5,6,7",
        "--prompt-ids",
        "9",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "--dtype",
        "float32",
        "--json",
    ]
    assert main(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["index"] for r in lines] == [0, 1]
    assert all(len(r["token_ids"]) == 6 and r["finish_reason"] == "length" for r in lines)
    assert lines[0]["usage"] == {"prompt_tokens": 3, "completion_tokens": 6}
    # same model, other layout or process: same greedy tokens
    assert main(args) == 0
    assert [json.loads(x) for x in capsys.readouterr().out.splitlines()] == lines


def test_layouts_generate_the_same_tokens(tmp_path, capsys):
    for layout in ("hf", "original"):
        main(["checkpoint", "tiny", str(tmp_path / layout), "--layout", layout])
    capsys.readouterr()
    outs = []
    for layout in ("hf", "original"):
        main(["generate", "--model", str(tmp_path / layout), "--prompt-ids", "1,2,3", "--json"])
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0]


def test_errors_are_one_clear_line(tmp_path):
    r = run_cli("generate", "--model", str(tmp_path), "--prompt-ids", "1")
    assert r.returncode == 2 and "no config.json" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("generate", "--model", "gpt-oss-tiny", "--prompt-ids", "1,x")
    assert r.returncode == 2 and "comma-separated integers" in r.stderr
    r = run_cli("generate", "--model", "gpt-oss-tiny", "--prompt-ids", "1", "--top-p", "0")
    assert r.returncode == 2 and "top_p=0.0" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("checkpoint", "tiny", str(tmp_path / "big"), "--preset", "gpt-oss-20b")
    assert r.returncode == 2 and "real gpt-oss weights" in r.stderr
    # serve: a bad model or draft is said before any Ray instance starts
    r = run_cli("serve", "--speculative", "eagle3")
    assert r.returncode == 2 and "needs draft_model" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("serve", "--speculative", "eagle3", "--draft-model", str(tmp_path))
    assert r.returncode == 2 and "no config.json (an EAGLE-3 draft" in r.stderr
    r = run_cli("serve", "--model", str(tmp_path / "none"))
    assert r.returncode == 2 and "not a directory" in r.stderr and "Traceback" not in r.stderr


def test_generate_on_ray_shards_prints_the_same_json_as_one_process(tmp_path):
    base = [
        "generate",
        "--model",
        "gpt-oss-tiny",
        "--prompt-ids",
        "5,6,7",
        "--prompt-ids",
        "9,10",
        "--max-tokens",
        "5",
        "--temperature",
        "0",
        "--dtype",
        "float32",
        "--json",
    ]
    single = run_cli(*base)
    sharded = run_cli(*base, "--shards", "2")
    assert single.returncode == 0 and sharded.returncode == 0, sharded.stderr[-2000:]
    assert single.stdout == sharded.stdout and len(single.stdout.splitlines()) == 2


def test_generate_from_chat_messages(tmp_path):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"role": "user", "content": "Hi"}]))
    r = run_cli(
        "generate",
        "--model",
        "gpt-oss-tiny",
        "--messages",
        str(path),
        "--max-tokens",
        "4",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    (record,) = [json.loads(line) for line in r.stdout.splitlines()]
    assert record["usage"]["completion_tokens"] == 4 == len(record["token_ids"])
    assert record["message"]["role"] == "assistant"
    path.write_text('{"messages": [{"role": "bot", "content": "x"}]}')
    r = run_cli("generate", "--model", "gpt-oss-tiny", "--messages", str(path), "--json")
    assert "messages[0].role" in json.loads(r.stdout)["error"]


def test_demo_runs_on_two_ray_shards_and_says_the_weights_are_random():
    r = run_cli("demo", "--max-tokens", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "RANDOM weights" in r.stdout and "--model DIR" in r.stdout
    assert "4 conversations, 16 tokens" in r.stdout and "engine shut down" in r.stdout


def test_every_help_imports_no_torch():
    """`--help` of every command and subcommand answers without loading torch, Ray or
    pydantic (seconds each, for nothing)."""
    script = """
import argparse, contextlib, io, sys
from gptoss_ray.cluster.cli.main import _parser, main
from gptoss_ray.benchmarks.cli import build_parser

def paths(parser, prefix):
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from paths(sub, [*prefix, name])

commands = list(paths(_parser(), [])) + [["bench", *p] for p in paths(build_parser(), [])]
for command in commands:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main([*command, "--help"])
        except SystemExit:
            pass
    assert "usage: gptoss-ray" in out.getvalue(), command
    heavy = [m for m in ("torch", "ray", "pydantic") if m in sys.modules]
    assert not heavy, (command, heavy)
print(len(commands))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout) >= 25  # every command was asked


def test_the_types_that_cross_layers_load_without_torch():
    """The scheduler and the engine loop are policy and bookkeeping: they, and the types
    they share with the shards and the API, load without the model's math."""
    script = (
        "import sys\n"
        "import gptoss_ray.model.types, gptoss_ray.cluster.engine.scheduler, gptoss_ray.cluster.engine.core\n"
        "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"

"""The package as a user meets it: one import name, `gptoss_ray`, whatever their folder
holds (a `model.py`, a `model/` checkpoint folder, `configs/`, `cluster/`, `router/`), in
the CLI, the Python API and the Ray workers; every command that starts an engine works
beside a Ray instance already running on the machine."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from gptoss_ray.cluster.cli.main import main
from gptoss_ray.cluster.runtime import ray_instance
from tests.engine_cases import expected_reply

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = (
    "model",
    "model/harmony",
    "model/kernels",
    "router",
    "shards",
    "cluster",
    "cluster/engine",
    "cluster/runtime",
    "cluster/client",
    "cluster/batch",
    "cluster/front",
    "cluster/front/endpoints",
    "cluster/cli",
    "configs",
    "benchmarks",
)


def test_the_wheel_installs_one_package_and_its_metadata(tmp_path):
    # built from a copy: setuptools writes build/ and *.egg-info beside the sources
    src = tmp_path / "src"
    skip = (".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".whl", "out")
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*skip))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(src),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("gptoss_ray-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"gptoss_ray", f"{wheel.name.split('-py')[0]}.dist-info"}, top
    for sub in SUBPACKAGES:
        assert f"gptoss_ray/{sub}/__init__.py" in names, sub
    assert "gptoss_ray/model/data/o200k_base.tiktoken" in names
    assert "gptoss_ray/configs/models/gpt-oss-20b.json" in names
    assert not [n for n in names if n.startswith("gptoss_ray/tests")]
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert (
        "gptoss-ray = gptoss_ray.cluster.cli.main:main"
        in zipfile.ZipFile(wheel).read(entry).decode()
    )


def test_gpu_sh_lays_out_the_package_without_a_build(tmp_path):
    """The lent GPU has the dependencies but not the project: gpu.sh links the folders
    under `gptoss_ray` itself. A python3 that runs without site-packages stands in."""
    shim = tmp_path / "bin" / "python3"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    shim.chmod(0o755)
    script = (ROOT / "benchmarks" / "gpu.sh").read_text()
    block = script[script.index("# link:begin") : script.index("# link:end")]
    check = (
        "import gptoss_ray.model, gptoss_ray.benchmarks, gptoss_ray.shards; from importlib import resources;"
        "print(resources.files('gptoss_ray.configs').joinpath('models', 'gpt-oss-20b.json')"
        ".is_file())"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{shim.parent}:{env['PATH']}"
    done = subprocess.run(
        ["bash", "-c", f'{block}\npython3 -c "{check}"'],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


def test_a_stale_ray_address_fails_at_once(monkeypatch, tmp_path):
    """`ray start` leaves its address behind when its processes die without `ray stop`;
    Ray would wait minutes on it."""
    (tmp_path / "ray").mkdir()
    port = _free_port()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_instance.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_instance, "_init", _must_not_init)
    t0 = time.monotonic()
    with pytest.raises(ray_instance.EngineNotFound, match=f"no Ray instance answers at .*:{port}"):
        ray_instance.connect("auto")
    assert time.monotonic() - t0 < 10


def test_auto_joins_only_a_registered_instance(monkeypatch, tmp_path):
    """Ray's own 'auto' would join any instance it sees running, such as another
    engine's private one, which ends with that engine."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # nothing registered here
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_instance.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_instance, "_init", _must_not_init)
    with pytest.raises(ray_instance.EngineNotFound, match="no Ray instance was started"):
        ray_instance.connect("auto")


@pytest.mark.parametrize(
    ("address", "env", "expected"),
    [
        (None, None, "private"),  # another instance running or not
        (None, "10.0.0.1:6379", "join None"),  # `ray job submit` entrypoints
        ("auto", None, "join auto"),
        ("10.0.0.2:6379", None, "join 10.0.0.2:6379"),
    ],
)
def test_which_ray_an_engine_runs_on(monkeypatch, address, env, expected):
    calls = []
    monkeypatch.setattr(ray_instance.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_instance, "start_private", lambda n: calls.append("private"))
    monkeypatch.setattr(ray_instance, "connect", lambda a: calls.append(f"join {a}"))
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    owns = ray_instance.init_for_engine(address, 3)
    assert calls == [expected] and owns == (expected == "private")


@pytest.fixture
def user_folder(tmp_path):
    """A user's project folder holding the names our subpackages had before they moved
    under `gptoss_ray`; importing any of them fails loudly."""
    folder = tmp_path / "project"
    folder.mkdir()
    assert main(["checkpoint", "tiny", str(folder / "model")]) == 0  # a checkpoint folder
    (folder / "model.py").write_text("raise ImportError('the user model.py was imported')\n")
    for name in ("configs", "cluster", "router", "shards"):
        (folder / name).mkdir()
        (folder / name / "__init__.py").write_text(
            f"raise ImportError('the user {name}/ was imported')\n"
        )
    (folder / "configs" / "models").mkdir()
    return folder


@pytest.mark.slow
def test_commands_from_a_user_folder_beside_a_running_ray(user_folder, capsys):
    """From the user's folder: `serve --http` starts a local Ray instance (none runs) and
    the API on Ray Serve, which answers; then the demo, `generate --shards 2` and
    `Engine.start()` each run beside it on a private one, a batch job reaches the served
    engine, `stop` ends the engine and the API, leaves the instance running and says so,
    `stop --ray` ends it."""
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must be short
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_tmp  # this Ray's address file, apart from any other's

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        done = subprocess.run(
            args, cwd=user_folder, env=env, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-3000:])
        return done

    gptoss = [shutil.which("gptoss-ray") or "gptoss-ray"]
    head_pid = None
    port = _free_port()
    try:
        served = run(
            *gptoss,
            "serve",
            "--model",
            "gpt-oss-tiny",
            "--shards",
            "2",
            "--dtype",
            "float32",
            "--name",
            "user-engine",
            "--http",
            "--port",
            str(port),
        )
        assert "started a local Ray instance" in served.stderr
        assert f"OpenAI-compatible API at http://127.0.0.1:{port}/v1" in served.stdout
        models = urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30)
        assert json.loads(models.read())["data"][0]["id"] == "gpt-oss-tiny"
        head = json.loads((Path(env["GPTOSS_RAY_CACHE"]) / "local-ray.json").read_text())
        head_pid = head["pid"]

        demo = run(*gptoss, "demo", "--max-tokens", "4")
        assert re.search(r"^4 conversations, \d+ tokens in .* 2 shard\(s\)", demo.stdout, re.M)

        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0}
        (user_folder / "m.json").write_text(json.dumps(body))
        want = expected_reply(body)["token_ids"]
        out = run(
            *gptoss,
            "generate",
            "--model",
            "model",
            "--messages",
            "m.json",
            "--shards",
            "2",
            "--dtype",
            "float32",
            "--json",
        )
        assert json.loads(out.stdout.splitlines()[-1])["token_ids"] == want

        api = run(
            sys.executable,
            "-c",
            (
                "import json; from gptoss_ray.cluster.client.engine import Engine\n"
                "with Engine.start(model='gpt-oss-tiny', shards=2, dtype='float32') as e:\n"
                f"    print(json.dumps(e.chat([{body!r}])[0]['token_ids']))"
            ),
        )
        assert json.loads(api.stdout.splitlines()[-1]) == want

        line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}
        (user_folder / "in.jsonl").write_text(json.dumps(line) + "\n")
        run(
            *gptoss,
            "batch",
            "submit",
            "in.jsonl",
            "--output",
            "out.jsonl",
            "--wait",
            "--name",
            "user-engine",
        )
        (record,) = [json.loads(x) for x in (user_folder / "out.jsonl").read_text().splitlines()]
        assert (
            record["response"]["body"]["choices"][0]["message"] == expected_reply(body)["message"]
        )

        stopped = run(*gptoss, "stop", "--name", "user-engine")
        assert f"local Ray instance at {head['address']}" in stopped.stdout
        assert "keeps running; `gptoss-ray stop --ray` ends it" in stopped.stdout
        with pytest.raises(OSError):  # the API went with the engine
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10)
        assert ray_instance._is_head_process(head)

        ended = run(*gptoss, "stop", "--ray", "--name", "user-engine")
        assert f"stopped the local Ray instance at {head['address']}" in ended.stdout
        assert not ray_instance._is_head_process(head)
        head_pid = None
    finally:
        if head_pid is not None and ray_instance._is_head_process(head):
            os.kill(head_pid, signal.SIGTERM)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _must_not_init(*args, **kwargs):
    raise AssertionError(f"ray.init{args} reached")

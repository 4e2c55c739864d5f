"""No public port with a default key: placeholders are refused everywhere, and beyond
loopback a front needs a real key; the shipped Serve configs bind loopback."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from gptoss_ray.cluster.front import serve_app
from gptoss_ray.cluster.front.state import ApiKeyError, FrontSettings

CONFIGS = sorted((Path(__file__).parents[2] / "configs" / "serve").glob("*.yaml"))
STRONG = "0123456789abcdef0123"


@pytest.mark.parametrize("key", ["change-me", "CHANGEME", "  ", "your-api-key", ""])
def test_a_placeholder_key_is_refused_wherever_it_is_given(key, monkeypatch):
    with pytest.raises(ValidationError, match=r"api_key(.|\n)*placeholder"):
        FrontSettings(api_key=key)
    monkeypatch.setenv("GPTOSS_TEST_KEY", key)
    with pytest.raises(ApiKeyError, match="GPTOSS_TEST_KEY"):
        FrontSettings(api_key_env="GPTOSS_TEST_KEY").key()


def test_beyond_loopback_a_front_needs_a_real_key(monkeypatch):
    for host in ("127.0.0.1", "127.0.1.1", "localhost", "::1"):
        FrontSettings().check_exposure(host)  # no key on loopback: yours to choose
    with pytest.raises(ApiKeyError, match=r"host 0\.0\.0\.0: the API would be open to anyone"):
        FrontSettings().check_exposure("0.0.0.0")
    with pytest.raises(ApiKeyError, match="5 characters is too short"):
        FrontSettings(api_key="short").check_exposure("10.0.0.5")
    FrontSettings(api_key=STRONG).check_exposure("0.0.0.0")
    monkeypatch.delenv("GPTOSS_TEST_KEY", raising=False)
    with pytest.raises(ApiKeyError, match="GPTOSS_TEST_KEY is not set"):
        FrontSettings(api_key_env="GPTOSS_TEST_KEY").check_exposure("0.0.0.0")
    monkeypatch.setenv("GPTOSS_TEST_KEY", STRONG)
    FrontSettings(api_key_env="GPTOSS_TEST_KEY").check_exposure("0.0.0.0")


def test_serve_refuses_a_public_port_without_a_key_before_starting_anything(capsys, monkeypatch):
    from gptoss_ray.cluster.cli.main import main
    from gptoss_ray.cluster.front import serve

    def must_not_start(*args, **kwargs):
        raise AssertionError("started a cluster for a front that is refused")

    monkeypatch.setattr(serve, "ensure_cluster", must_not_start)
    assert main(["serve", "--http", "--host", "0.0.0.0"]) == 2
    assert "error: host 0.0.0.0: the API would be open to anyone" in capsys.readouterr().err
    assert main(["serve", "--http", "--host", "0.0.0.0", "--api-key", "change-me"]) == 2
    assert "placeholder" in capsys.readouterr().err


def test_a_serve_config_on_a_public_host_without_a_key_is_refused(monkeypatch):
    def must_not_start(*args, **kwargs):
        raise AssertionError("started engines for a front that is refused")

    monkeypatch.setattr(serve_app, "start_engines", must_not_start)
    monkeypatch.setattr(serve_app, "_serve_host", lambda: "0.0.0.0")
    with pytest.raises(ApiKeyError, match="open to anyone"):
        serve_app.build_app({"engine": {"model": "gpt-oss-tiny"}})


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_the_shipped_serve_configs_bind_loopback_and_hold_no_key(path):
    config = yaml.safe_load(path.read_text())
    assert config["http_options"]["host"] == "127.0.0.1"
    for app in config["applications"]:
        assert "GPTOSS_API_KEY" not in str(app.get("runtime_env", {}))  # no key in the file
        spec = serve_app.AppArgs(**app["args"])
        assert spec.front.api_key is None

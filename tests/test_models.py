"""Model names: built-in, local directory, cached Hugging Face id; anything else fails at once with the
nearest built-in name (a typo used to wait ~54 s of hub retries). Nothing here reaches the network."""

from __future__ import annotations

import shutil
import time

import pytest

from deltatune.cli import main
from deltatune.errors import ConfigError
from deltatune.models import catalogue
from deltatune.models.catalogue import resolve


@pytest.fixture(autouse=True)
def fresh_probe():
    catalogue._hub_problem.cache_clear()
    yield
    catalogue._hub_problem.cache_clear()


@pytest.fixture
def no_hub_call(monkeypatch):
    """Fail the test if the hub is asked at all."""
    from huggingface_hub import HfApi

    def refuse(*a, **k):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(HfApi, "model_info", refuse)


def test_typo_fails_at_once_offline_with_the_nearest_builtin(no_hub_call):
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        resolve("minilm-l7")
    assert time.perf_counter() - t0 < 2
    msg = str(e.value)
    assert "model.name: `minilm-l7` is not a built-in model (did you mean `minilm-l6`?)" in msg
    assert "not in the local Hugging Face cache" in msg and "HF_HUB_OFFLINE" in msg and "Fix:" in msg


def _online(monkeypatch, raises: Exception | None):
    from huggingface_hub import HfApi, constants

    calls = []

    def model_info(self, name, **kwargs):
        calls.append((name, kwargs.get("timeout")))
        if raises is not None:
            raise raises

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "model_info", model_info)
    return calls


def test_typo_with_an_unreachable_hub_fails_after_one_request(monkeypatch):
    httpx2 = pytest.importorskip("httpx2")
    calls = _online(monkeypatch, httpx2.ConnectError("[Errno -2] Name or service not known"))
    for _ in range(2):  # the tokenizer, the model and preflight all resolve the name: one request in all
        with pytest.raises(ConfigError, match=r"(?s)did you mean `minilm-l6`.*the hub is unreachable \(ConnectError"):
            resolve("minilm-l7")
    assert calls == [("minilm-l7", 10)]


def test_name_the_hub_does_not_have(monkeypatch):
    from unittest.mock import Mock

    from huggingface_hub.errors import RepositoryNotFoundError

    _online(monkeypatch, RepositoryNotFoundError("404", response=Mock(headers={})))
    with pytest.raises(ConfigError, match="the Hugging Face hub has no model by that name"):
        resolve("acme/no-such-model")


def test_name_the_hub_has_is_handed_on(monkeypatch):
    calls = _online(monkeypatch, None)
    assert resolve("acme/real-model") == "acme/real-model" and len(calls) == 1


def _cache(root, repo_id: str, model_dir) -> None:
    """The Hugging Face cache layout: models--ORG--NAME/{refs/main, snapshots/SHA/...}."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    sha = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model_dir, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)


def test_a_hub_id_in_the_local_cache_loads(monkeypatch, tmp_path, tiny_bert, no_hub_call):
    from huggingface_hub import constants

    from deltatune.models import load_model, load_tokenizer

    _cache(tmp_path, "acme/tiny-bert", tiny_bert)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert resolve("acme/tiny-bert") == "acme/tiny-bert"
    tok = load_tokenizer("acme/tiny-bert")
    model = load_model("classification", "acme/tiny-bert", ["a", "b"], tok, attention="eager")
    assert model.config.num_labels == 2


def test_params_with_an_unknown_model_is_one_error_line(monkeypatch, capsys, no_hub_call):
    monkeypatch.setattr("sys.argv", ["deltatune", "params", "model.name=minilm-l7"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.name: `minilm-l7`") and "Traceback" not in err
    assert "did you mean `minilm-l6`" in err

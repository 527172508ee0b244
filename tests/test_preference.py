"""task: preference wired through the config, the data build and the checks before training (the losses and
the pair encoding have their own files: test_preference_losses.py, test_preference_data.py)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from deltatune import config, preflight
from deltatune import data as data_mod
from deltatune.errors import ConfigError, DataError
from tests.conftest import write_jsonl

PAIRS = [{"prompt": f"review {i}: the film was {'good' if i % 2 else 'dull'}", "chosen": "positive" if i % 2 else
          "negative", "rejected": "negative" if i % 2 else "positive"} for i in range(12)]


def preference_config(tmp_path, tiny_chat_llama, rows=PAIRS, **kw):
    train = write_jsonl(tmp_path / "pairs.jsonl", rows)
    return config.load(None, [f"model.name={tiny_chat_llama}", "task=preference", f"data.train={train}",
                              "data.validation=0.25", "method.name=lora", *[f"{k}={v}" for k, v in kw.items()]])


def test_the_preference_section_takes_the_losses_own_settings(tmp_path, tiny_chat_llama):
    cfg = preference_config(tmp_path, tiny_chat_llama)
    assert (cfg.lm, cfg.metric, cfg.preference.hyper()) == (True, "loss", {"beta": 0.1, "label_smoothing": 0.0})
    orpo = preference_config(tmp_path, tiny_chat_llama, **{"preference.loss": "orpo", "preference.lambda": 0.3})
    assert orpo.preference.hyper() == {"lambda_": 0.3} and "lambda: 0.3" in orpo.to_yaml()
    with pytest.raises(ConfigError, match="gamma: not a dpo setting"):
        preference_config(tmp_path, tiny_chat_llama, **{"preference.gamma": 1.0})
    with pytest.raises(ConfigError, match="packing=true does not apply to task preference"):
        preflight.run(preference_config(tmp_path, tiny_chat_llama, **{"data.packing": True}))


def test_pairs_build_into_splits_with_answer_only_labels_and_bad_rows_named(tmp_path, tiny_chat_llama):
    cfg = preference_config(tmp_path, tiny_chat_llama)
    tok = AutoTokenizer.from_pretrained(tiny_chat_llama)
    bundle = data_mod.build(cfg.data, tok, task="preference")
    assert (len(bundle.train.dataset), len(bundle.validation.dataset)) == (9, 3)
    row = bundle.train.dataset[0]
    n = len(row["prompt_ids"])
    assert row["chosen_input_ids"][:n] == row["rejected_input_ids"][:n] == row["prompt_ids"]
    assert set(row["chosen_labels"][:n]) == {-100} and row["chosen_labels"][-1] == tok.eos_token_id
    assert bundle.stats["template"] == "chat" and "truncated_by_side" in bundle.stats
    bad = [*PAIRS[:4], {"prompt": "x", "chosen": "same", "rejected": "same"}]
    with pytest.raises(DataError, match=r"(?s)pairs.jsonl .*line 5: `chosen` and `rejected` are both"):
        data_mod.build(preference_config(tmp_path, tiny_chat_llama, rows=bad).data, tok, task="preference")
    skipped = data_mod.build(preference_config(tmp_path, tiny_chat_llama, rows=bad, **{"data.on_error": "skip"})
                              .data, tok, task="preference")
    assert skipped.stats["train"]["rows_skipped"] + skipped.stats["validation"]["rows_skipped"] == 1


def test_inspect_data_shows_each_pair_with_the_tokens_that_carry_loss(tmp_path, tiny_chat_llama):
    from typer.testing import CliRunner

    from deltatune.cli import app

    train = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    r = CliRunner().invoke(app, ["inspect-data", f"model.name={tiny_chat_llama}", "task=preference",
                                 f"data.train={train}", "data.validation=null", "--rows", "2"])
    assert r.exit_code == 0, r.output
    assert r.output.count("pair ") == 2 and "chosen (" in r.output and "rejected (" in r.output
    assert "thefilmwasdull" in r.output  # the toy tokenizer's pieces, shown as they are
    assert "chosen (9 tokens, 9 carry loss)" in r.output  # n##e##g##a##t##i##v##e and EOS: the answer only

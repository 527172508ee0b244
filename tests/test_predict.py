"""Predicting with a run: every input keeps its row, blank texts are flagged (not scored), truncation
is reported per row, long texts are shortened in the table only, and unreadable --file inputs are
one clear error line."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from deltatune import api, config
from deltatune.cli import app, main

runner = CliRunner()
LONG = "a great superb film " * 5_000  # 100,000 characters, far over data.max_length tokens


def tiny_run(out, tiny_bert, toy_data, **kw):
    """A tiny run trained once per module (make_config is per test): 8 steps, max_length 16."""
    base = {"model.name": str(tiny_bert), "data.train": str(toy_data["train"]),
            "data.validation": str(toy_data["validation"]), "data.max_length": 16, "train.max_steps": 8,
            "train.batch_size": 16, "train.lr": 1e-2, "train.precision": "fp32", "train.threads": 2,
            "eval.every": 100, "output.dir": str(out), **kw}
    api.train(config.load(None, [f"{k}={v}" for k, v in base.items()]))
    return out


@pytest.fixture(scope="module")
def full(tmp_path_factory, tiny_bert, toy_data):
    return tiny_run(tmp_path_factory.mktemp("predict") / "full", tiny_bert, toy_data)


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_bert, toy_data):
    root = tmp_path_factory.mktemp("predict-lora")
    return [tiny_run(root / name, tiny_bert, toy_data, **{"method.name": "lora", "method.r": 4, "train.seed": seed})
            for name, seed in (("a", 1), ("b", 2))]


def cli(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def json_rows(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_api_predict_flags_blank_texts_and_reports_truncation(full):
    rows = api.predict(full, ["a good film", "", "   \t", LONG])
    assert len(rows) == 4 and [r["text"] for r in rows] == ["a good film", "", "   \t", LONG]
    good, empty, blank, long = rows
    assert set(good) >= {"text", "label", "score", "scores", "truncated", "tokens", "tokens_total", "problem"}
    assert good["label"] in good["scores"] and good["problem"] is None and good["truncated"] is False
    assert good["tokens"] == good["tokens_total"] < 16
    for r in (empty, blank):  # training refuses empty text, so predict does not invent an answer for it
        assert r["problem"] == "empty text" and r["label"] is None and r["score"] is None and r["scores"] is None
    assert long["truncated"] is True and long["tokens"] == 16 and long["tokens_total"] > 10_000
    assert long["label"] is not None and long["problem"] is None
    assert api.predict(full, [""])[0]["problem"] == "empty text"  # nothing at all to score: no model call


def test_file_rows_keep_their_line_numbers_and_blanks_are_warned(full, tmp_path):
    f = tmp_path / "texts.txt"
    f.write_text("lovely warm story\n\nthe plot was dull\n   \n" + LONG + "\n", encoding="utf-8")
    r = cli("predict", str(full), "--file", str(f), "--json")
    assert r.exit_code == 0, r.output
    rows = json_rows(r)
    assert [x["line"] for x in rows] == [1, 2, 3, 4, 5]
    assert [x["problem"] for x in rows] == [None, "empty text", None, "empty text", None]
    assert rows[4]["text"] == LONG.rstrip("\n") and rows[4]["truncated"] is True  # --json keeps the whole text
    assert "2 of 5 texts are empty" in r.stderr and f"{f}:2" in r.stderr and f"{f}:4" in r.stderr
    assert "1 of 5 texts" in r.stderr and "truncated" in r.stderr and f"{f}:5" in r.stderr


def test_argument_rows_keep_their_position(full):
    r = cli("predict", str(full), "a great superb film", "", "an awful boring film", "--json")
    assert r.exit_code == 0, r.output
    rows = json_rows(r)
    assert [x["arg"] for x in rows] == [1, 2, 3]
    assert [x["label"] is None for x in rows] == [False, True, False]
    assert "1 of 3 texts is empty" in r.stderr


def test_table_shortens_long_texts_and_shows_flags(full, monkeypatch):
    from deltatune import cli as cli_mod

    monkeypatch.setattr(cli_mod.out, "_width", 200)  # a wide terminal: cells are not folded
    r = cli("predict", str(full), LONG, " ")
    assert r.exit_code == 0, r.output
    assert len(r.stdout) < 2_000  # shortened, not echoed whole
    assert LONG[:60] in r.stdout and "..." in r.stdout and "100,000 characters" in r.stdout
    assert "empty text" in r.stdout and "16 of" in r.stdout  # the truncated row says how much was kept


def test_multi_run_path_flags_rows_too(loras, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("a good film\n\n" + LONG + "\n", encoding="utf-8")
    r = cli("predict", "--run", str(loras[0]), "--run", str(loras[1]), "--file", str(f), "--json")
    assert r.exit_code == 0, r.output
    rows = json_rows(r)
    assert [(x["run"], x["line"]) for x in rows] == [(str(run), n) for run in loras for n in (1, 2, 3)]
    assert [x["problem"] for x in rows] == [None, "empty text", None] * 2
    assert [x["truncated"] for x in rows] == [False, False, True] * 2
    assert rows[0]["label"] is not None and rows[1]["score"] is None


def test_multi_adapter_mixed_batch_skips_blank_rows(loras):
    from deltatune.inference import MultiAdapter

    served = MultiAdapter(loras)
    texts = ["a good film", "", LONG]
    rows = served.predict_mixed(texts, [loras[0], loras[1], loras[1]])
    assert [r["problem"] for r in rows] == [None, "empty text", None] and rows[2]["truncated"] is True
    alone = served.predict(texts, loras[1])
    assert rows[2]["score"] == pytest.approx(alone[2]["score"], abs=1e-5)


def run_main(monkeypatch, capsys, *args: str) -> str:
    monkeypatch.setattr("sys.argv", ["deltatune", *args])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1
    return " ".join(err.split())  # rich wraps long lines


@pytest.mark.parametrize("command", ["predict", "generate"])
def test_non_utf8_file_is_one_error_naming_line_and_byte(monkeypatch, capsys, tmp_path, command):
    f = tmp_path / "latin1.txt"
    f.write_bytes("fine\ncaf\u00e9 au lait\n".encode("latin-1"))
    args = ("predict", str(tmp_path / "no-run"), "--file", str(f)) if command == "predict" else \
        ("generate", str(tmp_path / "no-run"), "--file", str(f))
    err = run_main(monkeypatch, capsys, *args)
    assert str(f) in err and "line 2" in err and "byte 4 of the line is 0xe9" in err and "UTF-8" in err
    assert "re-save" in err.lower()


def test_missing_file_is_one_error(monkeypatch, capsys, tmp_path):
    err = run_main(monkeypatch, capsys, "predict", str(tmp_path / "no-run"), "--file", str(tmp_path / "nope.txt"))
    assert "nope.txt" in err and "no such file" in err


def test_utf8_bom_and_stdin(full):
    r = runner.invoke(app, ["predict", str(full), "--file", "-", "--json"], input="\ufeffa good film\n\n",
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rows = json_rows(r)
    assert [x["text"] for x in rows] == ["a good film", ""] and [x["line"] for x in rows] == [1, 2]

"""Bad data is never dropped silently: every kind is named (file, line, column, problem) under
data.on_error=raise, and dropped, counted and sampled under skip, with rows read = used + skipped."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from deltatune import api
from deltatune.data import build
from deltatune.errors import DataError

from .conftest import data_section, toy_rows, write_jsonl


def section(**kw):
    return data_section(**{"validation": "null", **kw})


def messy_jsonl(path):
    """20 good rows and one of each bad kind, at known lines."""
    good = [json.dumps(r) for r in toy_rows(20)]
    bad = {
        3: b'{"text": "a good film", "label": "positive"',  # cut short
        6: b'{"text": "caf\xe9 au lait", "label": "positive"}',  # latin-1, not UTF-8
        9: b'{"text": "   ", "label": "negative"}',
        12: b'{"text": "fine", "label": "positive", "extra": 1}',
        15: b'{"text": "fine"}',
        18: b'["fine", "positive"]',
        21: b'{"text": 7, "label": "positive"}',
        23: b'{"text": null, "label": "positive"}',
    }
    lines, g = [], iter(good)
    for n in range(1, 21 + len(bad) - 1 + 1):
        lines.append(bad[n] if n in bad else next(g).encode())
    lines.insert(10, b"")  # a blank line is not a row, and does not shift the numbering of what follows
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


EXPECTED = {  # file line -> problem, after the blank line inserted before line 11
    3: "malformed JSON", 6: "not UTF-8", 9: "empty text", 13: "columns", 16: "columns",
    19: "malformed JSON", 22: "not text", 24: "missing value",
}


def test_raise_names_file_line_column_and_problem(tmp_path, tok):
    p = messy_jsonl(tmp_path / "messy.jsonl")
    with pytest.raises(DataError) as e:
        build(section(train=p), tok)
    msg = str(e.value)
    # Pass 1 (what would break the reader) is reported first, every offender with its line.
    assert f"{p}: 2 row(s) that are not a valid JSON object:" in msg
    assert "line 3: not valid JSON at column 44: Expecting ',' delimiter" in msg
    assert "line 19: a JSON list, where an object" in msg
    assert "line 6: byte 0xe9 at column 14 is not valid UTF-8" in msg
    assert "line 13: extra column(s) `extra` (most lines have: label, text)" in msg
    assert "line 16: missing column(s) `label`" in msg
    assert "line 22: `text` holds 7 (int), not a string" in msg
    assert "Or set data.on_error=skip" in msg


def test_skip_drops_counts_and_samples(tmp_path, tok):
    p = messy_jsonl(tmp_path / "messy.jsonl")
    b = build(section(train=p, on_error="skip"), tok)
    rep = b.stats["train"]
    assert rep["rows_read"] == 28 and rep["rows_skipped"] == 8 and rep["rows_used"] == 20 == b.train.rows
    assert rep["rows_read"] == rep["rows_used"] + rep["rows_skipped"]
    assert rep["skipped_by_problem"] == {"malformed JSON": 2, "columns": 2, "not UTF-8": 1, "not text": 1,
                                         "empty text": 1, "missing value": 1}
    # The sample: 5 dropped lines, each with its own line and problem; those that would break the reader
    # (found first, by line) before the rows' values (line 9's empty text, 22, 24).
    assert rep["skipped_sample"] == [
        "line 3: not valid JSON at column 44: Expecting ',' delimiter",
        "line 6: byte 0xe9 at column 14 is not valid UTF-8",
        "line 13: extra column(s) `extra` (most lines have: label, text)",
        "line 16: missing column(s) `label` (most lines have: label, text)",
        'line 19: a JSON list, where an object {"column": value, ...} belongs',
    ]
    # The 20 rows used are exactly the good ones, in order: the 8 dropped are the bad lines of EXPECTED.
    assert b.train.dataset["input_ids"] == [tok(r["text"])["input_ids"] for r in toy_rows(20)]


def test_csv_and_tsv_field_counts_and_bytes(tmp_path, tok):
    p = tmp_path / "d.csv"
    p.write_bytes(b"text,label\ngood film,positive\nbad film\n\"a, quoted\nfilm\",negative\n"
                  b"dull,negative,extra\nfine,positive\nna\xefve,positive\n")
    with pytest.raises(DataError) as e:
        build(section(train=p), tok)
    msg = str(e.value)
    # Before, pandas filled the short row's label with "" and the run went on.
    assert "line 3: 1 field(s) where the header has 2 (text, label): missing column(s)" in msg
    assert "line 6: 3 field(s) where the header has 2 (text, label): extra column(s)" in msg
    assert "line 8: byte 0xef at column 3 is not valid UTF-8" in msg
    b = build(section(train=p, on_error="skip"), tok)
    assert b.train.rows == 3 and b.stats["train"]["rows_skipped"] == 3
    assert b.train.dataset[1]["input_ids"] == tok("a, quoted\nfilm")["input_ids"]  # multi-line rows survive
    t = tmp_path / "d.tsv"
    t.write_text("text\tlabel\ngood\tpositive\nbad\tnegative\tx\n")
    with pytest.raises(DataError, match=r"line 3: 3 field\(s\) where the header has 2"):
        build(section(train=t), tok)


def test_unclosed_quote_is_fatal_even_under_skip(tmp_path, tok):
    p = tmp_path / "q.csv"
    p.write_text('text,label\ngood,positive\n"bad quote,negative\nfine,positive\nok,negative\n')
    for mode in ("raise", "skip"):
        with pytest.raises(DataError, match=r"lines 3-5: a quote opened on line 3 never closes") as e:
            build(section(train=p, on_error=mode), tok)
        assert "on_error=skip" not in str(e.value)


def test_labels_empty_text_over_long_and_duplicate_ids(tmp_path, tok):
    rows = [{"id": i, **r} for i, r in enumerate(toy_rows(12))]
    rows[2]["label"] = "neutral"
    rows[4]["text"] = "\t \n"
    rows[6]["text"] = "good " * 400
    rows[8]["id"] = 3
    rows[10]["label"] = None
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as e:
        build(section(train=p, labels="[negative,positive]", max_chars=1000), tok)
    msg = str(e.value)
    assert "line 5: `text` is empty" in msg
    assert "line 7: `text` has 2,000 characters (data.max_chars=1,000)" in msg
    assert "line 9: id '3' again (first at line 4)" in msg
    assert "line 11: `label` is missing" in msg
    b = build(section(train=p, labels="[negative,positive]", max_chars=1000, on_error="skip"), tok)
    assert b.stats["train"]["skipped_by_problem"] == {"empty text": 1, "over-long": 1, "duplicate id": 1,
                                                      "missing value": 1, "unknown label": 1}
    assert b.train.rows == 7
    # The default limit is 1000 x max_length characters; truncation is the normal path below it.
    assert build(section(train=p, labels="[negative,positive]", on_error="skip"), tok).train.rows == 8
    # data.id names the id column; a name that is not a column is an error.
    with pytest.raises(DataError, match=r"no id column `uid` \(set by `data.id`\)"):
        build(section(train=p, id="uid"), tok)


def test_validation_classes_missing_from_training(tmp_path, tok):
    train = write_jsonl(tmp_path / "train.jsonl", [r for r in toy_rows(30) if r["label"] == "positive"] +
                        [{"text": "so so", "label": "neutral"}])
    val = write_jsonl(tmp_path / "val.jsonl", toy_rows(6, seed=3) + [{"text": "meh", "label": "neutral"}])
    with pytest.raises(DataError) as e:
        build(section(train=train, validation=val, labels="[negative,neutral,positive]"), tok)
    msg = str(e.value)
    assert f"{val}: " in msg and "whose label never occurs in the training data ('negative')" in msg
    b = build(section(train=train, validation=val, labels="[negative,neutral,positive]", on_error="skip"), tok)
    v = b.stats["validation"]
    assert v["rows_skipped"] == v["skipped_by_problem"]["class missing from training"] >= 1
    assert v["rows_read"] == v["rows_used"] + v["rows_skipped"] == 7


def test_held_out_rows_keep_their_file_lines(tmp_path, tok):
    rows = toy_rows(40)
    rows[33]["label"] = "neutral"
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    s = section(train=p, validation=0.5, seed=1, labels="[negative,positive]")
    with pytest.raises(DataError, match=r"line 34: label 'neutral'"):
        build(s, tok)
    b = build(section(train=p, validation=0.5, seed=1, labels="[negative,positive]", on_error="skip"), tok)
    t, v = b.stats["train"], b.stats["validation"]
    assert t["rows_read"] == 40 and t["rows_held_out"] == 20 and t["rows_used"] + v["rows_used"] == 39
    assert t["rows_read"] == t["rows_used"] + t["rows_skipped"] + t["rows_held_out"]
    assert v["rows_read"] == v["rows_used"] + v["rows_skipped"] == 20


def test_empty_files_and_files_without_rows(tmp_path, tok):
    for name, content in [("e.jsonl", ""), ("h.csv", "text,label\n"), ("b.jsonl", "\n  \n\n")]:
        (tmp_path / name).write_text(content)
        with pytest.raises(DataError, match="the file is empty|no rows"):
            build(section(train=tmp_path / name, on_error="skip"), tok)
    all_bad = tmp_path / "bad.jsonl"
    all_bad.write_text("nope\n{\n")
    with pytest.raises(DataError, match="all 2 rows are bad"):
        build(section(train=all_bad, on_error="skip"), tok)


def test_parquet_rows_are_numbered(tmp_path, tok):
    rows = toy_rows(5)
    rows[3]["text"] = ""
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    with pytest.raises(DataError, match="row 4: `text` is empty"):
        build(section(train=tmp_path / "d.parquet"), tok)


def test_truncation_is_counted_and_warned(tmp_path, tok, capsys):
    rows = [{"text": "good " * 50, "label": "a"}] * 3 + [{"text": "bad", "label": "b"}] * 7
    b = build(section(train=write_jsonl(tmp_path / "t.jsonl", rows), max_length=16), tok)
    assert b.stats["train"]["truncated"] == 3 and b.stats["train"]["truncated_percent"] == 30.0
    err = capsys.readouterr().err
    assert "30% of train rows (3 of 10) are longer than data.max_length=16 tokens" in " ".join(err.split())
    build(section(train=write_jsonl(tmp_path / "u.jsonl", rows[2:]), max_length=16), tok)
    assert "longer than" in capsys.readouterr().err  # 1 of 8 is still >= 10%
    build(section(train=write_jsonl(tmp_path / "v.jsonl", rows[3:] * 2 + [{"text": "good", "label": "a"}]),
                  max_length=16), tok)
    assert "longer than" not in capsys.readouterr().err


def test_a_run_reports_skips_in_summary_and_a_raise_leaves_nothing_to_misread(make_config, tmp_path, capsys):
    p = messy_jsonl(tmp_path / "messy.jsonl")
    run = tmp_path / "run"
    cfg = make_config(**{"data.train": str(p), "data.validation": None, "train.max_steps": 2, "train.threads": 1,
                         "output.dir": str(run), "output.overwrite": False})
    with pytest.raises(DataError):
        api.train(cfg)
    # no model, metrics or summary (whether a failed start leaves config.yaml is tested with the run dir)
    assert not run.exists() or {x.name for x in run.iterdir()} <= {"config.yaml"}
    with pytest.raises(Exception, match="not a finished deltatune run"):
        api.load_run(run)
    s = api.train(cfg.model_copy(update={"data": cfg.data.model_copy(update={"on_error": "skip"})}))
    assert "skipped 8 of 28 rows" in " ".join(capsys.readouterr().err.split())
    d = json.loads((run / "summary.json").read_text())["data"]
    assert d["on_error"] == "skip" and d["train"]["rows_skipped"] == 8 == s["data"]["train"]["rows_skipped"]
    assert d["train"]["rows_read"] == d["train"]["rows_used"] + d["train"]["rows_skipped"]
    assert d["train"]["skipped_sample"]

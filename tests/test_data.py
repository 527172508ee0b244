"""Data: every file format, label maps, seeded splits, built-ins, and errors that name file and line."""

from __future__ import annotations

import csv

import pandas as pd
import pytest

from deltatune.data import build
from deltatune.data.builtin import BUILTIN_DATASETS
from deltatune.errors import ConfigError, DataError

from .conftest import data_section, toy_rows, write_jsonl

section = data_section


def write_all_formats(tmp_path, rows):
    df = pd.DataFrame(rows)
    paths = {"csv": tmp_path / "d.csv", "tsv": tmp_path / "d.tsv", "parquet": tmp_path / "d.parquet",
             "jsonl": write_jsonl(tmp_path / "d.jsonl", rows)}
    df.to_csv(paths["csv"], index=False)
    df.to_csv(paths["tsv"], index=False, sep="\t", quoting=csv.QUOTE_NONE)  # TSV as GLUE writes it
    df.to_parquet(paths["parquet"])
    return paths


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_formats_read_identically(tmp_path, tok, fmt):
    rows = toy_rows(40)
    rows[0]["text"] = 'he said "wow", then left'  # quotes and commas survive every format
    path = write_all_formats(tmp_path, rows)[fmt]
    b = build(section(train=path, validation="null"), tok)
    assert b.labels == ["negative", "positive"]
    assert b.train.rows == 40 and b.validation is None
    first = tok(rows[0]["text"])["input_ids"]
    assert b.train.dataset[0]["input_ids"] == first
    assert b.train.dataset["labels"][:3] == [b.labels.index(r["label"]) for r in rows[:3]]


def test_integer_labels_sort_numerically_and_split_is_seeded(tmp_path, tok):
    rows = [{"sentence": r["text"], "y": i % 11} for i, r in enumerate(toy_rows(110))]
    p = write_jsonl(tmp_path / "ints.jsonl", rows)
    s = section(train=p, validation=0.2, text="sentence", label="y", seed=7)
    a, b = build(s, tok), build(s, tok)
    assert a.labels == [str(i) for i in range(11)]
    assert a.train.rows == 88 and a.validation.rows == 22
    assert a.validation.dataset["input_ids"] == b.validation.dataset["input_ids"]
    other = build(section(train=p, validation=0.2, text="sentence", label="y", seed=8), tok)
    assert other.validation.dataset["input_ids"] != a.validation.dataset["input_ids"]
    ids = list(a.train.dataset["labels"]) + list(a.validation.dataset["labels"])
    assert sorted(ids) == sorted(r["y"] for r in rows)


def test_text_pair_and_headerless_columns(tmp_path, tok):
    p = tmp_path / "pairs.tsv"
    p.write_text("a good film\tthe plot\tpositive\na bad film\tthe actors\tnegative\n")
    b = build(section(train=p, validation="null", columns="[premise,hypothesis,label]", text="premise",
                      text_pair="hypothesis"), tok)
    assert b.train.rows == 2
    assert b.train.dataset[0]["input_ids"] == tok("a good film", "the plot")["input_ids"]


def test_truncation_is_counted(tmp_path, tok):
    rows = [{"text": "good " * 50, "label": "a"}, {"text": "bad", "label": "b"}]
    b = build(section(train=write_jsonl(tmp_path / "t.jsonl", rows), validation="null", max_length=16), tok)
    assert b.train.truncated == 1 and b.stats["train_truncated"] == 1
    assert max(b.train.dataset["length"]) == 16


def test_missing_column_suggests(tmp_path, tok):
    p = write_jsonl(tmp_path / "d.jsonl", [{"txt": "good", "label": "a"}])
    with pytest.raises(DataError) as e:
        build(section(train=p, validation="null", text="text"), tok)
    assert str(p) in str(e.value) and "no column `text` (set by `data.text`)" in str(e.value)
    assert "did you mean `txt`" in str(e.value)


def test_empty_text_names_line(tmp_path, tok):
    p = tmp_path / "d.csv"
    p.write_text("text,label\ngood film,positive\n   ,negative\nbad,negative\n")
    with pytest.raises(DataError, match=r"d\.csv: 1 row\(s\) with empty text:\n\s+line 3: `text` is empty"):
        build(section(train=p, validation="null"), tok)


def test_label_outside_label_set_names_line(tmp_path, tok):
    train = write_jsonl(tmp_path / "train.jsonl", toy_rows(20))
    val = write_jsonl(tmp_path / "val.jsonl", toy_rows(3) + [{"text": "meh", "label": "neutral"}])
    with pytest.raises(DataError, match=r"val\.jsonl: 1 row\(s\) with a label not in the label set.*\n"
                                        r"\s+line 4: label 'neutral'"):
        build(section(train=train, validation=val), tok)
    with pytest.raises(DataError, match="line 1: label"):
        build(section(train=train, validation="null", labels="[good,bad]"), tok)


def test_missing_empty_and_unsupported_files(tmp_path, tok):
    with pytest.raises(ConfigError, match="data file not found"):
        build(section(train=tmp_path / "nope.csv"), tok)
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(DataError, match="file is empty"):
        build(section(train=tmp_path / "e.csv"), tok)
    (tmp_path / "x.xlsx").write_text("x")
    with pytest.raises(ConfigError, match="unsupported file type"):
        build(section(train=tmp_path / "x.xlsx"), tok)
    with pytest.raises(ConfigError, match="did you mean `movie-reviews`"):
        build(section(train="builtin:movie-review"), tok)


@pytest.mark.parametrize("name", sorted(BUILTIN_DATASETS))
def test_builtin_datasets_from_packages(name):
    ds = BUILTIN_DATASETS[name]
    path = ds.path()  # extracts from the installed package on first use, then reads the cache
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == ds.rows
    df = pd.read_json(path, lines=True)
    text, label = {"instruction": ("input", "output"), "prompt": ("prompt", "chosen")}.get(  # sft rows, pairs
        next(c for c in ("instruction", "prompt", "text") if c in df.columns), ("text", "label"))
    assert sorted(df[label].unique()) == list(ds.labels)
    assert df[text].str.strip().str.len().min() > 0


def test_builtin_pairs_are_the_sft_rows_with_the_wrong_label_rejected():
    """movie-reviews-pairs prompts the model as movie-reviews-instruct does (the chat user turn of an sft row
    is instruction, a blank line, input), so an sft run and a DPO run over it see the same prompts."""
    pairs = pd.read_json(BUILTIN_DATASETS["movie-reviews-pairs"].path(), lines=True)
    sft = pd.read_json(BUILTIN_DATASETS["movie-reviews-instruct"].path(), lines=True)
    assert (pairs["prompt"] == sft["instruction"] + "\n\n" + sft["input"]).all()
    assert (pairs["chosen"] == sft["output"]).all() and (pairs["rejected"] != pairs["chosen"]).all()
    assert set(pairs["rejected"]) == {"positive", "negative"}


def test_one_loss_ignore_label():
    """-100 (the label the loss skips) is written once, in deltatune/constants.py, which imports nothing from
    the project; everything else names it IGNORE_INDEX. It must be what torch's cross-entropy ignores."""
    import ast
    from pathlib import Path

    import torch

    import deltatune
    from deltatune.constants import IGNORE_INDEX

    assert IGNORE_INDEX == torch.nn.CrossEntropyLoss().ignore_index
    src = Path(deltatune.__file__).parent
    found = set()  # file:line
    for path in sorted(src.rglob("*.py")):
        for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            literal = (isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub) and isinstance(n.operand, ast.Constant)
                       and n.operand.value == 100)
            named = isinstance(n, ast.Assign) and any(getattr(t, "id", "") in ("IGNORE", "IGNORE_INDEX")
                                                      for t in n.targets)
            if literal or named:
                found.add(f"{path.relative_to(src)}:{n.lineno}")
    assert found == {f"constants.py:{_line_of(src / 'constants.py', 'IGNORE_INDEX =')}"}
    tree = ast.parse((src / "constants.py").read_text(encoding="utf-8"))
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def _line_of(path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.startswith(text))


def test_the_task_decides_language_model_or_classifier_in_one_place(make_config):
    """tasks.is_lm (config.is_lm, RunConfig.lm) is the one answer to "token targets or one label per text"; the data,
    evaluation and preflight code, and api's evaluate/inspect_data, ask it instead of comparing task names."""
    import ast
    import typing
    from pathlib import Path

    import deltatune
    from deltatune import config

    tasks = typing.get_args(config.RunConfig.model_fields["task"].annotation)
    assert {t: config.is_lm(t) for t in tasks} == {"classification": False, "causal_lm": True, "sft": True,
                                                   "preference": True}
    assert make_config(task="sft").lm and not make_config().lm
    src = Path(deltatune.__file__).parent
    trees = [ast.parse(p.read_text(encoding="utf-8")) for d in ("data", "evaluation") for p in (src / d).glob("*.py")]
    trees.append(ast.parse((src / "preflight.py").read_text(encoding="utf-8")))
    api = ast.parse((src / "api.py").read_text(encoding="utf-8"))
    trees += [f for f in api.body if isinstance(f, ast.FunctionDef) and f.name in ("evaluate", "inspect_data")]
    compared = [ast.unparse(n) for t in trees for n in ast.walk(t) if isinstance(n, ast.Compare)
                and any(isinstance(c, ast.Constant) and c.value == "classification" for c in n.comparators)]
    assert compared == []


def test_rows_pass_validation_once(tmp_path, tok, monkeypatch):
    """Each split's rows are checked once for their values and once against the label set, in training
    (build) and when a saved run is scored on a file (build_eval, what `deltatune eval --data` uses)."""
    from deltatune.data import build_eval, validate

    calls = []
    real = validate.check

    def counting(ds, section, report, lm=False, labels=None, **kw):
        calls.append((report.name, "labels" if labels is not None else "values"))
        return real(ds, section, report, lm, labels, **kw)

    monkeypatch.setattr(validate, "check", counting)
    train, val = write_jsonl(tmp_path / "t.jsonl", toy_rows(40)), write_jsonl(tmp_path / "v.jsonl", toy_rows(20, 1))
    bundle = build(section(train=train, validation=val), tok)
    assert sorted(calls) == [("train", "labels"), ("train", "values"), ("validation", "labels"),
                             ("validation", "values")]
    calls.clear()
    split, skipped = build_eval(section(train=train, validation=val), tok, bundle.labels, "classification", str(val))
    assert sorted(calls) == [("eval", "labels"), ("eval", "values")]
    assert split.dataset["input_ids"] == bundle.validation.dataset["input_ids"] and skipped == 0
    assert split.dataset["labels"] == bundle.validation.dataset["labels"] and split.where == str(val)

"""Silent data problems made loud (issue 10): labels that differ by whitespace or case, label columns
mixing numbers and names, splits that leave nothing to learn, text the vocabulary cannot read, and
files saved with a UTF-8 byte-order mark."""

from __future__ import annotations

import json

import pytest

from deltatune import api
from deltatune.data import build
from deltatune.errors import DataError

from .conftest import data_section, toy_rows, write_jsonl

BOM = b"\xef\xbb\xbf"


def section(**kw):
    return data_section(**{"validation": "null", **kw})


def relabel(rows: list[dict], at: dict[int, object]) -> list[dict]:
    """Rows with the label of some rows (0-based index -> label) replaced."""
    return [{**r, "label": at[i]} if i in at else r for i, r in enumerate(rows)]


def write_csv(path, rows, sep=","):
    path.write_text("text" + sep + "label\n" + "".join(f"{r['text']}{sep}{r['label']}\n" for r in rows),
                    encoding="utf-8")
    return path


# --- 1. labels: whitespace stripped, case and kind clashes named ------------------------------


def test_labels_are_stripped_in_train_and_validation(tmp_path, tok):
    rows = toy_rows(40)
    train = write_jsonl(tmp_path / "train.jsonl",
                        relabel(rows, {i: r["label"] + " " for i, r in enumerate(rows) if i % 3 == 0}))
    val = write_csv(tmp_path / "val.csv", [{**r, "label": "  " + r["label"]} for r in toy_rows(10, seed=3)])
    b = build(section(train=train, validation=val), tok)
    assert b.labels == ["negative", "positive"]
    assert b.stats["validation"]["rows_used"] == 10
    blank = write_csv(tmp_path / "blank.csv", relabel(toy_rows(10), {3: "   "}))
    with pytest.raises(DataError, match="line 5: `label` is missing"):  # not a class named "" (or "   ")
        build(section(train=blank), tok)


def test_labels_differing_only_by_case_name_the_lines(tmp_path, tok):
    rows = toy_rows(40)
    flip = {i: r["label"].capitalize() for i, r in enumerate(rows) if r["label"] == "positive"}
    flip = dict(list(flip.items())[:2])  # two rows spelled `Positive`; the rest `positive`
    p = write_jsonl(tmp_path / "t.jsonl", relabel(rows, flip))
    with pytest.raises(DataError) as e:
        build(section(train=p), tok)
    msg = str(e.value)
    lines = [i + 1 for i in flip]
    assert all(f"line {n}:" in msg for n in lines), msg
    assert "'Positive'" in msg and "'positive'" in msg and "case" in msg
    assert "on_error=skip" in msg  # these rows can be dropped, and the message lists them
    b = build(section(train=p, on_error="skip"), tok)
    assert b.labels == ["negative", "positive"]
    assert b.stats["train"]["skipped_by_problem"] == {"label case": 2}
    assert b.stats["train"]["rows_used"] == 38
    # against a given label set, a case variant is named as such
    with pytest.raises(DataError, match="the label set has 'positive'; labels are case-sensitive"):
        build(section(train=write_jsonl(tmp_path / "u.jsonl", [{**r, "label": r["label"].capitalize()} for r in rows]),
                      labels="[negative,positive]"), tok)


def test_csv_label_column_mixing_numbers_and_names(tmp_path, tok):
    rows = [{**r, "label": "1" if r["label"] == "positive" else "0"} for r in toy_rows(40)]
    few = write_csv(tmp_path / "few.csv", relabel(rows, {4: "pos", 9: "neg"}))
    with pytest.raises(DataError) as e:
        build(section(train=few), tok)
    msg = str(e.value)
    assert "line 6:" in msg and "line 11:" in msg and "'pos'" in msg, msg  # CSV line = row + 2 (header)
    b = build(section(train=few, on_error="skip"), tok)  # a few strays: dropped and counted
    assert b.labels == ["0", "1"]
    assert b.stats["train"]["skipped_by_problem"] == {"mixed labels": 2}
    # About half each: two encodings of the same classes; only the user knows the mapping.
    half = write_csv(tmp_path / "half.csv", relabel(rows, {i: ("pos" if r["label"] == "1" else "neg")
                                                           for i, r in enumerate(rows) if i % 2}))
    for on_error in ("raise", "skip"):
        with pytest.raises(DataError) as e:
            build(section(train=half, on_error=on_error), tok)
        msg = str(e.value)
        assert "line 2" in msg and "line 3" in msg and "numbers" in msg and "names" in msg, msg
        assert "on_error=skip" not in msg


def test_jsonl_label_column_mixing_ints_and_strings_is_found_before_reading(tmp_path, tok, monkeypatch):
    rows = relabel(toy_rows(30), {i: i % 2 for i in range(30)})
    rows = relabel(rows, {2: "pos", 7: "neg"})
    p = write_jsonl(tmp_path / "mixed.jsonl", rows)
    from deltatune.data import sources

    def never(*a, **k):
        raise AssertionError("datasets read a file whose label column mixes types")

    monkeypatch.setattr(sources, "read", never)
    with pytest.raises(DataError) as e:
        build(section(train=p), tok)
    msg = str(e.value)
    assert str(p) in msg and "line 3:" in msg and "line 8:" in msg and "'pos'" in msg, msg
    monkeypatch.undo()
    b = build(section(train=p, on_error="skip"), tok)
    assert b.labels == ["0", "1"] and b.stats["train"]["skipped_by_problem"] == {"mixed labels": 2}
    # all ints: as before
    ints = write_jsonl(tmp_path / "ints.jsonl", relabel(toy_rows(30), {i: i % 2 for i in range(30)}))
    assert build(section(train=ints), tok).labels == ["0", "1"]


# --- 3. splits and sizes that leave nothing to learn -----------------------------------------


def test_a_validation_fraction_that_leaves_too_little_training_is_blamed(tmp_path, tok):
    p = write_jsonl(tmp_path / "t.jsonl", toy_rows(20))
    for on_error in ("raise", "skip"):  # 1 row (one class) left for training; then none at all
        for fraction, held in ((0.95, 19), (0.99, 20)):
            with pytest.raises(DataError) as e:
                build(section(train=p, validation=fraction, on_error=on_error), tok)
            msg = str(e.value)
            assert f"data.validation={fraction}" in msg and f"{held} of 20" in msg, msg
            assert "on_error=skip" not in msg


def test_one_class_in_training_is_refused(tmp_path, tok):
    p = write_jsonl(tmp_path / "t.jsonl", [{**r, "label": "positive"} for r in toy_rows(20)])
    with pytest.raises(DataError, match="2 classes"):
        build(section(train=p), tok)


def test_fewer_training_rows_than_one_batch_is_refused(tmp_path, tok):
    p = write_jsonl(tmp_path / "t.jsonl", toy_rows(10))
    with pytest.raises(DataError, match="train.batch_size"):
        build(section(train=p), tok, min_rows=16)
    assert build(section(train=p), tok, min_rows=8).train.rows == 10


def test_classes_missing_from_training_because_of_the_split_blame_the_split(tmp_path, tok):
    rows = toy_rows(40) + [{"text": "a neutral film", "label": "neutral"}]
    p = write_jsonl(tmp_path / "t.jsonl", rows)
    # find a seed whose 25% hold-out takes the single `neutral` row
    for seed in range(50):
        try:
            build(section(train=p, validation=0.25, seed=seed), tok)
        except DataError as e:
            msg = str(e)
            break
    else:
        pytest.fail("no seed held out the single row")
    assert "neutral" in msg and "data.validation=0.25" in msg, msg
    assert "on_error=skip" not in msg


def test_train_refuses_fewer_rows_than_a_batch(make_config, tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", toy_rows(10))
    cfg = make_config(**{"data.train": str(p), "data.validation": None, "train.batch_size": 16})
    with pytest.raises(DataError, match="train.batch_size"):
        api.train(cfg)


# --- 4. unknown tokens ----------------------------------------------------------------------


CHINESE = ["这部电影很好看", "剧情非常无聊", "演员表演精彩", "故事很感人", "结尾太糟糕了", "我很喜欢这部片子"]


def test_unknown_token_share_is_measured_and_warned(tmp_path, tok, capsys):
    rows = [{"text": CHINESE[i % len(CHINESE)], "label": r["label"]} for i, r in enumerate(toy_rows(20))]
    p = write_jsonl(tmp_path / "zh.jsonl", rows)
    b = build(section(train=p), tok)
    assert b.stats["train"]["unk_percent"] > 50
    err = " ".join(capsys.readouterr().err.split())
    assert "unknown" in err and "vocabulary" in err and "multilingual" in err, err
    en = write_jsonl(tmp_path / "en.jsonl", toy_rows(20))
    b = build(section(train=en), tok)
    assert b.stats["train"]["unk_percent"] == 0
    assert "unknown" not in capsys.readouterr().err


def test_tokenizers_without_an_unknown_token_report_not_applicable(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([r["text"] for r in toy_rows(50)],
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                special_tokens=["<|endoftext|>"]))
    gpt2_like = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    rows = [{"text": CHINESE[i % len(CHINESE)], "label": r["label"]} for i, r in enumerate(toy_rows(20))]
    b = build(section(train=write_jsonl(tmp_path / "zh.jsonl", rows)), gpt2_like)
    assert b.stats["train"]["unk_percent"] is None


# --- 5. a UTF-8 byte-order mark ---------------------------------------------------------------


def bom_files(d, rows) -> dict[str, object]:
    csv_text = "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows)
    tsv_text = "text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows)
    jsonl_text = "".join(json.dumps(r) + "\n" for r in rows)
    out = {}
    for name, text in (("csv", csv_text), ("tsv", tsv_text), ("jsonl", jsonl_text)):
        out[name] = d / f"bom.{name}"
        out[name].write_bytes(BOM + text.encode())
    return out


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_a_byte_order_mark_is_accepted(tmp_path, tok, fmt):
    p = bom_files(tmp_path, toy_rows(20))[fmt]
    b = build(section(train=p), tok)
    assert b.labels == ["negative", "positive"] and b.train.rows == 20
    # under skip, the cleaned copy without the bad line reads too
    p.write_bytes(p.read_bytes() + ('{"text": "fine"' if fmt == "jsonl" else "fine\n").encode() + b"\n")
    b = build(section(train=p, on_error="skip"), tok)
    assert b.train.rows == 20 and b.stats["train"]["rows_skipped"] == 1


def test_evaluate_reads_byte_order_marks_and_padded_labels(make_config, tmp_path):
    cfg = make_config(**{"train.epochs": 1})
    api.train(cfg)
    rows = [{**r, "label": r["label"] + " "} for r in toy_rows(20, seed=5)]
    for p in bom_files(tmp_path, rows).values():
        result = api.evaluate(cfg.output.dir, str(p))
        assert result["rows"] == 20 and result["rows_skipped"] == 0
    labels = json.loads((tmp_path / "run" / "labels.json").read_text())
    assert labels == ["negative", "positive"]


def test_tokenizing_stays_cacheable(tmp_path, tok):
    """`datasets` caches tokenization by hashing `encode` and what it uses; an unhashable reference (e.g.
    a module holding a Console) falls back to a random hash, and every run tokenizes again."""
    p = write_jsonl(tmp_path / "t.jsonl", toy_rows(30))
    first, again = build(section(train=p), tok), build(section(train=p), tok)
    assert first.train.dataset._fingerprint == again.train.dataset._fingerprint


def test_language_modelling_text_files_with_a_byte_order_mark_and_unknown_tokens(tmp_path, tok):
    from deltatune.data import sources

    p = tmp_path / "lm.txt"
    p.write_bytes(BOM + "\n".join(["the film was good"] * 5 + CHINESE).encode() + b"\n")
    assert sources.read(str(p))[0]["text"] == "the film was good"
    b = build(section(train=p), tok, task="causal_lm")
    assert b.train.rows == 11 and b.stats["train"]["unk_percent"] > 30

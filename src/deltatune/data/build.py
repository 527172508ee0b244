"""Rows -> validated -> tokenized (cached by `datasets`) splits for a classification run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from deltatune.config import DataSection
from deltatune.data import packing, sft, sources, validate
from deltatune.errors import DataError

MAX_SHOWN = 5  # offending rows quoted in an error


@dataclass
class Split:
    name: str
    dataset: datasets.Dataset  # columns: input_ids, attention_mask, labels, length
    rows: int
    truncated: int
    where: str


@dataclass
class DataBundle:
    labels: list[str]
    train: Split
    validation: Split | None
    stats: dict = field(default_factory=dict)


def build(section: DataSection, tokenizer: PreTrainedTokenizerBase, labels: list[str] | None = None,
          task: str = "classification") -> DataBundle:
    """Read, validate, split, and tokenize. `labels` fixes the label set (e.g. from a saved run).

    classification: rows -> (input_ids, label id). causal_lm: rows -> input_ids ending in EOS, every
    token a target (the model learns to stop).
    """
    lm = task != "classification"
    reports: list[validate.SplitReport] = []  # rows read / used / skipped, per split
    train_raw, train_where = _read(section, section.train, task, "train", reports)
    val_raw, val_where = None, None
    if isinstance(section.validation, str):
        val_raw, val_where = _read(section, section.validation, task, "validation", reports)
    elif isinstance(section.validation, float):
        parts = train_raw.train_test_split(test_size=section.validation, seed=section.seed)
        train_raw, val_raw = parts["train"], parts["test"]
        val_where = f"{train_where} ({section.validation:.0%} held out, seed {section.seed})"
        reports[0].held_out = len(val_raw)
        reports.append(validate.SplitReport("validation", val_where, reports[0].unit, read=len(val_raw)))

    labels = [] if lm else labels or section.labels or _label_set(train_raw, section.label)
    if not lm:  # labels outside the set; validation classes that training never has
        train_raw = validate.check(train_raw, section, reports[0], labels=labels)
        if val_raw is not None:
            val_raw = validate.check(val_raw, section, reports[1], labels=labels,
                                     train_labels=set(_label_set(train_raw, section.label)))
    stats: dict = {}
    if task == "sft":
        fmt = sft.detect_format(train_raw.column_names, section.format, train_where)
        template = sft.resolve_template(section.template, tokenizer)
        stats.update(format=fmt, template=template)
        train_raw = validate.check_sft(train_raw, section, reports[0], fmt)
        if val_raw is not None:
            val_raw = validate.check_sft(val_raw, section, reports[1], fmt)
    if section.sample and section.sample < len(train_raw):
        stats["sampled_from"] = len(train_raw)
        reports[0].not_sampled = len(train_raw) - section.sample
        keep = np.random.default_rng(section.seed).choice(len(train_raw), section.sample, replace=False)
        train_raw = train_raw.select(sorted(keep.tolist()))
    if task == "sft":
        train = tokenize_sft("train", train_raw, section, tokenizer, train_where, fmt, template)
        val = tokenize_sft("validation", val_raw, section, tokenizer, val_where, fmt, template) if val_raw else None
        for report, split in zip(reports, (train, val)):
            if split is not None:
                report.no_target = split.rows - len(split.dataset)
    else:
        train = tokenize_split("train", train_raw, section, tokenizer, labels, train_where, not lm)
        val = tokenize_split("validation", val_raw, section, tokenizer, labels, val_where, not lm) if val_raw else None
    stats.update({
        "train_rows": train.rows, "validation_rows": val.rows if val else 0,
        "train_truncated": train.truncated, "validation_truncated": val.truncated if val else 0,
        "max_length": section.max_length, "on_error": section.on_error,
        **validate.report(reports, {"train": train, "validation": val}, section.max_length),
    })
    if section.packing:
        # Only training is packed: evaluation scores each example on its own.
        train, stats["packing"] = packing.pack_split(train, section.max_length, section.seed)
    return DataBundle(labels=labels, train=train, validation=val, stats=stats)


def _read(section: DataSection, spec: str, task: str = "classification", name: str = "train",
          reports: list | None = None) -> tuple[datasets.Dataset, str]:
    lm = task != "classification"
    ds, report = validate.read(spec, section, name, lm)  # bad lines raised or skipped, each row keeps its line
    where = report.where
    if task != "sft":  # sft columns are checked by format (instruction/output or messages), in tokenize_sft
        sources.require_columns(ds, {"data.text": section.text, "data.text_pair": section.text_pair,
                                     "data.label": None if lm else section.label}, where)
        ds = validate.check(ds, section, report, lm)
    if reports is not None:
        reports.append(report)
    return ds, where


def tokenize_sft(name: str, ds: datasets.Dataset, section: DataSection, tokenizer: PreTrainedTokenizerBase,
                 where: str, fmt: str, template: str) -> Split:
    """Instruction rows -> input_ids + labels (response tokens only), plus the prompt and reference
    answer that generation-based evaluation uses."""
    sft.detect_format(ds.column_names, fmt, where)

    def encode(row: dict) -> dict:
        try:
            e = sft.encode(tokenizer, sft.to_messages(row, fmt), template, section.max_length)
        except ValueError as err:
            raise DataError(f"{where}: {err}") from None
        return {"input_ids": e.input_ids, "labels": e.labels, "length": len(e.input_ids),
                "prompt_ids": e.prompt_ids, "reference": e.reference, "truncated": e.truncated}

    tokenized = ds.map(encode, remove_columns=ds.column_names, desc=f"tokenizing {name}")
    truncated = sum(tokenized["truncated"])
    # A row cut so short that none of its response is left carries no loss: dropped, and counted.
    has_target = [any(t != sft.IGNORE for t in lab[1:]) for lab in tokenized["labels"]]
    kept = tokenized.select([i for i, ok in enumerate(has_target) if ok]).remove_columns("truncated")
    return Split(name=name, dataset=kept, rows=len(ds), truncated=truncated, where=where)


def _label_set(ds: datasets.Dataset, column: str) -> list[str]:
    values = {validate.label_of(v) for v in ds.unique(column)} - {None}
    # Integer labels sort numerically so that "10" comes after "9" and ids match the numbers.
    if all(v.lstrip("-").isdigit() for v in values):
        return sorted(values, key=int)
    return sorted(values)


def tokenize_split(name: str, ds: datasets.Dataset, section: DataSection, tokenizer: PreTrainedTokenizerBase,
                   labels: list[str], where: str, with_labels: bool = True) -> Split:
    first_line = sources.first_data_line(Path(where.split(" (")[0]), has_header=section.columns is None)
    _check_rows(ds, section, labels if with_labels else None, where, first_line)
    label_id = {name: i for i, name in enumerate(labels)}
    cols = [c for c in (section.text, section.text_pair) if c]

    # Language modelling: every sequence ends in EOS (one slot kept for it) so the model learns to stop.
    eos = [tokenizer.eos_token_id] if not with_labels and tokenizer.eos_token_id is not None else []
    room = section.max_length - len(eos)

    def encode(batch: dict) -> dict:
        texts = [batch[c] for c in cols]
        ids = tokenizer(*texts, truncation=True, max_length=room)["input_ids"]
        ids = [x + eos if eos and (not x or x[-1] != eos[0]) else x for x in ids]
        full = tokenizer(*texts, truncation=False)["input_ids"]
        out = {"input_ids": ids, "length": [len(x) for x in ids], "truncated": [len(f) > room for f in full]}
        if with_labels:
            out["labels"] = [label_id[validate.label_of(v)] for v in batch[section.label]]
        return out

    # `map` results are cached on disk by the fingerprint of data + function + tokenizer.
    tokenized = ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"tokenizing {name}")
    truncated = sum(tokenized["truncated"])
    tokenized = tokenized.remove_columns("truncated")
    return Split(name=name, dataset=tokenized, rows=len(ds), truncated=truncated, where=where)


def _check_rows(ds: datasets.Dataset, section: DataSection, labels: list[str] | None, where: str,
                first_line: int) -> None:
    """Empty texts and unknown labels are errors naming the file line; nothing is dropped silently.
    (Rows from `build` were checked already, with data.on_error; this guards direct callers.)"""
    strict = section.model_copy(update={"on_error": "raise"})
    report = validate.SplitReport("rows", where)
    validate.check(ds, strict, report, lm=labels is None, first_line=first_line)
    if labels is not None:
        validate.check(ds, strict, report, labels=labels, first_line=first_line)

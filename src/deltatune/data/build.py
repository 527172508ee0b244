"""Rows -> validated -> tokenized (cached by `datasets`) splits for a classification run."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from datasets.fingerprint import Hasher
from transformers import PreTrainedTokenizerBase

from deltatune import tasks
from deltatune.config import DataSection, is_lm
from deltatune.constants import IGNORE_INDEX
from deltatune.data import packing, preference, sft, sources, validate
from deltatune.data.columns import column, rows_of
from deltatune.data.validate import label_of  # by name: `map` hashes what `encode` uses, and the module holds a Console
from deltatune.errors import DataError

MAX_SHOWN = 5  # offending rows quoted in an error
# Text the vocabulary covers leaves almost no unknown tokens (a stray emoji or symbol); at 5% whole
# words are lost, usually a language or script the vocabulary lacks (the model then learns from noise).
UNK_WARN_PERCENT = 5.0


@dataclass
class Split:
    name: str
    dataset: datasets.Dataset  # columns: input_ids, attention_mask, labels, length
    rows: int
    truncated: int
    where: str
    unk_percent: float | None = None  # unknown tokens / text tokens; None: the tokenizer has no unknown token


@dataclass
class DataBundle:
    labels: list[str]
    train: Split
    validation: Split | None
    stats: dict = field(default_factory=dict)


def build(section: DataSection, tokenizer: PreTrainedTokenizerBase, labels: list[str] | None = None,
          task: str = "classification", min_rows: int = 1) -> DataBundle:
    """Read, validate, split, and tokenize. `labels` fixes the label set (e.g. from a saved run).

    classification: rows -> (input_ids, label id). causal_lm: rows -> input_ids ending in EOS, every
    token a target (the model learns to stop). A classification run needs 2 classes and at least
    `min_rows` training rows (pass train.batch_size: fewer rows than one batch is refused).
    """
    lm = is_lm(task)
    reports: list[validate.SplitReport] = []  # rows read / used / skipped, per split
    train_raw, train_where = _read(section, section.train, task, "train", reports)
    val_raw, val_where = None, None
    if isinstance(section.validation, str):
        val_raw, val_where = _read(section, section.validation, task, "validation", reports)
    split = None  # (rows held out, of rows) for a validation fraction: the first suspect when training is small
    if isinstance(section.validation, float):
        split = (math.ceil(section.validation * len(train_raw)), len(train_raw))  # as train_test_split counts
        if split[0] >= split[1]:
            _refuse_small(section, train_where, 0, [], split, reports[0], min_rows)
        parts = train_raw.train_test_split(test_size=section.validation, seed=section.seed)
        train_raw, val_raw = parts["train"], parts["test"]
        val_where = f"{train_where} ({section.validation:.0%} held out, seed {section.seed})"
        reports[0].held_out = len(val_raw)
        reports.append(validate.SplitReport("validation", val_where, reports[0].unit, read=len(val_raw)))

    derived = not (labels or section.labels)
    labels = [] if lm else labels or section.labels or _label_set(train_raw, section.label)
    if not lm:  # labels outside the set; validation classes that training never has
        train_raw = validate.check(train_raw, section, reports[0], labels=labels)
        classes = _label_set(train_raw, section.label)
        _refuse_small(section, train_where, len(train_raw), classes, split, reports[0], min_rows)
        if val_raw is not None:
            if split:
                _held_out_classes(section, train_where, reports[0].unit, val_raw, set(classes),
                                  None if derived else set(labels))
            val_raw = validate.check(val_raw, section, reports[1], labels=labels, train_labels=set(classes))
    stats: dict = {}
    if task == "sft":
        fmt = sft.detect_format(train_raw.column_names, section.format, train_where)
        template = sft.resolve_template(section.template, tokenizer)
        stats.update(format=fmt, template=template)
        train_raw = validate.check_sft(train_raw, section, reports[0], fmt)
        if val_raw is not None:
            val_raw = validate.check_sft(val_raw, section, reports[1], fmt)
    if task == "preference":
        template = sft.resolve_template(section.template, tokenizer)
        stats.update(template=template)
        train_raw, val_raw = (None if raw is None else _checked_pairs(raw, where, section, report)
                              for raw, where, report in zip((train_raw, val_raw), (train_where, val_where),
                                                            (*reports, None)))
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
    elif task == "preference":
        train, val = _tokenized_pairs(section, tokenizer, template, (train_raw, val_raw), (train_where, val_where),
                                      reports, stats)
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
        packed, stats["packing"] = packing.pack_dataset(train.dataset, section.max_length, section.seed)
        train = Split(name=train.name, dataset=packed, rows=train.rows, truncated=train.truncated, where=train.where)
    return DataBundle(labels=labels, train=train, validation=val, stats=stats)


def build_eval(section: DataSection, tokenizer: PreTrainedTokenizerBase, labels: list[str], task: str,
               file: str) -> tuple[Split, int]:
    """One file to score a saved run on, read, checked (data.on_error as the run had it) and tokenized as in
    training, each row validated once. Returns the split and the number of rows skipped."""
    if tasks.has_prompts(task):  # the same reading, checks and rendering as a training file
        one = section.model_copy(update={"train": file, "validation": None, "sample": None, "packing": False})
        bundle = build(one, tokenizer, task=task)
        return bundle.train, bundle.stats["train"]["rows_skipped"]
    reports: list[validate.SplitReport] = []
    raw, _ = _read(section, file, task, "eval", reports, where=file)
    if not is_lm(task):
        raw = validate.check(raw, section, reports[0], labels=labels)
    validate.report(reports, {}, section.max_length)
    split = tokenize_split("eval", raw, section, tokenizer, labels, file, with_labels=not is_lm(task))
    return split, len(reports[0].skipped)


def _refuse_small(section: DataSection, where: str, rows: int, classes: list[str], split: tuple[int, int] | None,
                  report: validate.SplitReport, min_rows: int) -> None:
    """A classifier trained on one class, or on fewer rows than one batch, reports perfect-looking
    metrics that mean nothing: refused, naming the cause (a validation fraction first)."""
    usable = min(rows, section.sample or rows)
    if len(classes) >= 2 and usable >= min_rows:
        return
    what = f"{rows} training row(s)" + (f" of class {classes[0]!r} only" if len(classes) == 1 else "")
    need = ("nothing to train on" if not rows else "a classifier needs at least 2 classes in training"
            if len(classes) < 2 else f"fewer than one batch (train.batch_size={min_rows})")
    if split:
        raise DataError(f"{where}: data.validation={section.validation} holds out {split[0]} of {split[1]} rows for "
                        f"validation, leaving {what}: {need}. The split is the cause, not the data. Fix: lower "
                        f"data.validation (e.g. 0.1), or give data.validation a file of its own.")
    if usable < rows:
        raise DataError(f"{where}: data.sample={section.sample} keeps fewer training rows than one batch "
                        f"(train.batch_size={min_rows}). Fix: raise data.sample, or lower train.batch_size.")
    skipped = f" ({len(report.skipped)} bad row(s) skipped, see above)" if report.skipped else ""
    fix = ("add rows of the other classes (and check that data.label names the label column)" if len(classes) < 2
           else f"add training rows, or lower train.batch_size to {rows} or less")
    raise DataError(f"{where}: {what}{skipped}: {need}. Fix: {fix}.")


def _held_out_classes(section: DataSection, where: str, unit: str, val: datasets.Dataset, train_classes: set[str],
                      label_set: set[str] | None) -> None:
    """A class whose every row the validation fraction took is the split's doing, not bad rows: skipping
    them (on_error=skip) would not help, so this is raised, naming the split. `label_set`: the classes
    the run has (data.labels); None when it comes from the training rows, where every class counts."""
    lines: dict[str, list[int]] = {}
    for v, line in zip(val[section.label], val[validate.LINE]):
        name = validate.label_of(v)
        if name is not None and name not in train_classes and (label_set is None or name in label_set):
            lines.setdefault(name, []).append(line)
    if not lines:
        return
    shown = "; ".join(f"{name!r} ({len(at)} row(s): {unit} {', '.join(map(str, at[:MAX_SHOWN]))}"
                      f"{', ...' if len(at) > MAX_SHOWN else ''})" for name, at in sorted(lines.items()))
    raise DataError(f"{where}: data.validation={section.validation} (seed {section.seed}) held out every row of "
                    f"{shown}, so training never sees these classes and cannot learn them. The split is the cause, "
                    f"not the labels. Fix: give these classes more rows, use another data.seed, or give "
                    f"data.validation a file of its own.")


def _read(section: DataSection, spec: str, task: str = "classification", name: str = "train",
          reports: list | None = None, where: str | None = None) -> tuple[datasets.Dataset, str]:
    """`where`: how errors name the file (default: its resolved path; `eval --data` keeps the user's spelling)."""
    lm = is_lm(task)
    ds, report = validate.read(spec, section, name, lm)  # bad lines raised or skipped, each row keeps its line
    where = where or report.where
    if not tasks.has_prompts(task):  # their columns are checked by format (sft) or as pairs (preference)
        sources.require_columns(ds, {"data.text": section.text, "data.text_pair": section.text_pair,
                                     "data.label": None if lm else section.label}, where)
        ds = validate.check(ds, section, report, lm)
    if reports is not None:
        reports.append(report)
    return ds, where


def _checked_pairs(raw: datasets.Dataset, where: str, section: DataSection, report: validate.SplitReport
                   ) -> datasets.Dataset:
    preference.require_columns(raw, where)
    return preference.check(raw, section, report)


def _tokenized_pairs(section: DataSection, tokenizer: PreTrainedTokenizerBase, template: str, raws: tuple,
                     wheres: tuple, reports: list[validate.SplitReport], stats: dict) -> tuple[Split, Split | None]:
    """Preference rows -> one row per pair (chosen and rejected sequences, answer-only labels), per split; what
    truncation did goes into `stats` and the split reports."""
    splits, by_side = [], {}
    for name, raw, where, report in zip(("train", "validation"), raws, wheres, (*reports, None)):
        if raw is None:
            splits.append(None)
            continue
        key = map_fingerprint(raw, tokenizer, "preference", template, section.max_length)
        kept, counts = preference.tokenize(raw, tokenizer, template, section.max_length, where, key, report.unit)
        report.no_target = counts.no_target
        by_side[report.name] = {"chosen": counts.truncated_chosen, "rejected": counts.truncated_rejected}
        splits.append(Split(name=name, dataset=kept, rows=counts.rows, truncated=counts.truncated_pairs, where=where))
    stats["truncated_by_side"] = by_side
    return splits[0], splits[1]


def tokenize_sft(name: str, ds: datasets.Dataset, section: DataSection, tokenizer: PreTrainedTokenizerBase,
                 where: str, fmt: str, template: str) -> Split:
    """Instruction rows -> input_ids + labels (response tokens only), plus the prompt and reference
    answer that generation-based evaluation uses."""
    sft.detect_format(ds.column_names, fmt, where)
    unk, markup = unknown_token(tokenizer)

    def encode(row: dict) -> dict:
        try:
            e = sft.encode(tokenizer, sft.to_messages(row, fmt), template, section.max_length)
        except ValueError as err:
            raise DataError(f"{where}: {err}") from None
        text = [t for t in e.input_ids if t not in markup]
        return {"input_ids": e.input_ids, "labels": e.labels, "length": len(e.input_ids),
                "prompt_ids": e.prompt_ids, "reference": e.reference, "truncated": e.truncated,
                "unk": text.count(unk), "text_tokens": len(text)}

    tokenized = ds.map(encode, remove_columns=ds.column_names, desc=f"tokenizing {name}",
                       new_fingerprint=map_fingerprint(ds, tokenizer, "sft", fmt, template, section.max_length))
    truncated = int(column(tokenized, "truncated").sum())
    unk_percent = _unknown_share(name, where, tokenizer, unk, tokenized)
    # A row cut so short that none of its response is left carries no loss: dropped, and counted.
    has_target = [any(t != IGNORE_INDEX for t in lab[1:]) for lab in rows_of(tokenized, "labels")]
    kept = tokenized.select([i for i, ok in enumerate(has_target) if ok])
    kept = kept.remove_columns(["truncated", "unk", "text_tokens"])
    return Split(name=name, dataset=kept, rows=len(ds), truncated=truncated, where=where, unk_percent=unk_percent)


def _label_set(ds: datasets.Dataset, column: str) -> list[str]:
    values = {validate.label_of(v) for v in ds.unique(column)} - {None}
    # Integer labels sort numerically so that "10" comes after "9" and ids match the numbers.
    if all(v.lstrip("-").isdigit() for v in values):
        return sorted(values, key=int)
    return sorted(values)


def tokenize_split(name: str, ds: datasets.Dataset, section: DataSection, tokenizer: PreTrainedTokenizerBase,
                   labels: list[str], where: str, with_labels: bool = True) -> Split:
    """Validated rows (from `build` or `build_eval`, which checked them with data.on_error) -> token ids."""
    label_id = {name: i for i, name in enumerate(labels)}
    cols = [c for c in (section.text, section.text_pair) if c]

    # Language modelling: every sequence ends in EOS (one slot kept for it) so the model learns to stop.
    eos = [tokenizer.eos_token_id] if not with_labels and tokenizer.eos_token_id is not None else []
    room = section.max_length - len(eos)
    unk, markup = unknown_token(tokenizer)

    def encode(batch: dict) -> dict:
        texts = [batch[c] for c in cols]
        full = tokenizer(*texts, truncation=False)["input_ids"]
        # Tokenized once: only rows longer than `room` are tokenized again, with truncation (for the rest
        # truncation changes nothing); the untruncated ids count what truncation drops and unknown tokens.
        ids = list(full)
        long = [i for i, f in enumerate(full) if len(f) > room]
        if long:
            cut = tokenizer(*[[t[i] for i in long] for t in texts], truncation=True, max_length=room)["input_ids"]
            for i, x in zip(long, cut, strict=True):
                ids[i] = x
        ids = [x + eos if eos and (not x or x[-1] != eos[0]) else x for x in ids]
        text = [[t for t in f if t not in markup] for f in full]
        out = {"input_ids": ids, "length": [len(x) for x in ids], "truncated": [len(f) > room for f in full],
               "unk": [x.count(unk) for x in text], "text_tokens": [len(x) for x in text]}
        if with_labels:
            out["labels"] = [label_id[label_of(v)] for v in batch[section.label]]
        return out

    # `map` results are cached on disk by the fingerprint of data + tokenizer + settings + code.
    key = map_fingerprint(ds, tokenizer, cols, section.label if with_labels else None, labels, room, eos)
    tokenized = ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"tokenizing {name}",
                       new_fingerprint=key)
    truncated = int(column(tokenized, "truncated").sum())
    unk_percent = _unknown_share(name, where, tokenizer, unk, tokenized)
    tokenized = tokenized.remove_columns(["truncated", "unk", "text_tokens"])
    return Split(name=name, dataset=tokenized, rows=len(ds), truncated=truncated, where=where,
                 unk_percent=unk_percent)


def map_fingerprint(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, *settings: object) -> str:
    """The cache key of a tokenizing `map`, computed without pickling the tokenizer. By default datasets
    hashes the mapped function with everything it references; dill-pickling the tokenizer took 0.25 s per
    split for MiniLM's (more for larger vocabularies), paid on every run, cache hit or not. What decides
    the result: the rows (their fingerprint), the tokenizer, `settings` (the columns, labels, lengths the
    function reads) and this package's data code, so that an edit to it never reuses stale tokens."""
    return Hasher.hash([ds._fingerprint, tokenizer_fingerprint(tokenizer), [repr(s) for s in settings],
                        _data_code()])


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Everything that decides a fast tokenizer's output: its full definition (the `tokenizers` JSON: vocabulary,
    normalizer, pre-tokenizer, post-processor, added tokens), the chat template, its Python-side settings
    and special tokens, and the library versions. A slow (Python) tokenizer gets datasets' full hash."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return Hasher.hash(tokenizer)
    import tokenizers
    import transformers

    definition = backend.to_str()
    # The JSON opens with the truncation and padding that the last call left set (transformers sets both on
    # every call, so they never carry over): left out, or a run with long rows would never hit its cache.
    definition = definition[max(definition.find('"added_tokens":'), 0):]
    settings = sorted((k, repr(v)) for k, v in tokenizer.init_kwargs.items())
    return Hasher.hash([type(tokenizer).__name__, definition, getattr(tokenizer, "chat_template", None),
                        settings, repr(tokenizer.special_tokens_map), tokenizer.padding_side,
                        tokenizer.truncation_side, tokenizer.model_max_length, transformers.__version__,
                        tokenizers.__version__])


@functools.cache
def _data_code() -> str:
    """The source of the modules whose code the tokenizing functions run."""
    return Hasher.hash([Path(m.__file__).read_bytes() for m in (validate, sft, preference)] +
                       [Path(__file__).read_bytes()])


def unknown_token(tokenizer: PreTrainedTokenizerBase) -> tuple[int | None, frozenset[int]]:
    """The unknown token's id, and the ids that are markup rather than text ([CLS], [SEP], ...).
    None where unknown tokens cannot occur or be told apart: byte-level BPE (GPT-2, LLaMA 3) encodes
    any text, and GPT-2's `unk_token` is its end-of-text token."""
    unk = tokenizer.unk_token_id
    if unk is None or unk in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        return None, frozenset()
    return unk, frozenset(tokenizer.all_special_ids) - {unk}


def _unknown_share(name: str, where: str, tokenizer: PreTrainedTokenizerBase, unk: int | None,
                   tokenized: datasets.Dataset) -> float | None:
    """Percent of a split's text tokens that became the unknown token; warned about above UNK_WARN_PERCENT."""
    if unk is None:
        return None
    n_unk, n_text = int(column(tokenized, "unk").sum()), int(column(tokenized, "text_tokens").sum())
    percent = round(100 * n_unk / max(n_text, 1), 2)
    if percent > UNK_WARN_PERCENT:
        validate.console.print(
            f"[yellow]warning:[/] {percent:.1f}% of the tokens of the {name} data ({where}) are unknown to the "
            f"tokenizer ({n_unk:,} of {n_text:,} became {tokenizer.unk_token}): the model cannot read that text, "
            f"usually a language or script its vocabulary does not cover. Fix: use a model whose vocabulary covers "
            f"the language of your data (e.g. a multilingual model such as bert-base-multilingual-cased or "
            f"xlm-roberta-base).", highlight=False, soft_wrap=True)
    return percent

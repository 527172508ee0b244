"""Bad rows: found, named (file, line, column, problem), and either raised or skipped and counted.

Two passes:
1. Before `datasets` reads a text file, each line is checked for what would break or silently bend
   the reader: bytes that are not UTF-8, lines that are not a JSON object, rows with missing or extra
   columns (against the CSV header, or the columns most JSON lines have), text that is not a string.
   Under `data.on_error: skip` the good lines are copied to a cleaned file that `datasets` reads.
2. On the loaded rows: missing or empty (whitespace-only) text, text over `data.max_chars`, missing
   labels, labels outside the label set, validation classes that training never has, duplicate ids,
   labels that differ from a more common one only by case, a label column mixing numbers and names.

Labels are compared without surrounding whitespace (`label_of`): "pos " and "pos" are one class. A
UTF-8 byte-order mark (Excel's "CSV UTF-8") is not part of the first line.

Every row keeps its file line (column `__line__`) through splits, so messages point at the file.
For each split, rows read = rows used + rows skipped (+ rows held out for a validation fraction).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from datasets.fingerprint import Hasher
from rich.console import Console

from deltatune.data import sources
from deltatune.errors import DataError

MAX_SHOWN = 5  # offending rows quoted in an error, and kept as a sample in summary.json
LINE = "__line__"
console = Console(stderr=True)

# A few labels of the other kind (numbers among names) are strays to drop under on_error: skip; more
# than this share means two encodings of the same classes (e.g. two merged sources), not strays.
MIXED_SKIP_SHARE = 0.10

# kind -> (how a message describes rows of this kind, how to fix them)
KINDS = {
    "not UTF-8": ("that are not valid UTF-8", "re-save the file as UTF-8"),
    "malformed JSON": ("that are not a valid JSON object", "fix these lines (one JSON object per line)"),
    "columns": ("with missing or extra columns", "give every row the same columns"),
    "unclosed quote": ("with a quote that is never closed",
                       "close the quote (or escape it by doubling it: \"\"); this cannot be skipped, since "
                       "every later line was read into one field"),
    "missing value": ("with a missing value", "fill these values, or remove the rows"),
    "not text": ("whose text is not a string", "make the text column hold strings"),
    "empty text": ("with empty text", "remove or fill these rows"),
    "over-long": ("longer than data.max_chars", "check these rows (a broken quote or a missing line break can merge "
                                                "many rows into one), or raise data.max_chars"),
    "not an sft example": ("that are not a usable instruction/chat example",
                            "give every row a non-empty instruction and output, or `messages` turns with "
                            "`role` and `content` and at least one assistant turn"),
    "duplicate id": ("with a duplicate id", "give every row its own id, or remove the duplicates"),
    "unknown label": ("with a label not in the label set",
                      "correct these labels, or list every label in `data.labels`"),
    "class missing from training": ("whose label never occurs in the training data",
                                    "add training rows with these labels, or remove them from the validation data "
                                    "(a model cannot learn a class it never sees)"),
    "label case": ("whose label differs from a more common label only in upper/lower case",
                   "spell each label one way (labels are case-sensitive: `Pos` and `pos` would be two classes); "
                   "skipping drops the less common spelling"),
    "mixed labels": ("whose kind of label differs from most rows (a name among numbers, or the reverse)",
                     "write every label the same way, all names (e.g. neg, pos) or all numbers (e.g. 0, 1): in a "
                     "mixed column `1` and `pos` are two different classes; skipping drops the less common kind"),
    "mixed label kinds": ("in a label column that mixes numbers and names, too many to drop",
                          "map one kind onto the other in the file (e.g. 0 -> neg, 1 -> pos), so that each class has "
                          f"one label; this cannot be skipped: more than {MIXED_SKIP_SHARE:.0%} of the rows would be "
                          f"lost, and only you know which number means which name"),
}
FATAL = {"unclosed quote", "mixed label kinds"}  # raised even under on_error: skip
NUMBER = re.compile(r"[-+]?\d+(\.\d+)?")
KIND_WORDS = {"number": ("a number", "numbers"), "name": ("a name", "names"),
              "quoted number": ("a number in quotes", "numbers in quotes"), "true/false": ("true/false", "true/false")}


@dataclass
class Problem:
    where: str  # "line 4", "lines 4-9", "row 3"
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.where}: {self.detail}"


@dataclass
class SplitReport:
    name: str
    where: str
    unit: str = "line"  # "row" where the file has no lines (parquet, JSON arrays)
    read: int = 0
    held_out: int = 0
    skipped: list[Problem] = field(default_factory=list)
    not_sampled: int = 0  # good rows left out by data.sample
    no_target: int = 0  # sft rows whose whole response was cut by data.max_length (no loss left)

    @property
    def used(self) -> int:
        return self.read - len(self.skipped) - self.held_out - self.not_sampled - self.no_target

    def as_dict(self) -> dict:
        out = {"file": self.where, "rows_read": self.read, "rows_used": self.used, "rows_skipped": len(self.skipped)}
        for key, n in (("rows_held_out", self.held_out), ("rows_not_sampled", self.not_sampled),
                       ("rows_without_target", self.no_target)):
            if n:
                out[key] = n
        out["skipped_by_problem"] = dict(Counter(p.kind for p in self.skipped))
        out["skipped_sample"] = [str(p) for p in self.skipped[:MAX_SHOWN]]
        return out


def _raise(where: str, problems: list[Problem], extra: dict[str, str] | None = None) -> None:
    blocks = []
    for kind, _ in Counter(p.kind for p in problems).most_common():
        rows = [p for p in problems if p.kind == kind]
        phrase, fix = KINDS[kind]
        shown = "\n    ".join(str(p) for p in rows[:MAX_SHOWN])
        more = f"\n    (and {len(rows) - MAX_SHOWN} more)" if len(rows) > MAX_SHOWN else ""
        blocks.append(f"{where}: {len(rows)} row(s) {phrase}{(extra or {}).get(kind, '')}:\n    "
                      f"{shown}{more}\n  Fix: {fix}.")
    tail = ("" if any(p.kind in FATAL for p in problems) else
            "\n  Or set data.on_error=skip to drop bad rows (counted and sampled in the log and summary.json).")
    raise DataError("\n".join(blocks) + tail)


# ---------------------------------------------------------------------------------------------
# Labels


def label_of(value) -> str | None:
    """A label as the label set holds it: surrounding whitespace is not part of it ("pos " is "pos");
    a missing or blank label is None."""
    if value is None:
        return None
    text = value.strip() if isinstance(value, str) else str(value)
    return text or None


def label_kind(value, json_types: bool = False) -> str:
    """How a label is written: a number or a name. In a JSON line the type counts too, since `datasets`
    cannot hold 1 and "1" (or true) in one column."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "number"
    if NUMBER.fullmatch(str(value).strip()):
        return "quoted number" if json_types else "number"
    return "name"


def mixed_labels(rows: list[tuple[int, int, object]], unit: str, json_types: bool = False) -> dict[int, Problem]:
    """Rows (key, line, label) whose kind of label is not the most common kind, by key. A few are strays
    (skippable); more than MIXED_SKIP_SHARE are a second encoding of the classes (never skipped)."""
    kinds = [label_kind(v, json_types) for _, _, v in rows]
    counts = Counter(kinds)
    if len(counts) < 2:
        return {}
    major, n_major = counts.most_common(1)[0]
    first = next(line for (_, line, _), k in zip(rows, kinds) if k == major)
    seen = sorted({label_of(v) for (_, _, v), k in zip(rows, kinds) if k == major}, key=str)
    examples = ", ".join(repr(v) for v in seen[:3]) + (", ..." if len(seen) > 3 else "")
    kind = "mixed label kinds" if len(rows) - n_major > MIXED_SKIP_SHARE * len(rows) else "mixed labels"
    return {key: Problem(f"{unit} {line}", kind, f"label {v!r} is {KIND_WORDS[k][0]}, where {n_major} of "
                                                 f"{len(rows)} labels are {KIND_WORDS[major][1]} ({examples}; "
                                                 f"first: {unit} {first})")
            for (key, line, v), k in zip(rows, kinds) if k != major}


def case_clashes(rows: list[tuple[int, int, str]], unit: str) -> dict[int, Problem]:
    """Rows (key, line, label) spelled differently from a more common label only by case, by key."""
    count = Counter(label for _, _, label in rows)
    first: dict[str, int] = {}
    for _, line, label in rows:
        first.setdefault(label, line)
    groups: dict[str, list[str]] = {}
    for label, _ in count.most_common():
        groups.setdefault(label.casefold(), []).append(label)
    main = {other: group[0] for group in groups.values() for other in group[1:]}  # spelling -> most common
    return {key: Problem(f"{unit} {line}", "label case", f"label {label!r}, where {count[main[label]]} rows spell it "
                                                         f"{main[label]!r} (first: {unit} {first[main[label]]})")
            for key, line, label in rows if label in main}


# ---------------------------------------------------------------------------------------------
# Pass 1: the file, line by line


@dataclass
class Scan:
    """What pass 1 found. Files are streamed line by line, never held in memory whole."""
    good: list[tuple[int, int]]  # (first line, last line) of each good row
    problems: list[Problem]
    header_lines: int = 0  # leading lines (a CSV header) that a cleaned copy keeps


def _utf8(raw: bytes, n: int) -> tuple[str, Problem | None]:
    if n == 1:
        raw = raw.removeprefix(codecs.BOM_UTF8)  # Excel's "CSV UTF-8": a byte-order mark, not text
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return raw.decode("utf-8", errors="replace"), Problem(
            f"line {n}", "not UTF-8", f"byte 0x{raw[e.start]:02x} at column {e.start + 1} is not valid UTF-8")


def scan_jsonl(path: Path, text_cols: list[str], label: str | None) -> Scan:
    rows: list[tuple[int, int]] = []  # (line, id of its key set)
    label_at: dict[int, object] = {}  # line -> its label, for labels of mixed kinds (1 and "pos")
    keysets: dict[frozenset, int] = {}
    problems: list[Problem] = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue  # blank lines are not rows (datasets skips them too)
            text, bad = _utf8(raw.rstrip(b"\r\n"), n)
            if bad:
                problems.append(bad)
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                problems.append(Problem(f"line {n}", "malformed JSON", f"not valid JSON at column {e.colno}: {e.msg}"))
                continue
            if not isinstance(obj, dict):
                problems.append(Problem(f"line {n}", "malformed JSON", f"a JSON {type(obj).__name__}, where an "
                                                                       f"object {{\"column\": value, ...}} belongs"))
                continue
            wrong = [c for c in text_cols if obj.get(c) is not None and not isinstance(obj[c], str)]
            if wrong:
                v = obj[wrong[0]]
                problems.append(Problem(f"line {n}", "not text", f"`{wrong[0]}` holds {json.dumps(v)[:60]} "
                                                                 f"({type(v).__name__}), not a string"))
                continue
            if label and isinstance(obj.get(label), (list, dict)):
                problems.append(Problem(f"line {n}", "not text", f"`{label}` holds a {type(obj[label]).__name__}, "
                                                                 f"not a single label"))
                continue
            rows.append((n, keysets.setdefault(frozenset(obj), len(keysets))))
            if label and label_of(obj.get(label)) is not None:
                label_at[n] = obj[label]
    # The schema is what most lines have; a line with other keys has missing or extra columns.
    common = Counter(k for _, k in rows).most_common(1)[0][0] if rows else -1
    by_id = {i: keys for keys, i in keysets.items()}
    schema = by_id.get(common, frozenset())
    good = []
    for n, k in rows:
        if k == common:
            good.append((n, n))
            continue
        keys = by_id[k]
        missing, extra = sorted(schema - keys), sorted(keys - schema)
        parts = ([f"missing column(s) {', '.join(f'`{c}`' for c in missing)}"] if missing else []) + \
                ([f"extra column(s) {', '.join(f'`{c}`' for c in extra)}"] if extra else [])
        have = ", ".join(sorted(schema))
        problems.append(Problem(f"line {n}", "columns", "; ".join(parts) + f" (most lines have: {have})"))
    # `datasets` cannot hold 1 and "pos" in one column (it fails, or makes them two classes): found here.
    mixed = mixed_labels([(n, n, label_at[n]) for n, _ in good if n in label_at], "line", json_types=True)
    if mixed:
        good = [g for g in good if g[0] not in mixed]
        problems += mixed.values()
    problems.sort(key=lambda p: int(p.where.split()[1]))
    return Scan(good, problems)


def scan_csv(path: Path, tsv: bool, columns: list[str] | None) -> Scan:
    bad_lines: dict[int, Problem] = {}
    total = [0]

    def lines():
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                total[0] = n
                text, bad = _utf8(raw, n)
                if bad:
                    bad_lines[n] = bad
                yield text

    limit = csv.field_size_limit()
    csv.field_size_limit(sys.maxsize)  # a huge field is reported (over-long / unclosed quote), not a crash
    source = lines()
    reader = csv.reader(source, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else csv.reader(source)
    try:
        header: list[str] | None = columns
        if header is None:
            header = next(reader, [])
            if 1 in bad_lines:
                raise DataError(f"{path}: the header line is not valid UTF-8 ({bad_lines[1].detail}). "
                                f"Fix: re-save the file as UTF-8.")
        header_lines = reader.line_num if columns is None else 0
        good, problems, end = [], [], reader.line_num
        open_quote: tuple[int, int, int] | None = None
        for record in reader:
            start, end = end + 1, reader.line_num
            if not any(f.strip() for f in record) and start == end and len(record) <= 1:
                continue  # a blank line: not a row (pandas skips these)
            span = f"line {start}" if start == end else f"lines {start}-{end}"
            bad = [bad_lines[i] for i in range(start, end + 1) if i in bad_lines]
            if bad:
                problems.append(Problem(bad[0].where, "not UTF-8", bad[0].detail))
            elif len(record) != len(header):
                what = "missing" if len(record) < len(header) else "extra"
                problems.append(Problem(span, "columns", f"{len(record)} field(s) where the header has "
                                                         f"{len(header)} ({', '.join(header)}): {what} column(s)"))
                if not tsv and end > start and any("\n" in f for f in record):
                    open_quote = (len(problems) - 1, start, end)
            else:
                good.append((start, end))
        # A quote that never closes swallows every later line into one field, up to the end of the file.
        if open_quote and open_quote[2] == end == total[0]:
            i, start, end = open_quote
            why = f"a quote opened on line {start} never closes, so lines {start}-{end} read as one row"
            problems[i] = Problem(f"lines {start}-{end}", "unclosed quote", why)
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: cannot be read as {'TSV' if tsv else 'CSV'}: {e}") from None
    finally:
        csv.field_size_limit(limit)
    return Scan(good, problems, header_lines)


def _cleaned_copy(path: Path, scan: Scan) -> Path:
    """The file without its bad rows (streamed), where `datasets` can read (and cache) it."""
    folder = Path(datasets.config.HF_DATASETS_CACHE) / "deltatune-clean"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    h = hashlib.sha256()
    ranges = iter(scan.good)
    current = next(ranges, None)
    with open(path, "rb") as src, open(tmp, "wb") as out:
        for n, raw in enumerate(src, 1):
            while current is not None and current[1] < n:
                current = next(ranges, None)
            if n <= scan.header_lines or (current is not None and current[0] <= n <= current[1]):
                if n == 1:
                    raw = raw.removeprefix(codecs.BOM_UTF8)
                if not raw.endswith((b"\n", b"\r")):
                    raw += b"\n"
                out.write(raw)
                h.update(raw)
    target = folder / f"{h.hexdigest()[:16]}-{path.name}"
    os.replace(tmp, target)
    return target


def read(spec: str, section, name: str, lm: bool = False) -> tuple[datasets.Dataset, SplitReport]:
    """Read one file through `datasets`, with its bad lines raised or skipped; rows carry their line."""
    path = sources.resolve_path(spec)
    report = SplitReport(name, str(path))
    suffix = path.suffix.lower()
    if suffix in sources.FORMATS and path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty. Fix: point data.{name} at a file with rows.")
    text_cols = [c for c in (section.text, section.text_pair) if c]
    scan = None
    with open(path, "rb") as f:
        json_array = f.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()[:1] == b"["
    if suffix in (".jsonl", ".json") and not json_array:
        scan = scan_jsonl(path, text_cols, None if lm else section.label)
    elif sources.FORMATS.get(suffix) == "csv":
        scan = scan_csv(path, suffix == ".tsv", section.columns)
    source: str | Path = spec
    if scan is not None:
        report.read = len(scan.good) + len(scan.problems)
        if report.read == 0:
            only = "a header" if scan.header_lines else "blank lines"
            raise DataError(f"{path}: no rows (the file holds only {only}). "
                            f"Fix: point data.{name} at a file with rows.")
        if scan.problems:
            if section.on_error == "raise" or any(p.kind in FATAL for p in scan.problems):
                _raise(str(path), scan.problems)
            report.skipped += scan.problems
            if not scan.good:
                raise DataError(f"{path}: all {report.read} rows are bad (first: {scan.problems[0]}). "
                                f"Fix: {KINDS[scan.problems[0].kind][1]}.")
            source = str(_cleaned_copy(path, scan))
    ds = sources.read(str(source), section.columns)
    if scan is not None:
        if len(ds) != len(scan.good):  # never expected; a wrong line number would be worse than stopping
            raise DataError(f"{path}: read {len(ds)} rows but found {len(scan.good)} in the file; cannot point at "
                            f"lines reliably. Please report this with the file.")
        lines = [a for a, _ in scan.good]
    else:
        report.unit, report.read = "row", len(ds)
        lines = list(range(1, len(ds) + 1))
    # The fingerprint from the line numbers' bytes: datasets would pickle the list (0.1 s per 60k rows).
    key = Hasher.hash([ds._fingerprint, LINE, np.asarray(lines, dtype=np.int64).tobytes()])
    return ds.add_column(LINE, lines, new_fingerprint=key), report


# ---------------------------------------------------------------------------------------------
# Pass 2: the loaded rows


def check(ds: datasets.Dataset, section, report: SplitReport, lm: bool = False, labels: list[str] | None = None,
          train_labels: set[str] | None = None, first_line: int = 1) -> datasets.Dataset:
    """Rows' values. With `labels`: labels only (outside the set; never in `train_labels`)."""
    text_cols = [c for c in (section.text, section.text_pair) if c]
    id_col = section.id or ("id" if "id" in ds.column_names else None)
    label = None if lm else section.label
    cols = [label] if labels is not None else text_cols + ([label] if label else []) + ([id_col] if id_col else [])
    cols = [c for c in dict.fromkeys(cols) if c in ds.column_names]
    if labels is None and id_col and id_col not in ds.column_names:
        raise DataError(f"{report.where}: no id column `{id_col}` (set by `data.id`); columns are: "
                        f"{', '.join(c for c in ds.column_names if c != LINE)}")
    table = ds.select_columns(cols + ([LINE] if LINE in ds.column_names else []))[:]
    lines = table[LINE] if LINE in table else range(first_line, first_line + len(ds))
    max_chars = section.max_chars or 1000 * section.max_length
    allowed = set(labels) if labels is not None else None
    folded = {name.casefold(): name for name in labels or []}
    problems: dict[int, Problem] = {}
    seen: dict[str, int] = {}

    def bad(i: int, kind: str, detail: str) -> None:
        problems.setdefault(i, Problem(f"{report.unit} {lines[i]}", kind, detail))

    for i in range(len(ds)):
        if allowed is not None:
            v = label_of(table[label][i])
            if v is None:
                bad(i, "missing value", f"`{label}` is missing")
            elif v not in allowed:
                same = folded.get(v.casefold())
                bad(i, "unknown label", f"label {v!r}" + (f" (the label set has {same!r}; labels are case-sensitive)"
                                                          if same else " (no training row has it)"
                                                          if train_labels is not None else ""))
            elif train_labels is not None and v not in train_labels:
                bad(i, "class missing from training", f"label {v!r}")
            continue
        for c in text_cols:
            v = table[c][i]
            if v is None:
                bad(i, "missing value", f"`{c}` is missing")
            elif not isinstance(v, str):
                bad(i, "not text", f"`{c}` holds {str(v)[:60]!r} ({type(v).__name__}), not a string")
            elif not v.strip():
                bad(i, "empty text", f"`{c}` is empty")
            elif len(v) > max_chars:
                bad(i, "over-long", f"`{c}` has {len(v):,} characters (data.max_chars={max_chars:,})")
        if label and label_of(table[label][i]) is None:
            bad(i, "missing value", f"`{label}` is missing")
        if id_col:
            v = table[id_col][i]
            if v is None:
                bad(i, "missing value", f"`{id_col}` is missing")
            elif str(v) in seen:
                bad(i, "duplicate id", f"id {str(v)!r} again (first at {report.unit} {seen[str(v)]})")
            else:
                seen[str(v)] = lines[i]
    if labels is None and label:  # the label column as a whole: one kind of label, one spelling per class
        given = [(i, lines[i], table[label][i]) for i in range(len(ds))
                 if i not in problems and label_of(table[label][i]) is not None]
        for i, p in mixed_labels(given, report.unit).items():
            problems[i] = p
        given = [(i, n, label_of(v)) for i, n, v in given if i not in problems]
        problems.update(case_clashes(given, report.unit))
    if not problems:
        return ds
    found = [problems[i] for i in sorted(problems)]
    if section.on_error == "raise" or any(p.kind in FATAL for p in found):
        missing = sorted({p.detail.removeprefix("label ") for p in found if p.kind == "class missing from training"})
        _raise(report.where, found, {"unknown label": f" {labels}",
                                     "class missing from training": f" ({', '.join(missing)})"})
    report.skipped += found
    if len(problems) == len(ds):
        raise DataError(f"{report.where}: every one of its {len(ds)} rows is bad (first: {found[0]}). "
                        f"Fix: {KINDS[found[0].kind][1]}.")
    return ds.select([i for i in range(len(ds)) if i not in problems])


def check_sft(ds: datasets.Dataset, section, report: SplitReport, fmt: str) -> datasets.Dataset:
    """sft rows that are not a usable example, raised or skipped like every other bad row."""
    from deltatune.data import sft

    rows = ds.to_list()
    found = sft.row_problems(rows, fmt)
    if not found:
        return ds
    problems = [Problem(f"{report.unit} {rows[i].get(LINE, i + 1)}", "not an sft example", detail)
                for i, detail in found]
    if section.on_error == "raise":
        _raise(report.where, problems)
    report.skipped += problems
    if len(found) == len(ds):
        raise DataError(f"{report.where}: every one of its {len(ds)} rows is bad (first: {problems[0]}). "
                        f"Fix: {KINDS[problems[0].kind][1]}.")
    bad = {i for i, _ in found}
    return ds.select([i for i in range(len(ds)) if i not in bad])


# ---------------------------------------------------------------------------------------------
# Reporting


def report(reports: list[SplitReport], splits: dict, max_length: int) -> dict:
    """The `data` section of summary.json (per split), and a warning line for every skip or heavy truncation."""
    out: dict = {}
    for r in reports:
        split = splits.get(r.name)
        # The promise: rows read = rows used + every row left out, each for a counted reason.
        if split is not None and r.used != len(split.dataset):
            raise AssertionError(f"row accounting broken for {r.name}: {r.as_dict()} but {len(split.dataset)} "
                                 f"rows are used")
        out[r.name] = d = r.as_dict()
        if r.skipped:
            kinds = ", ".join(f"{k}: {n}" for k, n in Counter(p.kind for p in r.skipped).most_common())
            console.print(f"[yellow]warning:[/] data.{r.name}: skipped {len(r.skipped)} of {r.read} rows in "
                          f"{r.where} ({kinds}); first: {r.skipped[0]}", highlight=False, soft_wrap=True)
        if r.no_target:
            console.print(f"[yellow]warning:[/] data.{r.name}: {r.no_target} row(s) lost their whole response to "
                          f"data.max_length and carry no loss; left out. Fix: raise data.max_length.",
                          highlight=False, soft_wrap=True)
        if split is not None:
            d["truncated"] = split.truncated
            d["truncated_percent"] = round(100 * split.truncated / max(split.rows, 1), 2)
            d["unk_percent"] = split.unk_percent  # None (null): the tokenizer has no unknown token
            if split.rows and split.truncated / split.rows >= 0.10:
                console.print(f"[yellow]warning:[/] {d['truncated_percent']:.0f}% of {r.name} rows "
                              f"({split.truncated:,} of {split.rows:,}) are longer than data.max_length="
                              f"{max_length} tokens and were cut. Fix: raise data.max_length if the cut text "
                              f"matters.", highlight=False, soft_wrap=True)
    return out

"""Read rows from files (CSV, TSV, JSONL, Parquet) or built-ins through the `datasets` library."""

from __future__ import annotations

import codecs
import csv
from pathlib import Path

import datasets

from deltatune.data import builtin
from deltatune.errors import ConfigError, DataError, did_you_mean

datasets.disable_progress_bars()

FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


def resolve_path(spec: str) -> Path:
    if spec.startswith("builtin:"):
        return builtin.resolve(spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"data file not found: {spec}")
    return path


def read(spec: str, columns: list[str] | None = None) -> datasets.Dataset:
    """Load one file as a Dataset. `columns` names the columns of a header-less CSV/TSV file."""
    path = resolve_path(spec)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"{path}: unsupported file type `{path.suffix}`; use one of {', '.join(FORMATS)}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    # Excel's "CSV UTF-8" (and some editors) start the file with a byte-order mark: not part of the first
    # column's name or the first line's text.
    kwargs: dict = {"encoding": "utf-8-sig"} if fmt != "parquet" and has_bom(path) else {}
    if fmt == "csv":
        tsv = path.suffix.lower() == ".tsv"
        # Quotes in TSV text are literal characters (SST-2 has many), not field delimiters.
        kwargs.update({"sep": "\t", "quoting": csv.QUOTE_NONE} if tsv else {})
        names = columns or _header(path, tsv)
        if columns:
            kwargs.update(header=None, names=columns)
        # Every column as a string: a label column of "1"/"0" must not turn into floats with NaN.
        kwargs.update(keep_default_na=False,
                      features=datasets.Features({n: datasets.Value("string") for n in names}))
    try:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
        if fmt == "text":  # plain text: one row per non-blank line, in a column named `text`
            ds = ds.filter(lambda row: bool(row["text"].strip()))
    except Exception as e:  # datasets wraps parser errors in several types; all mean "cannot read"
        cause = e.__cause__ or e
        raise DataError(f"{path}: cannot read as {fmt}: {type(cause).__name__}: {cause}") from None
    if len(ds) == 0:
        raise DataError(f"{path}: no rows")
    return ds


def has_bom(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8


def _header(path: Path, tsv: bool) -> list[str]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else csv.reader(f)
        return next(reader, [])


def require_columns(ds: datasets.Dataset, names: dict[str, str | None], where: str) -> None:
    """Each config key (e.g. data.text) must name an existing column."""
    have = [c for c in ds.column_names if not c.startswith("__")]  # not our own bookkeeping (`__line__`)
    for key, col in names.items():
        if col is not None and col not in have:
            raise DataError(
                f"{where}: no column `{col}` (set by `{key}`){did_you_mean(col, have)}; "
                f"columns are: {', '.join(have)}"
            )

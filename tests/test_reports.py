"""deltatune report and the comparison page: self-contained HTML (parsed), markdown, and a real browser."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.conftest import sft_rows, write_jsonl

RUN_SECTIONS = ["overview", "curves", "evaluation", "throughput", "predictions", "parameters", "data", "forgetting",
                "setup", "config"]
COMPARE_SECTIONS = ["table", "params", "memory", "loss", "lr"]


def _train(out: Path, **overrides) -> Path:
    from deltatune import api, config

    base = {"train.epochs": 2, "train.batch_size": 16, "train.lr": 3e-3, "train.precision": "fp32",
            "train.log_every": 4, "train.threads": 2, "output.dir": str(out), "output.overwrite": True,
            "method.name": "lora"}
    base.update(overrides)
    api.train(config.load(None, [f"{k}={v}" for k, v in base.items()]))
    return out


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory, tiny_bert, toy_data) -> Path:
    return _train(tmp_path_factory.mktemp("cls") / "run", **{"model.name": tiny_bert, "data.train": toy_data["train"],
                                                              "data.validation": toy_data["validation"]})


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_chat_llama) -> Path:
    d = tmp_path_factory.mktemp("sft")
    return _train(d / "run", **{"model.name": tiny_chat_llama, "task": "sft", "train.epochs": 1,
                                "data.train": write_jsonl(d / "train.jsonl", sft_rows(96, 1)),
                                "data.validation": write_jsonl(d / "val.jsonl", sft_rows(24, 2)),
                                "eval.forgetting_rows": 8})


class Page(HTMLParser):
    """Every tag with its attributes, the section ids and the visible text of a page."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def ids(self, tag: str) -> list[str]:
        return [a.get("id") for t, a in self.tags if t == tag]

    def images(self) -> list[str]:
        return [a.get("src", "") for t, a in self.tags if t == "img"]


def assert_self_contained(page: Page) -> None:
    assert page.images() and all(src.startswith("data:image/png;base64,") for src in page.images())
    assert not [t for t, a in page.tags if t in ("script", "link", "iframe", "object", "embed")]
    for tag, attrs in page.tags:
        for name in ("src", "href"):
            value = attrs.get(name) or ""
            assert value.startswith(("data:", "#")) or not value, (tag, name, value[:80])


def best_value(run: Path) -> str:
    s = json.loads((run / "summary.json").read_text())
    return f"{s['best_metrics'][s['best_metric']]:.4g}"


def test_pareto_front():
    from deltatune.reports import pareto_front

    # (cost, quality): 1 beats 3 (cheaper, better); 2 ties 0 on quality at a higher cost; 4 is the most expensive
    # but the best, so it stays.
    points = [(10, 0.8), (1, 0.7), (20, 0.8), (5, 0.6), (100, 0.9)]
    assert pareto_front(points) == [0, 1, 4]
    # Lower is better (e.g. loss): the cheapest point is on the front, and so is each cheaper-and-lower one.
    assert pareto_front([(1, 3.0), (2, 2.0), (3, 2.5), (4, 1.0)], higher_is_better=False) == [0, 1, 3]
    assert pareto_front([(1, 0.5), (1, 0.5)]) == [0, 1]  # identical points do not knock each other out
    assert pareto_front([]) == []


def test_classification_report(cls_run, tmp_path):
    from deltatune.reports import write_report

    written = write_report(cls_run, tmp_path / "r" / "report.html")
    page = Page(written["html"].read_text(encoding="utf-8"))
    assert page.ids("section") == RUN_SECTIONS
    assert_self_contained(page)
    text = " ".join(page.text)
    assert "best accuracy" in text and best_value(cls_run) in text
    # The confusion matrix counts every validation row once (64 in the toy data).
    assert "of 64 right" in text and "png:confusion" in written
    summary = json.loads((cls_run / "summary.json").read_text())
    assert f"{summary['trainable_params']:,} trainable: the same." in text  # breakdown agrees with training's count
    assert "lora_A (Linear)" in text and "classifier (Linear)" in text
    assert "memory plan: peak" in text and "not recorded" not in text and "could not be computed" not in text
    md = written["md"].read_text(encoding="utf-8")
    for key, path in written.items():
        if key.startswith("png:"):
            assert path.read_bytes().startswith(b"\x89PNG") and f"]({path.name})" in md


def test_sft_report_has_generations_and_forgetting(sft_run, tmp_path):
    from deltatune.reports import write_report

    written = write_report(sft_run, tmp_path / "report.html")
    page = Page(written["html"].read_text(encoding="utf-8"))
    assert page.ids("section") == RUN_SECTIONS
    assert_self_contained(page)
    text = " ".join(page.text)
    assert "Sample generations" in text and "classify the review" in text  # validation prompts were generated from
    assert "perplexity before training" in text and best_value(sft_run) in text
    assert "could not be computed" not in text


def test_report_of_a_run_with_files_missing(cls_run, tmp_path):
    """A killed run: config.yaml and a metrics.jsonl cut mid-line, nothing else. The page still renders and
    says what is missing; an empty directory too."""
    from deltatune.reports import write_report

    run = tmp_path / "killed"
    run.mkdir()
    shutil.copy(cls_run / "config.yaml", run / "config.yaml")
    lines = (cls_run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
    page = Page(write_report(run)["html"].read_text(encoding="utf-8"))
    text = " ".join(page.text)
    assert page.ids("section") == RUN_SECTIONS
    assert "Missing from the run directory: summary.json, labels.json" in text
    assert "predictions on the validation data could not be computed" in text  # no model saved
    assert len(page.images()) >= 3  # loss, lr, throughput from the three whole lines
    empty = tmp_path / "empty"
    empty.mkdir()
    text = " ".join(Page(write_report(empty)["html"].read_text(encoding="utf-8")).text)
    assert "No config.yaml in the run directory." in text and "No training steps in metrics.jsonl" in text
    # A summary.json of another shape (an older deltatune, a hand edit): only the sections reading it say so.
    (empty / "summary.json").write_text(json.dumps({"task": "classification", "forgetting": "yes"}))
    page = Page(write_report(empty)["html"].read_text(encoding="utf-8"))
    text = " ".join(page.text)
    assert page.ids("section") == RUN_SECTIONS
    assert "This section could not be drawn from the run's files: AttributeError" in text


def comparison(cls_run: Path, sft_run: Path) -> dict:
    s = json.loads((cls_run / "summary.json").read_text())
    run = {"method": "lora", "lr": 3e-3, "run_dir": str(cls_run), "status": "done",
           "best_metric": s["best_metrics"]["accuracy"], "trainable_params": s["trainable_params"],
           "total_params": s["total_params"], "trainable_pct": s["trainable_percent"], "artifact_mb": s["artifact_mb"],
           "peak_memory_mb": s["memory_per_rank"][0]["peak_increase_mb"], "tokens_per_s": s["tokens_per_s"],
           "wall_s": s["train_seconds"], "forgetting": None,
           "lr_grid": [{"lr": 1e-3, "best_metric": 0.5}, {"lr": 3e-3, "best_metric": s["best_metrics"]["accuracy"]}]}
    full = {**run, "method": "full", "lr": 1e-4, "run_dir": str(sft_run), "best_metric": 0.99,
            "trainable_params": s["total_params"], "peak_memory_mb": 1000.0, "lr_grid": None,
            "forgetting": {"perplexity_before": 3.0, "perplexity_after": 3.3, "change_percent": 10.0}}
    worse = {**full, "method": "bitfit", "best_metric": 0.1, "trainable_params": 10 * s["total_params"]}
    failed = {"method": "ia3", "lr": 1e-2, "run_dir": "/nonexistent", "status": "failed: out of memory"}
    return {"task": "classification", "metric": "accuracy", "higher_is_better": True, "budget_steps": 32,
            "runs": [run, full, worse, failed]}


def test_compare_page(cls_run, sft_run, tmp_path):
    from deltatune.reports import write_compare

    written = write_compare(comparison(cls_run, sft_run), tmp_path)
    page = Page(written["html"].read_text(encoding="utf-8"))
    assert page.ids("section") == COMPARE_SECTIONS
    assert_self_contained(page)
    assert {"png:trainable_params", "png:peak_memory_mb", "png:loss"} <= set(written)
    text = " ".join(page.text)
    assert "Pareto front (trainable parameters): lora, full." in text  # bitfit: more params, worse
    assert "Not finished: ia3: failed: out of memory" in text
    assert "No training loss recorded (no metrics.jsonl) for: ia3." in text  # the other three have curves
    assert "3.0 -> 3.3 (+10.0%)" in text
    assert "| lora | 0.003 |" in written["md"].read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# A real browser: Debian's chromium, headless


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium; .ci/run installs it as root)")
    return found


def render(html: Path, tmp: Path) -> tuple[Path, str, list[str]]:
    """Screenshot, DOM text and console messages of `html` in headless Chromium."""
    exe = chromium()
    flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp / 'p'}"]
    shot = tmp / f"{html.stem}.png"
    run = subprocess.run([*flags, "--enable-logging=stderr", "--v=0", "--window-size=1200,2400",
                          f"--screenshot={shot}", html.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.exists(), run.stderr[-2000:]
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    dom = subprocess.run([*flags, "--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120).stdout
    return shot, dom, console


def assert_not_blank(png: Path) -> None:
    from PIL import Image

    img = Image.open(png).convert("L")
    dark = sum(img.histogram()[:200])  # pixels clearly darker than the white page
    assert len(set(img.getdata())) > 10 and dark > 0.01 * img.width * img.height


def test_browser_catches_console_errors(tmp_path):
    """The console check below can fail: a page that throws is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><p>x</p><script>throw new Error('boom')</script></body></html>")
    assert any("Uncaught Error: boom" in line for line in render(bad, tmp_path)[2])


def test_browser_renders_report_and_comparison(cls_run, sft_run, tmp_path):
    from deltatune.reports import write_compare, write_report

    pages = [(write_report(cls_run, tmp_path / "report.html")["html"], best_value(cls_run)),
             (write_compare(comparison(cls_run, sft_run), tmp_path)["html"], best_value(cls_run))]
    for html, best in pages:
        shot, dom, console = render(html, tmp_path)
        assert console == [], console
        assert_not_blank(shot)
        assert best in dom and "data:image/png;base64," in dom

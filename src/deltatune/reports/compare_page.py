"""The page of a method comparison: compare.html and compare.md (with PNGs) from compare.json's dict.

The comparison itself (training each method, the lr sweep) is elsewhere; this module only renders what it
was given, plus each run's loss curve read from its own metrics.jsonl.
"""

from __future__ import annotations

from pathlib import Path

from deltatune.reports import plots
from deltatune.reports.page import Image, Section, Table, Text, cell, write
from deltatune.reports.run_report import read_metrics


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """Indices of the (cost, quality) points no other point dominates, in input order.

    A point is dominated when another costs no more and is no worse, and is strictly better in one of the
    two: the front is the best quality to be had for each cost (fewer parameters, less memory)."""
    def better_or_equal(a: float, b: float) -> bool:
        return a >= b if higher_is_better else a <= b

    front = []
    for i, (cost, quality) in enumerate(points):
        dominated = any(c <= cost and better_or_equal(q, quality) and (c < cost or q != quality)
                        for j, (c, q) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def _label(run: dict, runs: list[dict]) -> str:
    """The method's name, with its lr when the same method appears more than once."""
    same = sum(r.get("method") == run.get("method") for r in runs)
    return f"{run.get('method')} (lr {cell(run.get('lr'))})" if same > 1 and run.get("lr") is not None else \
        str(run.get("method"))


def _forgetting(value: dict | None) -> str | None:
    if not value:
        return None
    return (f"{value.get('perplexity_before')} -> {value.get('perplexity_after')} "
            f"({value.get('change_percent'):+}%)" if value.get("change_percent") is not None else str(value))


def _table(compare: dict, runs: list[dict]) -> Table:
    metric = compare.get("metric", "metric")
    header = ["method", "lr", "status", f"best {metric}", "trainable params", "trainable %", "artifact MB",
              "peak memory MB", "tokens/s", "wall s", "forgetting (perplexity)"]
    rows = [[_label(r, runs), r.get("lr"), r.get("status"), r.get("best_metric"), r.get("trainable_params"),
             r.get("trainable_pct"), r.get("artifact_mb"), r.get("peak_memory_mb"), r.get("tokens_per_s"),
             r.get("wall_s"), _forgetting(r.get("forgetting"))] for r in runs]
    return Table(header, rows)


def _tradeoff(done: list[dict], runs: list[dict], key: str, what: str, higher: bool, metric: str,
              logx: bool) -> list[Image | Text]:
    usable = [r for r in done if isinstance(r.get(key), (int, float)) and r[key] > 0]
    if not usable:
        return [Text(f"No finished run recorded {what}: nothing to plot.", "note")]
    points = [(_label(r, runs), float(r[key]), float(r["best_metric"])) for r in usable]
    front = pareto_front([(p[1], p[2]) for p in points], higher)
    names = ", ".join(points[i][0] for i in front)
    png = plots.tradeoff(points, front, f"{metric} vs {what}", what + (" (log scale)" if logx else ""), metric, logx)
    return [Image(key, png, f"{metric} against {what}, Pareto front marked"),
            Text(f"Pareto front ({what}): {names}. No other run is as good for less.")]


def _loss_curves(runs: list[dict]) -> list[Image | Text]:
    series, missing = [], []
    for r in runs:
        steps, _ = read_metrics(Path(r["run_dir"])) if r.get("run_dir") else ([], [])
        points = [(s["step"], s["loss"]) for s in steps if "loss" in s]
        if points:
            series.append((_label(r, runs), [p[0] for p in points], [p[1] for p in points]))
        else:
            missing.append(_label(r, runs))
    blocks: list[Image | Text] = []
    if series:
        blocks.append(Image("loss", plots.lines(series, "training loss", "step", "loss"), "training loss per method"))
    if missing:
        blocks.append(Text(f"No training loss recorded (no metrics.jsonl) for: {', '.join(missing)}.", "note"))
    return blocks


def _lr_grid(runs: list[dict]) -> list[Table | Text]:
    rows = [[_label(r, runs), g.get("lr"), g.get("best_metric"), "best" if g.get("lr") == r.get("lr") else ""]
            for r in runs for g in (r.get("lr_grid") or [])]
    if not rows:
        return [Text("No learning-rate sweep in this comparison.")]
    return [Table(["method", "lr", "best metric", ""], rows)]


def sections(compare: dict) -> list[Section]:
    runs = compare.get("runs") or []
    metric = compare.get("metric", "metric")
    higher = compare.get("higher_is_better", True)
    done = [r for r in runs if r.get("status") == "done" and isinstance(r.get("best_metric"), (int, float))]
    failed = [f"{_label(r, runs)}: {r.get('status')}" for r in runs if r.get("status") != "done"]
    table = [_table(compare, runs)] + ([Text("Not finished: " + "; ".join(failed), "note")] if failed else [])
    return [
        Section("table", "Methods", table),
        Section("params", f"{metric} vs trainable parameters",
                _tradeoff(done, runs, "trainable_params", "trainable parameters", higher, metric, logx=True)),
        Section("memory", f"{metric} vs peak memory",
                _tradeoff(done, runs, "peak_memory_mb", "peak memory MB", higher, metric, logx=False)),
        Section("loss", "Loss curves", _loss_curves(runs)),
        Section("lr", "Learning-rate sweep", _lr_grid(runs)),
    ]


def write_compare(compare: dict, out_dir: Path) -> dict[str, Path]:
    """Write compare.html (self-contained), compare.md and its PNGs into `out_dir`; returns the paths
    (`html`, `md`, `png:<name>`)."""
    budget = compare.get("budget_steps")
    best = "higher" if compare.get("higher_is_better", True) else "lower"
    subtitle = (f"task {compare.get('task')}; metric {compare.get('metric')} ({best} is better); "
                f"budget {f'{budget} steps' if budget else 'each run its own config'}; "
                f"{len(compare.get('runs') or [])} runs")
    return write("deltatune method comparison", subtitle, sections(compare), Path(out_dir) / "compare.html")

"""One row of compare.json from a run directory: every number as the run recorded it in summary.json.

Nothing is measured again here; where a number is missing from an old run's summary the row says None.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from deltatune.evaluation.metrics import HIGHER_IS_BETTER

# The renderer's contract (deltatune.reports.compare_page): every row has these keys, None when unknown.
KEYS = ("method", "lr", "run_dir", "status", "best_metric", "trainable_params", "total_params", "trainable_pct",
        "artifact_mb", "peak_memory_mb", "tokens_per_s", "wall_s", "forgetting", "lr_grid")


def blank(method: str, lr: float | None, run_dir: Path, status: str) -> dict:
    return {**dict.fromkeys(KEYS), "method": method, "lr": lr, "run_dir": str(Path(run_dir).resolve()),
            "status": status}


def failed(method: str, lr: float | None, run_dir: Path, reason: str) -> dict:
    return blank(method, lr, run_dir, f"failed: {reason}")


def method_label(config: dict) -> str:
    """The method a run's config.yaml trained, naming LoRA's variants as --methods does (`dora`)."""
    method = config.get("method") or {}
    name = method.get("name", "full")
    variant = method.get("variant")
    return variant if name == "lora" and variant not in (None, "lora") else name


def read_config(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}


def record(run_dir: Path, method: str | None = None) -> dict:
    """The row of a finished run (summary.json); a run without one is `failed: not finished`."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    method = method or method_label(config)
    lr = (config.get("train") or {}).get("lr")
    if not (run_dir / "summary.json").is_file():
        return failed(method, lr, run_dir, f"not finished (no summary.json in {run_dir})")
    s = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    memory = [m for m in s.get("memory_per_rank") or [] if m and m.get("peak_mb") is not None]
    row = blank(method, lr, run_dir, "done")
    row.update(
        best_metric=(s.get("best_metrics") or {}).get(s.get("best_metric")),
        trainable_params=s.get("trainable_params"), total_params=s.get("total_params"),
        trainable_pct=s.get("trainable_percent"), artifact_mb=s.get("artifact_mb"),
        # The peak of training (model included) on the busiest rank: RSS on CPU, max_memory_allocated on CUDA.
        # Older runs, or where the peak cannot be restarted after loading: the process's whole-life peak RSS.
        peak_memory_mb=max(m["peak_mb"] for m in memory) if memory else s.get("peak_rss_mb"),
        tokens_per_s=s.get("tokens_per_s"), wall_s=s.get("train_seconds"), forgetting=s.get("forgetting"),
        # Beyond the renderer's contract, for readers of compare.json.
        metric=s.get("best_metric"), best_step=s.get("best_step"), steps=s.get("steps"),
        artifact=s.get("artifact"), setup_s=s.get("setup_seconds"), compute_s=s.get("compute_seconds"),
        peak_memory_measured=memory[0]["measured"] if memory else ("peak RSS" if s.get("peak_rss_mb") else None),
        peak_memory_increase_mb=max((m.get("peak_increase_mb") or 0) for m in memory) if memory else None,
    )
    return row


def best_of(rows: list[dict], metric: str) -> dict | None:
    """The finished row with the best metric (first among equals); None when none finished."""
    done = [r for r in rows if r["status"] == "done" and r["best_metric"] is not None]
    if not done:
        return None
    pick = max if HIGHER_IS_BETTER[metric] else min
    return pick(done, key=lambda r: r["best_metric"])


def with_grid(rows: list[dict], metric: str, method: str) -> dict:
    """A method's row after an lr sweep: its best point, with every point in `lr_grid`."""
    grid = [{"lr": r["lr"], "best_metric": r["best_metric"], "status": r["status"], "run_dir": r["run_dir"]}
            for r in rows]
    best = best_of(rows, metric)
    if best is None:
        reasons = "; ".join(f"lr {r['lr']:g}: {r['status']}" for r in rows)
        row = blank(method, None, Path(rows[0]["run_dir"]), f"failed: every learning rate failed ({reasons})")
    else:
        row = dict(best)
    row["lr_grid"] = grid
    return row

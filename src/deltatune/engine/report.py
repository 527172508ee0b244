"""What a run shows and records: a rich progress bar, metrics.jsonl, and the final summary table."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

console = Console(stderr=True)


class RunLog:
    """Rank-0 only: every logged step and eval becomes one JSON line in metrics.jsonl, and goes to
    `on_record` too (the experiment trackers of output.tracking: tracking.Trackers.record)."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int,
                 on_record: Callable[[dict], None] | None = None):
        self.enabled = enabled
        self.on_record = on_record
        self.file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8") if enabled else None
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[rate]} tok/s"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=console, disable=not enabled, transient=False,
        )
        self.task = self.progress.add_task("train", total=total_steps, loss="-", lr="-", rate="-")
        self.start = time.perf_counter()

    def __enter__(self) -> RunLog:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()
        if self.file:
            self.file.close()

    def step(self, step: int, advance: int = 1, **fields: float) -> None:
        if not self.enabled:
            return
        shown = {}
        if "loss" in fields:
            shown = {"loss": f"{fields['loss']:.4f}", "lr": f"{fields['lr']:.2e}",
                     "rate": f"{fields.get('tokens_per_s', 0):,.0f}"}
        self.progress.update(self.task, advance=advance, **shown)
        if fields:
            self.write({"step": step, **fields})

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps({"time": round(time.perf_counter() - self.start, 3), **record}) + "\n")
            self.file.flush()
            if self.on_record is not None:
                self.on_record(record)

    def print(self, msg: str) -> None:
        if self.enabled:
            self.progress.console.print(msg)


def summary_table(summary: dict) -> Table:
    table = Table(title=f"deltatune run: {summary.get('run_dir', '')}", show_header=True)
    table.add_column("")
    table.add_column("value", justify="right")
    for key in ("method", "precision", "epochs_done", "steps", "train_seconds", "tokens_per_s",
                "trainable_params", "total_params", "peak_rss_mb", "best_step", "stopped_early"):
        if key in summary:
            v = summary[key]
            table.add_row(key, f"{v:,.2f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int)
                          and not isinstance(v, bool) else str(v))
    for key, v in (summary.get("best_metrics") or {}).items():
        if isinstance(v, float):
            table.add_row(f"best {key}", f"{v:.4f}")
    if summary.get("forgetting"):
        f = summary["forgetting"]
        table.add_row("general-text perplexity", f"{f['perplexity_before']:.3f} -> {f['perplexity_after']:.3f} "
                      f"({f['change_percent']:+.2f}%)")
    return table

"""Method comparison: train several methods on one config and budget, one at a time, and line them up
(compare.json, rendered by deltatune.reports.compare_page). See docs/compare.md.

    from deltatune.compare import compare_methods, compare_runs
    compare_methods("configs/quickstart.yaml", "full,lora,ia3", budget_steps=200, out="runs/cmp")
    compare_runs(["runs/lora", "runs/ia3"], out="runs/cmp2")
"""

from __future__ import annotations

from deltatune.compare.command import compare, compare_methods, compare_runs
from deltatune.compare.recipes import lr_grid
from deltatune.compare.records import record

__all__ = ["compare", "compare_methods", "compare_runs", "lr_grid", "record"]

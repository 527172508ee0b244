"""`deltatune compare`: train several methods on one config and budget, or line up finished runs.

Layout of the output directory (--out):
  <out>/<method>/ or <out>/<method>-lr<lr>/   one ordinary run directory per method (per lr with --lr-sweep)
  <out>/logs/<run>.yaml, <run>.log            the config each run trained with, and its output
  <out>/compare.json                          the rows (records.KEYS), rewritten after every run
  <out>/compare.html, compare.md, *.png       rendered by deltatune.reports.compare_page
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from deltatune import config as config_mod
from deltatune.compare import child, recipes, records
from deltatune.config import RunConfig
from deltatune.engine.checkpoints import config_view
from deltatune.engine.report import console
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.evaluation.metrics import HIGHER_IS_BETTER


@dataclass
class Job:
    """One training of the comparison: a method at one learning rate."""
    method: str
    lr: float
    run_dir: Path
    config_file: Path
    raw: dict  # its config, written to config_file when it trains
    cfg: RunConfig | None = None  # None: the config is invalid (`problem` says why)
    problem: str | None = None


def compare_methods(config: str | Path | RunConfig, methods: str | list[str], overrides: list[str] | None = None,
                    lr_sweep: bool = False, lrs: list[float] | None = None, budget_steps: int | None = None,
                    out: str | Path | None = None, recipes_dir: Path | None = recipes.RECIPES_DIR,
                    show_training: bool = True, render: bool = True) -> dict:
    """Train each method on `config`'s data, one after another, and write compare.json (+ the rendered page).

    Finished runs in `out` are kept, not trained again; a failed method is recorded with its reason and the
    others go on. `lr_sweep` trains recipes.lr_grid (or `lrs`, for every method) and keeps each method's best.
    Returns compare.json's dict."""
    cfg = config if isinstance(config, RunConfig) else config_mod.load(config, overrides)
    if lrs is not None and not all(0 < lr < 1 for lr in lrs):
        raise ConfigError(f"--lrs {','.join(f'{lr:g}' for lr in lrs)}: every learning rate must be between 0 and 1 "
                          f"(train.lr). Fix: e.g. --lrs 1e-4,3e-4,1e-3")
    names = recipes.parse_methods(methods if isinstance(methods, str) else ",".join(methods))
    sweep = lr_sweep or bool(lrs)
    out = Path(out or f"{cfg.output.dir}-compare").resolve()
    found = recipes.recipes(cfg.task, recipes_dir)
    plans = {name: _plan(name, cfg, found, sweep, lrs, budget_steps, out) for name in names}
    _refuse_conflicts([job for jobs in plans.values() if not isinstance(jobs, str) for job in jobs])
    result = {"task": cfg.task, "metric": cfg.metric, "higher_is_better": HIGHER_IS_BETTER[cfg.metric],
              "budget_steps": budget_steps, "runs": [], "config": None if isinstance(config, RunConfig) else
              str(config), "out_dir": str(out), "lr_sweep": sweep}
    try:
        for name, jobs in plans.items():
            if isinstance(jobs, str):  # the method's settings could not even be read
                result["runs"].append(records.failed(name, None, out / name, jobs))
                continue
            rows = [_train(job, cfg.metric, show_training) for job in jobs]
            result["runs"].append(records.with_grid(rows, cfg.metric, name) if sweep else rows[0])
            _write_json(result, out)
    except KeyboardInterrupt:
        console.print(f"compare: stopped. Run the same command again to go on: the finished runs in {out} are "
                      f"kept, an unfinished one resumes from its last checkpoint (train.save_every) or starts over.",
                      highlight=False, soft_wrap=True)
        raise
    _write_json(result, out)
    _render(result, out, render)
    return result


def _plan(name: str, cfg: RunConfig, found: dict, sweep: bool, lrs: list[float] | None, budget: int | None,
          out: Path) -> list[Job] | str:
    """The runs of one method (one, or one per lr), or why the method cannot run at all."""
    try:
        chosen = recipes.setting(name, cfg, found)
    except DeltatuneError as e:
        return f"its recipe {found.get(recipes.ALIASES.get(name, (name,))[0])} does not load: {e}"
    console.print(f"compare: {name}: lr {chosen.lr:g}, method options {chosen.source}", highlight=False,
                  soft_wrap=True)
    grid = (lrs or recipes.lr_grid(name, chosen.lr)) if sweep else [chosen.lr]
    jobs = []
    for lr in grid:
        tag = f"{name}-lr{recipes.lr_tag(lr)}" if sweep else name
        job = Job(name, lr, out / tag, out / "logs" / f"{tag}.yaml", recipes.derive(cfg, chosen, lr, budget, out / tag))
        try:
            job.cfg = recipes.validate(job.raw)
        except DeltatuneError as e:
            job.problem = str(e)
        jobs.append(job)
    return jobs


def _refuse_conflicts(jobs: list[Job]) -> None:
    """Before anything trains: a run directory holding a run of another config is never reused or replaced
    (its results would be reported as this config's, or lost)."""
    clashes = []
    for job in jobs:
        held = job.run_dir / "config.yaml"
        if job.cfg is None or not held.is_file():
            continue
        try:
            before = config_view(config_mod.load(held))
        except DeltatuneError as e:
            clashes.append(f"{job.run_dir}: its config.yaml does not load ({e})")
            continue
        now = config_view(job.cfg)
        diff = [f"{k} {before.get(k, '(unset)')!r} -> {now.get(k, '(unset)')!r}" for k in sorted(set(before) | set(now))
                if before.get(k) != now.get(k)]
        if diff:
            clashes.append(f"{job.run_dir} holds a run of another config ({'; '.join(diff[:4])}"
                           f"{' ...' if len(diff) > 4 else ''})")
    if clashes:
        raise ConfigError("compare: " + "\n  ".join(["these run directories hold other runs:", *clashes]) +
                          "\nFix: choose another --out, or delete those directories to train them again.")


def _train(job: Job, metric: str, show: bool) -> dict:
    """One run: skipped when it finished before, else trained in its own process and read back."""
    head = f"compare: {job.method} (lr {job.lr:g})"
    if job.cfg is None:
        console.print(f"{head}: failed before training: {job.problem}", highlight=False, soft_wrap=True)
        return records.failed(job.method, job.lr, job.run_dir, job.problem or "invalid config")
    if (job.run_dir / "summary.json").is_file():
        row = records.record(job.run_dir, job.method)
        console.print(f"{head}: skipped, finished earlier in {job.run_dir}: {_result(row, metric)}",
                      highlight=False, soft_wrap=True)
        return row
    console.print(f"{head}: training in {job.run_dir} (log {job.config_file.with_suffix('.log')})",
                  highlight=False, soft_wrap=True)
    recipes.write_config(job.raw, job.config_file)
    code, output = child.train(job.config_file, job.config_file.with_suffix(".log"), show)
    if code == 0 and (job.run_dir / "summary.json").is_file():
        row = records.record(job.run_dir, job.method)
        console.print(f"{head}: done: {_result(row, metric)}", highlight=False, soft_wrap=True)
        return row
    if code in (130, 143):  # the child was stopped with us (Ctrl-C, SIGTERM): stop the comparison too
        raise KeyboardInterrupt
    reason = child.failure_reason(output, code)
    console.print(f"{head}: failed (exit code {code}): {reason}", highlight=False, soft_wrap=True)
    return records.failed(job.method, job.lr, job.run_dir, reason)


def _result(row: dict, metric: str) -> str:
    def num(value, fmt: str) -> str:
        return "?" if value is None else format(value, fmt)

    return (f"{metric} {num(row['best_metric'], '.4f')}, {num(row['trainable_params'], ',')} trainable "
            f"({num(row['trainable_pct'], '.2f')}%), {num(row['wall_s'], '.0f')} s, "
            f"peak {num(row['peak_memory_mb'], ',.0f')} MB")


def _write_json(result: dict, out: Path) -> None:
    """Atomically: a reader (or a crash) never sees half a file."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".compare.json.{os.getpid()}"
    tmp.write_text(json.dumps({**result, "written": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1),
                   encoding="utf-8")
    tmp.replace(out / "compare.json")


def _render(result: dict, out: Path, render: bool) -> dict:
    if not render:
        return {}
    from deltatune.reports.compare_page import write_compare  # matplotlib and the page: only when rendering

    written = write_compare(result, out)
    console.print(f"compare: wrote {out / 'compare.json'}" + "".join(f", {p}" for p in written.values()),
                  highlight=False, soft_wrap=True)
    return written


def compare_runs(run_dirs: list[str | Path], out: str | Path | None = None, render: bool = True) -> dict:
    """Line up finished runs without training: compare.json (+ the rendered page) in `out` (default ./compare).
    The runs must be scored by one metric; a run that did not finish is a `failed: not finished` row."""
    dirs = [Path(d).resolve() for d in run_dirs]
    for d in dirs:
        if not (d / "config.yaml").is_file():
            raise DeltatuneError(f"compare: {d} is not a deltatune run directory (no config.yaml). Fix: pass "
                                 f"the output.dir of runs made by `deltatune train`.")
    cfgs = [config_mod.load(d / "config.yaml") for d in dirs]
    scored = {(c.task, c.metric) for c in cfgs}
    if len(scored) > 1:
        listed = ", ".join(f"{d.name} ({c.task}, {c.metric})" for d, c in zip(dirs, cfgs))
        raise DeltatuneError(f"compare: these runs are not scored alike: {listed}. Fix: compare runs of one task "
                             f"and eval.metric.")
    task, metric = scored.pop()
    budgets = {c.train.max_steps for c in cfgs}
    result = {"task": task, "metric": metric, "higher_is_better": HIGHER_IS_BETTER[metric],
              "budget_steps": budgets.pop() if len(budgets) == 1 else None,
              "runs": [records.record(d) for d in dirs], "config": None, "out_dir": None, "lr_sweep": False}
    out = Path(out or "compare").resolve()
    result["out_dir"] = str(out)
    for row in result["runs"]:
        console.print(f"compare: {row['method']} ({Path(row['run_dir']).name}): "
                      + (_result(row, metric) if row["status"] == "done" else row["status"]),
                      highlight=False, soft_wrap=True)
    _write_json(result, out)
    _render(result, out, render)
    return result


def compare(sources: list[str], methods: str | None = None, lr_sweep: bool = False, lrs: list[float] | None = None,
            budget_steps: int | None = None, out: str | Path | None = None,
            recipes_dir: Path | None = recipes.RECIPES_DIR, show_training: bool = True) -> dict:
    """The command line's two forms: `CONFIG [key=value ...] --methods ...` trains (compare_methods);
    `RUN_DIR RUN_DIR ...` lines up finished runs (compare_runs). A directory is a run, a file a config."""
    if not sources:
        raise ConfigError("compare: nothing to compare. Pass a CONFIG with --methods, or two or more run "
                          "directories.")
    first = Path(sources[0])
    if first.is_dir():
        files = [s for s in sources if not Path(s).is_dir()]
        if files:
            raise ConfigError(f"compare: {first} is a run directory, so every argument must be one; not: "
                              f"{', '.join(files)}. Fix: compare run directories alone, or a CONFIG with --methods.")
        if methods or lr_sweep or lrs or budget_steps is not None:
            raise ConfigError("compare: --methods, --lr-sweep, --lrs and --budget-steps train from a CONFIG; "
                              "run directories are compared as they are. Fix: drop them, or pass a CONFIG file.")
        return compare_runs(sources, out)
    if not first.is_file():
        raise ConfigError(f"compare: {first} does not exist. Fix: pass a CONFIG file (with --methods) or run "
                          f"directories.")
    overrides = sources[1:]
    stray = [s for s in overrides if "=" not in s]
    if stray:
        raise ConfigError(f"compare: after CONFIG come only section.key=value overrides; not: {', '.join(stray)}. "
                          f"Fix: compare run directories in a command of their own.")
    if not methods:
        raise ConfigError("compare: --methods is required with a CONFIG, e.g. --methods full,lora,ia3 "
                          "(`deltatune methods` lists them).")
    return compare_methods(first, methods, overrides, lr_sweep=lr_sweep, lrs=lrs, budget_steps=budget_steps,
                           out=out, recipes_dir=recipes_dir, show_training=show_training)

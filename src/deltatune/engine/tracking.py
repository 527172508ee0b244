"""Experiment tracking through the libraries people already use (output.tracking: tensorboard, mlflow).

Each tracker gets what metrics.jsonl gets (every record report.RunLog writes, at its step), the resolved
config as hyper-parameters and, at the end, the numbers of summary.json. Rank 0 only, like RunLog.
Both packages are optional extras: `check` refuses a missing one before anything loads, `opened` imports
it only when asked for. What a resume does to each tracker is in docs/tracking.md.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from deltatune.engine.faults import Terminated
from deltatune.engine.report import console
from deltatune.errors import ConfigError, DeltatuneError

TENSORBOARD_DIR = "tensorboard"  # under the run directory
MLFLOW_FILE = "mlflow.json"  # under the run directory: which MLflow run this run logs to (a resume continues it)
DEFAULT_EXPERIMENT = "deltatune"
DEFAULT_MLRUNS = "mlruns"  # relative to the working directory, where MLflow's own tools have always put it
# module imported, the package a user installs for it
PACKAGES = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "mlflow": ("mlflow.tracking", "mlflow-skinny")}
DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow's database stores: SQLAlchemy + alembic


def check(output) -> None:
    """Refuse, before any weight loads, a tracker whose package does not import (say, not installed)."""
    for name in output.tracking:
        module, package = PACKAGES[name]
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"output.tracking lists {name}, but {module} does not import ({e}). Fix: `pip install "
                              f"{package}` (or `pip install 'deltatune[tracking]'` for both trackers), or remove "
                              f"{name} from output.tracking.") from None
    if "mlflow" in output.tracking:
        uri = mlflow_uri(output)
        missing = [m for m in ("sqlalchemy", "alembic") if importlib.util.find_spec(m) is None]
        if store_kind(uri) == "database" and missing:
            raise ConfigError(f"MLflow tracking URI {uri}: a database store needs {' and '.join(missing)}, which "
                              f"mlflow-skinny does not install. Fix: `pip install sqlalchemy alembic` (or the full "
                              f"`mlflow`), or a file store: output.mlflow_uri=./mlruns.")


def mlflow_uri(output, stored: str | None = None) -> str:
    """output.mlflow_uri, else $MLFLOW_TRACKING_URI, else the URI a resumed run logged to, else ./mlruns as an
    absolute file: URI (so that a resume from another directory finds the same store)."""
    return (output.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or stored
            or Path(DEFAULT_MLRUNS).absolute().as_uri())


def store_kind(uri: str) -> str:
    """`file` (a directory: MLflow's file store), `database` (sqlite, postgresql, ...) or `server` (anything else)."""
    scheme = urlparse(uri).scheme.split("+", 1)[0]
    if scheme in ("", "file") or len(scheme) == 1:  # a path; `C:` is a Windows drive, not a scheme
        return "file"
    return "database" if scheme in DB_SCHEMES else "server"


def flatten(node: object, prefix: str = "") -> dict[str, object]:
    """Nested dicts as one level of dotted keys; any other value (lists too) is a leaf."""
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, object] = {}
    for key, value in node.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def scalars(record: dict) -> tuple[int, dict[str, float]] | None:
    """One metrics.jsonl record as (step, {tag: value}): train/<key> for a logged step, eval/<key> for an
    evaluation, train/skipped_step (1) for a step the non-finite guard skipped; None for anything else."""
    if "eval" in record:
        ev = record["eval"]
        return ev["step"], {f"eval/{k}": float(v) for k, v in ev.items() if is_number(v) and k not in ("step", "epoch")}
    if "skipped_step" in record:
        return record["skipped_step"], {"train/skipped_step": 1.0}
    if "step" in record:
        return record["step"], {f"train/{k}": float(v) for k, v in record.items()
                                if is_number(v) and k not in ("step", "time")}
    return None


def summary_scalars(summary: dict) -> dict[str, float]:
    """Every number in summary.json outside a list, as summary/<dotted.key> (best_metrics, forgetting, data...)."""
    return {f"summary/{k}": float(v) for k, v in flatten(summary).items() if is_number(v) and math.isfinite(v)}


def say(msg: str) -> None:
    console.print(msg, highlight=False, soft_wrap=True)  # paths stay whole, to copy


def param_value(v: object) -> str:
    """A config value as the text a `key=value` override would take (MLflow params are strings)."""
    return v if isinstance(v, str) else json.dumps(v)


class Trackers:
    """The trackers of one run; with none (the default, or a rank other than 0) every call does nothing.

    A tracker that fails while training (a tracking server gone) is reported once and dropped: training goes
    on, and metrics.jsonl keeps every record."""

    def __init__(self, backends: list, say=say):
        self.backends = backends
        self.say = say

    def record(self, record: dict) -> None:
        found = scalars(record) if self.backends else None
        if found and found[1]:
            self._each("log", *found)

    def finish(self, summary: dict) -> None:
        if self.backends:
            self._each("finish", summary)

    def close(self, status: str) -> None:
        for b in self.backends:
            try:
                b.close(status)
            except Exception as e:  # noqa: BLE001 - closing a tracker must not hide why the run ended
                self.say(f"[yellow]warning: {b.name} did not close cleanly: {type(e).__name__}: {e}[/]")
        self.backends = []

    def _each(self, method: str, *args) -> None:
        for b in list(self.backends):
            try:
                getattr(b, method)(*args)
            except Exception as e:  # noqa: BLE001 - see the class docstring
                self.say(f"[bold yellow]warning: {b.name} failed ({type(e).__name__}: {e}); it gets nothing more "
                         f"from this run (metrics.jsonl has every record)[/]")
                self.backends.remove(b)
                with contextlib.suppress(Exception):
                    b.close("FAILED")


@contextlib.contextmanager
def opened(cfg, run_dir: Path, resume_step: int | None, enabled: bool, say=say) -> Iterator[Trackers]:
    """The trackers output.tracking asks for, open for the run; closed FINISHED, or FAILED / KILLED by how the
    run ended. `resume_step`: the checkpoint step a resume continues from (None for a fresh run)."""
    if not (enabled and cfg.output.tracking):
        yield Trackers([])
        return
    check(cfg.output)  # api calls it before loading; again here for callers of the engine alone
    backends: list = []
    trackers = Trackers(backends, say)
    try:
        for name in cfg.output.tracking:
            backend = (TensorBoard if name == "tensorboard" else MLflow)(cfg, Path(run_dir), resume_step)
            backends.append(backend)
            say(f"[dim]tracking: {backend.where}[/]")
    except BaseException:
        trackers.close("FAILED")
        raise
    status = "FAILED"
    try:
        yield trackers
        status = "FINISHED"
    except (KeyboardInterrupt, Terminated):
        status = "KILLED"
        raise
    finally:
        trackers.close(status)


class TensorBoard:
    """Event files in <run>/tensorboard/, written by torch's SummaryWriter (tensorboard's own Writer is
    experimental and cannot purge). A resume purges what the killed run logged after its checkpoint."""

    name = "tensorboard"

    def __init__(self, cfg, run_dir: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = run_dir / TENSORBOARD_DIR
        # Events at or after purge_step in earlier event files are hidden by TensorBoard's readers: steps the
        # resume redoes appear once, with the values of the resumed run.
        self.writer = SummaryWriter(str(self.dir), purge_step=None if resume_step is None else resume_step + 1)
        self.where = f"TensorBoard event files in {self.dir} (tensorboard --logdir {self.dir})"
        self.config = flatten(cfg.model_dump(mode="json"))
        if resume_step is None:
            self.writer.add_text("config", "```yaml\n" + cfg.to_yaml() + "```", 0)
            self.writer.flush()

    def log(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a crash loses nothing that metrics.jsonl has

    def finish(self, summary: dict) -> None:
        """The summary numbers as scalars at the last step, and config + summary in the HParams tab."""
        from torch.utils.tensorboard.summary import hparams

        step = summary.get("steps", 0)
        metrics = summary_scalars(summary)
        params = {k: v if is_number(v) else param_value(v) for k, v in self.config.items()}
        for proto in hparams(params, metrics):
            self.writer.file_writer.add_summary(proto, step)
        self.log(step, metrics)

    def close(self, status: str) -> None:
        self.writer.close()


class MLflow:
    """One MLflow run per deltatune run, through MlflowClient (no global state). Its id is kept in
    <run>/mlflow.json, so a resume logs to the same MLflow run."""

    name = "mlflow"
    PARAMS_PER_BATCH, METRICS_PER_BATCH = 100, 1000  # MLflow's limits per log_batch call

    def __init__(self, cfg, run_dir: Path, resume_step: int | None):
        from mlflow.tracking import MlflowClient

        stored = self._stored(run_dir) if resume_step is not None else {}
        self.uri = mlflow_uri(cfg.output, stored.get("tracking_uri"))
        if store_kind(self.uri) == "file":
            # MLflow 3 keeps its file store only for those who opt in; a file store is what works without a
            # database package (docs/tracking.md says how to read it back).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=self.uri)
        self.logged: dict[str, int] = {}  # metric -> last step the MLflow run has (a resume skips up to it)
        try:
            self.run_id = self._resume(stored) if stored.get("tracking_uri") == self.uri else None
            if self.run_id is None:
                self.run_id = self._start(cfg, run_dir)
                (run_dir / MLFLOW_FILE).write_text(json.dumps({"tracking_uri": self.uri, "run_id": self.run_id}),
                                                   encoding="utf-8")
            else:
                self.client.set_tag(self.run_id, "deltatune.resumed_from_step", str(resume_step))
            self.experiment = self.client.get_experiment(self.client.get_run(self.run_id).info.experiment_id).name
        except Exception as e:
            raise DeltatuneError(f"output.tracking: could not open an MLflow run at {self.uri} ({type(e).__name__}: "
                                 f"{e}). Fix: check output.mlflow_uri / $MLFLOW_TRACKING_URI, or remove mlflow from "
                                 f"output.tracking.") from e
        self.where = f"MLflow run {self.run_id} in experiment `{self.experiment}` at {self.uri}"

    @staticmethod
    def _stored(run_dir: Path) -> dict:
        try:
            return json.loads((run_dir / MLFLOW_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def _start(self, cfg, run_dir: Path) -> str:
        from mlflow.entities import Param

        name = cfg.output.mlflow_experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
        run = self.client.create_run(exp_id, run_name=run_dir.name, tags={
            "deltatune.run_dir": str(run_dir.absolute()), "deltatune.task": cfg.task,
            "deltatune.method": cfg.method.name, "deltatune.model": cfg.model.name})
        params = [Param(k, param_value(v)) for k, v in flatten(cfg.model_dump(mode="json")).items()]
        for i in range(0, len(params), self.PARAMS_PER_BATCH):
            self.client.log_batch(run.info.run_id, params=params[i:i + self.PARAMS_PER_BATCH])
        return run.info.run_id

    def _resume(self, stored: dict) -> str | None:
        """The stored run, RUNNING again, with the last step of each metric it holds; None if it is gone."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(stored["run_id"])
        except MlflowException:
            return None
        for key in run.data.metrics:
            self.logged[key] = max(m.step for m in self.client.get_metric_history(run.info.run_id, key))
        self.client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id

    def log(self, step: int, values: dict[str, float], again: bool = False) -> None:
        """Metrics at `step`. After a resume, steps the killed run already logged are skipped (an exact resume
        redoes them with the same values; only timings differ), unless `again`."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items() if again or step > self.logged.get(k, -1)]
        for i in range(0, len(metrics), self.METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + self.METRICS_PER_BATCH])

    def finish(self, summary: dict) -> None:
        # Logged again at the same last step, a resumed run's summary becomes the latest value MLflow shows.
        self.log(summary.get("steps", 0), summary_scalars(summary), again=True)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)

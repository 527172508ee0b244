"""Experiment tracking (output.tracking): TensorBoard's and MLflow's own readers see what metrics.jsonl holds,
the config as hyper-parameters and the summary's numbers; a resume continues both without duplicate steps;
a missing package is refused before anything loads; the default writes no tracker files."""

from __future__ import annotations

import json
import sys
import typing
from pathlib import Path

import numpy as np
import pytest

from deltatune import api, config
from deltatune.engine import tracking
from deltatune.errors import ConfigError

BOTH = '["tensorboard", "mlflow"]'


@pytest.fixture
def mlflow_env(tmp_path, monkeypatch):
    """A clean MLflow environment in tmp_path (the default ./mlruns lands there); reading a file store back
    needs the same opt-in MLflow 3 asks of every file-store user."""
    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return tmp_path


def expected_series(run: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as the trackers should have it, written out here rather than through tracking.scalars:
    train records under train/<key>, evaluations under eval/<metric>, each at its step."""
    series: dict[str, list[tuple[int, float]]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "eval" in rec:
            ev = rec["eval"]
            for k in ("loss", "accuracy", "f1", "precision", "recall"):
                series.setdefault(f"eval/{k}", []).append((ev["step"], ev[k]))
        elif "step" in rec and "loss" in rec:
            for k in ("loss", "lr", "epoch", "tokens_per_s", "max_grad_norm"):
                series.setdefault(f"train/{k}", []).append((rec["step"], rec[k]))
    return series


def tensorboard_series(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def mlflow_run(store: Path, experiment: str = "deltatune"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.as_uri())
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} in {store}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, f"one MLflow run per deltatune run, found {len(runs)}"
    return client, runs[0]


def mlflow_series(client, run, keys) -> dict[str, list[tuple[int, float]]]:
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)) for k in keys}


def test_a_tracked_run_reads_back_in_tensorboard_and_mlflow(make_config, mlflow_env, tiny_bert):
    cfg = make_config(**{"output.tracking": BOTH, "train.max_steps": 12, "eval.every": 5, "eval.at_start": True})
    summary = api.train(cfg)
    run = Path(cfg.output.dir)
    want = expected_series(run)
    assert len(want["eval/accuracy"]) == 4 and len(want["train/loss"]) == 3  # steps 0/5/10/12 and 5/10/12

    # TensorBoard stores float32: each value equals metrics.jsonl's rounded to float32, at the same step.
    tb = tensorboard_series(run)
    for tag, points in want.items():
        assert tb[tag] == [(step, float(np.float32(v))) for step, v in points], tag
    assert tb["summary/best_metrics.accuracy"] == [(12, float(np.float32(summary["best_metrics"]["accuracy"])))]
    assert tb["summary/tokens_per_s"] == [(12, float(np.float32(summary["tokens_per_s"])))]

    client, mrun = mlflow_run(mlflow_env / "mlruns")  # the default store: ./mlruns
    assert mrun.info.status == "FINISHED" and mrun.info.run_name == "run"
    assert mrun.data.tags["deltatune.run_dir"] == str(run.absolute())
    assert mlflow_series(client, mrun, want) == {k: sorted(v) for k, v in want.items()}
    got = mrun.data.metrics
    assert got["summary/artifact_mb"] == summary["artifact_mb"]
    assert got["summary/best_metrics.loss"] == summary["best_metrics"]["loss"]
    assert got["summary/data.train.rows_used"] == 256
    params = mrun.data.params
    assert params["train.lr"] == "0.003" and params["model.name"] == str(tiny_bert)
    assert params["eval.at_start"] == "true" and params["method.name"] == "full"
    assert params["output.tracking"] == BOTH and params["data.labels"] == "null"
    # Every key of the resolved config, and nothing else.
    leaves = tracking.flatten(config.load(run / "config.yaml").model_dump(mode="json"))
    assert set(params) == set(leaves) and len(params) > 60
    assert json.loads((run / "mlflow.json").read_text())["run_id"] == mrun.info.run_id


def test_a_resume_continues_the_same_tensorboard_run_and_mlflow_run(make_config, mlflow_env):
    """Killed after step 6 but resumed from the step-4 checkpoint: steps 5 and 6 are logged again, and each
    tracker holds them once (TensorBoard purges the earlier events, MLflow skips steps it has)."""
    store = mlflow_env / "elsewhere"
    cfg = make_config(**{"output.tracking": BOTH, "output.mlflow_uri": str(store), "output.mlflow_experiment": "exp1",
                         "train.max_steps": 6, "train.save_every": 2, "train.keep_last": 3, "train.log_every": 1,
                         "eval.every": 2})
    first = api.train(cfg)
    run = Path(cfg.output.dir)
    again = api.train(cfg, resume=str(run / "checkpoints" / "step-000004"))
    assert again["train_seconds"] != first["train_seconds"]
    want = expected_series(run)
    assert [s for s, _ in want["train/loss"]] == [1, 2, 3, 4, 5, 6]

    tb = tensorboard_series(run)
    for tag in want:
        assert [s for s, _ in tb[tag]] == [s for s, _ in want[tag]], tag  # each step once
    # Redone steps have the resumed run's values: an exact resume gives back the same loss.
    assert [v for _, v in tb["train/loss"]] == [float(np.float32(v)) for _, v in want["train/loss"]]

    client, mrun = mlflow_run(store, "exp1")  # output.mlflow_uri and the experiment name, one run
    assert mrun.info.status == "FINISHED" and mrun.data.tags["deltatune.resumed_from_step"] == "4"
    got = mlflow_series(client, mrun, want)
    for tag in want:
        assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]], tag
    assert got["train/loss"] == want["train/loss"]
    # The summary is the resumed run's (logged again at the last step, so MLflow shows it as the latest).
    assert mrun.data.metrics["summary/train_seconds"] == again["train_seconds"]
    assert not (mlflow_env / "mlruns").exists()  # the default store was not touched


def test_a_missing_tracker_package_is_refused_before_anything_loads(make_config, mlflow_env, monkeypatch):
    def loaded(*a, **k):
        raise AssertionError("a model was loaded before the missing tracker was refused")

    monkeypatch.setattr(api.models, "load_model", loaded)
    for name, module, pip in (("mlflow", "mlflow.tracking", "pip install mlflow-skinny"),
                              ("tensorboard", "torch.utils.tensorboard", "pip install tensorboard")):
        cfg = make_config(**{"output.tracking": f"[{name}]"})
        with monkeypatch.context() as m:
            m.setitem(sys.modules, module, None)  # what `import` does when the package is not installed
            with pytest.raises(ConfigError, match=rf"output.tracking lists {name}.*{pip}.*deltatune\[tracking\]"):
                api.train(cfg)
        assert not Path(cfg.output.dir).exists()


def test_the_default_config_writes_no_tracker_files(make_config, mlflow_env):
    cfg = make_config(**{"train.max_steps": 2})
    assert cfg.output.tracking == []
    api.train(cfg)
    run = Path(cfg.output.dir)
    assert (run / "metrics.jsonl").exists()
    assert not (run / "tensorboard").exists() and not (run / "mlflow.json").exists()
    assert not (mlflow_env / "mlruns").exists() and not (mlflow_env / "mlflow.db").exists()


def test_tracking_keys_are_validated():
    def load(*overrides):
        return config.load(None, ["data.train=x.csv", *overrides]).output

    assert set(typing.get_args(config.OutputSection.model_fields["tracking"].annotation.__args__[0])) == set(
        tracking.PACKAGES)
    assert load("output.tracking=tensorboard,mlflow").tracking == ["tensorboard", "mlflow"]
    with pytest.raises(ConfigError, match=r"`output.tracking`: Input should be 'tensorboard' or 'mlflow'"):
        load("output.tracking=[tensorbord]")
    with pytest.raises(ConfigError, match="each tracker at most once"):
        load("output.tracking=[mlflow, mlflow]")
    with pytest.raises(ConfigError, match=r"`output.mlflow_uri`: read only by the mlflow tracker.*tracking=\[mlflow\]"):
        load("output.tracking=[tensorboard]", "output.mlflow_uri=./mlruns")


def test_the_mlflow_store_and_what_it_needs(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = config.load(None, ["data.train=x.csv", "output.tracking=[mlflow]"]).output
    assert tracking.mlflow_uri(out) == (tmp_path / "mlruns").as_uri()
    assert tracking.mlflow_uri(out, stored="file:///kept") == "file:///kept"  # a resume finds its run's store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracker:5000")
    assert tracking.mlflow_uri(out, stored="file:///kept") == "http://tracker:5000"
    assert tracking.mlflow_uri(out.model_copy(update={"mlflow_uri": "sqlite:///m.db"})) == "sqlite:///m.db"
    assert [tracking.store_kind(u) for u in ("./mlruns", "file:///x", "C:\\runs", "sqlite:///m.db",
                                             "postgresql+psycopg2://h/db", "http://h:5000", "databricks")] == [
        "file", "file", "file", "database", "database", "server", "file"]
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # mlflow-skinny does not install it
    db = out.model_copy(update={"mlflow_uri": "sqlite:///m.db"})
    with pytest.raises(ConfigError, match=r"sqlite:///m.db: a database store needs sqlalchemy.*pip install sqlalchemy"):
        tracking.check(db)


def test_a_tracker_that_fails_mid_run_is_dropped_with_a_warning_and_the_others_go_on():
    class Fake:
        def __init__(self, name, fail):
            self.name, self.fail, self.got, self.closed = name, fail, [], None

        def log(self, step, values):
            if self.fail:
                raise ConnectionError("tracking server gone")
            self.got.append((step, values))

        def close(self, status):
            self.closed = status

    bad, good = Fake("mlflow", True), Fake("tensorboard", False)
    said: list[str] = []
    trackers = tracking.Trackers([bad, good], said.append)
    trackers.record({"step": 3, "loss": 0.5, "lr": 1e-3, "time": 9.0})
    trackers.record({"eval": {"step": 3, "epoch": 0.5, "accuracy": 0.75, "confusion": [[1, 0], [0, 1]]}})
    trackers.record({"skipped_step": 4, "reason": "loss is nan"})
    trackers.record({"resume": {"from": "x", "step": 2}})  # not a metric
    assert good.got == [(3, {"train/loss": 0.5, "train/lr": 1e-3}), (3, {"eval/accuracy": 0.75}),
                        (4, {"train/skipped_step": 1.0})]
    assert bad.closed == "FAILED" and trackers.backends == [good]
    assert len(said) == 1 and "mlflow failed (ConnectionError: tracking server gone)" in said[0]


def test_other_ranks_track_nothing_and_a_failed_run_ends_failed_in_mlflow(mlflow_env):
    cfg = config.load(None, ["data.train=x.csv", "output.tracking=[tensorboard, mlflow]", "output.dir=run"])
    run = mlflow_env / "run"
    run.mkdir()
    with tracking.opened(cfg, run, None, enabled=False) as trackers:  # a rank other than 0
        trackers.record({"step": 1, "loss": 0.5})
    assert trackers.backends == [] and list(run.iterdir()) == [] and not (mlflow_env / "mlruns").exists()
    for raised, status in ((RuntimeError("diverged"), "FAILED"), (KeyboardInterrupt(), "KILLED")):
        with pytest.raises(type(raised)), tracking.opened(cfg, run, None, enabled=True) as trackers:
            trackers.record({"step": 1, "loss": 0.5})
            raise raised
        client, mrun = mlflow_run(mlflow_env / "mlruns")
        assert mrun.info.status == status and mrun.data.metrics == {"train/loss": 0.5}
        client.delete_run(mrun.info.run_id)

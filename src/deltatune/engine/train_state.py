"""A run's progress in one object: what a resumable checkpoint saves and restores whole.

`TrainState` holds everything that changes as training goes on and is not a tensor of the model,
optimizer, scheduler or scaler (those save themselves): the step and the position in the epoch, the
best evaluation so far, every evaluation, the early-stopping count, the open logging window, tokens
and compute time, the forgetting probe's baseline and the skipped-step counters. Like torchtitan's
`Trainer.state_dict` and torchtune's training progress, it is written as plain data
(`state_dict()`, JSON in `trainer_state.json`) and read back with `load_state_dict()`.

A leaf module: it imports nothing from deltatune.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

VERSION = 2  # trainer_state.json of this layout; version 1 (loose keys, before TrainState) is not read


@dataclass
class SkipCount:
    """Non-finite steps skipped (in all, in a row now, and where the current row began)."""
    skipped: int = 0
    in_a_row: int = 0
    first_bad: int = 0


@dataclass
class LogWindow:
    """The steps since the last logged line: their mean loss, largest gradient norm and throughput.

    `tokens` and `started` measure speed, not progress, and are not saved: a resumed run's first window
    reports the throughput of its own process."""
    loss: float = 0.0  # summed loss of the window's steps (each step's sum over its global batch)
    items: float = 0.0  # what that sum is over: examples or target tokens (this process's share)
    norm: float = 0.0
    # Further sums a task logs per window (preference: rewards and log-probs, engine/preference.py), by name.
    sums: dict[str, float] = field(default_factory=dict)
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, norm: float, items: float, sums: dict[str, float] | None = None) -> None:
        self.loss += loss
        self.norm = max(self.norm, norm)
        self.items += items
        for key, value in (sums or {}).items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def reset(self) -> None:
        self.loss, self.items, self.tokens, self.norm, self.sums = 0.0, 0.0, 0, 0.0, {}
        self.started = time.perf_counter()


@dataclass
class TrainState:
    steps_per_epoch: int
    step: int = 0  # optimizer steps done
    best: float | None = None  # the best value of eval.metric so far
    best_step: int = 0
    best_metrics: dict = field(default_factory=dict)
    evals: list[dict] = field(default_factory=list)
    bad_evals: int = 0  # evaluations in a row without improvement (early stopping)
    stopped_early: bool = False
    tokens: int = 0  # real (non-pad) tokens this process trained on
    compute_s: float = 0.0  # time inside training steps (no evaluation, no saving)
    probe_before: dict | None = None  # the forgetting probe on the base model, measured once at the start
    skips: SkipCount = field(default_factory=SkipCount)
    window: LogWindow = field(default_factory=LogWindow)

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    @property
    def batch_in_epoch(self) -> int:
        return self.step % self.steps_per_epoch

    def done(self, total_steps: int) -> bool:
        return self.step >= total_steps or self.stopped_early

    def state_dict(self) -> dict:
        """Plain data (JSON-ready). `epoch` and `batch_in_epoch` are for people: they follow from `step`."""
        return {"state_version": VERSION, "step": self.step, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "best": self.best, "best_step": self.best_step,
                "best_metrics": self.best_metrics, "evals": self.evals, "bad_evals": self.bad_evals,
                "stopped_early": self.stopped_early, "tokens": self.tokens, "compute_s": self.compute_s,
                "probe_before": self.probe_before, "skips": asdict(self.skips),
                "window": {"loss": self.window.loss, "items": self.window.items, "norm": self.window.norm,
                           "sums": dict(self.window.sums)}}

    def load_state_dict(self, d: dict) -> None:
        self.step, self.best, self.best_step = d["step"], d["best"], d["best_step"]
        self.best_metrics, self.evals, self.bad_evals = d["best_metrics"], d["evals"], d["bad_evals"]
        self.stopped_early, self.tokens, self.compute_s = d["stopped_early"], d["tokens"], d["compute_s"]
        self.probe_before = d["probe_before"]
        # In place: the non-finite guard holds `skips`.
        self.skips.skipped, self.skips.in_a_row, self.skips.first_bad = (d["skips"]["skipped"], d["skips"]["in_a_row"],
                                                                         d["skips"]["first_bad"])
        self.window.loss, self.window.items, self.window.norm = d["window"]["loss"], d["window"]["items"], \
            d["window"]["norm"]
        self.window.sums = dict(d["window"].get("sums", {}))  # absent in checkpoints written before it existed

"""Resumable checkpoints: everything a killed run needs to continue exactly as if it had never stopped.

Layout, every `train.save_every` optimizer steps (and at every step whose evaluation became the best):

    <output.dir>/checkpoints/step-000050/
        weights.safetensors   the parameters that train (the whole model for full fine-tuning, the
                              adapter and head for PEFT methods), by their names in the live model
        optimizer.pt  scheduler.pt  scaler.pt (fp16 only)  rng-rank0.pt ... (one per process)
        trainer_state.json    the loop's TrainState whole (engine/train_state.py: step, epoch and position
                              in it, best metric/step/metrics, evaluations, early-stop count, logging
                              window, tokens, compute time, probe baseline, skipped steps), plus the
                              config and data fingerprints an exact resume checks

A checkpoint is written into `.tmp-step-000050/`, every file fsync'ed, then renamed: a directory
named `step-N` is complete, anything else is the debris of a killed process and is removed. Only
`torch.load(weights_only=True)` and safetensors read them. Rotation keeps the newest `train.keep_last`
and the best; a deleted checkpoint is first renamed away, so none is ever half-deleted under its name.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from deltatune.engine import artifact, disk, runlock, train_state
from deltatune.engine.faults import all_finite
from deltatune.engine.train_state import TrainState
from deltatune.errors import ConfigError

DIRNAME = "checkpoints"
STATE = "trainer_state.json"
NAME = re.compile(r"^step-(\d+)$")
# Keys that may change between a run and its resume: they do not change what is computed.
MAY_CHANGE = ("output.", "train.threads", "train.log_every", "train.compile", "train.gradient_checkpointing",
              "train.save_every", "train.keep_last", "train.max_bad_steps", "eval.batch_size", "data.on_error")


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / DIRNAME


def step_of(path: Path) -> int:
    m = NAME.match(Path(path).name)
    return int(m.group(1)) if m else -1


def complete(ckdir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckdir.is_dir():
        return []
    found = [p for p in ckdir.iterdir() if p.is_dir() and NAME.match(p.name) and (p / STATE).is_file()]
    return sorted(found, key=step_of)


def has_saved(run_dir: Path) -> bool:
    """Whether a run got as far as a complete best model/adapter or resumable checkpoint."""
    run_dir = Path(run_dir)
    return (run_dir / "model").is_dir() or (run_dir / "adapter").is_dir() or bool(complete(checkpoints_dir(run_dir)))


def latest(ckdir: Path) -> Path | None:
    done = complete(ckdir)
    return done[-1] if done else None


def latest_with_step(ckdir: Path) -> tuple[Path, int] | None:
    """The newest complete checkpoint and its step, or None (what the non-finite guard reports)."""
    last = latest(ckdir)
    return (last, step_of(last)) if last is not None else None


def remove_debris(ckdir: Path) -> list[str]:
    """Delete what killed processes left: unfinished writes and deletions."""
    removed = []
    if ckdir.is_dir():
        for p in ckdir.iterdir():
            if p.name.startswith((".tmp-", ".del-")) or (NAME.match(p.name) and not (p / STATE).is_file()):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return removed


def delete(path: Path) -> None:
    gone = path.with_name(f".del-{path.name}")
    os.replace(path, gone)  # atomic: the checkpoint disappears whole, then its files go
    shutil.rmtree(gone, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# What must match for an exact resume


def config_view(cfg) -> dict[str, object]:
    """The resolved config as flat `section.key` -> value, without keys that may change on resume."""
    flat: dict[str, object] = {}

    def walk(prefix: str, node: object) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = node

    walk("", cfg.model_dump(mode="json"))
    return {k: v for k, v in flat.items() if not k.startswith(MAY_CHANGE)}


def config_diff(saved: dict, now: dict) -> list[str]:
    keys = sorted(set(saved) | set(now))
    return [f"{k}: {saved.get(k, '(unset)')!r} in the checkpoint, {now.get(k, '(unset)')!r} now"
            for k in keys if saved.get(k) != now.get(k)]


def data_fingerprint(ds) -> str:
    """sha256 of the tokenized training rows in order (token ids, lengths, labels)."""
    import pyarrow.compute as pc

    h = hashlib.sha256(str(len(ds)).encode())
    cols = [c for c in ("input_ids", "labels") if c in ds.column_names]
    for table in ds.with_format("arrow").iter(batch_size=8192):
        for col in cols:
            arr = table.column(col).combine_chunks()
            if col == "input_ids":
                h.update(pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
                arr = arr.flatten()
            h.update(arr.to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Choosing the checkpoint to resume from (before any weight is loaded)


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / STATE).read_text(encoding="utf-8"))


def resolve(cfg, resume: str | None) -> Path | None:
    """`auto`: the newest complete checkpoint of output.dir, or None. A path: that checkpoint (or the
    newest in a run directory). Either way the config must be the one it was written with."""
    if resume is None:
        return None
    ckdir = checkpoints_dir(Path(cfg.output.dir))
    if resume == "auto":
        path = latest(ckdir)
        if path is None:
            return None
    else:
        path = Path(resume)
        if (path / DIRNAME).is_dir():  # a run directory: its newest checkpoint
            found = latest(path / DIRNAME)
            if found is None:
                raise ConfigError(f"--resume {resume}: the run directory has no complete checkpoint. "
                                  f"Fix: start without --resume, or set train.save_every to write checkpoints.")
            path = found
        elif not path.is_dir():
            have = ", ".join(p.name for p in complete(ckdir)) or "none"
            raise ConfigError(f"--resume {resume}: no such checkpoint directory (complete checkpoints in {ckdir}: "
                              f"{have}). Fix: pass one of them, or --resume auto for the newest.")
        elif not (path / STATE).is_file() or not NAME.match(path.name):
            raise ConfigError(f"--resume {resume}: not a complete checkpoint (no {STATE}; a checkpoint whose "
                              f"writer was killed is never used). Fix: --resume auto picks the newest complete one.")
    saved = read_state(path)
    # Before anything is removed for this resume (newer checkpoints of the branch it abandons).
    check_world(path, saved, cfg, int(os.environ.get("WORLD_SIZE", "1")))
    diff = config_diff(saved["config"], config_view(cfg))
    if diff:
        raise ConfigError(f"--resume {path}: the config differs from the one this checkpoint was written with:\n"
                          + "".join(f"    {d}\n" for d in diff)
                          + "  An exact resume needs the same settings. Fix: resume with the checkpoint's values "
                            "(see its run's config.yaml), or start a new run in another output.dir.")
    return path


def check_world(path: Path, meta: dict, cfg, world: int, mode: str | None = None) -> None:
    """An exact resume sees the same global batches (train.batch_size x train.grad_accum x processes) and
    reads the checkpoint's own format: the same number of processes and the same train.distributed
    (`mode`: the strategy now running; single and ddp checkpoints are the same format)."""
    was = meta["world_size"]
    written = (meta.get("distributed") or {}).get("mode", "ddp" if was > 1 else "single")
    if mode is not None and written != mode and {written, mode} != {"single", "ddp"}:
        raise ConfigError(f"--resume {path}: written by train.distributed={written}, resumed with "
                          f"{mode}; their checkpoints differ. Fix: resume with "
                          f"train.distributed={written} and {was} process(es).")
    if was != world:
        tc = cfg.train
        raise ConfigError(f"--resume {path}: written by {was} process(es), resumed with {world}: the global batch "
                          f"(train.batch_size x train.grad_accum x processes) would change from "
                          f"{tc.batch_size * tc.grad_accum * was} to {tc.batch_size * tc.grad_accum * world}, and "
                          f"with it every later step. Fix: resume with --nproc {was} (the same number of "
                          f"processes in all).")


# ---------------------------------------------------------------------------------------------
# Saving and restoring


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _numpy_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # As tensors and plain numbers, so that torch.load(weights_only=True) can read it back.
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def rng_state() -> dict:
    out = {"python": random.getstate(), "numpy": _numpy_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    n = s["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class Saver:
    """Writes, rotates and restores the resumable checkpoints of one run."""

    def __init__(self, run_dir: Path, cfg, dist, spread, model, optimizer, scheduler, scaler, train_set,
                 steps_per_epoch: int, total_steps: int):
        self.dir = checkpoints_dir(run_dir)
        self.run_dir, self.cfg, self.dist, self.spread, self.model = Path(run_dir), cfg, dist, spread, model
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.train_set, self.steps_per_epoch, self.total_steps = train_set, steps_per_epoch, total_steps
        self._data: str | None = None

    @property
    def data(self) -> str:
        if self._data is None:
            self._data = data_fingerprint(self.train_set)
        return self._data

    def due(self, step: int, new_best: bool) -> bool:
        every = self.cfg.train.save_every
        return bool(every) and (step % every == 0 or new_best) and step < self.total_steps

    def save(self, state: TrainState) -> Path:
        """Checkpoint `step-<state.step>`: weights, optimizer, scheduler, scaler (as the strategy stores them:
        whole from rank 0, or a shard from every rank), RNG per rank, and the TrainState whole."""
        step = state.step
        if not all_finite(trainable(self.model).values()):  # never reached: non-finite steps are skipped
            raise ConfigError(f"refusing to write checkpoint step {step}: some weights are not finite")
        final = self.dir / f"step-{step:06d}"
        tmp = self.dir / f".tmp-{final.name}"
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            self._write(tmp, tmp, lambda: tmp.mkdir(parents=True))
        self.dist.barrier()

        def put(name: str, write) -> None:
            self._write(tmp, tmp / name, lambda: write(tmp / name))

        put(f"rng-rank{self.dist.rank}.pt", lambda path: torch.save(rng_state(), path))
        self.spread.save_state(tmp, put, self.model, self.optimizer, self.scheduler, self.scaler)
        self.dist.barrier()
        if self.dist.is_main:
            meta = {**state.state_dict(), "steps_per_epoch": self.steps_per_epoch,
                    "total_steps": self.total_steps, "world_size": self.dist.world,
                    "distributed": self.spread.describe(), "time": time.time(),
                    "config": config_view(self.cfg), "data": self.data}
            put(STATE, lambda path: path.write_text(json.dumps(meta, indent=1), encoding="utf-8"))
            for f in [*sorted(tmp.rglob("*"), reverse=True), tmp]:  # files before the folders that hold them
                self._write(tmp, f, lambda f=f: _fsync(f))
            if final.exists():  # written before by a branch that was abandoned by a resume
                delete(final)
            os.replace(tmp, final)
            _fsync(self.dir)
            runlock.artifact_saved(self.run_dir)  # a run this one replaces (output.overwrite) can go now
            self.rotate(state.best_step)
        self.dist.barrier()
        return final

    @staticmethod
    def _write(tmp: Path, path: Path, write) -> None:
        """`write()` creates `path` in checkpoint `tmp`. A full disk or a read-only directory stops the run with
        a sentence, and the unfinished checkpoint is removed (the complete ones stay)."""
        try:
            write()
        except Exception as e:
            failure = disk.write_failure(e, path, f"checkpoint {tmp.name.removeprefix('.tmp-')}")
            if failure is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            raise failure from None

    def rotate(self, best_step: int) -> None:
        done = complete(self.dir)
        keep = set(done[-self.cfg.train.keep_last:]) | {p for p in done if step_of(p) == best_step}
        for p in done:
            if p not in keep:
                delete(p)

    def restore(self, path: Path, tokenizer, log, state: TrainState) -> None:
        """Load everything from checkpoint `path`, the loop's progress into `state`."""
        meta = read_state(path)
        if meta.get("state_version") != train_state.VERSION:
            raise ConfigError(f"--resume {path}: this checkpoint was written by an older deltatune, whose trainer "
                              f"state this version does not read. Fix: start the run over (output.overwrite=true), "
                              f"or finish it with the deltatune version that wrote it.")
        check_world(path, meta, self.cfg, self.dist.world, self.spread.name)
        if meta["total_steps"] != self.total_steps or meta["steps_per_epoch"] != self.steps_per_epoch:
            raise ConfigError(f"--resume {path}: the run had {meta['total_steps']} steps of "
                              f"{meta['steps_per_epoch']} per epoch, now {self.total_steps} of {self.steps_per_epoch}"
                              f". Fix: resume with the same data and settings.")
        if meta["data"] != self.data:
            raise ConfigError(f"--resume {path}: the training data differs from the data this checkpoint was "
                              f"trained on (fingerprint of the tokenized rows). Fix: restore the original data "
                              f"files, or start a new run in another output.dir.")
        best = Path(path).parent / f"step-{meta['best_step']:06d}"
        # The saved best model may come from steps after this checkpoint (a branch the kill cut off):
        # rewrite it from the best checkpoint, or remove it, so that it matches the restored best state.
        if meta["best_step"] and best.is_dir():
            self.spread.load_weights(best, self.model)  # every rank: sharded weights load collectively
            whole = self.spread.full_state_dict(self.model)
            if self.dist.is_main:
                artifact.save(self.model, tokenizer, self.run_dir, state_dict=whole)
        elif not meta["best_step"] and self.dist.is_main:
            shutil.rmtree(artifact.artifact_dir(self.run_dir, self.model), ignore_errors=True)
        self.spread.load_state(path, self.model, self.optimizer, self.scheduler, self.scaler)
        state.load_state_dict(meta)
        set_rng_state(torch.load(path / f"rng-rank{self.dist.rank}.pt", weights_only=True))
        log.print(f"resumed from {path}: step {meta['step']} of {self.total_steps} (epoch {meta['epoch']}, "
                  f"batch {meta['batch_in_epoch']} of {self.steps_per_epoch})")


# ---------------------------------------------------------------------------------------------
# The run directory before training starts (rank 0)


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Keep metrics.jsonl records up to `step`: later ones belong to steps the resume will redo."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        at = rec.get("step", rec.get("skipped_step", (rec.get("eval") or {}).get("step", 0)))
        if at <= step:
            kept.append(line + "\n")
    tmp = path.with_name(".metrics.jsonl.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def leftovers(run_dir: Path) -> list[str]:
    """What an unfinished run left that a new run would mix with or misread."""
    found = [p.name for p in (run_dir / "model", run_dir / "adapter") if p.exists()]
    found += [f"{DIRNAME}/{p.name}" for p in complete(checkpoints_dir(run_dir))]
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists() and metrics.stat().st_size:
        found.append("metrics.jsonl")
    return found

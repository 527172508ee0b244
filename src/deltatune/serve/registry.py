"""Which run directories the server may load, and whether an adapter fits the server's base model.

A path comes from the command line or from an admin request: it must lie under the allowed root (after
resolving symlinks; `..` is refused outright), every file the server reads must resolve inside that root
too, and weights must be safetensors (pickle files run code when loaded). An adapter must have been
trained on the server's base: same model (config.json and weights fingerprint, as recorded in the run's
summary.json at training, else computed from the model of that name here) and revision. The check
that its target modules exist in the base is made when it loads (engine.py): every saved tensor must
find its place, or the adapter is refused instead of silently serving the base model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from deltatune.models import identity
from deltatune.serve.errors import ServeError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
RUN_FILES = ("config.yaml", "labels.json", "summary.json")


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise ServeError(f"adapter name `{name}`: use 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                         f"or digit (it is the `model` clients send)", 400, "bad_name")
    return name


def resolve_run(root: str | Path, run_dir: str | Path) -> Path:
    """The run directory `run_dir` (relative to `root`, or absolute) once it is known to stay inside `root`.

    Refused: any `..` component (even one that would resolve back inside), a path or symlink that leads
    outside the root, a directory that is not a finished run, pickle weights, and files of the run that
    are symlinks out of the root."""
    top = Path(root).resolve()
    given = Path(run_dir)
    if ".." in given.parts:
        raise ServeError(f"run directory `{run_dir}`: `..` is not allowed; give a path inside the allowed root "
                         f"{top}", 400, "path_not_allowed")
    path = (given if given.is_absolute() else top / given).resolve()
    if not path.is_relative_to(top):
        raise ServeError(f"run directory `{run_dir}` resolves to {path}, outside the allowed root {top}. Fix: "
                         f"move or copy the run under {top}, or start the server with --allowed-root set to a "
                         f"directory that holds it", 403, "path_not_allowed")
    if not path.is_dir():
        raise ServeError(f"run directory `{run_dir}`: no such directory under {top}", 404, "run_not_found")
    artifact = next((path / a for a in ("adapter", "model") if (path / a).is_dir()), None)
    if artifact is None:
        # A merged model directory (`deltatune merge`) is served as it is.
        artifact = path if (path / "config.json").is_file() else None
    if artifact is None:
        raise ServeError(f"{path}: not a finished deltatune run (no adapter/ or model/) nor a merged model "
                         f"(config.json). Fix: pass the output.dir of a run that completed `deltatune train`",
                         400, "not_a_run")
    files = [path / f for f in RUN_FILES if (path / f).exists() or (path / f).is_symlink()]
    files += sorted(artifact.iterdir())
    for f in files:
        if not f.resolve().is_relative_to(top):
            raise ServeError(f"{f} is a link to {f.resolve()}, outside the allowed root {top}; refused",
                             403, "path_not_allowed")
        if f.suffix in PICKLE_SUFFIXES:
            raise ServeError(f"{f}: pickle weights are refused (loading them can run code); the server loads "
                             f"safetensors only. Fix: save the run again with safetensors (deltatune does by "
                             f"default)", 400, "unsafe_weights")
    return path


def model_dir(name: str, revision: str | None = None) -> Path:
    """The local directory of `name` (models/identity.py), or a 400 saying why it cannot be found."""
    from deltatune.errors import DeltatuneError

    try:
        return identity.model_dir(name, revision)
    except DeltatuneError as e:
        raise ServeError(f"base model `{name}` cannot be found here: {e}", 400, "base_not_found") from None


def recorded_base(run_dir: Path) -> dict | None:
    """The base the run recorded at training (summary.json `base`, since stop 20), if any."""
    try:
        return json.loads((run_dir / "summary.json").read_text(encoding="utf-8")).get("base")
    except (OSError, ValueError):
        return None


class Base:
    """The server's base model: its name, revision and fingerprint, against which adapters are checked."""

    def __init__(self, name: str, revision: str | None = None):
        self.name, self.revision = name, revision
        self.directory = model_dir(name, revision)
        self.fingerprint = identity.fingerprint(self.directory)

    def check_run(self, run_dir: Path, model_name: str, model_revision: str | None) -> None:
        """Refuse an adapter trained on another model: never answer with a base it was not trained on."""
        if model_revision != self.revision and model_name == self.name:
            raise ServeError(f"{run_dir}: trained on `{model_name}` revision {model_revision}, the server's base is "
                             f"revision {self.revision}", 409, "base_mismatch")
        recorded = recorded_base(run_dir)
        try:
            theirs = (recorded["fingerprint"] if recorded
                      else identity.fingerprint(model_dir(model_name, model_revision)))
        except ServeError as e:
            raise ServeError(f"{run_dir}: trained on `{model_name}`, which cannot be found on this machine, so it "
                             f"cannot be checked against the server's base `{self.name}` ({e}). Fix: make that "
                             f"model available under the same name, or serve the run on a server whose --base is "
                             f"it", 409, "base_mismatch") from None
        if theirs != self.fingerprint:
            raise ServeError(f"{run_dir}: trained on `{model_name}` (fingerprint {theirs}), but the server's base is "
                             f"`{self.name}` (fingerprint {self.fingerprint}): its adapter would answer with a "
                             f"model it was not trained on. Fix: serve it on a server started with --base "
                             f"{model_name}", 409, "base_mismatch")

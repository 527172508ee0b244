"""Which run directories the server may load, and whether an adapter fits the server's base model.

A path comes from the command line or from an admin request: it must lie under the allowed root (after
resolving symlinks; `..` is refused outright), every file the server reads must resolve inside that root
too, and weights must be safetensors (pickle files run code when loaded). An adapter must have been
trained on the server's base: same model (config.json and weights fingerprint) and revision. The check
that its target modules exist in the base is made when it loads (engine.py): every saved tensor must
find its place, or the adapter is refused instead of silently serving the base model.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from deltatune.serve.errors import ServeError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
RUN_FILES = ("config.yaml", "labels.json", "summary.json")
SAMPLE_BYTES = 1 << 20  # of each weights file, hashed into the fingerprint (whole files would take minutes)


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
    """The local directory holding `name`'s config.json (built-in name, local directory or cached hub id)."""
    from deltatune.errors import DeltatuneError
    from deltatune.models.catalogue import resolve

    try:
        source = resolve(name, revision)
    except DeltatuneError as e:
        raise ServeError(f"base model `{name}` cannot be found here: {e}", 400, "base_not_found") from None
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, "config.json", revision=revision)
    if not isinstance(cached, str):
        raise ServeError(f"base model `{name}`: config.json is not in the local Hugging Face cache", 400,
                         "base_not_found")
    return Path(cached).parent


def fingerprint(directory: Path) -> str:
    """A model's identity: its config.json (as data, without transformers' bookkeeping keys) and, for each
    safetensors file, its size and the hash of its first MiB (the header and the first tensors). Two copies
    of one model agree; two models with the same architecture but other weights do not."""
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    for key in ("_name_or_path", "transformers_version"):
        config.pop(key, None)
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for f in sorted(directory.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}:".encode())
        with open(f, "rb") as fh:
            h.update(hashlib.sha256(fh.read(SAMPLE_BYTES)).digest())
    return h.hexdigest()[:16]


class Base:
    """The server's base model: its name, revision and fingerprint, against which adapters are checked."""

    def __init__(self, name: str, revision: str | None = None):
        self.name, self.revision = name, revision
        self.directory = model_dir(name, revision)
        self.fingerprint = fingerprint(self.directory)

    def check_run(self, run_dir: Path, model_name: str, model_revision: str | None) -> None:
        """Refuse an adapter trained on another model: never answer with a base it was not trained on."""
        if model_revision != self.revision and model_name == self.name:
            raise ServeError(f"{run_dir}: trained on `{model_name}` revision {model_revision}, the server's base is "
                             f"revision {self.revision}", 409, "base_mismatch")
        try:
            theirs = fingerprint(model_dir(model_name, model_revision))
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

"""`deltatune serve`: load the base, the adapters and the runs, then serve them with uvicorn until stopped.

On SIGINT/SIGTERM uvicorn stops accepting connections and lets in-flight requests finish (up to the request
timeout); the app's shutdown then answers anything still queued before the process exits.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from deltatune.serve import registry
from deltatune.serve.app import Settings, create_app
from deltatune.serve.engine import Engine
from deltatune.serve.errors import ServeError


def parse_adapters(pairs: list[str]) -> dict[str, str]:
    """`NAME=RUN_DIR` arguments as a dict; a repeated name is an error, not a silent replacement."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, run = pair.partition("=")
        if not sep or not name or not run:
            raise ServeError(f"--adapter {pair}: write NAME=RUN_DIR, e.g. --adapter sentiment=runs/sst2-lora")
        if name in out:
            raise ServeError(f"--adapter {name} is given twice ({out[name]} and {run}); names must be unique")
        out[registry.check_name(name)] = run
    return out


def build(base: str | None, adapters: dict[str, str], runs: list[str] | None = None,
          allowed_root: str | Path = ".", base_revision: str | None = None, settings: Settings | None = None,
          device: str | None = None, merge: list[str] | None = None):
    """The FastAPI app serving `adapters` (name -> run directory) over `base`, plus each of `runs` (full,
    merged or adapter runs) under its directory's name; the names in `merge` are served merged (LoRA/IA3: no
    adapter work per token). Every path must lie under `allowed_root`."""
    settings = dataclasses.replace(settings or Settings(), allowed_root=Path(allowed_root))
    if not adapters and not runs:
        raise ServeError("nothing to serve: give --adapter NAME=RUN_DIR (repeatable) and/or --run RUN_DIR")
    engine = Engine(base, base_revision, device)
    named = {**adapters}
    for run in runs or []:
        name = Path(run).resolve().name
        if name in named:
            raise ServeError(f"--run {run}: the name `{name}` is taken; serve it with --adapter OTHER_NAME={run}")
        named[name] = run
    unknown = sorted(set(merge or []) - set(named))
    if unknown:
        raise ServeError(f"--merge {', '.join(unknown)}: no adapter or run of that name is served (names: "
                         f"{', '.join(named)})")
    for name, run in named.items():  # paths on the command line are relative to the working directory
        engine.add(name, registry.resolve_run(settings.allowed_root, os.path.abspath(run)), name in (merge or []))
    return create_app(engine, settings)


def serve(base: str | None, adapters: dict[str, str], runs: list[str] | None = None, host: str = "127.0.0.1",
          port: int = 8000, allowed_root: str | Path = ".", base_revision: str | None = None,
          settings: Settings | None = None, device: str | None = None, log_level: str = "info",
          merge: list[str] | None = None) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests are answered before the process exits."""
    import uvicorn

    app = build(base, adapters, runs, allowed_root, base_revision, settings, device, merge)
    timeout = app.state.settings.timeout_s
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=int(timeout) + 5)

"""deltatune: fine-tune pretrained transformers, fully or as a small delta, on the hardware you have.

    import deltatune
    cfg = deltatune.load("configs/quickstart.yaml", ["train.epochs=1"])
    summary = deltatune.train(cfg)
    deltatune.predict(summary["run_dir"], ["a quietly moving film"])
"""

from __future__ import annotations

import atexit
import gc

__version__ = "0.1.0"
__all__ = ["RunConfig", "load", "train", "evaluate", "predict", "load_run", "__version__"]


def __getattr__(name: str):
    # Lazy: `deltatune --help` and config checks should not pay ~5 s importing torch + transformers.
    if name in ("train", "evaluate", "predict", "load_run"):
        from deltatune import api

        return getattr(api, name)
    if name in ("RunConfig", "load"):
        from deltatune import config

        return getattr(config, name)
    raise AttributeError(f"module 'deltatune' has no attribute {name!r}")


def _skip_exit_collections() -> None:
    """Python's shutdown runs full garbage collections over every object still alive; with torch,
    transformers and datasets loaded that is millions of objects, and took 2.5-3 s per process here
    after the work was done (measured: `import deltatune.api` then exit, 2.5-3.1 s -> 0.3-0.7 s).
    Frozen objects are skipped by those collections. Everything else still runs: the other exit
    handlers, and the clean-up of objects freed by reference counting (files, locks, temp dirs);
    only cyclic garbage is left for the operating system to reclaim with the process."""
    gc.freeze()


# Exit handlers run last-in first-out: those that torch, datasets, ... register after this import run before it.
atexit.register(_skip_exit_collections)

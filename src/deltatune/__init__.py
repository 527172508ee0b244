"""deltatune: fine-tune pretrained transformers, fully or as a small delta, on the hardware you have.

    import deltatune
    cfg = deltatune.load("configs/quickstart.yaml", ["train.epochs=1"])
    summary = deltatune.train(cfg)
    deltatune.predict(summary["run_dir"], ["a quietly moving film"])
"""

from __future__ import annotations

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

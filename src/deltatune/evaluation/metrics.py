"""Classification metrics via scikit-learn: binary for two classes, macro-averaged otherwise."""

from __future__ import annotations

HIGHER_IS_BETTER = {"accuracy": True, "f1": True, "precision": True, "recall": True, "loss": False,
                    "perplexity": False, "exact_match": True, "label_accuracy": True,
                    "reward_accuracy": True, "reward_margin": True, "preference_accuracy": True}
TASK_METRICS = {"classification": ("accuracy", "f1", "precision", "recall", "loss"),
                "causal_lm": ("loss", "perplexity"),
                "sft": ("loss", "perplexity", "exact_match", "label_accuracy"),
                "preference": ("loss", "reward_accuracy", "reward_margin", "preference_accuracy", "exact_match",
                               "label_accuracy")}
GENERATION_METRICS = ("exact_match", "label_accuracy")


def classification(y_true: list[int], y_pred: list[int], num_labels: int) -> dict[str, float]:
    # Imported here: scikit-learn (with scipy) takes about 1 s to import, which every command that imports
    # the engine paid, also those that never score a classifier (language-model runs, predict, generate).
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    average = "binary" if num_labels == 2 else "macro"
    p, r, f, _ = precision_recall_fscore_support(
        y_true, y_pred, average=average, labels=list(range(num_labels)) if average == "macro" else None,
        zero_division=0)
    return {"accuracy": float(accuracy_score(y_true, y_pred)), "precision": float(p), "recall": float(r),
            "f1": float(f)}


def improved(metric: str, new: float, best: float | None) -> bool:
    if best is None:
        return True
    return new > best if HIGHER_IS_BETTER[metric] else new < best

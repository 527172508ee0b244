"""The Hugging Face Trainer recipe, as tutorials write it (`plain`) and as a careful user tunes it (`tuned`).

plain: padding="max_length" (128), fp32.
tuned: dynamic padding (DataCollatorWithPadding), length-grouped sampling, bf16 autocast where the
       CPU/GPU supports it.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from common import HPARAMS, prepared, read_tsv, report
from datasets import Dataset
from sklearn.metrics import accuracy_score, f1_score
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

from deltatune.engine.precision import cpu_supports_bf16
from deltatune.models import resolve


def main(variant: str) -> None:
    files = prepared()
    train_rows, test_rows = read_tsv(files["train"]), read_tsv(files["test"])
    path = resolve(HPARAMS["model"])
    tok = AutoTokenizer.from_pretrained(path)
    plain = variant == "plain"

    def encode(batch):
        kw = {"padding": "max_length"} if plain else {}
        enc = tok(batch["text"], truncation=True, max_length=HPARAMS["max_length"], **kw)
        enc["labels"] = [int(x) for x in batch["label"]]
        return enc

    def to_ds(rows):
        return Dataset.from_list(rows).map(encode, batched=True, remove_columns=["text", "label"])

    train_ds, test_ds = to_ds(train_rows), to_ds(test_rows)
    set_seed(HPARAMS["seed"])
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32)
    bf16 = (not plain) and (torch.cuda.is_bf16_supported() if torch.cuda.is_available() else cpu_supports_bf16())
    args = TrainingArguments(
        output_dir="bench/.work/trainer", num_train_epochs=HPARAMS["epochs"],
        per_device_train_batch_size=HPARAMS["batch_size"], per_device_eval_batch_size=64,
        learning_rate=HPARAMS["lr"], warmup_steps=HPARAMS["warmup"], weight_decay=HPARAMS["weight_decay"],
        max_grad_norm=HPARAMS["max_grad_norm"], lr_scheduler_type="linear", seed=HPARAMS["seed"],
        bf16=bf16, use_cpu=not torch.cuda.is_available(), save_strategy="no", eval_strategy="no",
        logging_steps=50, report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        train_sampling_strategy="random" if plain else "group_by_length",
    )
    collator = None if plain else DataCollatorWithPadding(tok)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=collator)
    t0 = time.perf_counter()
    trainer.train()
    trainer.save_model()  # timed like deltatune's, whose training ends with the trained model on disk
    seconds = time.perf_counter() - t0
    pred = trainer.predict(test_ds)
    y_pred = np.argmax(pred.predictions, axis=-1)
    y_true = pred.label_ids
    report({"recipe": f"HF Trainer, {variant}", "precision": "bf16" if bf16 else "fp32",
            "train_seconds": round(seconds, 2), "accuracy": float(accuracy_score(y_true, y_pred)),
            "f1": float(f1_score(y_true, y_pred))})


if __name__ == "__main__":
    main(sys.argv[1])

"""deltatune on the same data with the same hyper-parameters, through its public library API: what a user's
script does (train, then score the test split), nothing else, so the process's wall time is the user's."""

from __future__ import annotations

from common import HPARAMS, WORK, prepared, report

from deltatune import api, config


def main() -> None:
    files = prepared()
    h = HPARAMS
    cfg = config.load(None, [
        f"model.name={h['model']}", f"data.train={files['train']}", "data.validation=null", "data.text=sentence",
        f"data.max_length={h['max_length']}", f"train.epochs={h['epochs']}", f"train.batch_size={h['batch_size']}",
        f"train.lr={h['lr']}", f"train.warmup={h['warmup']}", f"train.weight_decay={h['weight_decay']}",
        f"train.max_grad_norm={h['max_grad_norm']}", f"train.seed={h['seed']}", "train.precision=auto",
        "train.schedule=linear", f"output.dir={WORK / 'deltatune'}", "output.overwrite=true",
    ])
    summary = api.train(cfg)
    result = api.evaluate(WORK / "deltatune", str(files["test"]))
    report({"recipe": "deltatune", "precision": summary["precision"], "train_seconds": summary["train_seconds"],
            "accuracy": result["accuracy"], "f1": result["f1"]})


if __name__ == "__main__":
    main()

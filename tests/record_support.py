"""Metrics records in the schema training and ``selfkd-eval`` write, with
scores chosen by hand."""


def record(split, exit_errors, *, nll=1.0, ensemble_error=None, num_examples=100,
           dataset="cifar10"):
    """A metrics record: per-exit top-1 errors, other scores derived from them."""
    def scores(top1):
        return {"top1_err": top1, "top5_err": top1 / 4, "nll": nll, "ece": top1 / 10,
                "aurc": 2 * top1, "eaurc": top1}
    exits = [{"exit": i, **scores(e)} for i, e in enumerate(exit_errors, start=1)]
    ensemble = scores(exit_errors[-1] if ensemble_error is None else ensemble_error)
    return {
        "dataset": dataset, "split": split, "num_examples": num_examples,
        "arch": "resnet18", "methods": [], "num_exits": len(exits),
        "train_time_s": None, "train_time_per_epoch_s": None, "epochs": 2,
        "params": 1000, "exits": exits, "ensemble": ensemble,
        "reliability": {"edges": [0.0, 0.5, 1.0], "confidence": [0.3, 0.8],
                        "accuracy": [0.25, 0.75], "count": [40, 60]},
    }

"""Measures the early-exit cascade of a trained run on its test set, without peeking.

The run held out no validation data, so the test set is split in two
stratified halves (fixed by ``--seed``): the threshold is picked on the
*selection* half only (the cheapest threshold whose accuracy there is at most
``--max_accuracy_drop`` points below the deepest exit's), and every figure is
reported on the other, *report* half, which played no part in the choice.

Reported on the report half: the accuracy of the deepest exit and of the
cascade, the cascade's mean FLOPs per image against the deepest exit served
alone, the share of images each exit answered, and the latency per image of
the two SavedModels (``selfkd-export`` of the deepest exit and of the cascade,
loaded with `tf.saved_model.load`, fed raw float32 pixels) at batch 1 and 64
(`selfkd_tf.early_exit.time_per_image`).

Example:

    python tools/early_exit_study.py --model=/work/runs/small/pskd_byot_dmfl_seed0 \\
        --out=/tmp/early_exit_study
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import tensorflow as tf

from selfkd_tf import early_exit, export
from selfkd_tf.metrics import write_metrics_json
from selfkd_tf.evaluation import evaluation_data, load_trained_model, predict_exit_probabilities

# The selection sweep runs on stored probabilities only, so it can be fine.
SELECTION_THRESHOLDS = (*np.round(np.arange(0.0, 1.0, 0.005), 3).tolist(),
                        0.9975, 0.999, 0.9995, 0.9999, 1.01)


def stratified_halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint index sets holding half of every class each (the odd one out to the second)."""
    rng = np.random.default_rng(seed)
    first, second = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        first.append(members[: len(members) // 2])
        second.append(members[len(members) // 2:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="A run directory or .keras file.")
    parser.add_argument("--out", required=True, help="Directory for the exports and JSON.")
    parser.add_argument("--max_accuracy_drop", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the halves.")
    parser.add_argument("--latency_examples", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    trained = load_trained_model(args.model)
    model = trained.model
    test_ds, info = evaluation_data(trained, split="test")
    exit_probs, labels = predict_exit_probabilities(model, test_ds)
    images = np.concatenate([x["image"].numpy() for x, _ in test_ds])
    selection, report = stratified_halves(labels, args.seed)
    costs = export.exit_costs(model.backbone)

    def curve_of(rows, thresholds):
        return early_exit.early_exit_curve([p[rows] for p in exit_probs], labels[rows],
                                           costs, thresholds)

    chosen = early_exit.select_threshold(curve_of(selection, SELECTION_THRESHOLDS),
                                         max_accuracy_drop=args.max_accuracy_drop)
    if chosen is None:
        raise SystemExit(
            f"early_exit_study: no threshold keeps the selection half within "
            f"{args.max_accuracy_drop} points of the deepest exit at less cost; "
            "serve the deepest exit")
    reported = curve_of(report, [chosen["threshold"]])

    # Raw pixels of the report half, as a client would send them.
    std, mean = np.float32(model.input_std), np.float32(model.input_mean)
    pixels = np.round((images[report] * std + mean) * 255)[: args.latency_examples]
    paths = {name: os.path.join(args.out, name) for name in ("deepest", "cascade")}
    export.export_saved_model(model, paths["deepest"], overwrite=True,
                              class_names=info.class_names)
    export.export_saved_model(model, paths["cascade"], exit="cascade", overwrite=True,
                              threshold=chosen["threshold"], class_names=info.class_names)
    served = {name: tf.saved_model.load(path) for name, path in paths.items()}
    latency = early_exit.time_per_image(
        [lambda x, s=s: s.serve(tf.constant(x, tf.float32)) for s in served.values()],
        pixels.astype(np.float32), rounds=args.rounds)

    result = {
        "model": trained.path, "dataset": info.name, "seed": args.seed,
        "selection_examples": len(selection), "report_examples": len(report),
        "max_accuracy_drop": args.max_accuracy_drop,
        "threshold": chosen["threshold"],
        "selection": {"cascade_accuracy": chosen["accuracy"],
                      "deepest_accuracy": chosen["required_accuracy"] + args.max_accuracy_drop},
        "report": {"deepest": reported["exits"][-1], "exits": reported["exits"],
                   "cascade": reported["cascade"][0]},
        "latency_ms": dict(zip(paths, latency)),
        "latency_examples": len(pixels), "rounds": args.rounds,
    }
    write_metrics_json(result, os.path.join(args.out, "early_exit_study.json"))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

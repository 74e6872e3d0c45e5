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
(`selfkd_tf.serving.early_exit.time_per_image`). ``--out`` receives the two
SavedModels (``deepest``, ``cascade``) and ``early_exit_study.json``, each
written whole, the JSON last.

Example:

    python tools/early_exit_study.py --model=/work/runs/small/pskd_byot_dmfl_seed0 \\
        --out=/tmp/early_exit_study
"""

from __future__ import annotations

import json
import os

from selfkd_tf.cli import quiet_tensorflow  # noqa: F401  first: hides TensorFlow's start-up messages

from absl import flags  # noqa: E402

import tool_io  # noqa: E402
from selfkd_tf.cli import program  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from selfkd_tf.data.splits import stratified_halves  # noqa: E402
from selfkd_tf.evaluation.scoring import predict_exit_probabilities  # noqa: E402
from selfkd_tf.experiment.trained import evaluation_data, load_trained_model  # noqa: E402
from selfkd_tf.models import costs  # noqa: E402
from selfkd_tf.serving import early_exit  # noqa: E402
from selfkd_tf.serving import saved_model  # noqa: E402
from selfkd_tf.errors import SettingsError  # noqa: E402

PROGRAM = "early_exit_study.py"
EXPORTS = ("deepest", "cascade")
RESULT_FILE = "early_exit_study.json"

flags.DEFINE_string("model", None, "A run directory or .keras file.")
flags.DEFINE_string("out", None, "Directory for the exports and JSON.")
flags.DEFINE_float("max_accuracy_drop", 0.5, "Points of accuracy on the selection half "
                   "the cascade may lose against the deepest exit; >= 0.")
tool_io.register_finite("max_accuracy_drop", 0)
flags.DEFINE_integer("seed", 0, "Seed of the halves.", lower_bound=0)
flags.DEFINE_integer("latency_examples", 256, "Report-half images the latency is "
                     "timed on.", lower_bound=1)
flags.DEFINE_integer("rounds", 3, "Timed passes over them per SavedModel and batch size.",
                     lower_bound=1)
flags.mark_flags_as_required(["model", "out"])
FLAGS = flags.FLAGS

# The selection sweep runs on stored probabilities only, so it can be fine.
SELECTION_THRESHOLDS = (*np.round(np.arange(0.0, 1.0, 0.005), 3).tolist(),
                        0.9975, 0.999, 0.9995, 0.9999, 1.01)


def output_paths(out: str, model: str) -> dict[str, str]:
    """The SavedModel directories under ``out``, by name, and the JSON file's (``"json"``).

    Raises:
        SettingsError: one of them cannot be written (``out`` lies under a
            file, holds other files where an export goes, contains
            ``model``, ...).
    """
    paths = {name: os.path.join(out, name) for name in EXPORTS}
    kind = "run directory" if os.path.isdir(model) else "file"
    try:
        for path in paths.values():
            saved_model.check_export_path(path, overwrite=True, keep={f"the model's {kind}": model})
    except ValueError as err:
        raise SettingsError("out", str(err).partition(": ")[2]) from err
    paths["json"] = os.path.join(out, RESULT_FILE)
    tool_io.check_output_file("out", paths["json"])
    return paths


def main(argv: list[str]) -> int:
    del argv  # tool_io.run rejects positional arguments
    paths = output_paths(FLAGS.out, FLAGS.model)
    trained = load_trained_model(FLAGS.model)
    model = trained.model
    test_ds, info = evaluation_data(trained, split="test")
    exit_probs, labels = predict_exit_probabilities(model, test_ds)
    images = np.concatenate([x["image"].numpy() for x, _ in test_ds])
    selection, report = stratified_halves(labels, FLAGS.seed)
    exit_costs = costs.exit_costs(model.backbone)

    def curve_of(rows, thresholds):
        return early_exit.early_exit_curve([p[rows] for p in exit_probs], labels[rows],
                                           exit_costs, thresholds)

    chosen = early_exit.select_threshold(curve_of(selection, SELECTION_THRESHOLDS),
                                         max_accuracy_drop=FLAGS.max_accuracy_drop)
    if chosen is None:
        raise program.CommandError(
            f"no threshold keeps the selection half within {FLAGS.max_accuracy_drop} "
            "points of the deepest exit at less cost; serve the deepest exit")
    reported = curve_of(report, [chosen["threshold"]])

    # Raw pixels of the report half, as a client would send them.
    std, mean = np.float32(model.input_std), np.float32(model.input_mean)
    pixels = np.round((images[report] * std + mean) * 255)[: FLAGS.latency_examples]
    with tool_io.writing(FLAGS.out):  # e.g. a full disk; an export leaves nothing
        saved_model.export_saved_model(model, paths["deepest"], overwrite=True,
                                  class_names=info.class_names)
        saved_model.export_saved_model(model, paths["cascade"], exit="cascade", overwrite=True,
                                  threshold=chosen["threshold"], class_names=info.class_names)
    served = {name: tf.saved_model.load(paths[name]) for name in EXPORTS}
    latency = early_exit.time_per_image(
        [lambda x, s=s: s.serve(tf.constant(x, tf.float32)) for s in served.values()],
        pixels.astype(np.float32), rounds=FLAGS.rounds)

    result = {
        "model": trained.path, "dataset": info.name, "seed": FLAGS.seed,
        "selection_examples": len(selection), "report_examples": len(report),
        "max_accuracy_drop": FLAGS.max_accuracy_drop,
        "threshold": chosen["threshold"],
        "selection": {"cascade_accuracy": chosen["accuracy"],
                      "deepest_accuracy": chosen["required_accuracy"] + FLAGS.max_accuracy_drop},
        "report": {"deepest": reported["exits"][-1], "exits": reported["exits"],
                   "cascade": reported["cascade"][0]},
        "latency_ms": dict(zip(EXPORTS, latency)),
        "latency_examples": len(pixels), "rounds": FLAGS.rounds,
    }
    tool_io.write_json(paths["json"], result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    program.run(main, PROGRAM)

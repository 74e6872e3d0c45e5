"""``selfkd-eval``: evaluate a trained model on a dataset split.

Usage:

    selfkd-eval --model=runs/cifar100_resnet18_pskd+byot+dmfl
    selfkd-eval --model=runs/a/model.keras --split=test --out=evals/a
    selfkd-eval --model=model.keras --dataset=folder:/data/cifar10-jpeg

Writes a ``metrics.json`` record (`selfkd_tf.metrics` schema) for every exit
and the ensemble, and prints it as a table. The model is a run directory or
a ``.keras`` file; the data settings default to the run's ``flags.json`` (a
lone ``.keras`` file needs ``--dataset``).
"""

from __future__ import annotations

import os

from selfkd_tf.cli import common  # first: quiets TensorFlow's start-up logging

from absl import flags  # noqa: E402

from selfkd_tf import experiment  # noqa: E402
from selfkd_tf import metrics as metrics_lib  # noqa: E402

PROGRAM = "selfkd-eval"

flags.DEFINE_string("model", None, "A run directory or a .keras file.")
flags.DEFINE_string(
    "dataset", None, "Dataset to evaluate on (as selfkd-train --dataset); "
    "default: the run's.")
flags.DEFINE_string("data_dir", None, "TFDS data directory; default: the run's.")
flags.DEFINE_string(
    "split", None, "test, validation (the part of the training set the run "
    "held out with --validation_fraction) or train (the training examples the "
    "run used, unaugmented); default: the run's evaluation split.")
flags.DEFINE_integer(
    "eval_examples", None, "Score a stratified subset of this many examples; "
    "default: the whole split.", lower_bound=1)
flags.DEFINE_integer("batch_size", None, "Evaluation batch size; default: the run's.")
flags.DEFINE_string(
    "out", None, "Output: a .json file, or a directory that receives "
    "metrics.json; default: metrics_<split>.json beside the model.")
flags.mark_flag_as_required("model")
FLAGS = flags.FLAGS


def _output_path(model_path: str, split: str) -> str:
    if FLAGS.out is None:
        return os.path.join(os.path.dirname(os.path.abspath(model_path)),
                            f"metrics_{split}.json")
    if FLAGS.out.endswith(".json"):
        return FLAGS.out
    return os.path.join(FLAGS.out, experiment.METRICS_FILE)


def main(argv: list[str]) -> int:
    del argv  # common.run rejects positional arguments
    try:
        trained = experiment.load_trained_model(FLAGS.model)
        record = experiment.evaluate_trained(
            trained, dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
            split=FLAGS.split, batch_size=FLAGS.batch_size,
            eval_examples=FLAGS.eval_examples)
    except experiment.SettingsError as err:
        common.fail(PROGRAM, common.flag_message(err))
    out = _output_path(trained.path, record["split"])
    metrics_lib.write_metrics_json(record, out)
    print(f"{FLAGS.model} on {record['dataset']} ({record['split']} split, "
          f"{record['num_examples']} examples):")
    print(experiment.format_metrics_table(record))
    print(f"Wrote {out}")
    return 0


def run() -> None:
    common.run(main, PROGRAM)


if __name__ == "__main__":
    run()

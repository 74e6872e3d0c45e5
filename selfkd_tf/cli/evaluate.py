"""``selfkd-eval``: evaluate a trained model on a dataset split.

Usage:

    selfkd-eval --model=runs/cifar100_resnet18_pskd+byot+dmfl
    selfkd-eval --model=runs/a/model.keras --split=test --out=evals/a
    selfkd-eval --model=model.keras --dataset=folder:/data/cifar10-jpeg
    selfkd-eval --model=runs/a --early_exit --split=test
    selfkd-eval --model=runs/a --early_exit --max_accuracy_drop=0.5  # on validation

Writes a ``metrics.json`` record (`selfkd_tf.metrics` schema) for every exit
and the ensemble, and prints it as a table. The model is a run directory or
a ``.keras`` file; the data settings default to the run's ``flags.json`` (a
lone ``.keras`` file needs ``--dataset``).

``--early_exit`` instead sweeps the early-exit cascade's threshold (see
`selfkd_tf.early_exit`) and writes ``early_exit.json`` and ``early_exit.png``;
with ``--target_accuracy`` or ``--max_accuracy_drop`` it also picks the
cheapest threshold on the validation split and prints its cost saving.
"""

from __future__ import annotations

import os

from selfkd_tf.cli import common  # first: quiets TensorFlow's start-up logging

from absl import flags  # noqa: E402

from selfkd_tf import early_exit  # noqa: E402
from selfkd_tf import metrics as metrics_lib  # noqa: E402
from selfkd_tf.cli import model_flags  # noqa: E402
from selfkd_tf.evaluation import evaluate_trained, format_metrics_table, load_trained_model  # noqa: E402
from selfkd_tf.settings import SettingsError  # noqa: E402

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
flags.DEFINE_bool(
    "early_exit", False, "Instead of metrics.json, sweep the early-exit "
    "cascade's confidence threshold and write early_exit.json and "
    "early_exit.png: accuracy against mean FLOPs and latency per image, with "
    "every exit served alone for reference (--out as for metrics.json; "
    "default: early_exit_<split>.json/.png beside the model).")
flags.DEFINE_list(
    "thresholds", None, "With --early_exit: the thresholds to sweep, "
    "comma-separated, each >= 0; default: 0 to 0.9 by 0.05, then 0.925, "
    "0.95, 0.975, 0.99, 0.995, 0.999 and 1.01 (only the deepest exit answers).")
flags.DEFINE_integer(
    "latency_examples", 128, "With --early_exit: time the cascade and the "
    "exits at batch 1 and 64 on the split's first this many images "
    "(0: FLOPs only).", lower_bound=0)
flags.DEFINE_float(
    "target_accuracy", None, "With --early_exit: pick the cheapest threshold "
    "whose accuracy (%) is at least this, on --split=validation (never the "
    "test split). Exit status 1 when no threshold reaches it.",
    lower_bound=0, upper_bound=100)
flags.DEFINE_float(
    "max_accuracy_drop", None, "With --early_exit: as --target_accuracy, with "
    "the target this many points below the deepest exit's accuracy.",
    lower_bound=0)
flags.mark_flag_as_required("model")
FLAGS = flags.FLAGS
flags.adopt_module_key_flags(model_flags)  # --helpshort lists it


def _output_path(model_path: str, split: str, stem: str = "metrics") -> str:
    if FLAGS.out is None:
        return os.path.join(os.path.dirname(os.path.abspath(model_path)),
                            f"{stem}_{split}.json")
    if FLAGS.out.endswith(".json"):
        return FLAGS.out
    return os.path.join(FLAGS.out, f"{stem}.json")


def _criterion() -> dict[str, float]:
    """``--target_accuracy`` or ``--max_accuracy_drop``, as given."""
    return {name: FLAGS[name].value for name in ("target_accuracy", "max_accuracy_drop")
            if FLAGS[name].value is not None}


def _early_exit_settings() -> tuple[str | None, list[float]]:
    """The split and thresholds of an ``--early_exit`` run; exits on bad flags."""
    if not FLAGS.early_exit:
        for name in ("thresholds", "latency_examples", "target_accuracy",
                     "max_accuracy_drop"):
            if FLAGS[name].present:
                common.fail(PROGRAM, f"--{name}: only with --early_exit")
    if len(_criterion()) > 1:
        common.fail(PROGRAM, "--target_accuracy: give it or --max_accuracy_drop, not both")
    split = FLAGS.split
    if _criterion():
        if split not in (None, "validation"):
            common.fail(PROGRAM, f"--split: a threshold is picked on the validation "
                        f"split only, never on {split}")
        split = "validation"
    try:
        thresholds = early_exit.check_thresholds(
            FLAGS.thresholds or early_exit.DEFAULT_THRESHOLDS)
    except ValueError as err:
        common.fail(PROGRAM, f"--thresholds: {str(err).partition(': ')[2] or err}")
    return split, thresholds


def _run_early_exit(split: str | None, thresholds: list[float]) -> int:
    try:
        trained = load_trained_model(FLAGS.model, model_flags.safe_mode())
        curve = early_exit.evaluate_cascade(
            trained, thresholds=thresholds, latency_examples=FLAGS.latency_examples,
            dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, split=split,
            batch_size=FLAGS.batch_size, eval_examples=FLAGS.eval_examples)
    except SettingsError as err:
        common.fail(PROGRAM, common.flag_message(err))
    selected = early_exit.select_threshold(curve, **_criterion()) if _criterion() else None
    out = _output_path(trained.path, curve["split"], "early_exit")
    png = os.path.splitext(out)[0] + ".png"
    early_exit.write_curve(curve, out, png, selected)
    print(f"{FLAGS.model} on {curve['dataset']} ({curve['split']} split, "
          f"{curve['num_examples']} examples), early exit:")
    print(early_exit.format_curve_table(curve))
    print(f"Wrote {out} and {png}")
    if not _criterion():
        return 0
    deepest = curve["exits"][-1]["accuracy"]
    if selected is None:
        required = early_exit.required_accuracy(curve, **_criterion())
        print(f"No threshold keeps accuracy >= {required:.2f}% on the {curve['split']} "
              f"split (deepest exit: {deepest:.2f}%)")
        return 1
    print(f"Threshold {selected['threshold']:g}: accuracy {selected['accuracy']:.2f}% "
          f"(required {selected['required_accuracy']:.2f}%, deepest exit "
          f"{deepest:.2f}%) at {100 * selected['flops_vs_deepest']:.1f}% of the "
          f"deepest exit's FLOPs per image (saves "
          f"{100 * (1 - selected['flops_vs_deepest']):.1f}%)")
    return 0


def main(argv: list[str]) -> int:
    del argv  # common.run rejects positional arguments
    split, thresholds = _early_exit_settings()
    if FLAGS.early_exit:
        return _run_early_exit(split, thresholds)
    try:
        trained = load_trained_model(FLAGS.model, model_flags.safe_mode())
        record = evaluate_trained(
            trained, dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
            split=FLAGS.split, batch_size=FLAGS.batch_size,
            eval_examples=FLAGS.eval_examples)
    except SettingsError as err:
        common.fail(PROGRAM, common.flag_message(err))
    out = _output_path(trained.path, record["split"])
    metrics_lib.write_metrics_json(record, out)
    print(f"{FLAGS.model} on {record['dataset']} ({record['split']} split, "
          f"{record['num_examples']} examples):")
    print(format_metrics_table(record))
    print(f"Wrote {out}")
    return 0


def run() -> None:
    common.run(main, PROGRAM)


if __name__ == "__main__":
    run()

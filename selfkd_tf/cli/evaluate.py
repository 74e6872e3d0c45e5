"""``selfkd-eval``: evaluate a trained model on a dataset split.

Usage:

    selfkd-eval --model=runs/cifar100_resnet18_pskd+byot+dmfl
    selfkd-eval --model=runs/a/model.keras --split=test --out=evals/a
    selfkd-eval --model=model.keras --dataset=folder:/data/cifar10-jpeg
    selfkd-eval --model=runs/a --early_exit --split=test
    selfkd-eval --model=runs/a --early_exit --max_accuracy_drop=0.5  # on validation

Scores every exit and the ensemble, prints them as a table and writes the
record (`selfkd_tf.metrics.record` schema) to ``metrics_<split>.json`` beside the
model (``--out`` names another ``.json`` file, or a directory that receives
``metrics.json``). The model is a run directory or a ``.keras`` file; the
data settings default to the run's ``flags.json`` (a lone ``.keras`` file
needs ``--dataset``). A run that another process is training is refused
(its ``model.keras`` would be replaced under the evaluation).

``--early_exit`` instead sweeps the early-exit cascade's threshold (see
`selfkd_tf.serving.early_exit`) and writes ``early_exit_<split>.json`` and
``early_exit_<split>.png`` beside the model (``--out`` names others); with
``--target_accuracy`` or ``--max_accuracy_drop`` it also picks the cheapest
threshold on the validation split and prints its cost saving.
"""

from __future__ import annotations

import math
import os

from selfkd_tf.cli import quiet_tensorflow  # noqa: F401  first: hides TensorFlow's start-up messages

from absl import flags  # noqa: E402

from selfkd_tf.serving import early_exit  # noqa: E402
from selfkd_tf.metrics import record as metrics_record  # noqa: E402
from selfkd_tf.cli import model_flags  # noqa: E402
from selfkd_tf.files import check_creatable  # noqa: E402
from selfkd_tf.cli import program  # noqa: E402
from selfkd_tf.evaluation.scoring import format_metrics_table  # noqa: E402
from selfkd_tf.experiment.trained import (  # noqa: E402
    TrainedModel, evaluate_cascade, evaluate_trained, load_trained_model, reading_run)
from selfkd_tf.experiment.settings import MAX_BATCH_SIZE  # noqa: E402

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
    "eval_examples", None, "Score a stratified subset of at most this many "
    "examples (a split that holds fewer is scored whole, and the output says "
    "so); default: the whole split.", lower_bound=1)
flags.DEFINE_integer("batch_size", None, "Evaluation batch size; default: the run's.",
                     lower_bound=1, upper_bound=MAX_BATCH_SIZE)
flags.DEFINE_string(
    "out", None, "Output: a .json file, or a directory that receives "
    "metrics.json; default: metrics_<split>.json beside the model.")
flags.DEFINE_bool(
    "early_exit", False, "Instead of metrics_<split>.json, sweep the early-exit "
    "cascade's confidence threshold and write early_exit_<split>.json and "
    ".png beside the model: accuracy against mean FLOPs and latency per "
    "image, with every exit served alone for reference (--out: a .json file, "
    "with the .png beside it, or a directory that receives early_exit.json "
    "and early_exit.png).")
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
    "whose accuracy (%) is at least this at less cost than the deepest exit "
    "served alone, on --split=validation (never the test split); needs a run "
    "trained with --validation_fraction. Exit status 1 when no threshold "
    "does (serve the deepest exit).",
    lower_bound=0, upper_bound=100)
flags.DEFINE_float(
    "max_accuracy_drop", None, "With --early_exit: as --target_accuracy, with "
    "the target this many points below the deepest exit's accuracy.",
    lower_bound=0)


def _finite(value: float | None) -> bool:
    return value is None or math.isfinite(value)


# absl's bounds let NaN and infinity through.
flags.register_validator("target_accuracy", _finite, message="must be a finite number")
flags.register_validator("max_accuracy_drop", _finite, message="must be a finite number")
flags.mark_flag_as_required("model")
FLAGS = flags.FLAGS
flags.adopt_module_key_flags(model_flags)  # --helpshort lists it


def _model_directory() -> str:
    """Where the default outputs go: the run directory, or the ``.keras`` file's."""
    if os.path.isdir(FLAGS.model):
        return os.path.abspath(FLAGS.model)
    return os.path.dirname(os.path.abspath(FLAGS.model))


def _output_path(split: str | None, stem: str = "metrics") -> str:
    if FLAGS.out is None:
        return os.path.join(_model_directory(), f"{stem}_{split}.json")
    if FLAGS.out.endswith(".json"):
        return FLAGS.out
    return os.path.join(FLAGS.out, f"{stem}.json")


def _check_outputs(split: str | None, stem: str) -> None:
    """Exits (status 2) unless the outputs can be written; before any work.

    The files are known with ``--out``, and beside the model once the split
    is; otherwise only the model's directory is checked.
    """
    where = "" if FLAGS.out else " (the default, beside the model); choose another with --out"
    files = []
    if FLAGS.out is not None or split is not None:
        files.append(_output_path(split, stem))
        if stem == "early_exit":
            files.append(os.path.splitext(files[0])[0] + ".png")
    for path in files:
        if os.path.isdir(path):
            advice = where or f"; give a .json file, or a directory to write {stem}.json in"
            program.fail(PROGRAM, f"--out: {path} is a directory{advice}")
    try:
        for path in files or [os.path.join(_model_directory(), f"{stem}.json")]:
            check_creatable(path)
    except ValueError as err:
        program.fail(PROGRAM, f"--out: {err}{where}")


def _write(out: str, write, *args) -> None:
    """``write(*args)``, which writes ``out``; a failure (e.g. a full disk) is
    one line and exit status 1."""
    try:
        write(*args)
    except OSError as err:
        program.fail(PROGRAM, f"cannot write {err.filename or out}: "
                    f"{err.strerror or err}", status=1)


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
                program.fail(PROGRAM, f"--{name}: only with --early_exit")
    if len(_criterion()) > 1:
        program.fail(PROGRAM, "--target_accuracy: give it or --max_accuracy_drop, not both")
    split = FLAGS.split
    if _criterion():
        if split not in (None, "validation"):
            program.fail(PROGRAM, f"--split: a threshold is picked on the validation "
                        f"split only, never on {split}")
        split = "validation"
    try:
        thresholds = early_exit.check_thresholds(
            early_exit.DEFAULT_THRESHOLDS if FLAGS.thresholds is None else FLAGS.thresholds)
    except ValueError as err:
        program.fail(PROGRAM, f"--thresholds: {str(err).partition(': ')[2] or err}")
    return split, thresholds


def _check_validation_split(trained: TrainedModel) -> None:
    """Exits (status 2) when a threshold is to be picked but the run held out
    no validation split to pick it on."""
    if trained.settings is None or not trained.settings.validation_fraction:
        flag = next(iter(_criterion()))
        program.fail(PROGRAM, f"--{flag}: chooses the threshold on a validation split, "
                    f"which needs a run trained with --validation_fraction; "
                    f"{FLAGS.model} held out none")


def _say_if_capped(scored: dict) -> None:
    """Says when ``--eval_examples`` asked for more than the split holds."""
    asked, count = FLAGS.eval_examples, scored["num_examples"]
    if asked is not None and asked > count:
        print(f"--eval_examples={asked} is more than the {scored['split']} split "
              f"holds; scored all {count} examples")


def _run_early_exit(split: str | None, thresholds: list[float]) -> int:
    _check_outputs(split, "early_exit")
    trained = load_trained_model(FLAGS.model, model_flags.safe_mode())
    if _criterion():
        _check_validation_split(trained)
    curve = evaluate_cascade(
        trained, thresholds=thresholds, latency_examples=FLAGS.latency_examples,
        dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, split=split,
        batch_size=FLAGS.batch_size, eval_examples=FLAGS.eval_examples)
    selected = early_exit.select_threshold(curve, **_criterion()) if _criterion() else None
    out = _output_path(curve["split"], "early_exit")
    png = os.path.splitext(out)[0] + ".png"
    _write(out, early_exit.write_curve, curve, out, png, selected)
    _say_if_capped(curve)
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
              f"split at less cost than the deepest exit (deepest exit: "
              f"{deepest:.2f}%); serve the deepest exit")
        return 1
    print(f"Threshold {selected['threshold']:g}: accuracy {selected['accuracy']:.2f}% "
          f"(required {selected['required_accuracy']:.2f}%, deepest exit "
          f"{deepest:.2f}%) at {100 * selected['flops_vs_deepest']:.1f}% of the "
          f"deepest exit's FLOPs per image (saves "
          f"{100 * (1 - selected['flops_vs_deepest']):.1f}%)")
    return 0


def _run_metrics() -> int:
    _check_outputs(FLAGS.split, "metrics")
    trained = load_trained_model(FLAGS.model, model_flags.safe_mode())
    record = evaluate_trained(
        trained, dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
        split=FLAGS.split, batch_size=FLAGS.batch_size,
        eval_examples=FLAGS.eval_examples)
    out = _output_path(record["split"])
    _write(out, metrics_record.write_metrics_json, record, out)
    _say_if_capped(record)
    print(f"{FLAGS.model} on {record['dataset']} ({record['split']} split, "
          f"{record['num_examples']} examples):")
    print(format_metrics_table(record))
    print(f"Wrote {out}")
    return 0


def main(argv: list[str]) -> int:
    del argv  # program.run rejects positional arguments
    split, thresholds = _early_exit_settings()
    # Held from loading the model to writing what it scored.
    with reading_run(FLAGS.model):
        if FLAGS.early_exit:
            return _run_early_exit(split, thresholds)
        return _run_metrics()


def run() -> None:
    program.run(main, PROGRAM)


if __name__ == "__main__":
    run()

"""``selfkd-eval``: evaluate a trained model on a dataset split.

Usage:

    selfkd-eval --model=runs/cifar100_resnet18_pskd+byot+dmfl
    selfkd-eval --model=runs/a/model.keras --split=test --out=evals/a
    selfkd-eval --model=model.keras --dataset=folder:/data/cifar10-jpeg
    selfkd-eval --model=runs/a --early_exit --split=test
    selfkd-eval --model=runs/a --early_exit --max_accuracy_drop=0.5  # on validation
    selfkd-eval --model=runs/a --fit_temperature --split=test
    selfkd-eval --model=runs/a --temperature_file=runs/a/temperatures_test.json

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

``--fit_temperature`` instead fits one temperature per exit (temperature
scaling, `selfkd_tf.metrics.calibration`) on held-out data and reports NLL
and ECE before and after it on other held-out data: fitted on the validation
split and reported on the test split, or with ``--split=test`` fitted on one
stratified half of the test split and reported on the other. It writes
``temperatures_<split>.json`` beside the model (``--out`` names another
file), which ``--temperature_file`` (here, to score the calibrated model:
``calibrated_metrics_<split>.json``, ``calibrated_early_exit_<split>.*``)
and ``selfkd-export --temperature_file`` read.
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
from selfkd_tf.evaluation.scoring import (  # noqa: E402
    format_metrics_table, format_temperature_table)
from selfkd_tf.errors import SettingsError  # noqa: E402
from selfkd_tf.experiment.settings import MAX_BATCH_SIZE, MAX_SEED  # noqa: E402
from selfkd_tf.experiment.trained import (  # noqa: E402
    TEMPERATURE_SPLITS, TrainedModel, evaluate_cascade, evaluate_trained,
    fit_temperature_scaling, load_trained_model, reading_run)
from selfkd_tf.rundir.reading import RunDirectoryError, read_temperatures  # noqa: E402

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
flags.DEFINE_bool(
    "fit_temperature", False, "Instead of metrics_<split>.json, fit one temperature "
    f"per exit on held-out data (--split: {', '.join(TEMPERATURE_SPLITS)}; default: "
    "validation when the run held one out) and write temperatures_<split>.json "
    "beside the model, with NLL and ECE before and after on other held-out data "
    "(validation: the test split; test: the other stratified half).")
flags.DEFINE_integer(
    "calibration_seed", 0, "With --fit_temperature --split=test: seed of the "
    "stratified halves of the test split.", lower_bound=0, upper_bound=MAX_SEED)
flags.DEFINE_string(
    "temperature_file", None, "Score the model with these temperatures (a "
    "temperatures_<split>.json of --fit_temperature): every exit's logits divided "
    "by its temperature.")


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


def _stem(stem: str, temperatures: dict | None) -> str:
    """The default output's name: a calibrated model's scores never replace
    the model's own (``calibrated_metrics_<split>.json``)."""
    return f"calibrated_{stem}" if temperatures else stem


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
        if stem.endswith("early_exit"):
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


def _run_early_exit(split: str | None, thresholds: list[float],
                    temperatures: dict | None) -> int:
    _check_outputs(split, _stem("early_exit", temperatures))
    trained = _loaded(temperatures)
    if _criterion():
        _check_validation_split(trained)
    curve = evaluate_cascade(
        trained, thresholds=thresholds, latency_examples=FLAGS.latency_examples,
        temperatures=temperatures and temperatures["temperatures"],
        dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, split=split,
        batch_size=FLAGS.batch_size, eval_examples=FLAGS.eval_examples)
    selected = early_exit.select_threshold(curve, **_criterion()) if _criterion() else None
    out = _output_path(curve["split"], _stem("early_exit", temperatures))
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


def _temperatures() -> dict | None:
    """The ``--temperature_file`` record, or None; exits (status 2) on a bad one."""
    if FLAGS.temperature_file is None:
        return None
    if FLAGS.fit_temperature:
        program.fail(PROGRAM, "--temperature_file: not with --fit_temperature, "
                     "which fits the temperatures itself")
    try:
        return read_temperatures(FLAGS.temperature_file)
    except RunDirectoryError as err:
        program.fail(PROGRAM, f"--temperature_file: {err}")


def _loaded(temperatures: dict | None) -> TrainedModel:
    """The model; with temperatures, one for each of its exits."""
    trained = load_trained_model(FLAGS.model, model_flags.safe_mode())
    count = len(temperatures["temperatures"]) if temperatures else None
    if count is not None and count != trained.model.num_exits:
        raise SettingsError(
            "temperature_file", f"{FLAGS.temperature_file} holds {count} temperatures; "
            f"the model has {trained.model.num_exits} exits")
    return trained


def _run_temperature_scaling() -> int:
    _check_outputs(FLAGS.split, "temperatures")
    trained = _loaded(None)
    record = fit_temperature_scaling(
        trained, split=FLAGS.split, seed=FLAGS.calibration_seed, dataset=FLAGS.dataset,
        data_dir=FLAGS.data_dir, batch_size=FLAGS.batch_size,
        eval_examples=FLAGS.eval_examples)
    fitted, reported = record["fitted_on"], record["reported_on"]
    out = _output_path(fitted["split"], "temperatures")
    _write(out, metrics_record.write_metrics_json, record, out)
    print(f"{FLAGS.model}: temperatures fitted on the {fitted['split']} split "
          f"({fitted['rows']}, {fitted['num_examples']} examples), scored on the "
          f"{reported['split']} split ({reported['rows']}, {reported['num_examples']} "
          "examples):")
    print(format_temperature_table(record))
    print(f"Wrote {out}")
    return 0


def _run_metrics(temperatures: dict | None) -> int:
    _check_outputs(FLAGS.split, _stem("metrics", temperatures))
    trained = _loaded(temperatures)
    record = evaluate_trained(
        trained, temperatures=temperatures and temperatures["temperatures"],
        dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
        split=FLAGS.split, batch_size=FLAGS.batch_size,
        eval_examples=FLAGS.eval_examples)
    out = _output_path(record["split"], _stem("metrics", temperatures))
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
    temperatures = _temperatures()
    if FLAGS.fit_temperature and FLAGS.early_exit:
        program.fail(PROGRAM, "--fit_temperature: not with --early_exit; fit the "
                     "temperatures first, then pass --temperature_file")
    if FLAGS.calibration_seed and not FLAGS.fit_temperature:
        program.fail(PROGRAM, "--calibration_seed: only with --fit_temperature")
    # Held from loading the model to writing what it scored.
    with reading_run(FLAGS.model):
        if FLAGS.fit_temperature:
            return _run_temperature_scaling()
        if FLAGS.early_exit:
            return _run_early_exit(split, thresholds, temperatures)
        return _run_metrics(temperatures)


def run() -> None:
    program.run(main, PROGRAM)


if __name__ == "__main__":
    run()

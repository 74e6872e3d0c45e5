"""``selfkd-export``: export a classifier of a trained model as a SavedModel.

Usage:

    selfkd-export --model=runs/cifar100_resnet18_pskd --out=export/deepest
    selfkd-export --model=runs/a/model.keras --exit=2 --out=export/exit2
    selfkd-export --model=runs/a --exit=ensemble --out=export/ensemble
    selfkd-export --model=runs/a --exit=cascade --threshold=0.9 --out=export/cascade

The SavedModel takes raw pixels (0..255, float32 or uint8, resized to the
model's size when they have another) and returns ``probabilities``,
``logits``, ``class_ids`` and ``class_names`` (a cascade also ``exit_ids``);
a single-exit export holds only the layers the chosen exit needs, a cascade
skips the deeper stages for the images a shallow exit is sure of (see
`selfkd_tf.serving.saved_model` and `selfkd_tf.serving.cascade`). The class names are the run's
dataset's unless ``--class_names`` gives them. The command prints the
export's parameters and FLOPs next to the training model's. A run that
another process is training is refused (its ``model.keras`` is about to be
replaced).
"""

from __future__ import annotations

import os

from selfkd_tf.cli import quiet_tensorflow  # noqa: F401  first: hides TensorFlow's start-up messages

from absl import flags  # noqa: E402
import tensorflow as tf  # noqa: E402

from selfkd_tf import data  # noqa: E402
from selfkd_tf.serving import saved_model as export_lib  # noqa: E402
from selfkd_tf.rundir.reading import RunDirectoryError, read_temperatures  # noqa: E402
from selfkd_tf.serving.cascade import check_threshold  # noqa: E402
from selfkd_tf.cli import model_flags  # noqa: E402
from selfkd_tf.cli import program  # noqa: E402
from selfkd_tf.experiment.trained import TrainedModel, load_trained_model, reading_run  # noqa: E402
from selfkd_tf.experiment.settings import check_float32  # noqa: E402
from selfkd_tf.errors import SettingsError  # noqa: E402

PROGRAM = "selfkd-export"

flags.DEFINE_string("model", None, "A run directory or a .keras file.")
flags.DEFINE_string("out", None, "The SavedModel directory to write.")
flags.DEFINE_string(
    "exit", "deepest", "The classifier served: deepest, an exit index 1..N "
    "(1 is the shallowest), ensemble (mean of all exits' probabilities), or "
    "cascade (each image answered by the first exit whose top probability "
    "reaches --threshold, else by the deepest).")
flags.DEFINE_float(
    "threshold", None, "With --exit=cascade: the default confidence "
    "threshold, >= 0 (0 answers every image at exit 1, above 1 only at the "
    "deepest exit). Clients may pass another per call. selfkd-eval "
    "--early_exit --target_accuracy picks one on validation data.")
flags.DEFINE_list(
    "class_names", None, "The class names, comma-separated in class-id order; "
    "default: those of the run's dataset ('0', '1', ... for a .keras file "
    "outside a run directory).")
flags.DEFINE_string(
    "temperature_file", None, "Serve calibrated probabilities: the temperatures "
    "of a temperatures_<split>.json written by selfkd-eval --fit_temperature "
    "divide every exit's logits (the calibration signature says what they were "
    "fitted on).")
flags.DEFINE_bool(
    "overwrite", False, "Replace an existing --out that is a SavedModel (or "
    "an empty directory); any other file or directory is never replaced.")
flags.mark_flags_as_required(["model", "out"])
FLAGS = flags.FLAGS
flags.adopt_module_key_flags(model_flags)  # --helpshort lists it


def _class_names(trained: TrainedModel) -> list[str] | None:
    """``--class_names``, else the run's dataset's, else None."""
    if FLAGS.class_names is not None or trained.settings is None:
        return FLAGS.class_names
    try:
        return list(data.class_names(trained.settings.dataset, trained.settings.data_dir))
    except data.DataError as err:
        raise SettingsError(
            "class_names", f"cannot read them from the run's dataset ({err}); "
            "pass them with --class_names") from err


def _flag_error(error: ValueError) -> SettingsError:
    """A library ``"<argument>: <problem>"`` error as the flag's error."""
    flag, _, problem = str(error).partition(": ")
    return SettingsError(flag, problem)


def _calibration() -> tuple[list[float] | None, str]:
    """``--temperature_file``'s temperatures and what they were fitted on."""
    if FLAGS.temperature_file is None:
        return None, ""
    try:
        record = read_temperatures(FLAGS.temperature_file)
    except RunDirectoryError as err:
        raise SettingsError("temperature_file", str(err)) from err
    fitted = record["fitted_on"]
    return record["temperatures"], (f"{fitted['split']} split, {fitted['rows']}, "
                                    f"{fitted['num_examples']} examples")


def _check_flags_before_loading() -> None:
    """``--threshold`` and ``--out``, which need no model; raises SettingsError."""
    kind = "run directory" if os.path.isdir(FLAGS.model) else "file"
    try:
        if FLAGS.threshold is not None:
            check_threshold(FLAGS.threshold)
            # The graph holds it in float32, which 1e39 does not fit.
            check_float32("threshold", FLAGS.threshold)
        export_lib.check_export_path(FLAGS.out, FLAGS.overwrite,
                                     keep={f"the model's {kind}": FLAGS.model})
    except ValueError as err:
        raise _flag_error(err) from err


def main(argv: list[str]) -> int:
    del argv
    _check_flags_before_loading()
    temperatures, calibration = _calibration()
    # Held from loading the model to writing the export.
    with reading_run(FLAGS.model):
        trained = load_trained_model(FLAGS.model, model_flags.safe_mode())
        model = trained.model
        try:
            export_lib.check_export_arguments(
                model, FLAGS.out, FLAGS.exit, FLAGS.overwrite, FLAGS.threshold)
        except ValueError as err:
            raise _flag_error(err) from err
        if temperatures is not None and len(temperatures) != model.num_exits:
            raise SettingsError(
                "temperature_file", f"{FLAGS.temperature_file} holds {len(temperatures)} "
                f"temperatures; the model has {model.num_exits} exits")
        # Read only once the flags are known to be good: it may decode the
        # whole dataset.
        class_names = _class_names(trained)
        try:
            summary = export_lib.export_saved_model(
                model, FLAGS.out, exit=FLAGS.exit, overwrite=FLAGS.overwrite,
                threshold=FLAGS.threshold, class_names=class_names,
                temperatures=temperatures, calibration=calibration)
        except ValueError as err:
            raise _flag_error(err) from err
        # E.g. a full disk; the export leaves nothing behind.
        except OSError as err:
            program.fail(PROGRAM, f"cannot write {FLAGS.out}: {err.strerror or err}",
                         status=1)
        except tf.errors.OpError as err:
            program.fail(PROGRAM, f"cannot write {FLAGS.out}: {err.message}", status=1)
    if summary.threshold is None:
        print(f"Exported exit {summary.exit} of {model.num_exits} to {summary.path}")
    else:
        print(f"Exported the {model.num_exits}-exit cascade (threshold "
              f"{summary.threshold:g}) to {summary.path}")
    print(summary.table())
    if temperatures is not None:
        print(f"Temperatures {', '.join(f'{t:.3f}' for t in temperatures)} (exits 1.."
              f"{model.num_exits}), fitted on the {calibration}")
    return 0


def run() -> None:
    program.run(main, PROGRAM)


if __name__ == "__main__":
    run()

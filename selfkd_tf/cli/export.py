"""``selfkd-export``: export one classifier of a trained model as a SavedModel.

Usage:

    selfkd-export --model=runs/cifar100_resnet18_pskd --out=export/deepest
    selfkd-export --model=runs/a/model.keras --exit=2 --out=export/exit2
    selfkd-export --model=runs/a --exit=ensemble --out=export/ensemble

The SavedModel takes raw pixels (0..255, float32 or uint8) and returns
``probabilities``, ``logits`` and ``class_ids``; it holds only the layers the
chosen exit needs (see `selfkd_tf.export`). The command prints the export's
parameters and FLOPs next to the training model's.
"""

from __future__ import annotations

from selfkd_tf.cli import common  # first: quiets TensorFlow's start-up logging

from absl import flags  # noqa: E402

from selfkd_tf import experiment  # noqa: E402
from selfkd_tf import export as export_lib  # noqa: E402

PROGRAM = "selfkd-export"

flags.DEFINE_string("model", None, "A run directory or a .keras file.")
flags.DEFINE_string("out", None, "The SavedModel directory to write.")
flags.DEFINE_string(
    "exit", "deepest", "The classifier served: deepest, an exit index 1..N "
    "(1 is the shallowest), or ensemble (mean of all exits' probabilities).")
flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
flags.mark_flags_as_required(["model", "out"])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> int:
    del argv
    try:
        model = experiment.load_trained_model(FLAGS.model).model
        try:
            summary = export_lib.export_saved_model(
                model, FLAGS.out, exit=FLAGS.exit, overwrite=FLAGS.overwrite)
        except ValueError as err:
            flag, _, problem = str(err).partition(": ")
            raise experiment.SettingsError(flag, problem) from err
    except experiment.SettingsError as err:
        common.fail(PROGRAM, common.flag_message(err))
    print(f"Exported exit {summary.exit} of {model.num_exits} to {summary.path}")
    print(summary.table())
    return 0


def run() -> None:
    common.run(main, PROGRAM)


if __name__ == "__main__":
    run()

"""``selfkd-train``: train (or resume) a multi-exit classifier with PS-KD, BYOT, DMFL.

Usage:

    selfkd-train --flagfile=configs/cifar100_resnet18.flags --methods=pskd,byot,dmfl
    selfkd-train --flagfile=configs/smoke.flags --dataset=npz:/data/tiny.npz --model_dir=/tmp/smoke

Every field of `selfkd_tf.experiment.TrainSettings` is a flag
(``--helpshort`` lists them). The run directory (``--model_dir``) receives
``flags.json``, ``history.csv``, ``tensorboard/``, ``checkpoints/``,
``model.keras`` and ``metrics.json``. Rerunning the same command resumes a
killed run from its last checkpoint.

Exit status: 0 on success; 2 for invalid flags or data (one error line,
nothing written); 1 when the loss diverges (the last good checkpoint is
kept).
"""

from __future__ import annotations

from selfkd_tf.cli import common  # first: quiets TensorFlow's start-up logging
from absl import flags  # noqa: E402

from selfkd_tf import experiment  # noqa: E402
from selfkd_tf.cli import flags as train_flags  # noqa: E402

PROGRAM = "selfkd-train"
flags.adopt_module_key_flags(train_flags)  # --helpshort lists them


def main(argv: list[str]) -> int:
    del argv  # common.run rejects positional arguments
    try:
        record = experiment.train(train_flags.settings_from_flags())
    except experiment.SettingsError as err:
        common.fail(PROGRAM, common.flag_message(err))
    except experiment.TrainingDivergedError as err:
        common.fail(PROGRAM, err, status=1)
    print(experiment.format_metrics_table(record))
    return 0


def run() -> None:
    common.run(main, PROGRAM)


if __name__ == "__main__":
    run()

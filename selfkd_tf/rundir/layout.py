"""What a run directory holds: the names of its files.

`selfkd_tf.experiment.training.train` writes a run directory; `selfkd-eval`
writes scores beside its model; `selfkd-report` reads finished runs. All of
them name the files through these constants.

- ``flags.json``: the run's resolved settings
  (`selfkd_tf.experiment.settings.TrainSettings.to_json`);
- ``data.json``: what the run trains on
  (`selfkd_tf.rundir.data_record.DataFingerprint`);
- ``history.csv``: one row per epoch, numbered from 1;
- ``tensorboard/``: TensorBoard scalars;
- ``checkpoints/``: the training state (`selfkd_tf.experiment.checkpointing`);
- ``model.keras``: the trained model;
- ``metrics.json``: every exit and the ensemble scored on the evaluation
  split (`selfkd_tf.metrics.record`).
"""

import os

FLAGS_FILE = "flags.json"
"""The run's resolved settings (`selfkd_tf.experiment.settings.TrainSettings.to_json`)."""
HISTORY_FILE = "history.csv"
METRICS_FILE = "metrics.json"
MODEL_FILE = "model.keras"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"
DATA_FILE = "data.json"
"""The run directory's record of its training data (`DataFingerprint`)."""
RUN_FILES = (FLAGS_FILE, DATA_FILE, HISTORY_FILE, METRICS_FILE, MODEL_FILE,
             TENSORBOARD_DIR, CHECKPOINT_DIR)
"""Everything training writes in a run directory (and ``overwrite`` removes)."""

SCORE_FILES = tuple(
    f"{stem}_{split}.{extension}"
    for stem, extensions in (("metrics", ("json",)), ("early_exit", ("json", "png")),
                             ("temperatures", ("json",)), ("calibrated_metrics", ("json",)),
                             ("calibrated_early_exit", ("json", "png")))
    for split in ("test", "validation", "train") for extension in extensions)
"""What ``selfkd-eval`` writes beside the model by default: scores of the
model the run held, so ``overwrite`` removes them with it (a report must
not read an earlier model's scores as the new one's)."""

RESUME_SAFE_FIELDS = frozenset({
    "data_dir", "model_dir", "overwrite", "save_every_steps", "distribute",
    "jit_compile", "deterministic", "eval_every", "cache",
})
"""Fields of ``flags.json`` a resumed run may change: where things are and
how fast they run, not what is computed. Any other difference refuses to
resume, and runs that differ only in these (and the seed) are repeats of one
recipe."""


def run_directory_of(path: str) -> str | None:
    """The run directory of a model path: the directory itself, or the
    directory of a ``.keras`` file with a `FLAGS_FILE` beside it; else None."""
    if os.path.isdir(path):
        return path
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(path) and os.path.isfile(os.path.join(directory, FLAGS_FILE)):
        return directory
    return None

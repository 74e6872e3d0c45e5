"""The resume policy: when a run directory may be trained again, and how.

`selfkd_tf.experiment.training.train` on an existing run directory resumes
the run from its last checkpoint, or returns its metrics when it has
finished. Before anything is written it checks the following, and refuses
with a one-line `SettingsError` that names the way out (the same settings,
another ``--model_dir`` or ``--overwrite``):

- the directory's files are the run's own and lead nowhere else
  (`check_run_directory`);
- the settings would compute the same run (`check_resumable`; the fields of
  `selfkd_tf.rundir.layout.RESUME_SAFE_FIELDS` may change), and subset
  sizes that asked for more than a split holds are what the run used
  (`maybe_capped`, `sizes_used`, `describe_capped`);
- the data are those the run was trained on (`check_same_data`,
  ``data.json``);
- the checkpoint can be read (`resume_error` words its refusal).

A resumed run drops the history rows of the epochs it trains again
(`truncate_history`); ``--overwrite`` removes the run's files first
(`remove_run_files`).

Example:

```python
check_run_directory("runs/a")
check_resumable(read_settings("runs/a"), settings)
record = finished_record("runs/a")     # None while the run is unfinished
```
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import shutil
import typing

from selfkd_tf import data as data_lib
from selfkd_tf.experiment import checkpointing
from selfkd_tf.experiment.settings import TrainSettings
from selfkd_tf.errors import SettingsError
from selfkd_tf.files import write_atomically
from selfkd_tf.rundir import reading
from selfkd_tf.rundir.data_record import DataFingerprint
from selfkd_tf.rundir.layout import (
    DATA_FILE, HISTORY_FILE, METRICS_FILE, RESUME_SAFE_FIELDS, RUN_FILES, SCORE_FILES)


def read_finished_metrics(path: str) -> dict:
    """A finished run's ``metrics.json`` record, checked for what is printed."""
    try:
        return reading.read_metrics(path)
    except reading.RunDirectoryError as err:
        raise SettingsError(
            "model_dir", f"{err}; move it away to evaluate the run again, or "
            "pass --overwrite to train it afresh") from err


def check_run_directory(run_dir: str) -> None:
    """Refuses run files through which training would write outside ``run_dir``."""
    try:
        reading.check_contained(run_dir, RUN_FILES, appended=(HISTORY_FILE,))
    except reading.RunDirectoryError as err:
        raise SettingsError(
            "model_dir", f"{err}; remove it, choose another --model_dir or pass "
            "--overwrite to start afresh") from err


def check_same_data(run_dir: str, info: data_lib.DatasetInfo) -> None:
    """Refuses to resume a run on data other than its ``data.json`` records."""
    path = os.path.join(run_dir, DATA_FILE)
    if not os.path.lexists(path):
        return  # Older runs: the checkpoint's shapes are compared instead.
    try:
        saved = DataFingerprint.from_json(reading.read_json(path), path)
    except reading.RunDirectoryError as err:
        raise SettingsError("model_dir", str(err)) from err
    differences = saved.differences(DataFingerprint.from_info(info))
    if differences:
        raise SettingsError(
            "model_dir", f"{run_dir} holds a run trained on other data "
            f"({'; '.join(differences)}); rerun on the same data to resume it, "
            "choose another --model_dir, or pass --overwrite to start it afresh")


def resume_error(run_dir: str, err: checkpointing.CheckpointError) -> SettingsError:
    return SettingsError(
        "model_dir", f"cannot resume {run_dir}: {err}; rerun with the data "
        "and settings it was trained with, choose another --model_dir, or pass "
        "--overwrite to start it afresh")


def check_resumable(previous: TrainSettings, settings: TrainSettings,
                     fields: typing.Iterable[str] | None = None) -> None:
    """Raises `SettingsError` when ``settings`` would change the run's result.

    Only ``fields`` are compared, when given.
    """
    old, new = previous.to_json(), settings.to_json()
    changed = [k for k in (new if fields is None else fields)
               if k not in RESUME_SAFE_FIELDS and old[k] != new[k]]
    if changed:
        differences = ", ".join(f"--{k}: {old[k]!r} -> {new[k]!r}" for k in changed)
        raise SettingsError(
            "model_dir",
            f"{settings.model_dir} holds a run with other settings ({differences}); "
            "rerun with its settings to resume it, choose another --model_dir, "
            "or pass --overwrite to start it afresh")


SUBSET_SIZES = ("train_examples", "eval_examples")
"""Settings that ask for at most so many examples of a split."""


def maybe_capped(previous: TrainSettings, settings: TrainSettings) -> tuple[str, ...]:
    """The subset sizes asked for above the numbers the run recorded.

    ``flags.json`` records the number of examples used, so a request that
    its split could not fill (``--train_examples=1000`` of 400) is recorded
    as the split's size; asked again, it is the same run if the split still
    holds just that many, which only the data can tell.
    """
    return tuple(
        name for name in SUBSET_SIZES
        if None not in (getattr(previous, name), getattr(settings, name))
        and getattr(settings, name) > getattr(previous, name))


def sizes_used(settings: TrainSettings, info: data_lib.DatasetInfo) -> TrainSettings:
    """``settings`` with each subset size the number of examples used.

    A size larger than its split takes the whole split (at most that many),
    so the run records what it trained and evaluated on.
    """
    counts = {"train_examples": info.num_train, "eval_examples": info.num_eval}
    return dataclasses.replace(settings, **{
        name: counts[name] for name in SUBSET_SIZES if getattr(settings, name) is not None})


def describe_capped(asked: TrainSettings, used: TrainSettings,
                     info: data_lib.DatasetInfo) -> list[str]:
    """One line per subset size that its split could not fill."""
    splits = {"train_examples": "training", "eval_examples": info.eval_split}
    return [f"--{name}={getattr(asked, name)} is more than the {splits[name]} split "
            f"holds; using all {getattr(used, name)} examples"
            for name in SUBSET_SIZES if getattr(asked, name) != getattr(used, name)]


def computed_settings(settings: TrainSettings) -> dict:
    """The settings that change what a run computes (all but `RESUME_SAFE_FIELDS`)."""
    return {k: v for k, v in settings.to_json().items() if k not in RESUME_SAFE_FIELDS}


def remove_run_files(run_dir: str) -> None:
    for name in (*RUN_FILES, *SCORE_FILES):
        path = os.path.join(run_dir, name)
        # A symbolic link is removed, never followed.
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def truncate_history(path: str, first_epoch: int) -> None:
    """Drops the rows of 0-based epochs ``>= first_epoch``, which are trained again.

    The ``epoch`` column numbers epochs from 1 (`selfkd_tf.experiment.callbacks.HistoryCSV`).

    A killed run may have logged an epoch whose checkpoint it did not write,
    or half a row.

    Raises:
        SettingsError: the file is not a history (`selfkd_tf.rundir.reading.read_history`).
    """
    try:
        rows = reading.read_history(path)
    except reading.RunDirectoryError as err:
        raise SettingsError(
            "model_dir", f"{err}; move it away to resume without it") from err
    if rows is None:
        if os.path.lexists(path):
            os.remove(path)
        return
    column = rows[0].index("epoch")
    kept = [
        row for row in rows[1:]
        if len(row) == len(rows[0]) and row[column].isdigit()
        and int(row[column]) <= first_epoch
    ]
    if not kept:
        os.remove(path)
        return
    text = io.StringIO()
    csv.writer(text).writerows([rows[0], *kept])
    write_atomically(path, text.getvalue())


def finished_record(run_dir: str) -> dict | None:
    """A finished run's metrics record (and says so); None if it has not finished."""
    metrics_path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.lexists(metrics_path):
        return None
    record = read_finished_metrics(metrics_path)
    print(f"{run_dir} has finished; its metrics are in {metrics_path}.")
    return record

"""One training run, from settings to a run directory.

`train(settings)` is the whole recipe as a plain function: build the data,
the model and the optimizer, `fit` with a few callbacks, save and evaluate.
Every knob is a field of `TrainSettings`, whose field names are also the
``selfkd-train`` flag names (`selfkd_tf.cli.flags`).

A run directory (``settings.model_dir``) holds:

- ``flags.json``: the resolved settings (`TrainSettings.to_json`);
- ``data.json``: what the run trains on (`run_directory.DataFingerprint`),
  so that a resumed run refuses data that changed;
- ``history.csv``: one row per epoch (`selfkd_tf.callbacks.HistoryCSV`),
  epochs numbered from 1 as on the console, with an ``epoch_time_s`` column;
- ``tensorboard/``: TensorBoard scalars of every logged value (loss terms,
  per-exit accuracies, ``lr``, ``alpha_t``, ``epoch_time_s``) at step = the
  1-based epoch;
- ``checkpoints/``: crash-safe training state (`selfkd_tf.checkpointing`);
- ``model.keras``: the trained `SelfKDModel`;
- ``metrics.json``: every exit and the ensemble evaluated on the evaluation
  split (`selfkd_tf.metrics_record.build_metrics_record`).

Running `train` again on an existing directory resumes it from its last
checkpoint, or returns its metrics when it has finished; settings that would
change the result (`RESUME_SAFE_FIELDS` lists those that would not) and the
data must match, unless ``overwrite`` starts the run afresh. The directory's
files are read as untrusted (`selfkd_tf.run_directory`): anything malformed,
or a link through which training would write elsewhere, is refused in one
line before anything is written.

Example:

```python
settings = TrainSettings(dataset="npz:/data/tiny.npz", arch="resnet18",
                         width_multiplier=0.25, epochs=10, model_dir="runs/tiny")
record = train(settings)
record["exits"][-1]["top1_err"]  # the deepest exit's test error, in percent
```
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import shutil
import sys
import tempfile
import typing

import keras

from selfkd_tf import callbacks as callbacks_lib
from selfkd_tf import checkpointing
from selfkd_tf import cluster
from selfkd_tf import data as data_lib
from selfkd_tf import distribute as distribute_lib
from selfkd_tf import metrics as metrics_lib
from selfkd_tf import metrics_record
from selfkd_tf import run_directory
from selfkd_tf import run_lock
from selfkd_tf.builders import build_datasets, build_model, compile_model, seed_everything
from selfkd_tf.evaluation import evaluate_model
from selfkd_tf.files import write_atomically
from selfkd_tf.run_directory import (
    CHECKPOINT_DIR, DATA_FILE, FLAGS_FILE, HISTORY_FILE, METRICS_FILE, MODEL_FILE,
    RESUME_SAFE_FIELDS, RUN_FILES, TENSORBOARD_DIR)
from selfkd_tf.settings import (
    SettingsError, TrainSettings, as_settings_error, read_settings)
from selfkd_tf.training import SelfKDModel


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint was kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training was interrupted (Ctrl-C); the checkpoints on disk are whole.

    ``str(error)`` is one line: where training stopped and how to resume.
    """


# -- run directory ------------------------------------------------------------


def _read_metrics(path: str) -> dict:
    """A finished run's ``metrics.json`` record, checked for what is printed."""
    try:
        return run_directory.read_metrics(path, metrics_lib.METRIC_KEYS)
    except run_directory.RunDirectoryError as err:
        raise SettingsError(
            "model_dir", f"{err}; move it away to evaluate the run again, or "
            "pass --overwrite to train it afresh") from err


def _check_run_directory(run_dir: str) -> None:
    """Refuses run files through which training would write outside ``run_dir``."""
    try:
        run_directory.check_contained(run_dir, RUN_FILES, appended=(HISTORY_FILE,))
    except run_directory.RunDirectoryError as err:
        raise SettingsError(
            "model_dir", f"{err}; remove it, choose another --model_dir or pass "
            "--overwrite to start afresh") from err


def _check_same_data(run_dir: str, info: data_lib.DatasetInfo) -> None:
    """Refuses to resume a run on data other than its ``data.json`` records."""
    path = os.path.join(run_dir, DATA_FILE)
    if not os.path.lexists(path):
        return  # Older runs: the checkpoint's shapes are compared instead.
    try:
        saved = run_directory.DataFingerprint.from_json(run_directory.read_json(path), path)
    except run_directory.RunDirectoryError as err:
        raise SettingsError("model_dir", str(err)) from err
    differences = saved.differences(run_directory.DataFingerprint.from_info(info))
    if differences:
        raise SettingsError(
            "model_dir", f"{run_dir} holds a run trained on other data "
            f"({'; '.join(differences)}); rerun on the same data to resume it, "
            "choose another --model_dir, or pass --overwrite to start it afresh")


def _resume_error(run_dir: str, err: checkpointing.CheckpointError) -> SettingsError:
    return SettingsError(
        "model_dir", f"cannot resume {run_dir}: {err}; rerun with the data "
        "and settings it was trained with, choose another --model_dir, or pass "
        "--overwrite to start it afresh")


def _check_resumable(previous: TrainSettings, settings: TrainSettings,
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


_SUBSET_SIZES = ("train_examples", "eval_examples")
"""Settings that ask for at most so many examples of a split."""


def _maybe_capped(previous: TrainSettings, settings: TrainSettings) -> tuple[str, ...]:
    """The subset sizes asked for above the numbers the run recorded.

    ``flags.json`` records the number of examples used, so a request that
    its split could not fill (``--train_examples=1000`` of 400) is recorded
    as the split's size; asked again, it is the same run if the split still
    holds just that many, which only the data can tell.
    """
    return tuple(
        name for name in _SUBSET_SIZES
        if None not in (getattr(previous, name), getattr(settings, name))
        and getattr(settings, name) > getattr(previous, name))


def _sizes_used(settings: TrainSettings, info: data_lib.DatasetInfo) -> TrainSettings:
    """``settings`` with each subset size the number of examples used.

    A size larger than its split takes the whole split (at most that many),
    so the run records what it trained and evaluated on.
    """
    counts = {"train_examples": info.num_train, "eval_examples": info.num_eval}
    return dataclasses.replace(settings, **{
        name: counts[name] for name in _SUBSET_SIZES if getattr(settings, name) is not None})


def _describe_capped(asked: TrainSettings, used: TrainSettings,
                     info: data_lib.DatasetInfo) -> list[str]:
    """One line per subset size that its split could not fill."""
    splits = {"train_examples": "training", "eval_examples": info.eval_split}
    return [f"--{name}={getattr(asked, name)} is more than the {splits[name]} split "
            f"holds; using all {getattr(used, name)} examples"
            for name in _SUBSET_SIZES if getattr(asked, name) != getattr(used, name)]


def _computed_settings(settings: TrainSettings) -> dict:
    """The settings that change what a run computes (all but `RESUME_SAFE_FIELDS`)."""
    return {k: v for k, v in settings.to_json().items() if k not in RESUME_SAFE_FIELDS}


def _remove_run_files(run_dir: str) -> None:
    for name in (*RUN_FILES, *run_directory.SCORE_FILES):
        path = os.path.join(run_dir, name)
        # A symbolic link is removed, never followed.
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def _truncate_history(path: str, first_epoch: int) -> None:
    """Drops the rows of 0-based epochs ``>= first_epoch``, which are trained again.

    The ``epoch`` column numbers epochs from 1 (`callbacks_lib.HistoryCSV`).

    A killed run may have logged an epoch whose checkpoint it did not write,
    or half a row.

    Raises:
        SettingsError: the file is not a history (`run_directory.read_history`).
    """
    try:
        rows = run_directory.read_history(path)
    except run_directory.RunDirectoryError as err:
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


def _save_model(model: SelfKDModel, path: str) -> None:
    # Keras insists on the .keras suffix, so the temporary name keeps it; a
    # fresh name (not one a planted link could anticipate) and no Ctrl-C
    # half-way leave either the old file or the new one.
    fd, temporary = tempfile.mkstemp(
        dir=os.path.dirname(path), prefix=".", suffix=f"-{MODEL_FILE}")
    os.close(fd)
    try:
        with checkpointing.uninterrupted():
            model.save(temporary)
            # mkstemp made it owner-only; readable like the other run files.
            os.chmod(temporary, 0o644)
            os.replace(temporary, path)
    finally:
        if os.path.lexists(temporary):
            os.remove(temporary)


# -- training -----------------------------------------------------------------


def _resolved(settings: TrainSettings) -> TrainSettings:
    """Validated, with absolute paths and the default ``model_dir`` filled in."""
    settings.validate()
    kind, colon, path = settings.dataset.partition(":")
    dataset = f"{kind}:{os.path.abspath(os.path.expanduser(path))}" if colon else kind
    model_dir = settings.model_dir or settings.default_model_dir()
    return dataclasses.replace(
        settings, dataset=dataset, model_dir=os.path.abspath(model_dir))


def _callbacks(settings: TrainSettings, saver: checkpointing.CheckpointCallback) -> list:
    # Order matters at epoch end. SoftTargetRefresh comes first (fit moves
    # it there), so the table is refreshed before anything is saved; its
    # schedule length is explicit because a resumed run fits in segments.
    # The timer adds epoch_time_s to the logs the loggers write. The
    # checkpoint comes last, after the CSV row, so a kill in between makes
    # the resumed run log that epoch again (the stale row is dropped by
    # _truncate_history) rather than never.
    # The progress bar is for a terminal only: Keras draws it with colour
    # codes and carriage returns whatever stdout is, which fill a log file
    # with a line per step. EpochSummary's line per epoch is shown anyway.
    run_dir = settings.model_dir
    progress_bar = [keras.callbacks.ProgbarLogger()] if _stdout_is_terminal() else []
    return [
        callbacks_lib.SoftTargetRefresh(epochs=settings.epochs),
        callbacks_lib.EpochTimer(),
        # Given here rather than added by fit, so it finishes the epoch's bar
        # before EpochSummary prints.
        *progress_bar,
        callbacks_lib.HistoryCSV(os.path.join(run_dir, HISTORY_FILE), append=True),
        callbacks_lib.EpochTensorBoard(
            os.path.join(run_dir, TENSORBOARD_DIR), write_graph=False,
            profile_batch=0),
        callbacks_lib.EpochSummary(),
        keras.callbacks.TerminateOnNaN(),
        saver,
    ]


def _stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


class _StopAfterEpoch(keras.callbacks.Callback):
    """Ends `fit` after ``epoch``: the resumed epoch is a segment of its own."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            self.model.stop_training = True


def _fit(model, settings, train_ds, eval_ds, steps, start, callbacks, saver) -> None:
    """Trains from checkpoint position ``start`` to the last epoch.

    A run resumed mid-epoch first finishes that epoch alone, skipping the
    batches already trained on (the data of an epoch is a pure function of
    the seed and the epoch), then trains the remaining epochs. Both segments
    are fits over all ``settings.epochs``, so callbacks see the true epoch
    count.
    """
    segments = []
    if start.step:
        segments.append((train_ds.skip(start.step), start.epoch, steps - start.step,
                         [_StopAfterEpoch(start.epoch)]))
        train_ds = train_ds.skip(steps)
    first = start.epoch + 1 if start.step else start.epoch
    if first < settings.epochs:
        segments.append((train_ds, first, steps, []))
    for data, initial_epoch, steps_per_epoch, extra in segments:
        model.fit(
            data, validation_data=eval_ds, initial_epoch=initial_epoch,
            epochs=settings.epochs, steps_per_epoch=steps_per_epoch,
            validation_freq=evaluation_epochs(settings.epochs, settings.eval_every),
            # Keras adds a progress bar of its own unless verbose is 0.
            callbacks=callbacks + extra, verbose=int(_stdout_is_terminal()), shuffle=False,
        )
        if saver.diverged_at is not None:
            return


def evaluation_epochs(epochs: int, every: int) -> list[int]:
    """1-based epochs after which `fit` evaluates: the first, every ``every``-th
    and the last.

    The first is included because `keras.callbacks.CSVLogger` fixes its
    columns at the first epoch's end; without it the ``val_`` columns would
    be missing from ``history.csv``.

    >>> evaluation_epochs(10, 4)
    [1, 4, 8, 10]
    """
    return sorted({1, epochs, *range(every, epochs + 1, every)})


def _divergence_message(saver: checkpointing.CheckpointCallback, directory: str) -> str:
    epoch, step = saver.diverged_at
    last = saver.last_saved
    if last is None:
        kept = "no checkpoint had been written"
    elif last.step:
        kept = f"the last good checkpoint (epoch {last.epoch + 1}, step {last.step}) is kept in {directory}"
    else:
        kept = f"the last good checkpoint (end of epoch {last.epoch}) is kept in {directory}"
    return (f"the loss became NaN or infinite at epoch {epoch + 1}, step {step}; "
            f"training stopped and {kept}")


def _interruption_message(saver: checkpointing.CheckpointCallback) -> str:
    now, last = saver.position, saver.last_saved
    if last is None:
        since = "from the start: no checkpoint had been written"
    elif last.step:
        since = f"from the checkpoint at epoch {last.epoch + 1}, step {last.step}"
    else:
        since = f"from the checkpoint at the end of epoch {last.epoch}"
    return (f"interrupted at epoch {now.epoch + 1} step {now.step}; rerun the "
            f"same command to resume ({since})")


def train(settings: TrainSettings) -> dict:
    """Runs, resumes or (when finished) reads the run in ``settings.model_dir``.

    The process that writes the run directory (the only one, or the chief
    of a cluster) holds its lock (`selfkd_tf.run_lock`) throughout, so a
    second process started on the same directory is refused instead of
    writing it too. Nothing is written before the settings, the data, the
    model and the run directory (its files, and for a resumed run its data
    record and checkpoint) have been checked, so an invalid setting leaves
    no trace.

    ``train_examples`` and ``eval_examples`` ask for at most so many
    examples; a split that holds fewer is used whole, a line says so, and
    ``flags.json`` records the number used.

    Returns:
        The ``metrics.json`` record.

    Raises:
        SettingsError: invalid settings, unreadable data, a run directory
            that another process is using (flag None), or one holding a run
            with other settings or other data, or unreadable or hostile
            files (and no ``overwrite``).
        TrainingDivergedError: the loss became NaN or infinite.
        TrainingInterrupted: Ctrl-C during training; the checkpoints are
            whole, and running `train` again resumes from the latest.
    """
    settings = _resolved(settings)
    seed_everything(settings)
    with as_settings_error():
        strategy = distribute_lib.make_strategy(settings.distribute)
    with contextlib.ExitStack() as held:
        if cluster.is_chief(strategy):
            with as_settings_error():
                held.enter_context(run_lock.locked(settings.model_dir, activity="trained"))
        return _train_locked(settings, strategy)


def _finished(run_dir: str) -> dict | None:
    """A finished run's metrics record (and says so); None if it has not finished."""
    metrics_path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.lexists(metrics_path):
        return None
    record = _read_metrics(metrics_path)
    print(f"{run_dir} has finished; its metrics are in {metrics_path}.")
    return record


def _train_locked(settings: TrainSettings, strategy) -> dict:
    """`train`, once the run directory is this process's to write."""
    run_dir = settings.model_dir
    if not settings.overwrite:
        _check_run_directory(run_dir)
    previous = None if settings.overwrite else read_settings(run_dir)
    if previous is None and not settings.overwrite and any(
            os.path.exists(os.path.join(run_dir, name)) for name in RUN_FILES):
        raise SettingsError(
            "model_dir", f"{run_dir} holds run files but no {FLAGS_FILE}; choose "
            "another --model_dir or pass --overwrite to start afresh")
    maybe_capped = ()
    if previous is not None:
        maybe_capped = _maybe_capped(previous, settings)
        _check_resumable(previous, settings,
                         [k for k in settings.to_json() if k not in maybe_capped])
        if not maybe_capped and (record := _finished(run_dir)) is not None:
            return record
    checkpoint_dir = os.path.join(run_dir, CHECKPOINT_DIR)
    try:
        resumed = checkpointing.read_position(checkpoint_dir) if previous else None
    except checkpointing.CheckpointError as err:
        raise _resume_error(run_dir, err) from err
    start = resumed or checkpointing.Position()

    with as_settings_error():
        cluster.check_workers_agree(strategy, _computed_settings(settings), start)
    train_ds, eval_ds, info = build_datasets(
        settings, initial_epoch=min(start.epoch, settings.epochs - 1))
    asked, settings = settings, _sizes_used(settings, info)
    if maybe_capped:
        if any(getattr(previous, k) != getattr(settings, k) for k in maybe_capped):
            _check_resumable(previous, asked, maybe_capped)  # names what was asked
        if (record := _finished(run_dir)) is not None:
            return record
    for line in _describe_capped(asked, settings, info):
        print(line)
    with strategy.scope():
        model = build_model(settings, info)
        compile_model(model, settings, info.steps_per_epoch)
        model.optimizer.build(model.trainable_variables)
    if resumed:
        _check_same_data(run_dir, info)
        try:
            checkpointing.TrainingCheckpoint(model, checkpoint_dir).restore_latest()
        except checkpointing.CheckpointError as err:
            raise _resume_error(run_dir, err) from err

    # Reads come from run_dir; this worker's writes go to out_dir (run_dir
    # on the chief, a throw-away folder on the other workers of a cluster).
    out_dir = cluster.worker_directory(run_dir, strategy)
    if settings.overwrite:
        _remove_run_files(out_dir)
    # Checks history.csv before anything else is written.
    _truncate_history(os.path.join(out_dir, HISTORY_FILE), start.epoch)
    os.makedirs(out_dir, exist_ok=True)
    write_atomically(os.path.join(out_dir, FLAGS_FILE),
                      json.dumps(settings.to_json(), indent=2) + "\n")
    write_atomically(os.path.join(out_dir, DATA_FILE), json.dumps(
        run_directory.DataFingerprint.from_info(info).to_json(), indent=2) + "\n")
    checkpoint = checkpointing.TrainingCheckpoint(
        model, os.path.join(out_dir, CHECKPOINT_DIR))
    if resumed:
        print(f"Resuming {run_dir} at epoch {start.epoch + 1}, step {start.step} "
              f"of {info.steps_per_epoch}." if start.epoch < settings.epochs else
              f"{run_dir} has finished training; saving and evaluating it.")

    saver = checkpointing.CheckpointCallback(
        checkpoint, steps_per_epoch=info.steps_per_epoch,
        save_every_steps=settings.save_every_steps, start=start)
    try:
        _fit(model, settings, train_ds, eval_ds, info.steps_per_epoch, start,
             _callbacks(dataclasses.replace(settings, model_dir=out_dir), saver), saver)
    except KeyboardInterrupt:
        raise TrainingInterrupted(_interruption_message(saver)) from None
    if saver.diverged_at is not None:
        raise TrainingDivergedError(_divergence_message(saver, checkpoint_dir))

    _save_model(model, os.path.join(out_dir, MODEL_FILE))
    record = evaluate_model(
        model, eval_ds, dataset_name=info.name, split=info.eval_split,
        arch=settings.arch, methods=settings.methods,
        train_time_s=saver.train_time_s(), epochs=settings.epochs,
    )
    metrics_record.write_metrics_json(record, os.path.join(out_dir, METRICS_FILE))
    return record

"""One training run, from settings to a run directory.

`train(settings)` is the whole recipe as a plain function: build the data,
the model and the optimizer, `fit` with a few callbacks, save and evaluate.
Every knob is a field of `TrainSettings`, whose field names are also the
``selfkd-train`` flag names (`selfkd_tf.cli.flags`).

A run directory (``settings.model_dir``) holds:

- ``flags.json``: the resolved settings (`TrainSettings.to_json`);
- ``data.json``: what the run trains on (`selfkd_tf.rundir.data_record.DataFingerprint`),
  so that a resumed run refuses data that changed;
- ``history.csv``: one row per epoch (`selfkd_tf.experiment.callbacks.HistoryCSV`),
  epochs numbered from 1 as on the console, with an ``epoch_time_s`` column;
- ``tensorboard/``: TensorBoard scalars of every logged value (loss terms,
  per-exit accuracies, ``lr``, ``alpha_t``, ``epoch_time_s``) at step = the
  1-based epoch;
- ``checkpoints/``: crash-safe training state (`selfkd_tf.experiment.checkpointing`);
- ``model.keras``: the trained `SelfKDModel`;
- ``metrics.json``: every exit and the ensemble evaluated on the evaluation
  split (`selfkd_tf.metrics.record.build_metrics_record`).

Running `train` again on an existing directory resumes it from its last
checkpoint, or returns its metrics when it has finished; settings that would
change the result and the data must match, unless ``overwrite`` starts the
run afresh (`selfkd_tf.experiment.resume`, the resume policy). The
directory's files are read as untrusted (`selfkd_tf.rundir.reading`):
anything malformed, or a link through which training would write elsewhere,
is refused in one line before anything is written.

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
import dataclasses
import json
import os
import sys
import tempfile

import keras

from selfkd_tf import data as data_lib
from selfkd_tf.distillation.model import SelfKDModel
from selfkd_tf.distribution import cluster
from selfkd_tf.distribution.multiworker import in_multi_worker_mode
from selfkd_tf.distribution import strategy as distribute_lib
from selfkd_tf.evaluation.scoring import evaluate_model
from selfkd_tf.distillation import pskd
from selfkd_tf.experiment import callbacks as callbacks_lib
from selfkd_tf.experiment import checkpointing
from selfkd_tf.experiment import resume
from selfkd_tf.experiment.builders import build_datasets, build_model, compile_model, seed_everything
from selfkd_tf.errors import SettingsError
from selfkd_tf.experiment.settings import TrainSettings, as_settings_error, read_settings
from selfkd_tf.files import write_atomically
from selfkd_tf.metrics import record as metrics_record
from selfkd_tf.metrics.scores import NonFiniteProbabilitiesError
from selfkd_tf.rundir import lock as run_lock
from selfkd_tf.rundir.data_record import DataFingerprint
from selfkd_tf.rundir.layout import (
    CHECKPOINT_DIR, DATA_FILE, FLAGS_FILE, HISTORY_FILE, METRICS_FILE, MODEL_FILE,
    RUN_FILES, TENSORBOARD_DIR)


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint was kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training was interrupted (Ctrl-C); the checkpoints on disk are whole.

    ``str(error)`` is one line: where training stopped and how to resume.
    """


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
    # resume.truncate_history) rather than never.
    # The progress bar is for a terminal only: Keras draws it with colour
    # codes and carriage returns whatever stdout is, which fill a log file
    # with a line per step. EpochSummary's line per epoch is shown anyway.
    run_dir = settings.model_dir
    progress_bar = [keras.callbacks.ProgbarLogger()] if _stdout_is_terminal() else []
    return [
        pskd.SoftTargetRefresh(epochs=settings.epochs),
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


def _worker_share(strategy) -> data_lib.WorkerShare | None:
    """This worker's replicas in a multi-worker run; None on a single worker."""
    if not in_multi_worker_mode(strategy):
        return None
    # The strategy's own description of this worker's input pipeline.
    context = strategy.extended._make_input_context()
    return data_lib.WorkerShare(
        context.input_pipeline_id, context.num_input_pipelines,
        context.num_replicas_in_sync // context.num_input_pipelines)


def _per_worker(dataset, strategy, share):
    """A dataset of this worker's pieces, one per replica and step, as `fit`
    takes it: distributed as it is, each piece to its replica."""
    if share is None:
        return dataset
    return strategy.distribute_datasets_from_function(lambda context: dataset)


def _fit(model, settings, train_ds, eval_ds, steps, start, callbacks, saver,
         share=None) -> None:
    """Trains from checkpoint position ``start`` to the last epoch.

    A run resumed mid-epoch first finishes that epoch alone, skipping the
    batches already trained on (the data of an epoch is a pure function of
    the seed and the epoch), then trains the remaining epochs. Both segments
    are fits over all ``settings.epochs``, so callbacks see the true epoch
    count. With a worker ``share``, the datasets hold this worker's pieces,
    one per replica and step.
    """
    strategy = model.distribute_strategy
    per_step = share.replicas_per_worker if share else 1
    eval_ds = _per_worker(eval_ds, strategy, share)
    segments = []
    if start.step:
        segments.append((train_ds.skip(start.step * per_step), start.epoch,
                         steps - start.step, [_StopAfterEpoch(start.epoch)]))
        train_ds = train_ds.skip(steps * per_step)
    first = start.epoch + 1 if start.step else start.epoch
    if first < settings.epochs:
        segments.append((train_ds, first, steps, []))
    for data, initial_epoch, steps_per_epoch, extra in segments:
        model.fit(
            _per_worker(data, strategy, share), validation_data=eval_ds, initial_epoch=initial_epoch,
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
    of a cluster) holds its lock (`selfkd_tf.rundir.lock`) throughout, so a
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


def _train_locked(settings: TrainSettings, strategy) -> dict:
    """`train`, once the run directory is this process's to write."""
    run_dir = settings.model_dir
    if not settings.overwrite:
        resume.check_run_directory(run_dir)
    previous = None if settings.overwrite else read_settings(run_dir)
    if previous is None and not settings.overwrite and any(
            os.path.exists(os.path.join(run_dir, name)) for name in RUN_FILES):
        raise SettingsError(
            "model_dir", f"{run_dir} holds run files but no {FLAGS_FILE}; choose "
            "another --model_dir or pass --overwrite to start afresh")
    maybe_capped = ()
    if previous is not None:
        maybe_capped = resume.maybe_capped(previous, settings)
        resume.check_resumable(previous, settings,
                         [k for k in settings.to_json() if k not in maybe_capped])
        if not maybe_capped and (record := resume.finished_record(run_dir)) is not None:
            return record
    checkpoint_dir = os.path.join(run_dir, CHECKPOINT_DIR)
    try:
        resumed = checkpointing.read_position(checkpoint_dir) if previous else None
    except checkpointing.CheckpointError as err:
        raise resume.resume_error(run_dir, err) from err
    start = resumed or checkpointing.Position()

    with as_settings_error():
        cluster.check_workers_agree(strategy, resume.computed_settings(settings), start)
    # Each worker of a cluster reads only its share of the examples; the
    # final scores read the whole evaluation split.
    share = _worker_share(strategy)
    initial_epoch = min(start.epoch, settings.epochs - 1)
    train_ds, eval_ds, info = build_datasets(settings, initial_epoch=initial_epoch, share=share)
    fit_eval_ds = eval_ds
    if share is not None:
        _, eval_ds, _ = build_datasets(settings, initial_epoch=initial_epoch)
    asked, settings = settings, resume.sizes_used(settings, info)
    if maybe_capped:
        if any(getattr(previous, k) != getattr(settings, k) for k in maybe_capped):
            resume.check_resumable(previous, asked, maybe_capped)  # names what was asked
        if (record := resume.finished_record(run_dir)) is not None:
            return record
    for line in resume.describe_capped(asked, settings, info):
        print(line)
    with strategy.scope():
        model = build_model(settings, info)
        compile_model(model, settings, info.steps_per_epoch)
        model.optimizer.build(model.trainable_variables)
    if resumed:
        resume.check_same_data(run_dir, info)
        try:
            checkpointing.TrainingCheckpoint(model, checkpoint_dir).restore_latest()
        except checkpointing.CheckpointError as err:
            raise resume.resume_error(run_dir, err) from err

    # Reads come from run_dir; this worker's writes go to out_dir (run_dir
    # on the chief, a throw-away folder on the other workers of a cluster).
    out_dir = cluster.worker_directory(run_dir, strategy)
    if settings.overwrite:
        resume.remove_run_files(out_dir)
    # Checks history.csv before anything else is written.
    resume.truncate_history(os.path.join(out_dir, HISTORY_FILE), start.epoch)
    os.makedirs(out_dir, exist_ok=True)
    write_atomically(os.path.join(out_dir, FLAGS_FILE),
                      json.dumps(settings.to_json(), indent=2) + "\n")
    write_atomically(os.path.join(out_dir, DATA_FILE), json.dumps(
        DataFingerprint.from_info(info).to_json(), indent=2) + "\n")
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
        _fit(model, settings, train_ds, fit_eval_ds, info.steps_per_epoch, start,
             _callbacks(dataclasses.replace(settings, model_dir=out_dir), saver), saver,
             share)
    except KeyboardInterrupt:
        raise TrainingInterrupted(_interruption_message(saver)) from None
    if saver.diverged_at is not None:
        raise TrainingDivergedError(_divergence_message(saver, checkpoint_dir))

    _save_model(model, os.path.join(out_dir, MODEL_FILE))
    try:
        record = evaluate_model(
            model, eval_ds, dataset_name=info.name, split=info.eval_split,
            arch=settings.arch, methods=settings.methods,
            train_time_s=saver.train_time_s(), epochs=settings.epochs,
        )
    except NonFiniteProbabilitiesError:
        # The training loss stayed finite, but inference (batch norms'
        # moving statistics) did not: the run diverged all the same.
        raise TrainingDivergedError(
            f"the trained model predicts NaN or infinite probabilities on the "
            f"{info.eval_split} split (the loss stayed finite in training, where batch norm "
            f"uses each batch's statistics); its weights are in "
            f"{os.path.join(out_dir, MODEL_FILE)}; lower --lr") from None
    metrics_record.write_metrics_json(record, os.path.join(out_dir, METRICS_FILE))
    return record

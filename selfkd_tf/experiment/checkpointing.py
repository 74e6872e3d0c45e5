"""Crash-safe training state: save often, resume exactly where a run stopped.

A `TrainingCheckpoint` is a `tf.train.CheckpointManager` over everything a
resumed run needs to continue as if it had never stopped:

- the model's weights, including its non-trainable state: batch-norm
  statistics, the PS-KD teacher table, this epoch's staged predictions and
  ``a_t`` (`selfkd_tf.distillation.model.SelfKDModel` keeps them as weights);
- the optimizer's variables: momentum and the step counter, which is also the
  position in the learning-rate schedule; and which form the momentum is in
  (`selfkd_tf.optimizers.SGD`'s or Keras's), so a checkpoint written with
  one resumes under the other without a jump (`optimizers.convert_momentum`);
  checkpoints that do not say are Keras's, as selfkd_tf wrote them before
  `selfkd_tf.optimizers.SGD`;
- the running sums of the epoch's metrics, so a resumed epoch logs the same
  values as an uninterrupted one;
- the `Position`: the next epoch, the batches of it already trained, and
  the training time spent so far.

Writes are atomic: TensorFlow writes a checkpoint's files before it points
the ``checkpoint`` state file (itself replaced atomically) at them, so a run
killed mid-save resumes from the previous checkpoint, which is kept
(``max_to_keep=2``). A Ctrl-C (SIGINT) during a save takes effect when the
save is complete (`uninterrupted`), so an interrupted run never leaves half
a checkpoint.

Reading is guarded too: a checkpoint directory that cannot be read, whose
state file names files outside it (which the manager would delete when it
prunes old checkpoints), or whose variables do not fit the model raises a
`CheckpointError` with a one-line message before anything is restored.

Example:

```python
checkpoint = TrainingCheckpoint(model, "runs/a/checkpoints")
start = read_position("runs/a/checkpoints") or Position()  # before building data
if start != Position():
    checkpoint.restore_latest()
saver = CheckpointCallback(checkpoint, steps_per_epoch=391, save_every_steps=100,
                           start=start)
model.fit(..., callbacks=[saver])
```
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import os
import signal
import threading
import time

import keras
import numpy as np
import tensorflow as tf

from selfkd_tf import optimizers
from selfkd_tf.files import is_within

_POSITION_KEYS = {
    "epoch": "progress/epoch/.ATTRIBUTES/VARIABLE_VALUE",
    "step": "progress/step/.ATTRIBUTES/VARIABLE_VALUE",
    "train_time_s": "progress/train_time_s/.ATTRIBUTES/VARIABLE_VALUE",
}
_MOMENTUM_FORM_KEY = "momentum_holds_rate/.ATTRIBUTES/VARIABLE_VALUE"


_READ_ERRORS = (tf.errors.OpError, ValueError, IndexError)
"""What TensorFlow raises for damaged checkpoint files (a truncated data file
surfaces as an IndexError)."""


class CheckpointError(ValueError):
    """A checkpoint directory cannot be read or does not fit the model.

    ``str(error)`` is one line that says what is wrong.
    """


@dataclasses.dataclass(frozen=True)
class Position:
    """Where a run stands.

    Attributes:
        epoch: the 0-based epoch training continues with; ``epochs`` once
            training is complete.
        step: batches of that epoch already trained on (0 at an epoch end).
        train_time_s: seconds spent training up to this point.
    """

    epoch: int = 0
    step: int = 0
    train_time_s: float = 0.0


class _Progress(tf.Module):
    """The `Position` as checkpointed variables."""

    def __init__(self):
        super().__init__(name="progress")
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.train_time_s = tf.Variable(0.0, dtype=tf.float64, trainable=False)


def latest_checkpoint(directory: str) -> str | None:
    """The path prefix of the latest checkpoint in ``directory``, if any.

    Raises:
        CheckpointError: the ``checkpoint`` state file cannot be parsed,
            names no checkpoint, or names one outside ``directory``.
    """
    state_file = os.path.join(directory, "checkpoint")
    if not os.path.lexists(state_file):
        return None
    logger = tf.get_logger()
    level = logger.level
    # TensorFlow logs an unparsable state file as a warning and answers
    # None, which would read as "no checkpoint" and restart the run.
    logger.setLevel("ERROR")
    try:
        state = tf.train.get_checkpoint_state(directory)
    except (tf.errors.OpError, ValueError, UnicodeDecodeError) as err:
        state = err
    finally:
        logger.setLevel(level)
    if not getattr(state, "model_checkpoint_path", None):
        problem = _first_line(state) if isinstance(state, Exception) else "not a checkpoint state"
        raise CheckpointError(f"unreadable checkpoint state {state_file}: {problem}")
    paths = [state.model_checkpoint_path, *state.all_model_checkpoint_paths]
    for path in paths:
        if not is_within(os.path.realpath(os.path.join(directory, path)),
                         os.path.realpath(directory)):
            raise CheckpointError(
                f"the checkpoint state in {directory} names {path!r}, which is "
                "outside the directory")
    return os.path.join(directory, state.model_checkpoint_path)


def read_position(directory: str) -> Position | None:
    """The position of the latest checkpoint in ``directory``, if any.

    Reads three scalars, so it is cheap and needs no model: a run learns
    which epoch to start its data pipeline at before building anything.

    Raises:
        CheckpointError: the checkpoint cannot be read (see
            `latest_checkpoint`), lacks the position or holds a negative one.
    """
    path = latest_checkpoint(directory)
    if path is None:
        return None
    try:
        values = {k: tf.train.load_variable(path, key)
                  for k, key in _POSITION_KEYS.items()}
        position = Position(int(values["epoch"]), int(values["step"]),
                            float(values["train_time_s"]))
    except (*_READ_ERRORS, TypeError) as err:
        raise CheckpointError(
            f"unreadable checkpoint {path}: {_first_line(err)}") from err
    if position.epoch < 0 or position.step < 0:
        raise CheckpointError(f"checkpoint {path} holds a negative position {position}")
    return position


def _first_line(error: BaseException) -> str:
    return (str(error).strip() or type(error).__name__).splitlines()[0]


@contextlib.contextmanager
def uninterrupted():
    """Defers Ctrl-C (SIGINT) and SIGTERM until the block ends, then delivers it.

    Wraps writes that must not stop half-way. Outside the main thread, where
    Python delivers no signals, it does nothing.

    Example:

    >>> with uninterrupted():
    ...     manager.save()  # a Ctrl-C here raises KeyboardInterrupt after it
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {signum: signal.signal(signum, lambda *args: received.append(args))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if not received:
        return
    signum = received[0][0]
    if callable(previous[signum]):
        previous[signum](*received[0])  # Python's SIGINT handler raises KeyboardInterrupt
    elif previous[signum] == signal.SIG_DFL:
        os.kill(os.getpid(), signum)


class TrainingCheckpoint:
    """Saves and restores a compiled model's whole training state.

    Args:
        model: a compiled `keras.Model` whose optimizer is built
            (``model.optimizer.build(model.trainable_variables)``), so
            restoring assigns every variable at once.
        directory: where the checkpoints go.
        max_to_keep: checkpoints kept; 2 keeps the previous one usable while
            the next is written.
    """

    def __init__(self, model: keras.Model, directory: str, max_to_keep: int = 2):
        self.model = model
        self.directory = directory
        self._progress = _Progress()
        self._metric_variables = [v for m in model.metrics for v in m.variables]
        state = dict(model=model, optimizer=model.optimizer,
                     metrics=self._metric_variables, progress=self._progress)
        self._momentum_holds_rate = tf.Variable(
            optimizers.momentum_holds_rate(model.optimizer), trainable=False)
        self._checkpoint = tf.train.Checkpoint(
            **state, momentum_holds_rate=self._momentum_holds_rate)
        # Checkpoints written before the momentum form was recorded.
        self._unmarked_checkpoint = tf.train.Checkpoint(**state)
        self._manager = tf.train.CheckpointManager(
            self._checkpoint, directory, max_to_keep=max_to_keep)

    def save(self, position: Position, number: int) -> str:
        """Writes a checkpoint numbered ``number`` (the global step).

        A Ctrl-C during the write raises `KeyboardInterrupt` once the
        checkpoint is complete.
        """
        with uninterrupted():
            self._progress.epoch.assign(position.epoch)
            self._progress.step.assign(position.step)
            self._progress.train_time_s.assign(position.train_time_s)
            return self._manager.save(checkpoint_number=number)

    def restore_latest(self) -> Position:
        """Restores the latest checkpoint into the model and optimizer.

        Raises:
            CheckpointError: there is no readable checkpoint, or it does not
                fit the model (another architecture, number of classes or of
                training examples); nothing is restored then.
        """
        path = latest_checkpoint(self.directory)
        if path is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        saved = _saved_shapes(path)
        mismatches = self._shape_mismatches(saved)
        if mismatches:
            raise CheckpointError(
                f"the checkpoint {path} was made for another model or other "
                f"data: {_summary(mismatches)}")
        marked = _MOMENTUM_FORM_KEY in saved
        try:
            holds_rate = bool(tf.train.load_variable(path, _MOMENTUM_FORM_KEY)
                              if marked else True)
            checkpoint = self._checkpoint if marked else self._unmarked_checkpoint
            checkpoint.restore(path).assert_consumed()
        except (AssertionError, *_READ_ERRORS) as err:
            raise CheckpointError(
                f"the checkpoint {path} does not fit the model or cannot be "
                f"read: {_first_line(err)}") from err
        optimizer = self.model.optimizer
        current = optimizers.momentum_holds_rate(optimizer)
        if optimizers.sgd_with_momentum(optimizer) and holds_rate != current:
            optimizers.convert_momentum(optimizer, to_rate_form=current)
        # The restore set the mark to the checkpoint's; the momentum is now
        # in this optimizer's form, which the next checkpoint must say.
        self._momentum_holds_rate.assign(current)
        return Position(int(self._progress.epoch.numpy()),
                        int(self._progress.step.numpy()),
                        float(self._progress.train_time_s.numpy()))

    def _shape_mismatches(self, saved: dict[str, list[int]]
                          ) -> list[tuple[str, tuple, tuple]]:
        """The saved values whose shapes differ from the variables they restore.

        Checked before restoring, because a failed restore leaves TensorFlow
        warnings about unrestored values behind.

        Args:
            saved: the checkpoint's keys and shapes (`_saved_shapes`).

        Returns:
            ``(variable path, saved shape, model shape)`` triples.
        """
        found = []
        for key, shape in sorted(saved.items()):
            variable = _resolve(self._checkpoint, key)
            if variable is None or tuple(variable.shape) == tuple(shape):
                continue
            name = getattr(variable, "path", None) or key.split("/.ATTRIBUTES")[0]
            found.append((name, tuple(shape), tuple(variable.shape)))
        return found

    def metric_values(self) -> list[np.ndarray]:
        return [v.numpy() for v in self._metric_variables]

    def assign_metric_values(self, values: list[np.ndarray]) -> None:
        for variable, value in zip(self._metric_variables, values):
            variable.assign(value)


def _saved_shapes(path: str) -> dict[str, list[int]]:
    """The keys of the checkpoint ``path`` and the shapes of their values.

    Raises:
        CheckpointError: the checkpoint cannot be read.
    """
    try:
        return dict(tf.train.list_variables(path))
    except _READ_ERRORS as err:
        raise CheckpointError(
            f"unreadable checkpoint {path}: {_first_line(err)}") from err


def _resolve(root, key: str):
    """The variable a checkpoint key such as
    ``model/backbone/_operations/12/moving_mean/.ATTRIBUTES/VARIABLE_VALUE``
    restores, found by following the key's attribute names and list indices
    from ``root``; None if the key is not a variable's or does not resolve.
    """
    path, marker, _ = key.partition("/.ATTRIBUTES/")
    if not marker:
        return None
    node = root
    for part in path.split("/"):
        if isinstance(node, collections.abc.Sequence) and part.isdigit():
            index = int(part)
            node = node[index] if index < len(node) else None
        else:
            node = getattr(node, part, None)
        if node is None:
            return None
    return node if hasattr(node, "shape") and hasattr(node, "dtype") else None


def _summary(mismatches: list[tuple[str, tuple, tuple]]) -> str:
    """One line on what differs, read from the PS-KD table's and the
    classifiers' shapes where they differ, e.g. ``"training examples 8 -> 9
    (4 values differ in shape, e.g. ...)"``."""
    differ = {}
    for name, saved, model in mismatches:
        leaf = name.split("/")[-1]
        if leaf == "soft_target_table" and len(saved) == len(model) == 2:
            for what, a, b in zip(("training examples", "classes"), saved, model):
                if a != b:
                    differ[what] = f"{what} {a} -> {b}"
        elif "_logits/" in name and leaf == "kernel" and saved[:-1] == model[:-1]:
            differ.setdefault("classes", f"classes {saved[-1]} -> {model[-1]}")
    name, saved, model = mismatches[0]
    example = f"{name}: saved {saved}, model {model}"
    count = f"{len(mismatches)} values differ in shape, e.g. {example}"
    return f"{', '.join(differ.values())} ({count})" if differ else count


def _is_finite(loss, model: keras.Model) -> bool:
    """Whether the logged loss (if any) and every trainable weight are finite."""
    if loss is not None and not np.isfinite(loss):
        return False
    return bool(tf.reduce_all([
        tf.reduce_all(tf.math.is_finite(v)) for v in model.trainable_variables
    ]))


class CheckpointCallback(keras.callbacks.Callback):
    """Checkpoints at every epoch end and every ``save_every_steps`` steps.

    A state with a non-finite loss or non-finite weights is never saved, so
    after a divergence (see `keras.callbacks.TerminateOnNaN`) the latest
    checkpoint is the last good state.

    When the run resumes mid-epoch (``start.step > 0``), the first epoch's
    batches are numbered from ``start.step`` and the epoch's metric sums are
    restored after Keras resets them.

    Put it after the callbacks that change the state at epoch end
    (`selfkd_tf.distillation.pskd.SoftTargetRefresh`, which `SelfKDModel.fit` puts
    first) so the saved epoch end is complete.

    Args:
        checkpoint: the `TrainingCheckpoint`, restored to ``start`` already.
        steps_per_epoch: batches per epoch.
        save_every_steps: also save when the global step (epochs times
            ``steps_per_epoch`` plus the batch) is a multiple of it; 0 never.
        start: the position training starts from.

    Attributes:
        position: where training stands: the 0-based epoch in progress and
            its batches trained so far (``(epoch + 1, 0)`` after an epoch).
        last_saved: the `Position` of the latest checkpoint, or None.
        diverged_at: ``(epoch, step)`` of the first batch whose loss was not
            finite (0-based epoch, 1-based step), or None.
    """

    def __init__(self, checkpoint: TrainingCheckpoint, *, steps_per_epoch: int,
                 save_every_steps: int = 0, start: Position = Position()):
        super().__init__()
        self.checkpoint = checkpoint
        self.steps_per_epoch = steps_per_epoch
        self.save_every_steps = save_every_steps
        self.start = start
        self.position = start
        self.last_saved: Position | None = start if start.epoch or start.step else None
        self.diverged_at: tuple[int, int] | None = None
        self._metric_values = checkpoint.metric_values() if start.step else None
        self._clock_start: float | None = None

    def train_time_s(self) -> float:
        """Training seconds of the whole run: before the resume plus since."""
        if self._clock_start is None:
            return self.start.train_time_s
        return self.start.train_time_s + time.monotonic() - self._clock_start

    def on_train_begin(self, logs=None):
        if self._clock_start is None:  # a resumed epoch is a fit of its own
            self._clock_start = time.monotonic()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._offset = self.start.step if epoch == self.start.epoch else 0
        self.position = Position(epoch, self._offset)
        if self._offset and self._metric_values is not None:
            self.checkpoint.assign_metric_values(self._metric_values)
            self._metric_values = None

    def on_train_batch_end(self, batch, logs=None):
        step = self._offset + batch + 1
        self.position = Position(self._epoch, step)
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss) and self.diverged_at is None:
            self.diverged_at = (self._epoch, step)
        # The last step of an epoch is saved by on_epoch_end, after the
        # PS-KD table refresh; saving it here would record a finished epoch
        # whose table was not refreshed.
        if not self.save_every_steps or step == self.steps_per_epoch:
            return
        if (self._epoch * self.steps_per_epoch + step) % self.save_every_steps == 0:
            self._save(Position(self._epoch, step), loss)

    def on_epoch_end(self, epoch, logs=None):
        self.position = Position(epoch + 1, 0)
        self._save(self.position, (logs or {}).get("loss"))

    def _save(self, position: Position, loss) -> None:
        if not _is_finite(loss, self.model):
            return
        position = dataclasses.replace(position, train_time_s=self.train_time_s())
        # A signal deferred by the save must not take effect before the save
        # is recorded: the interruption message names the last checkpoint.
        with uninterrupted():
            self.checkpoint.save(position, position.epoch * self.steps_per_epoch + position.step)
            self.last_saved = position

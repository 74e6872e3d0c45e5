"""Crash-safe training state: save often, resume exactly where a run stopped.

A `TrainingCheckpoint` is a `tf.train.CheckpointManager` over everything a
resumed run needs to continue as if it had never stopped:

- the model's weights, including its non-trainable state: batch-norm
  statistics, the PS-KD teacher table, this epoch's staged predictions and
  ``a_t`` (`selfkd_tf.training.SelfKDModel` keeps them as weights);
- the optimizer's variables: momentum and the step counter, which is also the
  position in the learning-rate schedule;
- the running sums of the epoch's metrics, so a resumed epoch logs the same
  values as an uninterrupted one;
- the `Position`: the next epoch, the batches of it already trained, and
  the training time spent so far.

Writes are atomic: TensorFlow writes a checkpoint's files before it points
the ``checkpoint`` state file (itself replaced atomically) at them, so a run
killed mid-save resumes from the previous checkpoint, which is kept
(``max_to_keep=2``).

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

import dataclasses
import time

import keras
import numpy as np
import tensorflow as tf

_POSITION_KEYS = {
    "epoch": "progress/epoch/.ATTRIBUTES/VARIABLE_VALUE",
    "step": "progress/step/.ATTRIBUTES/VARIABLE_VALUE",
    "train_time_s": "progress/train_time_s/.ATTRIBUTES/VARIABLE_VALUE",
}


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


def read_position(directory: str) -> Position | None:
    """The position of the latest checkpoint in ``directory``, if any.

    Reads three scalars, so it is cheap and needs no model: a run learns
    which epoch to start its data pipeline at before building anything.
    """
    path = tf.train.latest_checkpoint(directory)
    if path is None:
        return None
    values = {k: tf.train.load_variable(path, key) for k, key in _POSITION_KEYS.items()}
    return Position(int(values["epoch"]), int(values["step"]),
                    float(values["train_time_s"]))


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
        self._checkpoint = tf.train.Checkpoint(
            model=model, optimizer=model.optimizer,
            metrics=self._metric_variables, progress=self._progress,
        )
        self._manager = tf.train.CheckpointManager(
            self._checkpoint, directory, max_to_keep=max_to_keep)

    def save(self, position: Position, number: int) -> str:
        """Writes a checkpoint numbered ``number`` (the global step)."""
        self._progress.epoch.assign(position.epoch)
        self._progress.step.assign(position.step)
        self._progress.train_time_s.assign(position.train_time_s)
        return self._manager.save(checkpoint_number=number)

    def restore_latest(self) -> Position:
        """Restores the latest checkpoint into the model and optimizer.

        Raises:
            AssertionError: the checkpoint does not match the model.
        """
        self._checkpoint.restore(self._manager.latest_checkpoint).assert_consumed()
        return Position(int(self._progress.epoch.numpy()),
                        int(self._progress.step.numpy()),
                        float(self._progress.train_time_s.numpy()))

    def metric_values(self) -> list[np.ndarray]:
        return [v.numpy() for v in self._metric_variables]

    def assign_metric_values(self, values: list[np.ndarray]) -> None:
        for variable, value in zip(self._metric_variables, values):
            variable.assign(value)


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
    (`selfkd_tf.callbacks.SoftTargetRefresh`, which `SelfKDModel.fit` puts
    first) so the saved epoch end is complete.

    Args:
        checkpoint: the `TrainingCheckpoint`, restored to ``start`` already.
        steps_per_epoch: batches per epoch.
        save_every_steps: also save when the global step (epochs times
            ``steps_per_epoch`` plus the batch) is a multiple of it; 0 never.
        start: the position training starts from.

    Attributes:
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
        if self._offset and self._metric_values is not None:
            self.checkpoint.assign_metric_values(self._metric_values)
            self._metric_values = None

    def on_train_batch_end(self, batch, logs=None):
        step = self._offset + batch + 1
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
        self._save(Position(epoch + 1, 0), (logs or {}).get("loss"))

    def _save(self, position: Position, loss) -> None:
        if not _is_finite(loss, self.model):
            return
        position = dataclasses.replace(position, train_time_s=self.train_time_s())
        self.checkpoint.save(position, position.epoch * self.steps_per_epoch + position.step)
        self.last_saved = position

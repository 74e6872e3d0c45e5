"""Callbacks that report training progress: the console, ``history.csv``, TensorBoard.

Epochs are numbered from 1 wherever they are shown: Keras's progress bar
("Epoch 3/10"), `EpochSummary` ("epoch 3/10"), the ``epoch`` column of
`HistoryCSV` and the step of `EpochTensorBoard`'s scalars. (Keras hands
callbacks the 0-based index; `keras.callbacks.CSVLogger` and
`keras.callbacks.TensorBoard` would write that.)
"""

from __future__ import annotations

import csv
import time

import keras


class EpochTimer(keras.callbacks.Callback):
    """Adds ``epoch_time_s``, the epoch's wall time, to the epoch's logs.

    The time runs from the epoch's start to its end, validation included.
    Put it before the callbacks that write the logs (`keras.callbacks.
    CSVLogger`, `keras.callbacks.TensorBoard`, `EpochSummary`): Keras hands
    every callback the same logs dict.

    Example:

    >>> model.fit(ds, epochs=3, callbacks=[EpochTimer(), keras.callbacks.CSVLogger("h.csv")])
    """

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epoch_time_s"] = time.monotonic() - self._start


class EpochSummary(keras.callbacks.Callback):
    """Prints one line per epoch: time, losses, per-exit validation accuracy.

    Example output:

        epoch 3/300 12.4s | loss 2.113 ce 1.502 byot 0.581 dmfl 0.030 |
        val acc exit1 31.2% exit2 40.5% exit3 52.0% exit4 60.1% ensemble 61.3% |
        lr 0.1 alpha_t 0.008

    (on one line). Values missing from the logs are left out; without
    validation data the training accuracies are shown.
    """

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        parts = [f"epoch {epoch + 1}/{self.params.get('epochs', '?')}"]
        if "epoch_time_s" in logs:
            parts[0] += f" {logs['epoch_time_s']:.1f}s"
        parts.append(" ".join(
            f"{k} {logs[k]:.3f}" for k in ("loss", "ce", "byot", "dmfl") if k in logs))
        prefix = "val_" if any(k.startswith("val_") for k in logs) else ""
        accuracies = sorted(
            (k for k in logs
             if k.startswith(prefix) and k.endswith("_accuracy")
             and k[len(prefix):].startswith(("exit", "ensemble"))),
            key=lambda k: (k[len(prefix):].startswith("ensemble"), len(k), k))
        if accuracies:
            parts.append(("val acc " if prefix else "acc ") + " ".join(
                f"{k[len(prefix):-len('_accuracy')]} {100 * logs[k]:.1f}%"
                for k in accuracies))
        parts.append(" ".join(f"{k} {logs[k]:.4g}" for k in ("lr", "alpha_t") if k in logs))
        print(" | ".join(p for p in parts if p), flush=True)


class HistoryCSV(keras.callbacks.CSVLogger):
    """`keras.callbacks.CSVLogger` with the ``epoch`` column numbered from 1,
    whose appended rows follow the file's header.

    The row of the epoch the progress bar calls "Epoch 3/10" says 3.

    Keras's logger takes its columns from the first epoch it sees, adding
    ``val_<key>`` for every key when that epoch has no validation. A run
    resumed at an epoch without evaluation (or by a version that logs other
    keys) would then append rows of other columns, in another order, under
    the old header. Appending to a file with a header, the header's columns
    are kept: a value the header lacks is left out, one the logs lack is
    ``NA``.

    Example:

    >>> model.fit(ds, epochs=3, callbacks=[HistoryCSV("history.csv", append=True)])
    """

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.append and not self.append_header:
            with open(self.filename, newline="") as f:
                header = next(csv.reader(f, delimiter=self.sep), [])
            self.keys = [key for key in header if key != "epoch"]

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch + 1, logs)


class EpochTensorBoard(keras.callbacks.TensorBoard):
    """`keras.callbacks.TensorBoard` for epoch scalars, at step = 1-based epoch.

    Keras's callback also writes the optimizer's learning rate as
    ``epoch_learning_rate``, read after the epoch's last step (so the rate
    of the next step); it is left out, as the model logs ``lr``, the rate
    its steps applied: one learning-rate tag, ``epoch_lr``.

    Example:

    >>> model.fit(ds, epochs=3, callbacks=[EpochTensorBoard("runs/a/tensorboard")])
    """

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch + 1, logs)

    def _collect_learning_rate(self, logs):
        return logs

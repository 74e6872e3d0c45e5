"""Callbacks that drive the PS-KD schedule and report training progress."""

from __future__ import annotations

import keras


class SoftTargetRefresh(keras.callbacks.Callback):
    """Advances PS-KD by one epoch: sets ``a_t``, then refreshes the table.

    At the start of epoch ``t`` it sets ``a_t = a_T * (t + 1) / T``; at the
    end it moves the predictions made during the epoch into the teacher
    table (`SelfKDModel.refresh_soft_targets`), so epoch ``t + 1`` learns
    from them. `SelfKDModel.fit` adds this callback itself when PS-KD is on.

    Args:
        epochs: ``T``, the length of the schedule; defaults to the ``epochs``
            passed to `fit`. Set it when training in several `fit` calls.

    Example:

    >>> model.fit(train_ds, epochs=300, callbacks=[SoftTargetRefresh()])
    """

    def __init__(self, epochs: int | None = None):
        super().__init__()
        self.epochs = epochs

    def on_epoch_begin(self, epoch, logs=None):
        self.model.begin_pskd_epoch(epoch, self.epochs or self.params["epochs"])

    def on_epoch_end(self, epoch, logs=None):
        self.model.refresh_soft_targets()

"""A callback that records what every training step and epoch produced."""

import keras
import numpy as np


class StepRecorder(keras.callbacks.Callback):
    """Every step's own logs, and the PS-KD table after every epoch's refresh.

    Keras logs running means over the epoch; resetting the metrics before
    every step makes each logged value that step's alone.
    """

    def __init__(self):
        super().__init__()
        self.keys, self.logs, self.tables, self.valid = [], [], [], []

    def on_train_batch_begin(self, batch, logs=None):
        for metric in self.model.metrics:
            metric.reset_state()

    def on_train_batch_end(self, batch, logs=None):
        self.keys = sorted(logs)
        self.logs.append([float(logs[k]) for k in self.keys])

    def on_epoch_end(self, epoch, logs=None):
        # SelfKDModel.fit runs the table refresh before any other callback.
        self.tables.append(self.model.soft_target_table.numpy())
        self.valid.append(self.model.soft_target_valid.numpy())

    def column(self, key: str) -> np.ndarray:
        """Every step's value of the logged ``key``."""
        return np.array([row[self.keys.index(key)] for row in self.logs])

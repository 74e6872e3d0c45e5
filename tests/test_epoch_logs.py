"""What an epoch's logs say: the values it trained with, numbered as on the console."""

import csv

import keras
import numpy as np
import pytest

from selfkd_tf.distillation.config import SelfKDConfig
from selfkd_tf.distillation.pskd import SoftTargetRefresh
from selfkd_tf.experiment.callbacks import EpochSummary, EpochTensorBoard, HistoryCSV
from selfkd_tf.optimizers import make_optimizer
from support import indexed_dataset, learnable_arrays, tensorboard_scalars, tiny_model

NUM_CLASSES = 4


def _model(n, methods=("pskd",), pskd_alpha=0.8, lr=0.05, schedule="constant",
           epochs=2, steps=2):
    model = tiny_model(NUM_CLASSES, n, image_size=16, seed=0, config=SelfKDConfig(
        methods=methods, pskd_alpha=pskd_alpha))
    model.compile(optimizer=make_optimizer(lr, schedule=schedule, epochs=epochs,
                                           steps_per_epoch=steps))
    return model


class AppliedRates(keras.callbacks.Callback):
    """The learning rate each step is about to apply, read before the step."""

    def __init__(self):
        super().__init__()
        self.rates = []

    def on_train_batch_begin(self, batch, logs=None):
        self.rates.append(float(self.model.optimizer.learning_rate.numpy()))


def test_logged_lr_is_the_rate_the_epoch_trained_with():
    # Multistep over 4 epochs of 2 steps: x0.1 from epoch 3 (50%), x0.01 from
    # epoch 4 (75%), counted from 1.
    images, labels = learnable_arrays(32, NUM_CLASSES)
    model = _model(32, methods=(), lr=0.05, schedule="multistep", epochs=4, steps=2)
    applied = AppliedRates()
    history = model.fit(indexed_dataset(images, labels, 16), epochs=4, verbose=0,
                        callbacks=[applied])
    assert applied.rates == pytest.approx([0.05] * 4 + [0.005] * 2 + [0.0005] * 2)
    # Each epoch's lr is the rate of its own (last) step, not the next one's.
    np.testing.assert_allclose(history.history["lr"], [0.05, 0.05, 0.005, 0.0005],
                               rtol=1e-6)


def test_logged_alpha_t_is_the_teacher_weight_the_epoch_applied():
    images, labels = learnable_arrays(32, NUM_CLASSES)
    model = _model(32, pskd_alpha=0.6, epochs=3)
    history = model.fit(indexed_dataset(images, labels, 16), epochs=3, verbose=0)
    # a_t = 0.6 (t + 1) / 3 is 0.2 in epoch 0, but no prediction is stored
    # yet: the targets are one-hot and the teacher's weight is 0.
    np.testing.assert_allclose(history.history["alpha_t"], [0.0, 0.4, 0.6], atol=1e-7)
    assert float(model.pskd_alpha_t.numpy()) == pytest.approx(0.6)


def test_alpha_t_counts_only_the_rows_that_have_a_teacher():
    images, labels = learnable_arrays(32, NUM_CLASSES)
    model = _model(32, pskd_alpha=0.8, epochs=2)
    refresh = SoftTargetRefresh(epochs=2)
    # Epoch 0 predicts rows 0-15 only; epoch 1 trains on rows 0-31 at once.
    model.fit(indexed_dataset(images[:16], labels[:16], 16), epochs=1, verbose=0,
              callbacks=[refresh])
    assert model.soft_target_valid.numpy().tolist() == [1.0] * 16 + [0.0] * 16
    history = model.fit(indexed_dataset(images, labels, 32), initial_epoch=1, epochs=2,
                        verbose=0, callbacks=[refresh])
    # a_1 = 0.8 * 2 / 2 = 0.8, applied to half of the batch.
    np.testing.assert_allclose(history.history["alpha_t"], [0.4], rtol=1e-6)


def test_console_history_and_tensorboard_number_epochs_alike(tmp_path, capsys):
    images, labels = learnable_arrays(32, NUM_CLASSES)
    model = _model(32, epochs=2)
    data = indexed_dataset(images, labels, 16)
    model.fit(data, validation_data=data, epochs=2, verbose=0, callbacks=[
        HistoryCSV(str(tmp_path / "history.csv")),
        EpochTensorBoard(str(tmp_path / "tb"), write_graph=False, profile_batch=0),
        EpochSummary(),
    ])
    console = [line.split()[1] for line in capsys.readouterr().out.splitlines()
               if line.startswith("epoch ")]
    assert console == ["1/2", "2/2"]
    with open(tmp_path / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["epoch"] for row in rows] == ["1", "2"]

    scalars = tensorboard_scalars(str(tmp_path / "tb"))
    assert sorted(scalars["train/epoch_loss"]) == [1, 2]
    assert sorted(scalars["validation/epoch_loss"]) == [1, 2]
    # One learning-rate tag: the model's lr, as in history.csv.
    assert [tag for tag in scalars if "learning_rate" in tag or tag.endswith("_lr")] == [
        "train/epoch_lr"]
    for row in rows:
        step = int(row["epoch"])
        assert scalars["train/epoch_lr"][step] == pytest.approx(float(row["lr"]))
        assert scalars["train/epoch_alpha_t"][step] == pytest.approx(float(row["alpha_t"]))


def test_a_resumed_history_keeps_its_columns(tmp_path):
    """Resumed at an epoch without evaluation (Keras would then invent
    ``val_<key>`` for every key, in another order) or by a version that
    logs another key, the rows still follow the header."""
    path = str(tmp_path / "history.csv")
    first = HistoryCSV(path, append=True)
    first.on_train_begin()
    first.on_epoch_end(0, {"loss": 2.0, "lr": 0.1, "val_loss": 3.0})
    first.on_train_end()
    resumed = HistoryCSV(path, append=True)
    resumed.on_train_begin()
    resumed.on_epoch_end(1, {"loss": 1.5, "lr": 0.1, "val_ce": 9.0})
    resumed.on_epoch_end(2, {"loss": 1.0, "lr": 0.01, "val_loss": 2.5})
    resumed.on_train_end()
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["epoch", "loss", "lr", "val_loss"], ["1", "2.0", "0.1", "3.0"],
                    ["2", "1.5", "0.1", "NA"], ["3", "1.0", "0.01", "2.5"]]

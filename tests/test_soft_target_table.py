"""The PS-KD table: dense or top-k rows, completed by hand, and its memory."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from selfkd_tf.distillation.config import SelfKDConfig
from selfkd_tf.distillation.pskd import SoftTargetTable

from support import indexed_dataset, learnable_arrays, tiny_model

PREDICTION = np.array([[0.5, 0.2, 0.15, 0.1, 0.05],
                       [0.05, 0.1, 0.15, 0.2, 0.5]], np.float32)


def _table(top_k, num_examples=4):
    return SoftTargetTable(keras.layers.Layer(), num_examples, 5, top_k=top_k)


def test_a_top_k_row_keeps_its_k_probabilities_and_spreads_the_rest_evenly():
    table = _table(top_k=2)
    table.stage(tf.constant([3, 1]), tf.constant(PREDICTION))
    probs, valid = table.teacher(tf.constant([3, 1, 0]))
    np.testing.assert_array_equal(valid, [0.0, 0.0, 0.0])  # staged, not yet the teacher
    table.refresh()
    probs, valid = table.teacher(tf.constant([3, 1, 0]))
    np.testing.assert_array_equal(valid, [1.0, 1.0, 0.0])
    # By hand: 0.5 and 0.2 kept, the remaining 0.3 over the other 3 classes.
    np.testing.assert_allclose(probs[0], [0.5, 0.2, 0.1, 0.1, 0.1], atol=1e-7)
    np.testing.assert_allclose(probs[1], [0.1, 0.1, 0.1, 0.2, 0.5], atol=1e-7)
    np.testing.assert_allclose(np.sum(probs[:2], -1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(table.teacher_classes.numpy()[3], [0, 1])


def test_k_of_c_minus_one_is_the_dense_table():
    dense, top = _table(top_k=None), _table(top_k=4)
    for table in (dense, top):
        table.stage(tf.constant([0, 2]), tf.constant(PREDICTION))
        table.refresh()
    np.testing.assert_allclose(top.teacher(tf.constant([0, 2]))[0],
                               dense.teacher(tf.constant([0, 2]))[0], atol=1e-7)


@pytest.mark.parametrize("top_k", [0, 5, 2.0, True])
def test_a_top_k_that_keeps_nothing_or_everything_is_refused(top_k):
    with pytest.raises(ValueError, match=r"^table_top_k: got .* allowed: integers in \[1, 5\)"):
        _table(top_k=top_k)


def test_imagenet_fits_in_256_mb_with_the_ten_largest_probabilities():
    table = SoftTargetTable(keras.layers.Layer(), 1_281_167, 1000, top_k=10)
    total = sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize
                for v in table.variables.values())
    assert total == 2 * 1_281_167 * (10 * (4 + 4) + 4) <= 256 * 2**20
    assert all(v.value.device.endswith("CPU:0") for v in table.variables.values())


def test_a_model_trains_and_saves_with_a_top_k_table(tmp_path):
    images, labels = learnable_arrays(16, 4, size=8)
    model = tiny_model(4, 16, image_size=8, seed=0, table_top_k=2,
                       config=SelfKDConfig(methods=("pskd",)))
    model.compile(optimizer="sgd")
    model.fit(indexed_dataset(images, labels, batch_size=8), epochs=2, verbose=0)
    assert model.soft_target_table.shape == (16, 2)
    assert model.soft_target_valid.numpy().sum() == 16
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.table_top_k == 2
    np.testing.assert_array_equal(loaded.soft_target_classes.numpy(),
                                  model.soft_target_classes.numpy())

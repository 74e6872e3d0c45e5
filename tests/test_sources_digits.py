"""Tests of `digits`: scikit-learn's handwritten digits, embedded, no download."""

import numpy as np
from sklearn.datasets import load_digits

from selfkd_tf.data import load_arrays, make_datasets
from support import read_pass


def test_digits_split_is_fixed_stratified_and_complete():
    raw = load_digits()
    arrays = load_arrays("digits")

    assert arrays.x_train.shape == (1442, 8, 8, 1)
    assert arrays.x_test.shape == (355, 8, 8, 1)
    assert arrays.x_train.dtype == np.uint8 and arrays.y_train.dtype == np.int64
    assert arrays.class_names == tuple("0123456789")
    # In file order, the 5th, 10th, 15th, ... example of each class is a
    # test example, the others training examples, in file order.
    test_positions = np.sort(
        np.concatenate(
            [np.flatnonzero(raw.target == c)[4::5] for c in range(10)]
        )
    )
    train_positions = np.setdiff1d(np.arange(1797), test_positions)
    np.testing.assert_array_equal(arrays.y_test, raw.target[test_positions])
    np.testing.assert_array_equal(arrays.y_train, raw.target[train_positions])
    np.testing.assert_array_equal(
        np.bincount(arrays.y_test), np.bincount(raw.target) // 5
    )
    # 0..16 grey levels (counts of set pixels) onto 0..255.
    expected = np.round(raw.images * 255 / 16).astype(np.uint8)[..., None]
    np.testing.assert_array_equal(arrays.x_test, expected[test_positions])
    np.testing.assert_array_equal(arrays.x_train, expected[train_positions])
    assert arrays.x_train.min() == 0 and arrays.x_train.max() == 255
    assert len(np.unique(arrays.x_train)) == 17


def test_digits_pipeline_elements_and_statistics():
    train, evaluation, info = make_datasets(
        "digits", batch_size=500, augment=False
    )
    assert info.name == "digits"
    assert (info.num_train, info.num_eval, info.num_classes) == (1442, 355, 10)
    assert info.image_shape == (8, 8, 1) and info.steps_per_epoch == 3
    arrays = load_arrays("digits")
    np.testing.assert_allclose(
        info.mean, [arrays.x_train.mean() / 255], rtol=1e-9
    )
    indices, images = read_pass(train, info)
    np.testing.assert_array_equal(np.sort(indices), np.arange(1442))
    np.testing.assert_array_equal(
        images, arrays.x_train[indices].astype(np.int64)
    )
    eval_indices, eval_images = read_pass(evaluation, info)
    np.testing.assert_array_equal(eval_indices, np.arange(355))
    np.testing.assert_array_equal(eval_images, arrays.x_test.astype(np.int64))

"""Tests of `npz:PATH`: arrays in one .npz file."""

import os

import numpy as np
import pytest

from selfkd_tf.data import load_arrays, make_datasets
from support import RunsCommand, assert_one_line_data_error, write_npz_arrays


def test_npz_grayscale_floats_and_column_labels(tmp_path):
    x = np.linspace(0, 1, 5 * 5 * 6).reshape(5, 5, 6)
    dataset = write_npz_arrays(
        tmp_path,
        x_train=x,
        y_train=np.array([[0], [1], [4], [1], [3]]),
        x_test=x[:1],
        y_test=[2],
        class_names=np.array(["a", "b", "c", "d", "e"]),
    )
    arrays = load_arrays(dataset)
    assert arrays.x_train.shape == (5, 5, 6, 1)
    assert arrays.x_train.dtype == np.uint8
    np.testing.assert_array_equal(arrays.x_train[..., 0], np.round(x * 255))
    np.testing.assert_array_equal(arrays.y_train, [0, 1, 4, 1, 3])
    assert arrays.class_names == ("a", "b", "c", "d", "e")
    _, _, info = make_datasets(dataset)
    assert info.image_shape == (5, 6, 1) and len(info.mean) == 1


def test_class_names_default_to_label_numbers(tmp_path):
    x = np.zeros((4, 2, 2), np.uint8)
    arrays = load_arrays(
        write_npz_arrays(tmp_path, x_train=x, y_train=[0, 2, 1, 2], x_test=x, y_test=[0] * 4)
    )
    assert arrays.class_names == ("0", "1", "2")


def test_an_object_array_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "MARKER"
    x = np.zeros((4, 2, 2, 3), np.uint8)
    labels = np.empty(4, object)
    labels[:] = [RunsCommand(f"touch {marker}"), 1, 0, 1]
    path = tmp_path / "hostile.npz"
    np.savez(path, x_train=x, y_train=labels, x_test=x, y_test=[0, 1, 0, 1])
    assert_one_line_data_error(
        f"npz:{path}",
        {},
        rf"^cannot read npz file {path}: Object arrays cannot be loaded "
        r"when allow_pickle=False$",
    )
    assert not marker.exists()


X = np.zeros((4, 2, 2, 3), np.uint8)
Y = np.array([0, 1, 0, 1])


def _npz_case(arrays, pattern):
    def build(tmp_path):
        return write_npz_arrays(tmp_path, **arrays), {}, pattern

    return build


def _not_an_npz(tmp_path):
    (tmp_path / "x.npz").write_text("plain text")
    return f"npz:{tmp_path}/x.npz", {}, r"cannot read npz file .*x\.npz"


def _single_array(tmp_path):
    np.save(tmp_path / "x.npy", X)
    os.rename(tmp_path / "x.npy", tmp_path / "x.npz")
    return f"npz:{tmp_path}/x.npz", {}, r"x\.npz holds a single array"


ERROR_CASES = {
    "missing keys": _npz_case(
        {"x_train": X, "y_train": Y}, r"lacks arrays x_test, y_test"
    ),
    "length mismatch": _npz_case(
        {"x_train": X, "y_train": Y[:3], "x_test": X, "y_test": Y},
        r"x_train has 4 examples but y_train has 3 labels",
    ),
    "label too large": _npz_case(
        {
            "x_train": X,
            "y_train": Y,
            "x_test": X,
            "y_test": [0, 2, 0, 1],
            "class_names": ["a", "b"],
        },
        r"y_test has label 2 at position 1; labels must be in \[0, 2\)",
    ),
    "negative label": _npz_case(
        {"x_train": X, "y_train": [0, -1, 0, 1], "x_test": X, "y_test": Y},
        r"y_train has label -1 at position 1",
    ),
    "float labels": _npz_case(
        {"x_train": X, "y_train": Y * 1.0, "x_test": X, "y_test": Y},
        r"y_train must be integer class ids of shape \[N\]; got float64 \(4,\)",
    ),
    "float range": _npz_case(
        {"x_train": X * 1.0 + 255, "y_train": Y, "x_test": X, "y_test": Y},
        r"x_train \(float64\) has values in \[255.0, 255.0\]; "
        r".*floating images in \[0, 1\]",
    ),
    "image shape mismatch": _npz_case(
        {"x_train": X, "y_train": Y, "x_test": X[:, :1], "y_test": Y},
        r"train images have shape \(2, 2, 3\) "
        r"but test images have shape \(1, 2, 3\)",
    ),
    "empty test split": _npz_case(
        {"x_train": X, "y_train": Y, "x_test": X[:0], "y_test": Y[:0]},
        r"the test split has no examples$",
    ),
    "single class": _npz_case(
        {"x_train": X, "y_train": Y * 0, "x_test": X, "y_test": Y * 0},
        r"has a single class \('0'\); classification needs at least 2$",
    ),
    "fewer training examples than classes": _npz_case(
        {"x_train": X[:2], "y_train": [0, 1], "x_test": X, "y_test": [0, 1, 2, 3]},
        r": 2 training examples for 4 classes; every class needs at least one$",
    ),
    "not an archive": _not_an_npz,
    "a single array": _single_array,
}


@pytest.mark.parametrize("build", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_bad_npz_data_raises_a_one_line_data_error(tmp_path, build):
    assert_one_line_data_error(*build(tmp_path))

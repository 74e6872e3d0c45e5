"""Tests of selfkd_tf.data: indices, determinism, augmentation, splits.

The sources have their own test files (`test_sources_*.py`).
"""

import re
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from selfkd_tf.data import DatasetInfo, load_arrays, make_datasets
from support import (
    assert_one_line_data_error,
    positions,
    read_epochs,
    read_pass,
    small_npz,
    write_image_folder,
    write_npz_arrays,
)


@pytest.fixture
def npz_data(tmp_path):
    return small_npz(tmp_path)


# --- Element structure and index stability ------------------------------------


def test_elements_have_the_documented_structure(npz_data):
    dataset, arrays = npz_data
    train, evaluation, info = make_datasets(dataset, batch_size=16)

    assert isinstance(info, DatasetInfo)
    assert info.name == dataset
    assert (info.num_classes, info.num_train, info.num_eval) == (3, 60, 12)
    assert info.eval_split == "test" and info.image_shape == (8, 8, 3)
    assert info.steps_per_epoch == 4
    assert info.class_names == ("ant", "bee", "cow")
    for ds in (train, evaluation):
        features, label = ds.element_spec
        assert set(features) == {"image", "index"}
        assert features["image"].shape.as_list() == [None, 8, 8, 3]
        assert features["image"].dtype == tf.float32
        assert features["index"].dtype == tf.int32 and label.dtype == tf.int32

    batch_sizes = [len(y) for _, y in train]
    assert batch_sizes == [16, 16, 16, 12]  # no remainder dropped
    assert train.cardinality() == info.steps_per_epoch

    # Evaluation: in order, unaugmented.
    indices, images = read_pass(evaluation, info)
    np.testing.assert_array_equal(indices, np.arange(12))
    np.testing.assert_array_equal(images, arrays["x_test"])
    labels = np.concatenate([y.numpy() for _, y in evaluation])
    np.testing.assert_array_equal(labels, arrays["y_test"])


def test_train_index_follows_its_example_across_shuffled_epochs(npz_data):
    dataset, arrays = npz_data
    train, _, info = make_datasets(
        dataset, batch_size=16, augment=False, epochs=3
    )
    assert train.cardinality() == 3 * info.steps_per_epoch

    orders = []
    for indices, images, labels in read_epochs(train, info, 3):
        np.testing.assert_array_equal(np.sort(indices), np.arange(60))
        np.testing.assert_array_equal(images, arrays["x_train"][indices])
        np.testing.assert_array_equal(labels, arrays["y_train"][indices])
        orders.append(indices)
    assert not np.array_equal(orders[0], np.arange(60))
    assert not np.array_equal(orders[0], orders[1])
    assert not np.array_equal(orders[1], orders[2])


def test_epoch_data_is_a_function_of_seed_and_epoch_only(npz_data):
    dataset, _ = npz_data
    full, _, info = make_datasets(dataset, batch_size=16, epochs=4)
    again, _, _ = make_datasets(dataset, batch_size=16, epochs=4)
    resumed, _, _ = make_datasets(
        dataset, batch_size=16, epochs=4, initial_epoch=2
    )
    other_seed, _, _ = make_datasets(dataset, batch_size=16, epochs=4, seed=1)
    assert resumed.cardinality() == 2 * info.steps_per_epoch

    full_epochs = read_epochs(full, info, 4)
    for mine, theirs in zip(read_epochs(again, info, 4), full_epochs):
        for a, b in zip(mine, theirs):
            np.testing.assert_array_equal(a, b)
    for mine, theirs in zip(read_epochs(resumed, info, 2), full_epochs[2:]):
        for a, b in zip(mine, theirs):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(
        read_epochs(other_seed, info, 1)[0][0], full_epochs[0][0]
    )


def test_each_full_iteration_without_epochs_advances_one_epoch(npz_data):
    dataset, _ = npz_data
    # Two batches per epoch: a read-ahead of one batch reaches the epoch's end.
    reference, _, info = make_datasets(dataset, batch_size=32, epochs=4)
    expected = [
        (indices, images)
        for indices, images, _ in read_epochs(reference, info, 4)
    ]
    train, _, _ = make_datasets(dataset, batch_size=32)
    resumed, _, _ = make_datasets(dataset, batch_size=32, initial_epoch=2)

    def check(ds, epoch):
        indices, images = read_pass(ds, info)
        np.testing.assert_array_equal(indices, expected[epoch][0])
        np.testing.assert_array_equal(images, expected[epoch][1])

    check(train, 0)
    # A one-batch look, as Keras takes to build a model, does not count.
    abandoned = iter(train)
    next(abandoned)
    time.sleep(0.5)  # Time for any read-ahead to reach the end of the epoch.
    del abandoned
    check(train, 1)
    check(train, 2)
    check(resumed, 2)
    check(resumed, 3)


class IndexRecorder(keras.Model):
    """Model whose training step only records the sample indices it receives."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(3)
        self.flatten = keras.layers.Flatten()
        self.seen = []

    def call(self, x):
        return self.dense(self.flatten(x["image"]))

    def train_step(self, data):
        x, _ = data
        self.seen.append(x["index"].numpy())
        return {"steps": tf.constant(1.0)}


@pytest.mark.parametrize("epochs", [None, 3], ids=["epochs=None", "epochs=3"])
def test_keras_fit_trains_on_consecutive_epochs(npz_data, epochs):
    dataset, _ = npz_data
    reference, _, info = make_datasets(dataset, batch_size=16, epochs=3)
    expected = [indices for indices, _, _ in read_epochs(reference, info, 3)]
    train, _, _ = make_datasets(dataset, batch_size=16, epochs=epochs)

    model = IndexRecorder()
    model.compile(run_eagerly=True)
    steps = None if epochs is None else info.steps_per_epoch
    model.fit(train, epochs=3, steps_per_epoch=steps, shuffle=False, verbose=0)

    assert len(model.seen) == 3 * info.steps_per_epoch
    for epoch in range(3):
        seen = model.seen[
            epoch * info.steps_per_epoch : (epoch + 1) * info.steps_per_epoch
        ]
        np.testing.assert_array_equal(np.concatenate(seen), expected[epoch])


# --- Augmentation and normalization -------------------------------------------


def test_augmentation_crops_the_zero_padded_raw_image_and_flips(tmp_path):
    # Pixel values are distinct and non-zero: content identifies the crop.
    image = (
        1 + np.arange(8 * 8 * 3).reshape(3, 8, 8).transpose(1, 2, 0)
    ).astype(np.uint8)
    x = np.repeat(image[None], 40, axis=0)
    y = np.arange(40) % 2
    dataset = write_npz_arrays(
        tmp_path, x_train=x, y_train=y, x_test=x[:2], y_test=y[:2]
    )
    train, _, info = make_datasets(dataset, batch_size=40, epochs=3)
    padded = np.pad(image, [(4, 4), (4, 4), (0, 0)]).astype(np.int64)
    candidates = {
        (dy, dx, flip): crop[:, ::-1] if flip else crop
        for dy in range(9)
        for dx in range(9)
        for flip in (False, True)
        for crop in [padded[dy : dy + 8, dx : dx + 8]]
    }

    found = []
    for _, images, _ in read_epochs(train, info, 3):
        for augmented in images:
            matches = [
                key
                for key, crop in candidates.items()
                if np.array_equal(crop, augmented)
            ]
            # Exactly one crop of the zero-padded image, mirrored or not.
            assert len(matches) == 1
            found.append(matches[0])
    assert {flip for _, _, flip in found} == {False, True}
    assert len({(dy, dx) for dy, dx, _ in found}) > 20


def test_unaugmented_training_images_are_exact(npz_data):
    dataset, arrays = npz_data
    train, _, info = make_datasets(dataset, batch_size=64, augment=False)
    indices, images = read_pass(train, info)
    np.testing.assert_array_equal(images, arrays["x_train"][indices])


def test_dataset_normalization_uses_training_split_statistics(npz_data):
    dataset, arrays = npz_data
    x = arrays["x_train"].astype(np.float64) / 255
    _, evaluation, info = make_datasets(dataset, batch_size=64)
    np.testing.assert_allclose(info.mean, x.mean(axis=(0, 1, 2)), rtol=1e-9)
    np.testing.assert_allclose(info.std, x.std(axis=(0, 1, 2)), rtol=1e-9)
    expected = (arrays["x_test"] / 255 - x.mean(axis=(0, 1, 2))) / x.std(
        axis=(0, 1, 2)
    )
    images = np.concatenate([f["image"].numpy() for f, _ in evaluation])
    np.testing.assert_allclose(images, expected, atol=1e-5)


def test_imagenet_normalization(npz_data):
    dataset, arrays = npz_data
    _, evaluation, info = make_datasets(dataset, normalization="imagenet")
    assert info.mean == (0.485, 0.456, 0.406)
    assert info.std == (0.229, 0.224, 0.225)
    images = np.concatenate([f["image"].numpy() for f, _ in evaluation])
    expected = (arrays["x_test"] / 255 - np.array(info.mean)) / np.array(
        info.std
    )
    np.testing.assert_allclose(images, expected, atol=1e-5)


# --- Validation split and caps ------------------------------------------------


def test_validation_split_is_stratified_disjoint_and_seeded(npz_data):
    dataset, arrays = npz_data
    train, evaluation, info = make_datasets(
        dataset, validation_fraction=0.2, augment=False, batch_size=64
    )
    assert (info.eval_split, info.num_train, info.num_eval) == (
        "validation",
        48,
        12,
    )

    train_indices, train_images = read_pass(train, info)
    train_positions = positions(train_images[np.argsort(train_indices)])
    eval_positions = positions(read_pass(evaluation, info)[1])
    assert not set(train_positions) & set(eval_positions)
    assert sorted([*train_positions, *eval_positions]) == list(range(60))
    # Kept examples stay in their original order, which defines their index.
    assert list(train_positions) == sorted(train_positions)
    assert list(eval_positions) == sorted(eval_positions)
    held_out = np.bincount(arrays["y_train"][eval_positions], minlength=3)
    np.testing.assert_array_equal(held_out, [6, 4, 2])  # 20% of 30/20/10
    # Statistics come from the examples left for training.
    x = arrays["x_train"][train_positions] / 255
    np.testing.assert_allclose(info.mean, x.mean(axis=(0, 1, 2)), rtol=1e-9)

    def held_out_positions(seed):
        _, ev, _ = make_datasets(
            dataset, validation_fraction=0.2, seed=seed, batch_size=64
        )
        return positions(read_pass(ev, info)[1])

    np.testing.assert_array_equal(held_out_positions(0), eval_positions)
    assert not np.array_equal(held_out_positions(1), eval_positions)


def test_caps_take_stratified_deterministic_subsets(npz_data):
    dataset, arrays = npz_data

    def build(seed):
        train, evaluation, info = make_datasets(
            dataset,
            train_examples=30,
            eval_examples=6,
            seed=seed,
            augment=False,
            batch_size=64,
        )
        indices, images = read_pass(train, info)
        return (
            info,
            positions(images[np.argsort(indices)]),
            read_pass(evaluation, info)[1],
        )

    info, kept, eval_images = build(0)
    assert (info.num_train, info.num_eval, info.steps_per_epoch) == (30, 6, 1)
    np.testing.assert_array_equal(
        np.bincount(arrays["y_train"][kept]), [15, 10, 5]
    )
    assert len(eval_images) == 6
    np.testing.assert_array_equal(build(0)[1], kept)
    assert not np.array_equal(build(1)[1], kept)


def test_image_size_resizes_every_source(tmp_path):
    root, _ = write_image_folder(tmp_path / "images")
    for size, shape in (((6, 5), (6, 5)), (16, (16, 16))):
        for dataset in (f"folder:{root}", small_npz(tmp_path)[0], "digits"):
            arrays = load_arrays(dataset, image_size=size)
            assert arrays.x_train.shape[1:3] == shape
            assert arrays.x_test.shape[1:3] == shape
        _, _, info = make_datasets(f"folder:{root}", image_size=size)
        assert info.image_shape == (*shape, 3)


# --- Errors -------------------------------------------------------------------

X = np.zeros((4, 2, 2, 3), np.uint8)
Y = np.array([0, 1, 0, 1])


def _argument_case(pattern, **kwargs):
    def build(tmp_path):
        return (
            write_npz_arrays(tmp_path, x_train=X, y_train=Y, x_test=X, y_test=Y),
            kwargs,
            pattern,
        )

    return build


ERROR_CASES = {
    "unknown dataset": lambda p: (
        "imagenet",
        {},
        r"^unknown dataset 'imagenet'; expected one of 'cifar10', 'cifar100', "
        r"'digits', 'imagenet2012', 'cifar:PATH', 'folder:PATH', 'npz:PATH'$",
    ),
    "path given to a source without one": lambda p: (
        "digits:/tmp",
        {},
        r"^dataset 'digits:/tmp' takes no path; expected digits$",
    ),
    "path missing for a source with one": lambda p: (
        "npz",
        {},
        r"^dataset 'npz' needs a path; expected npz:PATH$",
    ),
    "empty path": lambda p: ("npz:", {}, r"dataset 'npz:' has an empty path"),
    "missing path": lambda p: (
        f"folder:{p}/nope",
        {},
        rf"folder path does not exist: {re.escape(str(p))}/nope",
    ),
    "validation_fraction 1": _argument_case(
        r"validation_fraction must be .*\[0, 1\); got 1\.0",
        validation_fraction=1.0,
    ),
    "validation_fraction negative": _argument_case(
        r"validation_fraction must", validation_fraction=-0.1
    ),
    "validation_fraction string": _argument_case(
        r"validation_fraction must", validation_fraction="0.1"
    ),
    "validation_fraction too small": _argument_case(
        r"validation_fraction=0\.1 of 4 training examples "
        r"leaves 0 for validation",
        validation_fraction=0.1,
    ),
    "normalization": _argument_case(
        r"normalization must be one of 'dataset', 'imagenet'; got 'minmax'",
        normalization="minmax",
    ),
    "batch_size": _argument_case(
        r"batch_size must be an integer >= 1; got 0", batch_size=0
    ),
    "epochs": _argument_case(
        r"epochs must be an integer >= 3; got 2", epochs=2, initial_epoch=2
    ),
    "train_examples": _argument_case(
        r"train_examples must be an integer >= 1; got 0", train_examples=0
    ),
    "seed": _argument_case(r"seed must be an integer >= 0; got -1", seed=-1),
    "image_size": _argument_case(
        r"image_size must be a positive int or \(height, width\)",
        image_size=(0, 4),
    ),
    "train_examples below the class count": _argument_case(
        r"^the training split holds 1 examples for 2 classes "
        r"\(train_examples=1, validation_fraction=0\.0\); "
        r"every class needs at least one$",
        train_examples=1,
    ),
}


@pytest.mark.parametrize("build", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_bad_input_raises_a_one_line_data_error(tmp_path, build):
    assert_one_line_data_error(*build(tmp_path))

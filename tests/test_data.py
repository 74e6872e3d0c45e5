"""Tests of selfkd_tf.data: sources, indices, determinism, augmentation."""

import os
import pickle
import re
import shutil
import struct
import tarfile
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from selfkd_tf.data import DataError, DatasetInfo, load_arrays, make_datasets

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
REAL_CIFAR_ARCHIVE = "/work/shared/data/cifar10-jpeg.tar.gz"
REAL_CIFAR_FOLDER = "/tmp/cifar/cifar10-jpeg"


# --- Builders of small datasets in every supported format ---------------------


def unique_images(count, height=8, width=8, channels=3, seed=0):
    """uint8 images whose first two pixel values spell their position."""
    images = np.random.default_rng(seed).integers(
        0, 256, (count, height, width, channels), dtype=np.uint8
    )
    images.reshape(count, -1)[:, 0] = np.arange(count) // 256
    images.reshape(count, -1)[:, 1] = np.arange(count) % 256
    return images


def positions(images):
    """Inverse of `unique_images`: the position spelled by each image."""
    flat = np.asarray(images).reshape(len(images), -1).astype(np.int64)
    return flat[:, 0] * 256 + flat[:, 1]


def write_npz(directory, **arrays):
    path = os.path.join(directory, "data.npz")
    np.savez(path, **arrays)
    return f"npz:{path}"


@pytest.fixture
def npz_data(tmp_path):
    """60 training examples in 3 classes of 30/20/10, 12 test examples."""
    y_train = np.repeat([0, 1, 2], [30, 20, 10])
    np.random.default_rng(1).shuffle(y_train)
    arrays = {
        "x_train": unique_images(60),
        "y_train": y_train,
        "x_test": unique_images(12, seed=1),
        "y_test": np.arange(12) % 3,
        "class_names": np.array(["ant", "bee", "cow"]),
    }
    return write_npz(tmp_path, **arrays), arrays


def raw_pixels(images, info):
    """Undoes the normalization of `images`, back to [0, 255] pixel values."""
    mean = np.asarray(info.mean) * 255
    std = np.asarray(info.std) * 255
    return np.round(np.asarray(images) * std + mean).astype(np.int64)


def read_epochs(train, info, count):
    """Indices, raw images and labels of `count` epochs of an `epochs=N` set."""
    epochs = []
    batches = iter(train)
    for _ in range(count):
        parts = [next(batches) for _ in range(info.steps_per_epoch)]
        epochs.append(
            (
                np.concatenate([x["index"].numpy() for x, _ in parts]),
                np.concatenate(
                    [raw_pixels(x["image"], info) for x, _ in parts]
                ),
                np.concatenate([y.numpy() for _, y in parts]),
            )
        )
    return epochs


def read_pass(dataset, info):
    """Indices and raw images of one full iteration over `dataset`."""
    parts = list(dataset)
    return (
        np.concatenate([x["index"].numpy() for x, _ in parts]),
        np.concatenate([raw_pixels(x["image"], info) for x, _ in parts]),
    )


def write_cifar_release(root, variant):
    """Writes a tiny CIFAR python release; returns its folder and contents."""
    rng = np.random.default_rng(2)
    if variant == "cifar10":
        folder, meta_file = "cifar-10-batches-py", "batches.meta"
        test_file = "test_batch"
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        names_key, label_key = b"label_names", b"labels"
        class_names = [f"class{i}" for i in range(10)]
    else:
        folder, meta_file, test_file = "cifar-100-python", "meta", "test"
        train_files = ["train"]
        names_key, label_key = b"fine_label_names", b"fine_labels"
        class_names = [f"fine{i:02d}" for i in range(100)]
    release = os.path.join(root, folder)
    os.makedirs(release)
    expected = {}
    for split, files in (("train", train_files), ("test", [test_file])):
        rows, labels = [], []
        for name in files:
            data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
            label = rng.integers(0, len(class_names), 2).tolist()
            content = {b"data": data, label_key: label, b"batch_label": b"x"}
            if variant == "cifar100":
                content[b"coarse_labels"] = [0, 0]
            with open(os.path.join(release, name), "wb") as f:
                pickle.dump(content, f)
            rows.append(data)
            labels.extend(label)
        rows = np.concatenate(rows)
        expected[split] = (
            rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1),
            np.array(labels),
        )
    with open(os.path.join(release, meta_file), "wb") as f:
        pickle.dump({names_key: [n.encode() for n in class_names]}, f)
    return release, expected, tuple(class_names)


def write_bmp(path, image):
    """Writes uint8 RGB `[H, W, 3]` as an uncompressed 24-bit BMP."""
    height, width, _ = image.shape
    padding = b"\0" * (-3 * width % 4)
    # Rows are stored bottom-up, pixels as BGR.
    pixels = b"".join(
        image[row, :, ::-1].tobytes() + padding
        for row in range(height - 1, -1, -1)
    )
    header = struct.pack("<2sIHHI", b"BM", 54 + len(pixels), 0, 0, 54)
    # BITMAPINFOHEADER: size, width, height, planes, bits per pixel,
    # compression, image size, resolution x/y, palette colors, important.
    fields = (40, width, height, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    dib = struct.pack("<IiiHHIIiiII", *fields)
    with open(path, "wb") as f:
        f.write(header + dib + pixels)


def write_image(path, image):
    """Writes uint8 `[H, W, C]` as JPEG, PNG or BMP, chosen by the extension."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if path.endswith(".bmp"):
        write_bmp(path, image)
        return
    encode = (
        tf.io.encode_png
        if path.endswith(".png")
        else lambda x: tf.io.encode_jpeg(x, quality=100)
    )
    tf.io.write_file(path, encode(image))


def solid(height, width, color):
    return np.broadcast_to(
        np.asarray(color, np.uint8), (height, width, len(color))
    ).copy()


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
    dataset = write_npz(
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


# --- Sources ------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
@pytest.mark.parametrize("form", ["folder", "parent", "tar.gz"])
def test_cifar_python_pickles(tmp_path, variant, form):
    release, expected, class_names = write_cifar_release(
        str(tmp_path / "src"), variant
    )
    path = {"folder": release, "parent": os.path.dirname(release)}.get(form)
    if form == "tar.gz":
        path = str(tmp_path / f"{os.path.basename(release)}.tar.gz")
        with tarfile.open(path, "w:gz") as archive:
            archive.add(release, arcname=os.path.basename(release))
        shutil.rmtree(release)

    arrays = load_arrays(f"cifar:{path}")
    np.testing.assert_array_equal(arrays.x_train, expected["train"][0])
    np.testing.assert_array_equal(arrays.y_train, expected["train"][1])
    np.testing.assert_array_equal(arrays.x_test, expected["test"][0])
    np.testing.assert_array_equal(arrays.y_test, expected["test"][1])
    assert arrays.class_names == class_names and arrays.num_classes == len(
        class_names
    )
    assert arrays.x_train.dtype == np.uint8 and arrays.y_train.dtype == np.int64

    _, _, info = make_datasets(f"cifar:{path}")
    assert info.mean == (
        CIFAR10_MEAN if variant == "cifar10" else CIFAR100_MEAN
    )
    assert info.name == f"cifar:{path}"


def test_cifar_rows_are_channel_planes(tmp_path):
    release, _, _ = write_cifar_release(str(tmp_path), "cifar100")
    planes = np.concatenate(
        [np.full(1024, value, np.uint8) for value in (10, 20, 30)]
    )
    with open(os.path.join(release, "train"), "wb") as f:
        pickle.dump({b"data": planes[None], b"fine_labels": [7]}, f)
    arrays = load_arrays(f"cifar:{release}")
    np.testing.assert_array_equal(arrays.x_train[0, 5, 9], [10, 20, 30])


@pytest.fixture
def image_folder(tmp_path):
    """JPEG, PNG and BMP files: RGB, gray, RGBA, mixed sizes, a stray file."""
    root = tmp_path / "images"
    rgba = np.dstack(
        [solid(12, 10, (200, 40, 90)), np.full((12, 10, 1), 77, np.uint8)]
    )
    gray = np.arange(120, dtype=np.uint8).reshape(12, 10, 1)
    bmp = np.random.default_rng(3).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    files = {
        # The first image sets the size; the second is resized to it.
        "train/cat/a.jpg": solid(12, 10, (250, 128, 0)),
        "train/cat/b.jpg": solid(24, 20, (0, 128, 250)),
        "train/dog/a.png": rgba,
        "train/dog/b.png": gray,
        "train/emu/a.bmp": bmp,
        "test/cat/a.png": solid(12, 10, (1, 2, 3)),
        "test/dog/a.jpg": solid(12, 10, (9, 9, 9)),
        "test/emu/a.png": solid(12, 10, (4, 5, 6)),
    }
    for name, image in files.items():
        write_image(str(root / name), image)
    (root / "train" / "emu" / "notes.txt").write_text("not an image")
    return str(root), files


def test_folder_of_images(image_folder):
    root, files = image_folder
    arrays = load_arrays(f"folder:{root}")

    assert arrays.class_names == ("cat", "dog", "emu")
    assert arrays.num_classes == 3
    assert arrays.x_train.shape == (5, 12, 10, 3)
    assert arrays.x_train.dtype == np.uint8
    np.testing.assert_array_equal(arrays.y_train, [0, 0, 1, 1, 2])
    np.testing.assert_array_equal(arrays.y_test, [0, 1, 2])
    np.testing.assert_allclose(
        arrays.x_train[0], files["train/cat/a.jpg"], atol=3
    )
    np.testing.assert_allclose(
        arrays.x_train[1], solid(12, 10, (0, 128, 250)), atol=3
    )
    np.testing.assert_array_equal(
        arrays.x_train[2], files["train/dog/a.png"][..., :3]
    )
    np.testing.assert_array_equal(
        arrays.x_train[3], np.repeat(files["train/dog/b.png"], 3, axis=-1)
    )
    np.testing.assert_array_equal(arrays.x_train[4], files["train/emu/a.bmp"])
    np.testing.assert_array_equal(arrays.x_test[0], files["test/cat/a.png"])

    _, _, info = make_datasets(f"folder:{root}")
    assert info.name == f"folder:{root}" and info.image_shape == (12, 10, 3)
    np.testing.assert_allclose(
        info.mean, arrays.x_train.mean(axis=(0, 1, 2)) / 255, rtol=1e-9
    )


def test_folder_gif(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    for split in ("train", "test"):
        os.makedirs(tmp_path / split / "only")
        image_module.new("RGB", (7, 5), (255, 0, 0)).save(
            tmp_path / split / "only" / "a.gif"
        )
    arrays = load_arrays(f"folder:{tmp_path}")
    assert arrays.x_train.shape == (1, 5, 7, 3)
    np.testing.assert_allclose(
        arrays.x_train[0], solid(5, 7, (255, 0, 0)), atol=2
    )


@pytest.mark.parametrize("size, shape", [((6, 5), (6, 5)), (16, (16, 16))])
def test_image_size_resizes_every_source(image_folder, npz_data, size, shape):
    root, _ = image_folder
    for dataset in (f"folder:{root}", npz_data[0]):
        arrays = load_arrays(dataset, image_size=size)
        assert arrays.x_train.shape[1:3] == shape
        assert arrays.x_test.shape[1:3] == shape
    _, _, info = make_datasets(f"folder:{root}", image_size=size)
    assert info.image_shape == (*shape, 3)


def test_npz_grayscale_floats_and_column_labels(tmp_path):
    x = np.linspace(0, 1, 4 * 5 * 6).reshape(4, 5, 6)
    dataset = write_npz(
        tmp_path,
        x_train=x,
        y_train=np.array([[0], [1], [4], [1]]),
        x_test=x[:1],
        y_test=[2],
    )
    arrays = load_arrays(dataset)
    assert arrays.x_train.shape == (4, 5, 6, 1)
    assert arrays.x_train.dtype == np.uint8
    np.testing.assert_array_equal(arrays.x_train[..., 0], np.round(x * 255))
    np.testing.assert_array_equal(arrays.y_train, [0, 1, 4, 1])
    assert arrays.class_names == ("0", "1", "2", "3", "4")
    _, _, info = make_datasets(dataset)
    assert info.image_shape == (5, 6, 1) and len(info.mean) == 1


def test_tfds_cifar10_with_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        arrays = load_arrays("cifar10", data_dir=str(tmp_path))
        train, _, info = make_datasets(
            "cifar10", data_dir=str(tmp_path), batch_size=5
        )
    assert arrays.x_train.shape == (12, 32, 32, 3)
    assert arrays.x_test.shape == (12, 32, 32, 3)
    assert arrays.x_train.dtype == np.uint8 and arrays.y_train.dtype == np.int64
    assert arrays.num_classes == 10 and arrays.y_train.max() < 10
    assert info.name == "cifar10" and info.mean == CIFAR10_MEAN
    assert info.steps_per_epoch == 3
    indices, _ = read_pass(train, info)
    np.testing.assert_array_equal(np.sort(indices), np.arange(12))


def copy_real_cifar_subset(destination, classes, train_count=3, test_count=2):
    """Copies a few real CIFAR-10 JPEGs to `destination`; False if absent."""
    wanted = {
        f"{split}/{name}/{i:04d}.jpg"
        for name in classes
        for split, count in (("train", train_count), ("test", test_count))
        for i in range(count)
    }
    if os.path.exists(REAL_CIFAR_ARCHIVE):
        with tarfile.open(REAL_CIFAR_ARCHIVE) as archive:
            for member in archive:
                relative = member.name.partition("/")[2]
                if relative in wanted:
                    (destination / relative).parent.mkdir(
                        parents=True, exist_ok=True
                    )
                    (destination / relative).write_bytes(
                        archive.extractfile(member).read()
                    )
                    wanted.discard(relative)
                    if not wanted:
                        return True
        raise AssertionError(f"{REAL_CIFAR_ARCHIVE} lacks {sorted(wanted)}")
    if os.path.isdir(REAL_CIFAR_FOLDER):
        for relative in wanted:
            (destination / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(
                os.path.join(REAL_CIFAR_FOLDER, relative),
                destination / relative,
            )
        return True
    return False


def test_real_cifar10_jpegs(tmp_path):
    classes = ("airplane", "automobile", "bird")
    if not copy_real_cifar_subset(tmp_path, classes):
        pytest.skip("real CIFAR-10 JPEGs are not available")
    arrays = load_arrays(f"folder:{tmp_path}")
    assert arrays.class_names == classes
    assert arrays.x_train.shape == (9, 32, 32, 3)
    assert arrays.x_test.shape == (6, 32, 32, 3)
    np.testing.assert_array_equal(arrays.y_train, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    first = tf.io.decode_jpeg(
        tf.io.read_file(str(tmp_path / "train/airplane/0000.jpg"))
    ).numpy()
    np.testing.assert_array_equal(arrays.x_train[0], first)

    train, _, info = make_datasets(f"folder:{tmp_path}", batch_size=4)
    assert info.steps_per_epoch == 3 and all(0.2 < m < 0.8 for m in info.mean)
    indices, images = read_pass(train, info)
    np.testing.assert_array_equal(np.sort(indices), np.arange(9))
    assert images.min() >= 0 and images.max() <= 255


# --- Errors -------------------------------------------------------------------


def _folder(tmp_path, layout):
    for name in layout:
        path = str(tmp_path / "root" / name)
        if name.endswith("/"):
            os.makedirs(path, exist_ok=True)
        else:
            write_image(path, solid(4, 4, (1, 2, 3)))
    return f"folder:{tmp_path / 'root'}", str(tmp_path / "root")


def _corrupt_image(tmp_path):
    dataset, root = _folder(tmp_path, ["train/a/x.png", "test/a/x.png"])
    # Sorted after x.png, the first image, which sets the size.
    for name in ("y_bad.jpg", "z_worse.png"):
        with open(os.path.join(root, "train", "a", name), "wb") as f:
            f.write(b"\xff\xd8 not really an image")
    return (
        dataset,
        {},
        (
            rf"^cannot read or decode image file {re.escape(root)}/train/a/"
            r"y_bad\.jpg \(and 1 more\): "
            r"Unknown image file format\. One of JPEG, .* required\.$"
        ),
    )


def _class_mismatch(tmp_path):
    dataset, root = _folder(
        tmp_path,
        ["train/a/x.png", "train/c/x.png", "test/a/x.png", "test/b/x.png"],
    )
    return (
        dataset,
        {},
        r"class folders differ .*only in train: \['c'\], only in test: \['b'\]",
    )


def _empty_class(tmp_path):
    dataset, root = _folder(
        tmp_path, ["train/a/x.png", "train/b/", "test/a/x.png", "test/b/x.png"]
    )
    return (
        dataset,
        {},
        rf"class folder {re.escape(root)}/train/b has no image files",
    )


def _missing_test_folder(tmp_path):
    dataset, root = _folder(tmp_path, ["train/a/x.png"])
    return dataset, {}, rf"missing folder {re.escape(root)}/test"


def _npz_case(arrays, pattern):
    def build(tmp_path):
        return write_npz(tmp_path, **arrays), {}, pattern

    return build


X = np.zeros((4, 2, 2, 3), np.uint8)
Y = np.array([0, 1, 0, 1])


def _cifar_case(edit, pattern):
    def build(tmp_path):
        release, _, _ = write_cifar_release(str(tmp_path), "cifar10")
        edit(release)
        return (
            f"cifar:{release}",
            {},
            pattern.format(release=re.escape(release)),
        )

    return build


def _write(name, content):
    def edit(release):
        with open(os.path.join(release, name), "wb") as f:
            f.write(content)

    return edit


def _corrupt_archive(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(b"\x1f\x8b\x08 truncated")
    return (
        f"cifar:{path}",
        {},
        r"cannot read .*cifar-10-python\.tar\.gz as a CIFAR tar archive",
    )


def _not_an_npz(tmp_path):
    (tmp_path / "x.npz").write_text("plain text")
    return f"npz:{tmp_path}/x.npz", {}, r"cannot read npz file .*x\.npz"


def _argument_case(pattern, **kwargs):
    def build(tmp_path):
        return (
            write_npz(tmp_path, x_train=X, y_train=Y, x_test=X, y_test=Y),
            kwargs,
            pattern,
        )

    return build


ERROR_CASES = {
    "unknown dataset": lambda p: (
        "imagenet",
        {},
        r"^unknown dataset 'imagenet'; expected one of 'cifar10', 'cifar100', "
        r"'cifar:PATH', 'folder:PATH', 'npz:PATH'$",
    ),
    "empty path": lambda p: ("npz:", {}, r"dataset 'npz:' has an empty path"),
    "missing path": lambda p: (
        f"folder:{p}/nope",
        {},
        rf"folder path does not exist: {re.escape(str(p))}/nope",
    ),
    "missing split folder": _missing_test_folder,
    "empty class folder": _empty_class,
    "class folders differ": _class_mismatch,
    "corrupt image": _corrupt_image,
    "npz missing keys": _npz_case(
        {"x_train": X, "y_train": Y}, r"lacks arrays x_test, y_test"
    ),
    "npz length mismatch": _npz_case(
        {"x_train": X, "y_train": Y[:3], "x_test": X, "y_test": Y},
        r"x_train has 4 examples but y_train has 3 labels",
    ),
    "npz label too large": _npz_case(
        {
            "x_train": X,
            "y_train": Y,
            "x_test": X,
            "y_test": [0, 2, 0, 1],
            "class_names": ["a", "b"],
        },
        r"y_test has label 2 at position 1; labels must be in \[0, 2\)",
    ),
    "npz negative label": _npz_case(
        {"x_train": X, "y_train": [0, -1, 0, 1], "x_test": X, "y_test": Y},
        r"y_train has label -1 at position 1",
    ),
    "npz float range": _npz_case(
        {"x_train": X * 1.0 + 255, "y_train": Y, "x_test": X, "y_test": Y},
        r"x_train \(float64\) has values in \[255.0, 255.0\]; "
        r".*floating images in \[0, 1\]",
    ),
    "npz image shape mismatch": _npz_case(
        {"x_train": X, "y_train": Y, "x_test": X[:, :1], "y_test": Y},
        r"train images have shape \(2, 2, 3\) "
        r"but test images have shape \(1, 2, 3\)",
    ),
    "npz not an archive": _not_an_npz,
    "cifar folder without cifar": lambda p: (
        f"cifar:{p}",
        {},
        r"holds no CIFAR python data",
    ),
    "cifar corrupt pickle": _cifar_case(
        _write("data_batch_2", b"garbage"),
        r"cannot unpickle {release}/data_batch_2: ",
    ),
    "cifar missing file": _cifar_case(
        lambda release: os.remove(os.path.join(release, "data_batch_3")),
        r"missing CIFAR file {release}/data_batch_3",
    ),
    "cifar bad data shape": _cifar_case(
        _write(
            "test_batch",
            pickle.dumps(
                {b"data": np.zeros((2, 5), np.uint8), b"labels": [0, 1]}
            ),
        ),
        r"{release}/test_batch: 'data' has shape \(2, 5\); "
        r"expected \[N, 3072\]",
    ),
    "cifar corrupt archive": _corrupt_archive,
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
}


@pytest.mark.parametrize("build", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_bad_input_raises_a_one_line_data_error(tmp_path, build):
    dataset, kwargs, pattern = build(tmp_path)
    with pytest.raises(DataError, match=pattern) as raised:
        make_datasets(dataset, **kwargs)
    assert "\n" not in str(raised.value)
    assert isinstance(raised.value, ValueError)


def test_tfds_failure_is_a_data_error(monkeypatch, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    def unavailable(*args, **kwargs):
        raise ConnectionError("no network\nsecond line")

    monkeypatch.setattr(tfds, "load", unavailable)
    with pytest.raises(
        DataError, match=r"cannot load TFDS dataset 'cifar100' .*: no network$"
    ):
        load_arrays("cifar100", data_dir=str(tmp_path))

"""Small datasets in every supported format, and readers of the pipelines.

Shared by the tests of `selfkd_tf.data` and of each `selfkd_tf.data.sources`
module.
"""

import os
import pickle
import struct

import numpy as np
import pytest
import tensorflow as tf

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)


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


def small_npz(directory):
    """60 training examples in 3 classes of 30/20/10, 12 test examples.

    Returns the dataset string and the arrays written.
    """
    y_train = np.repeat([0, 1, 2], [30, 20, 10])
    np.random.default_rng(1).shuffle(y_train)
    arrays = {
        "x_train": unique_images(60),
        "y_train": y_train,
        "x_test": unique_images(12, seed=1),
        "y_test": np.arange(12) % 3,
        "class_names": np.array(["ant", "bee", "cow"]),
    }
    return write_npz(directory, **arrays), arrays


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


def python2_pickle(value):
    """`value` pickled as Python 2 with numpy 1 did (protocol 2).

    Python 2 `str` (here: `str` and `bytes`) become byte strings, and a numpy
    array is rebuilt by `numpy.core.multiarray._reconstruct`, exactly the
    opcodes of the canonical CIFAR files. Handles dicts, lists, strings, ints
    and uint8 arrays.
    """

    def string(data):
        data = data.encode("latin1") if isinstance(data, str) else data
        if len(data) < 256:
            return b"U" + bytes([len(data)]) + data  # SHORT_BINSTRING
        return b"T" + struct.pack("<i", len(data)) + data  # BINSTRING

    def encode(item):
        if isinstance(item, (str, bytes)):
            return string(item)
        if isinstance(item, int):
            return b"J" + struct.pack("<i", item)  # BININT
        if isinstance(item, list):
            return b"](" + b"".join(map(encode, item)) + b"e"  # APPENDS
        if isinstance(item, dict):
            pairs = b"".join(encode(k) + encode(v) for k, v in item.items())
            return b"}(" + pairs + b"u"  # SETITEMS
        assert isinstance(item, np.ndarray) and item.dtype == np.uint8
        dtype = (
            b"cnumpy\ndtype\n" + string("u1") + b"K\x00K\x01\x87R"
            # The dtype's state: version 3, byte order "|", no fields.
            + b"(K\x03" + string("|") + b"NNNJ\xff\xff\xff\xff"
            + b"J\xff\xff\xff\xffK\x00tb"
        )
        shape = b"(" + b"".join(encode(int(d)) for d in item.shape) + b"t"
        return (
            b"cnumpy.core.multiarray\n_reconstruct\n"
            + b"cnumpy\nndarray\nK\x00\x85" + string("b") + b"\x87R"
            # The array's state: version 1, shape, dtype, C order, bytes.
            + b"(K\x01" + shape + dtype + b"\x89"
            + string(item.tobytes()) + b"tb"
        )

    return b"\x80\x02" + encode(value) + b"."


def write_cifar_release(root, variant, python2=False):
    """Writes a tiny CIFAR python release; returns its folder and contents.

    With `python2`, the files are pickled as Python 2 wrote the canonical ones.
    """
    rng = np.random.default_rng(2)
    if variant == "cifar10":
        folder, meta_file = "cifar-10-batches-py", "batches.meta"
        test_file = "test_batch"
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        names_key, label_key = "label_names", "labels"
        class_names = [f"class{i}" for i in range(10)]
        train_rows = 3
    else:
        folder, meta_file, test_file = "cifar-100-python", "meta", "test"
        train_files = ["train"]
        names_key, label_key = "fine_label_names", "fine_labels"
        class_names = [f"fine{i:02d}" for i in range(100)]
        train_rows = 120
    key = str if python2 else str.encode
    dump = python2_pickle if python2 else pickle.dumps
    release = os.path.join(root, folder)
    os.makedirs(release)
    expected = {}
    for split, files, count in (
        ("train", train_files, train_rows),
        ("test", [test_file], 2),
    ):
        rows, labels = [], []
        for name in files:
            data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
            label = rng.integers(0, len(class_names), count).tolist()
            content = {
                key("data"): data,
                key(label_key): label,
                key("batch_label"): key("x"),
            }
            if variant == "cifar100":
                content[key("coarse_labels")] = [0] * count
            with open(os.path.join(release, name), "wb") as f:
                f.write(dump(content))
            rows.append(data)
            labels.extend(label)
        rows = np.concatenate(rows)
        expected[split] = (
            rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1),
            np.array(labels),
        )
    with open(os.path.join(release, meta_file), "wb") as f:
        f.write(dump({key(names_key): [key(n) for n in class_names]}))
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


def assert_one_line_data_error(dataset, kwargs, pattern):
    """`make_datasets(dataset, **kwargs)` raises a one-line `DataError`."""
    from selfkd_tf.data import DataError, make_datasets

    with pytest.raises(DataError, match=pattern) as raised:
        make_datasets(dataset, **kwargs)
    assert "\n" not in str(raised.value)
    assert isinstance(raised.value, ValueError)


def write_image_folder(root):
    """JPEG, PNG and BMP files: RGB, gray, RGBA, mixed sizes, a stray file.

    Returns the root as a string and the images written, by relative path.
    """
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
        write_image(os.path.join(root, name), image)
    with open(os.path.join(root, "train", "emu", "notes.txt"), "w") as f:
        f.write("not an image")
    return str(root), files


def writes_file(name, content):
    """An edit of a dataset folder: writes `content` to `folder/name`."""

    def edit(folder):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(content)

    return edit


class RunsCommand:
    """Unpickles by running a shell command, as a hostile pickle would."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)
